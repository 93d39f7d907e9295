package acme

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"net/http"
	"time"

	"github.com/go-acme/lego/v4/acme/api"
)

// OrderGate paces one account's new orders (package pace's Gate). The
// client asks it before every newOrder request and tells it the CA's
// answer, whatever CA it is and however it words a refusal: the gate is
// what keeps a batch's workers from sending a herd of orders into a
// Retry-After they were already given.
type OrderGate interface {
	// Acquire returns when a new order may be sent, and done, to be
	// called once with the CA's answer to it; or an error when the wait
	// would pass what the run allows.
	Acquire(ctx context.Context) (done func(OrderAnswer), err error)
}

// OrderAnswer is what the CA said to one new order.
type OrderAnswer struct {
	Limited    bool          // a rateLimited answer
	RetryAfter time.Duration // its Retry-After; 0 when it gave none
	Detail     string        // the problem's detail, which may say its scope
	Failed     bool          // no answer (the request itself failed)
}

// gateTransport sends the new-order requests of one client through its
// OrderGate; every other request passes.
type gateTransport struct {
	ctx      context.Context // the client's: an interrupted run stops waiting
	base     http.RoundTripper
	gate     OrderGate
	newOrder func() string // the directory's newOrder URL, "" until known
}

func (t *gateTransport) RoundTrip(r *http.Request) (*http.Response, error) {
	if r.Method != http.MethodPost || r.URL.String() != t.newOrder() {
		return t.base.RoundTrip(r)
	}
	// lego's requests carry no context of their own: the wait at the
	// gate ends with the client's, or an interrupted batch would let its
	// waiting orders through one by one, each at the spacing a refusal
	// set (70 s for 68 orders), only for each to be refused below.
	ctx, cancel := context.WithCancel(r.Context())
	defer cancel()
	if t.ctx != nil {
		defer context.AfterFunc(t.ctx, cancel)()
	}
	done, err := t.gate.Acquire(ctx)
	if err != nil {
		return nil, err
	}
	resp, err := t.base.RoundTrip(r)
	if err != nil {
		done(OrderAnswer{Failed: true})
		return nil, err
	}
	done(answerOf(resp))
	return resp, nil
}

// answerOf reads a new-order response: a 429 with the rateLimited type
// is a refusal (its detail and Retry-After kept); anything else is not.
func answerOf(resp *http.Response) OrderAnswer {
	if resp.StatusCode != http.StatusTooManyRequests {
		return OrderAnswer{}
	}
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 1<<16))
	resp.Body.Close()
	resp.Body = io.NopCloser(bytes.NewReader(body))
	var p struct {
		Type   string `json:"type"`
		Detail string `json:"detail"`
	}
	json.Unmarshal(body, &p)
	a := OrderAnswer{Limited: true, Detail: p.Detail}
	if d, err := api.ParseRetryAfter(resp.Header.Get("Retry-After")); err == nil && d > 0 {
		a.RetryAfter = d
	}
	return a
}

// newOrderURL is the directory's newOrder URL, or "" before the client
// has read the directory (api.New reads it with a GET: no order yet).
func (c *Client) newOrderURL() string {
	if c.core == nil {
		return ""
	}
	return c.core.GetDirectory().NewOrderURL
}
