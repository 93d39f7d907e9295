package testenv

import (
	"bytes"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"os"
	"path/filepath"
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

	target *url.URL
	tr     *http.Transport
	srv    *http.Server

	mu         sync.Mutex
	fault      Fault
	retryAfter time.Duration
	requests   int
	orders     int
}

// StartCAFront starts a front for p.
func StartCAFront(p *Pebble) (*CAFront, error) {
	root, err := ModuleRoot()
	if err != nil {
		return nil, err
	}
	certs := filepath.Join(root, "testdata", "pebble")
	cert, err := tls.LoadX509KeyPair(filepath.Join(certs, "cert.pem"), filepath.Join(certs, "key.pem"))
	if err != nil {
		return nil, err
	}
	caPEM, err := os.ReadFile(p.CABundle)
	if err != nil {
		return nil, err
	}
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(caPEM)
	target, err := url.Parse(p.DirectoryURL)
	if err != nil {
		return nil, err
	}
	target.Path = ""
	f := &CAFront{target: target, tr: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}, MaxIdleConnsPerHost: 64}}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	f.DirectoryURL = "https://" + ln.Addr().String() + "/dir"
	f.srv = &http.Server{Handler: f, TLSConfig: &tls.Config{Certificates: []tls.Certificate{cert}}, ErrorLog: nullLogger()}
	go f.srv.ServeTLS(ln, "", "")
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
	body, _ := io.ReadAll(io.LimitReader(r.Body, 1<<20))
	r.Body.Close()
	r.Body = io.NopCloser(bytes.NewReader(body))
	r.ContentLength = int64(len(body))
	proxy := &httputil.ReverseProxy{
		Rewrite: func(pr *httputil.ProxyRequest) {
			pr.SetURL(f.target)
			pr.Out.Host = pr.In.Host // Pebble builds its URLs from Host
		},
		Transport: f.tr,
		ErrorLog:  nullLogger(),
	}
	proxy.ServeHTTP(w, r)
}

// refuse answers a new order with rateLimited, with a fresh nonce from
// the CA so that the client's next request is not a badNonce.
func (f *CAFront) refuse(w http.ResponseWriter, ra time.Duration) {
	if resp, err := (&http.Client{Transport: f.tr, Timeout: 10 * time.Second}).Head(f.target.String() + "/nonce-plz"); err == nil {
		resp.Body.Close()
		w.Header().Set("Replay-Nonce", resp.Header.Get("Replay-Nonce"))
	}
	w.Header().Set("Content-Type", "application/problem+json")
	w.Header().Set("Retry-After", fmt.Sprint(int(ra.Seconds())))
	w.WriteHeader(http.StatusTooManyRequests)
	json.NewEncoder(w).Encode(map[string]any{
		"type":   "urn:ietf:params:acme:error:rateLimited",
		"detail": "Service busy: too many requests, retry later",
		"status": http.StatusTooManyRequests,
	})
}
