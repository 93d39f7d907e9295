package acme

import (
	"errors"
	"fmt"
	"net"
	"strings"
	"testing"
	"time"

	legoacme "github.com/go-acme/lego/v4/acme"

	"github.com/lbcert/lbcert/internal/hint"
)

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

// An error response to an order that carried "replaces" is the CA
// refusing the hint, whatever its status (Pebble answers 500 for some
// serials), so the engine orders again without it; a failed validation
// or a rate limit is not.
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
		// The new-order request's answer may be about "replaces"; a
		// finalize's 5xx is the CA's own fault, whatever its type.
		{&legoacme.ProblemDetails{Type: "urn:ietf:params:acme:error:serverInternal", HTTPStatus: 500, URL: "https://ca.test/new-order"}, true},
		{&legoacme.ProblemDetails{Type: "urn:ietf:params:acme:error:serverInternal", HTTPStatus: 500, URL: "https://ca.test/finalize/1/2"}, false},
		{&legoacme.ProblemDetails{Type: "urn:ietf:params:acme:error:malformed", HTTPStatus: 400, URL: "https://ca.test/finalize/1/2"}, false},
	}
	for _, c := range cases {
		if got := replacesRejected(fmt.Errorf("obtain: %w", c.err), "https://ca.test/new-order"); got != c.want {
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
