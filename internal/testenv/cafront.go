package testenv

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"sync"
	"time"
)

// Fault is what a CAFront does to the requests it gets.
type Fault int

const (
	// Pass sends every request on to the CA.
	Pass Fault = iota
	// Unavailable answers every request with 503 and an HTML page, as a
	// load balancer in front of a CA that is down does.
	Unavailable
	// RefuseOrders answers every new order with rateLimited and the
	// front's Retry-After, worded as no particular CA words it; the
	// rest passes.
	RefuseOrders
	// Hang reads every request and never answers it, as a CA whose
	// backend stalls behind its load balancer does.
	Hang
)

// CAFront is a reverse proxy in front of a test CA (Pebble) whose
// faults a test switches while lbcert runs against it, and which counts
// what reached it: the CA's own outage, seen from the client.
type CAFront struct {
	// DirectoryURL is the CA's directory through the front.
	DirectoryURL string

	*front

	mu         sync.Mutex
	fault      Fault
	retryAfter time.Duration
	requests   int
	orders     int
}

// StartCAFront starts a front for p.
func StartCAFront(p *Pebble) (*CAFront, error) {
	f := &CAFront{}
	var err error
	if f.front, err = startFront(p, f); err != nil {
		return nil, err
	}
	f.DirectoryURL = f.dirURL
	return f, nil
}

// Set switches the front's fault; retryAfter is RefuseOrders'.
func (f *CAFront) Set(fault Fault, retryAfter time.Duration) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.fault, f.retryAfter = fault, retryAfter
}

// Requests counts every request the front got, whatever it answered.
func (f *CAFront) Requests() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.requests
}

// Orders counts the new orders the front got, whatever it answered.
func (f *CAFront) Orders() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.orders
}

// Stop closes the front.
func (f *CAFront) Stop() { f.srv.Close() }

func (f *CAFront) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	newOrder := r.Method == http.MethodPost && r.URL.Path == "/order-plz"
	f.mu.Lock()
	f.requests++
	if newOrder {
		f.orders++
	}
	fault, ra := f.fault, f.retryAfter
	f.mu.Unlock()
	switch {
	case fault == Hang:
		<-r.Context().Done() // until the client gives up
		return
	case fault == Unavailable:
		w.Header().Set("Content-Type", "text/html")
		w.WriteHeader(http.StatusServiceUnavailable)
		io.WriteString(w, "<html><body><h1>503 Service Unavailable</h1>No server is available to handle this request.</body></html>\n")
		return
	case fault == RefuseOrders && newOrder:
		f.refuse(w, ra)
		return
	}
	f.proxy(w, r)
}

// refuse answers a new order with rateLimited, with a fresh nonce from
// the CA so that the client's next request is not a badNonce.
func (f *CAFront) refuse(w http.ResponseWriter, ra time.Duration) {
	w.Header().Set("Replay-Nonce", f.nonce())
	w.Header().Set("Content-Type", "application/problem+json")
	w.Header().Set("Retry-After", fmt.Sprint(int(ra.Seconds())))
	w.WriteHeader(http.StatusTooManyRequests)
	json.NewEncoder(w).Encode(map[string]any{
		"type":   "urn:ietf:params:acme:error:rateLimited",
		"detail": "Service busy: too many requests, retry later",
		"status": http.StatusTooManyRequests,
	})
}
