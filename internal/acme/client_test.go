package acme

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	legoacme "github.com/go-acme/lego/v4/acme"

	"github.com/lbcert/lbcert/internal/hint"
)

// TestPollSoon: only a challenge response (Link rel="up" to its
// authorization) without Retry-After gets one of a second.
func TestPollSoon(t *testing.T) {
	for _, tc := range []struct {
		link, retry, want string
	}{
		{`<https://ca.example/authz/1>;rel="up"`, "", "1"},
		{`<https://ca.example/authz/1>;rel="up"`, "7", "7"},
		{`<https://ca.example/order/1>;rel="up"`, "", ""},
		{`<https://ca.example/dir>;rel="index"`, "", ""},
		{"", "", ""},
	} {
		h := http.Header{}
		if tc.link != "" {
			h.Set("Link", tc.link)
		}
		if tc.retry != "" {
			h.Set("Retry-After", tc.retry)
		}
		pollSoon(h)
		if got := h.Get("Retry-After"); got != tc.want {
			t.Errorf("Link %q Retry-After %q: got %q, want %q", tc.link, tc.retry, got, tc.want)
		}
	}
}

// TestClassify: a rateLimited problem is found through lbcert's own
// explained error, with its Retry-After; validation failures are told
// apart from other CA errors.
func TestClassify(t *testing.T) {
	rl := &legoacme.RateLimitedError{ProblemDetails: &legoacme.ProblemDetails{Type: legoacme.RateLimitedErr, Detail: "too many", HTTPStatus: 429}, RetryAfter: "120"}
	err := explain("obtain a.example.com", fmt.Errorf("wrapped: %w", rl))
	wait, limited := RateLimited(err)
	if !limited || wait != 2*time.Minute {
		t.Fatalf("RateLimited: %v %v", wait, limited)
	}
	if !strings.Contains(hint.Of(err), "rate limit") || !errors.As(err, new(*legoacme.RateLimitedError)) {
		t.Fatalf("explained error lost: %v", err)
	}
	unauth := explain("obtain b.example.com", &legoacme.ProblemDetails{Type: "urn:ietf:params:acme:error:unauthorized", Detail: "404"})
	if !FailedValidation(unauth) {
		t.Fatalf("unauthorized is a failed validation: %v", unauth)
	}
	if _, limited := RateLimited(unauth); limited {
		t.Fatal("unauthorized is not a rate limit")
	}
	if FailedValidation(explain("obtain", &legoacme.ProblemDetails{Type: "urn:ietf:params:acme:error:rejectedIdentifier"})) {
		t.Fatal("rejectedIdentifier is not a failed validation")
	}
}

// An error response to an order that carried "replaces" is retried once
// without it, whatever its status (Pebble answers 500 for some serials);
// a failed validation or a rate limit is not.
func TestReplacesRejected(t *testing.T) {
	cases := []struct {
		err  error
		want bool
	}{
		{&legoacme.ProblemDetails{Type: "urn:ietf:params:acme:error:serverInternal", HTTPStatus: 500, Detail: "could not find an order for the given certificate"}, true},
		{&legoacme.ProblemDetails{Type: "urn:ietf:params:acme:error:malformed", HTTPStatus: 400, Detail: "bad replaces"}, true},
		{&legoacme.AlreadyReplacedError{ProblemDetails: &legoacme.ProblemDetails{HTTPStatus: 409}}, true},
		{&legoacme.ProblemDetails{Type: "urn:ietf:params:acme:error:unauthorized", HTTPStatus: 403, Detail: "404 from the token URL"}, false},
		{&legoacme.RateLimitedError{ProblemDetails: &legoacme.ProblemDetails{Type: legoacme.RateLimitedErr, HTTPStatus: 429}}, false},
		{fmt.Errorf("dial tcp: connection refused"), false},
		// The account, not the "replaces": an order without it fails the
		// same way, and the engine must see the account's own error.
		{&legoacme.ProblemDetails{Type: "urn:ietf:params:acme:error:accountDoesNotExist", HTTPStatus: 400, Detail: "Account not found"}, false},
		{&legoacme.ProblemDetails{Type: "urn:ietf:params:acme:error:userActionRequired", HTTPStatus: 403}, false},
		{&legoacme.ProblemDetails{Type: "urn:ietf:params:acme:error:rejectedIdentifier", HTTPStatus: 400}, false},
	}
	for _, c := range cases {
		if got := replacesRejected(fmt.Errorf("obtain: %w", c.err)); got != c.want {
			t.Errorf("replacesRejected(%v) = %v, want %v", c.err, got, c.want)
		}
	}
}

