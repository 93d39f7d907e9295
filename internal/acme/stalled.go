package acme

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strings"

	legoacme "github.com/go-acme/lego/v4/acme"
)

// StalledChallengeError is a challenge the CA tried, failed and left
// "pending" with its error, instead of marking it "invalid".
//
// RFC 8555 section 7.1.6 moves a challenge from pending through
// processing to valid or invalid, and section 8.2 keeps it "processing"
// while the server retries. step-ca (v0.30.2) instead records a failed
// HTTP-01 fetch (no connection, or an HTTP error status) in the
// challenge's "error" and leaves it "pending"; it validates again only
// when the client posts to the challenge again, never by itself. lego
// polls the authorization until it stops being pending, which then never
// happens: it gave up after 100 Retry-Afters (about 95 s) with "the
// server didn't respond to our request (status=pending)". lbcert reads
// the error at the first poll instead and fails the order with it, as
// Let's Encrypt's "invalid" answer would have; an order retried later
// gets a fresh authorization.
type StalledChallengeError struct {
	Identifier string // the name the authorization is for
	Type       string // the challenge type, http-01
	Problem    *legoacme.ProblemDetails
}

func (e *StalledChallengeError) Error() string {
	return fmt.Sprintf("%s for %s: the CA left the challenge pending with an error: %v", e.Type, e.Identifier, e.Problem)
}

func (e *StalledChallengeError) Unwrap() error { return e.Problem }

// authzJSON is what stalledChallenge reads of an authorization.
type authzJSON struct {
	Status     string `json:"status"`
	Identifier struct {
		Value string `json:"value"`
	} `json:"identifier"`
	Challenges []struct {
		Type   string                   `json:"type"`
		Status string                   `json:"status"`
		Error  *legoacme.ProblemDetails `json:"error"`
	} `json:"challenges"`
}

// stalledChallenge returns the error of a pending authorization whose
// challenge is pending with an error, or nil. body is an ACME response.
func stalledChallenge(body []byte) error {
	if !bytes.Contains(body, []byte(`"challenges"`)) || !bytes.Contains(body, []byte(`"error"`)) {
		return nil // the common case, decided without decoding
	}
	var a authzJSON
	if json.Unmarshal(body, &a) != nil || a.Status != "pending" {
		return nil
	}
	for _, ch := range a.Challenges {
		if ch.Status == "pending" && ch.Error != nil && ch.Error.Type != "" {
			return &StalledChallengeError{Identifier: a.Identifier.Value, Type: ch.Type, Problem: ch.Error}
		}
	}
	return nil
}

// peekJSON reads a small JSON response's body and puts it back, so the
// caller can look at it and lego still reads all of it. It returns nil
// for anything else (a certificate chain, an error, a large body), left
// untouched.
func peekJSON(resp *http.Response) []byte {
	if resp.StatusCode != http.StatusOK || resp.ContentLength > 1<<20 ||
		!strings.HasPrefix(resp.Header.Get("Content-Type"), "application/json") {
		return nil
	}
	orig := resp.Body
	body, err := io.ReadAll(io.LimitReader(orig, 1<<20))
	// Put back what was read, in front of whatever was not.
	resp.Body = struct {
		io.Reader
		io.Closer
	}{io.MultiReader(bytes.NewReader(body), orig), orig}
	if err != nil || len(body) == 1<<20 {
		return nil
	}
	return body
}
