package acme

import (
	"context"
	"errors"
	"net/http"
	"testing"
	"time"
)

// heldGate never lets an order through: Acquire waits for its context.
type heldGate struct{ waiting chan struct{} }

func (g heldGate) Acquire(ctx context.Context) (func(OrderAnswer), error) {
	g.waiting <- struct{}{}
	<-ctx.Done()
	return nil, ctx.Err()
}

// A new order waiting at the gate stops waiting when the client's
// context ends (an interrupted run), though lego's request carries no
// context: it is neither held until the gate lets it through nor sent.
func TestGateWaitEndsWithTheClient(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	sent := false
	gt := &gateTransport{ctx: ctx, gate: heldGate{make(chan struct{}, 1)},
		base:     roundTripFunc(func(*http.Request) (*http.Response, error) { sent = true; return nil, errors.New("sent") }),
		newOrder: func() string { return "https://ca.test/new-order" }}
	req, _ := http.NewRequest(http.MethodPost, "https://ca.test/new-order", nil)
	errc := make(chan error, 1)
	go func() { _, err := gt.RoundTrip(req); errc <- err }()
	<-gt.gate.(heldGate).waiting
	cancel()
	select {
	case err := <-errc:
		if !errors.Is(err, context.Canceled) || sent {
			t.Fatalf("got %v (sent: %v), want the client's context error and nothing sent", err, sent)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the new order still waits at the gate after the client's context ended")
	}
}

type roundTripFunc func(*http.Request) (*http.Response, error)

func (f roundTripFunc) RoundTrip(r *http.Request) (*http.Response, error) { return f(r) }
