package acme

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	legoacme "github.com/go-acme/lego/v4/acme"

	"github.com/lbcert/lbcert/internal/hint"
)

// stepCAStalled is step-ca v0.30.2's authorization for a name it could
// not fetch the HTTP-01 token from, as it answers it.
const stepCAStalled = `{"identifier":{"type":"dns","value":"gone.example.net"},"status":"pending",` +
	`"challenges":[{"type":"http-01","status":"pending","token":"t","url":"https://ca/acme/acme/challenge/a/b",` +
	`"error":{"type":"urn:ietf:params:acme:error:connection","detail":"The server could not connect to validation target"}}],` +
	`"wildcard":false,"expires":"2026-12-04T10:00:00Z"}`

// Only a pending authorization whose challenge is pending with an error
// stalls; a challenge the CA is still working on, a failed one (lego
// reads "invalid" itself) and anything that is not an authorization go
// on to lego untouched.
func TestStalledChallenge(t *testing.T) {
	for _, tc := range []struct {
		name, body string
		stalled    bool
	}{
		{"step-ca connection", stepCAStalled, true},
		{"pending, no error", `{"identifier":{"value":"a.example"},"status":"pending","challenges":[{"type":"http-01","status":"pending"}]}`, false},
		{"processing with an error: the CA retries", `{"identifier":{"value":"a.example"},"status":"pending","challenges":[{"type":"http-01","status":"processing","error":{"type":"urn:ietf:params:acme:error:connection"}}]}`, false},
		{"invalid", `{"identifier":{"value":"a.example"},"status":"invalid","challenges":[{"type":"http-01","status":"invalid","error":{"type":"urn:ietf:params:acme:error:unauthorized"}}]}`, false},
		{"valid", `{"identifier":{"value":"a.example"},"status":"valid","challenges":[{"type":"http-01","status":"valid"}]}`, false},
		{"an order", `{"status":"pending","authorizations":["x"],"finalize":"y"}`, false},
		{"empty error", `{"status":"pending","challenges":[{"status":"pending","error":{}}]}`, false},
		{"not JSON", `"challenges" "error"`, false},
		{"nothing", ``, false},
	} {
		err := stalledChallenge([]byte(tc.body))
		if (err != nil) != tc.stalled {
			t.Errorf("%s: stalled = %v, want %v", tc.name, err, tc.stalled)
		}
	}
}

// Polled through the client's transport, step-ca's stalled authorization
// ends the order at once with the CA's own error: the name, the problem
// and its detail, a failed validation (it counts against the name) and
// not an unreachable CA, with the hint for a connection failure that
// also covers the HTTP error statuses step-ca files under it.
func TestStalledChallengeEndsThePoll(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		fmt.Fprint(w, stepCAStalled)
	}))
	defer srv.Close()
	c := &http.Client{Transport: ctxTransport{ctx: context.Background(), base: http.DefaultTransport}}
	_, err := c.Post(srv.URL, "application/jose+json", strings.NewReader("{}"))
	var st *StalledChallengeError
	if !errors.As(err, &st) || st.Identifier != "gone.example.net" || st.Type != "http-01" {
		t.Fatalf("poll: %v", err)
	}
	// As lego wraps it on its way back from Obtain.
	err = explain("obtain gone.example.net", fmt.Errorf("error: one or more domains had a problem:\n[gone.example.net] %w", err))
	want := "obtain gone.example.net: http-01 for gone.example.net: connection: The server could not connect to validation target"
	if err.Error() != want {
		t.Errorf("message:\n got %s\nwant %s", err, want)
	}
	if h := hint.Of(err); !strings.Contains(h, "could not connect on port 80") || !strings.Contains(h, "404") {
		t.Errorf("hint: %q", h)
	}
	if !FailedValidation(err) || Unreachable(err) {
		t.Errorf("FailedValidation %v, Unreachable %v: want a failed validation of a CA that answered", FailedValidation(err), Unreachable(err))
	}

	// A pending authorization without an error is passed on as it came.
	srv2 := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		fmt.Fprint(w, `{"identifier":{"value":"a.example"},"status":"pending","challenges":[{"type":"http-01","status":"pending"}]}`)
	}))
	defer srv2.Close()
	resp, err := c.Post(srv2.URL, "application/jose+json", strings.NewReader("{}"))
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
}