// A CA problem that says the name did not resolve gets the DNS hint,
// whatever type the CA filed it under, not the port-80 one.
func TestDNSFailureHint(t *testing.T) {
	err := explain("obtain gone.example.com", &legoacme.ProblemDetails{Type: "urn:ietf:params:acme:error:connection", Detail: "DNS problem: NXDOMAIN looking up A for gone.example.com"})
	if h := hint.Of(err); !strings.Contains(h, "could not resolve the name") || strings.Contains(h, "port 80") {
		t.Fatalf("hint %q", h)
	}
	err = explain("obtain up.example.com", &legoacme.ProblemDetails{Type: "urn:ietf:params:acme:error:connection", Detail: "Connection refused"})
	if h := hint.Of(err); !strings.Contains(h, "port 80") {
		t.Fatalf("refused: hint %q", h)
	}
}

// The CA not answering is told apart from the CA answering with a
// problem, a failed validation included (whose detail may say
// "connection refused" about the domain's port 80).
func TestUnreachable(t *testing.T) {
	yes := []error{
		&net.OpError{Op: "dial", Net: "tcp", Err: errors.New("connection refused")},
		fmt.Errorf("Get \"https://ca/dir\": net/http: TLS handshake timeout"),
		fmt.Errorf("ACME server https://ca/dir: dial tcp: lookup ca: no such host"),
	}
	no := []error{
		explain("obtain a.example.com", &legoacme.ProblemDetails{Type: "urn:ietf:params:acme:error:connection", Detail: "Connection refused"}),
		explain("obtain a.example.com", &legoacme.RateLimitedError{ProblemDetails: &legoacme.ProblemDetails{Type: legoacme.RateLimitedErr, HTTPStatus: 429}}),
		errors.New("CA returned a certificate that does not match our private key"),
	}
	for _, e := range yes {
		if !Unreachable(e) {
			t.Errorf("Unreachable(%v) = false", e)
		}
	}
	for _, e := range no {
		if Unreachable(e) {
			t.Errorf("Unreachable(%v) = true", e)
		}
	}
}

// TestProcessingOrderWaitsForRetryAfter: a POST whose answer is an order
// still "processing" with Retry-After is held for that wait (capped),
// its body intact; other answers are not held. The waits are read from
// processingWait, not timed; one real wait is cancelled by the context.
func TestProcessingOrderWaitsForRetryAfter(t *testing.T) {
	var status, retry string
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json; charset=utf-8")
		if retry != "" {
			w.Header().Set("Retry-After", retry)
		}
		fmt.Fprintf(w, `{"status":%q,"finalize":"https://ca.example/finalize/1"}`, status)
	}))
	defer srv.Close()
	for _, tc := range []struct {
		status, retry string
		want          time.Duration
	}{
		{"processing", "1", time.Second},
		{"processing", "3600", maxProcessingWait},
		{"valid", "1", 0},
		{"processing", "", 0},
		{"processing", "soon", 0},
	} {
		status, retry = tc.status, tc.retry
		resp, err := http.Post(srv.URL, "application/jose+json", strings.NewReader("{}"))
		if err != nil {
			t.Fatal(err)
		}
		if d := processingWait(resp.Header, peekJSON(resp)); d != tc.want {
			t.Errorf("%s, Retry-After %q: wait %v, want %v", tc.status, tc.retry, d, tc.want)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if !strings.Contains(string(body), `"status":"`+tc.status+`"`) {
			t.Errorf("%s: body lost: %q", tc.status, body)
		}
	}

	// The transport waits it out, and Ctrl-C during the wait ends it.
	ctx, cancel := context.WithCancel(context.Background())
	status, retry = "processing", "9"
	time.AfterFunc(200*time.Millisecond, cancel)
	req, _ := http.NewRequest(http.MethodPost, srv.URL, strings.NewReader("{}"))
	if _, err := (ctxTransport{ctx: ctx, base: http.DefaultTransport}).RoundTrip(req); !errors.Is(err, context.Canceled) {
		t.Errorf("cancelled wait: %v, want context.Canceled", err)
	}
}
