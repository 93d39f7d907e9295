package acme

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net"
	"net/url"
	"strings"
	"testing"

	legoacme "github.com/go-acme/lego/v4/acme"
)

// Only the CA's own faults let a fallback take the order; every fault of
// the names or the request would fail at any CA.
func TestCAFault(t *testing.T) {
	problem := func(typ string, status int) error {
		return &legoacme.ProblemDetails{Type: "urn:ietf:params:acme:error:" + typ, Detail: "d", HTTPStatus: status}
	}
	for _, c := range []struct {
		name string
		err  error
		want bool
	}{
		{"refused", &url.Error{Op: "Post", URL: "https://ca/x", Err: &net.OpError{Op: "dial", Err: errors.New("connection refused")}}, true},
		{"reset", errors.New(`Post "https://ca/x": read tcp: connection reset by peer`), true},
		{"closed mid-request", &url.Error{Op: "Post", URL: "https://ca/x", Err: io.EOF}, true},
		{"timeout", errors.New(`Post "https://ca/x": context deadline exceeded (Client.Timeout exceeded while awaiting headers)`), true},
		{"503 problem", Explain(problem("serverInternal", 503)), true},
		{"500 serverInternal", problem("serverInternal", 500), true},
		{"503 page", fmt.Errorf("obtain: 503 :: POST :: https://ca/new-order :: invalid character '<' :: <html>"), true},
		{"directory", fmt.Errorf("ACME server https://ca/dir: get directory at 'https://ca/dir': 502 :: GET :: https://ca/dir"), true},
		// The CA's certificate not trusted, at any request: as lego wraps
		// it, and as go-jose's nonce request keeps only its text.
		{"untrusted mid-order", fmt.Errorf("new order: %w", &url.Error{Op: "Post", URL: "https://ca/order-plz", Err: &tls.CertificateVerificationError{Err: x509.UnknownAuthorityError{}}}), true},
		{"untrusted nonce", errors.New(`register account: failed to post JWS message: failed to sign content: go-jose/go-jose: Error generating nonce: failed to get nonce from HTTP HEAD: Head "https://ca/nonce-plz": tls: failed to verify certificate: x509: certificate has expired or is not yet valid`), true},
		{"tls validation", problem("tls", 403), false},
		{"validation", Explain(problem("incorrectResponse", 403)), false},
		{"caa", problem("caa", 403), false},
		{"rejectedIdentifier", problem("rejectedIdentifier", 400), false},
		{"badCSR", problem("badCSR", 400), false},
		{"rateLimited", &legoacme.RateLimitedError{ProblemDetails: problem("rateLimited", 429).(*legoacme.ProblemDetails), RetryAfter: "60"}, false},
		{"profile", &ProfileError{"--profile x: no"}, false},
		{"account gone", problem("accountDoesNotExist", 400), false},
		{"stalled challenge", &StalledChallengeError{Identifier: "a", Type: "http-01", Problem: &legoacme.ProblemDetails{Type: "urn:ietf:params:acme:error:connection", HTTPStatus: 500}}, false},
	} {
		if strings.HasPrefix(c.name, "untrusted") && FailedValidation(c.err) {
			t.Errorf("%s: counted as a failed validation", c.name)
		}
		if c.name == "tls validation" && !FailedValidation(c.err) {
			t.Errorf("the CA's tls problem is no longer a failed validation")
		}
		if why, got := CAFault(c.err); got != c.want || got && why == "" {
			t.Errorf("%s: CAFault(%v) = %q, %v; want %v", c.name, c.err, why, got, c.want)
		}
	}
	// The reason is short enough for a report line.
	for err, want := range map[error]string{
		errors.New(`obtain a: Post "https://ca/authZ/x": net/http: timeout awaiting response headers`):                             "did not answer (timed out)",
		&url.Error{Op: "Post", URL: "https://ca/x", Err: &net.OpError{Op: "dial", Err: errors.New("connect: connection refused")}}: "did not answer (connection refused)",
		fmt.Errorf("obtain: 503 :: POST :: https://ca/new-order :: invalid character '<'"):                                         "answered HTTP 503",
	} {
		if why, _ := CAFault(err); why != want {
			t.Errorf("CAFault(%v) says %q, want %q", err, why, want)
		}
	}
}