// step-ca files a wrong answer to HTTP-01 as rejectedIdentifier on the
// challenge (its generic detail: "will not issue certificates for the
// identifier"). As lego reports it, that is a failed validation with the
// wrong-answer hint; the same problem answering the order itself is the
// CA's policy, as before.
func TestRejectedChallengeIsAWrongAnswer(t *testing.T) {
	pd := &legoacme.ProblemDetails{Type: "urn:ietf:params:acme:error:rejectedIdentifier", Detail: "The server will not issue certificates for the identifier", HTTPStatus: 400}
	for _, lego := range []string{"invalid challenge: %w", "invalid authorization: %w"} {
		err := explain("obtain wrong.example.net", fmt.Errorf("error: one or more domains had a problem:\n[wrong.example.net] "+lego, pd))
		if !FailedValidation(err) || !strings.Contains(hint.Of(err), "got the wrong answer") {
			t.Errorf("%q: FailedValidation %v, hint %q", lego, FailedValidation(err), hint.Of(err))
		}
	}
	err := explain("obtain blocked.example.net", fmt.Errorf("new order: %w", pd))
	if FailedValidation(err) || !strings.Contains(hint.Of(err), "policy or blocklist") {
		t.Errorf("order refused: FailedValidation %v, hint %q", FailedValidation(err), hint.Of(err))
	}
}

// A registration refused while binding an external account gets a hint
// about the key, whatever the CA called the problem (step-ca: a 500 for
// an unknown, wrong or already bound key); without EAB, or when the CA
// did not answer at all, it does not.
func TestRegisterErrorHint(t *testing.T) {
	pd := &legoacme.ProblemDetails{Type: "urn:ietf:params:acme:error:serverInternal", Detail: "The server experienced an internal error", HTTPStatus: 500}
	err := registerError(pd, Options{Email: "ops@example.com", EABKid: "kid-7"})
	if err.Error() != "register account ops@example.com: serverInternal: The server experienced an internal error" ||
		!strings.Contains(hint.Of(err), "EAB key ID kid-7") {
		t.Errorf("with EAB: %v / %q", err, hint.Of(err))
	}
	if err := registerError(pd, Options{Email: "ops@example.com"}); strings.Contains(hint.Of(err), "EAB") {
		t.Errorf("without EAB: %q", hint.Of(err))
	}
	down := fmt.Errorf("post: %w", &net.OpError{Op: "dial", Err: errors.New("connection refused")})
	if err := registerError(down, Options{EABKid: "kid-7"}); strings.Contains(hint.Of(err), "EAB") {
		t.Errorf("CA down: %q", hint.Of(err))
	}
}

// A CA's own failure (5xx, serverInternal) is retried by order and,
// when it persists, starts no backoff; the names' faults and rate limits
// are neither; an explained error keeps the NoBackoff of what it wraps.
func TestServerFault(t *testing.T) {
	for _, tc := range []struct {
		err    error
		server bool
	}{
		{&legoacme.ProblemDetails{Type: "urn:ietf:params:acme:error:serverInternal", HTTPStatus: 500}, true},
		{&legoacme.ProblemDetails{Type: "urn:ietf:params:acme:error:malformed", HTTPStatus: 503}, true},
		{&legoacme.ProblemDetails{Type: "urn:ietf:params:acme:error:unauthorized", HTTPStatus: 403}, false},
		{&legoacme.RateLimitedError{ProblemDetails: &legoacme.ProblemDetails{Type: legoacme.RateLimitedErr, HTTPStatus: 429}}, false},
		{errors.New("connection refused"), false},
	} {
		wrapped := fmt.Errorf("obtain: %w", tc.err)
		var nb interface{ NoBackoff() bool }
		explained := explain("obtain a.example", wrapped)
		if serverFault(wrapped) != tc.server || !errors.As(explained, &nb) || nb.NoBackoff() != tc.server {
			t.Errorf("%v: serverFault %v, want %v", tc.err, serverFault(wrapped), tc.server)
		}
	}
	inner := explain("obtain", &ProfileError{"--profile x"})
	var nb interface{ NoBackoff() bool }
	if !errors.As(inner, &nb) || !nb.NoBackoff() {
		t.Error("an explained error hid the NoBackoff of the error it wraps")
	}
	for try := 1; try < orderTries; try++ {
		if p := retryPause(try); p < time.Duration(try)*500*time.Millisecond || p >= time.Duration(try)*1500*time.Millisecond {
			t.Errorf("retryPause(%d) = %v", try, p)
		}
	}
}
