package acme

import (
	"errors"
	"net/http"
	"sync"
	"time"

	"github.com/go-acme/lego/v4/certificate"
)

// A CA that dies while orders are in flight leaves lego polling each of
// them until its 90 s certificate timeout, every error included, and
// only then does the order fail. With a fallback to go to
// (Options.FailFast), a client watches its own requests instead: after
// downStreak answers in a row that are the CA's own faults (no answer,
// a 5xx), spread over at least downSpan, the orders in flight give up
// at once with ErrCADown and the fallback takes them; lego's loop runs
// out in the background, harmlessly.
const (
	downStreak = 8
	downSpan   = 3 * time.Second
)

// ErrCADown is an order abandoned because its CA stopped answering
// every request mid-order.
var ErrCADown = errors.New("the CA stopped answering while the order was in flight")

// downDetector counts the CA's failed answers in a row.
type downDetector struct {
	mu     sync.Mutex
	streak int
	first  time.Time
	ch     chan struct{} // closed when a streak crosses the bar
}

// watch returns a channel closed when the CA is next found down.
func (d *downDetector) watch() <-chan struct{} {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.ch == nil {
		d.ch = make(chan struct{})
	}
	return d.ch
}

func (d *downDetector) result(fault bool) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if !fault {
		d.streak = 0
		return
	}
	now := time.Now()
	if d.streak == 0 {
		d.first = now
	}
	d.streak++
	if d.streak >= downStreak && now.Sub(d.first) >= downSpan && d.ch != nil {
		close(d.ch)
		d.ch, d.streak = nil, 0
	}
}

// watchTransport tells the detector how each request went.
type watchTransport struct {
	base http.RoundTripper
	d    *downDetector
}

func (t watchTransport) RoundTrip(r *http.Request) (*http.Response, error) {
	resp, err := t.base.RoundTrip(r)
	switch {
	case err != nil:
		t.d.result(r.Context().Err() == nil && (Unreachable(err) || closedConnection(err)))
	default:
		t.d.result(resp.StatusCode >= 500)
	}
	return resp, err
}

// orderWatched is order, given up when the CA is found down meanwhile.
func (c *Client) orderWatched(req certificate.ObtainRequest) (*certificate.Resource, error) {
	if c.down == nil {
		return c.order(req)
	}
	type result struct {
		res *certificate.Resource
		err error
	}
	down := c.down.watch()
	done := make(chan result, 1)
	go func() {
		res, err := c.order(req)
		done <- result{res, err}
	}()
	select {
	case r := <-done:
		return r.res, r.err
	case <-down:
		return nil, ErrCADown
	}
}
