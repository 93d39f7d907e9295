package acme

import (
	"crypto/tls"
	"errors"
	"net"
	"net/url"
	"strings"
	"time"

	legoacme "github.com/go-acme/lego/v4/acme"
	"github.com/go-acme/lego/v4/acme/api"

	"github.com/lbcert/lbcert/internal/hint"
)

// caError is an explained CA error that keeps the CA's own error in the
// chain, so callers can still ask what kind of problem it was.
type caError struct {
	explained *hint.Error
	cause     error
	// challenge: the CA's verdict on a challenge (challengeAnswer),
	// which the explained message no longer says in lego's words.
	challenge bool
	// server: the CA said it failed itself (serverFault).
	server bool
}

// NoBackoff tells the engine that a CA that failed itself (a 5xx, even
// after order's retries) is not the names' fault, nor is what the
// error it explains says is not.
func (e *caError) NoBackoff() bool {
	var nb interface{ NoBackoff() bool }
	return e.server || errors.As(e.cause, &nb) && nb.NoBackoff()
}

func (e *caError) Error() string   { return e.explained.Error() }
func (e *caError) Unwrap() []error { return []error{e.explained, e.cause} }

// RateLimited reports whether err is the CA's rateLimited answer, and for
// how long it asked to wait (0 when it did not say).
func RateLimited(err error) (time.Duration, bool) {
	var rl *legoacme.RateLimitedError
	if errors.As(err, &rl) {
		d, _ := api.ParseRetryAfter(rl.RetryAfter)
		return d, true
	}
	var pd *legoacme.ProblemDetails
	if errors.As(err, &pd) && pd.Type == legoacme.RateLimitedErr {
		return 0, true
	}
	return 0, false
}

// CATimeout bounds connecting to the CA and its TLS handshake.
const CATimeout = 30 * time.Second

// Unreachable reports whether err means the CA did not answer at all
// (refused, timed out, no route, name not found, TLS never finished), as
// opposed to answering with a problem. A run that meets this a few times
// in a row stops ordering from that CA: the domains are not at fault.
func Unreachable(err error) bool {
	if err == nil {
		return false
	}
	var pd *legoacme.ProblemDetails
	if errors.As(err, &pd) || FailedValidation(err) || strings.Contains(err.Error(), "urn:ietf:params:acme:error:") {
		return false // the CA answered (a validation that could not connect is the domain's matter)
	}
	if _, limited := RateLimited(err); limited {
		return false
	}
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		return true
	}
	var op *net.OpError
	if errors.As(err, &op) {
		return true
	}
	msg := err.Error()
	for _, s := range []string{"connection refused", "i/o timeout", "TLS handshake timeout", "no such host", "Client.Timeout exceeded", "network is unreachable", "connection reset",
		"timeout awaiting response headers"} {
		if strings.Contains(msg, s) {
			return true
		}
	}
	return false
}

// AccountGone reports whether the CA says it does not know the account
// (it lost its database, as a restarted Pebble does, or deactivated it).
func AccountGone(err error) bool {
	var pd *legoacme.ProblemDetails
	if errors.As(err, &pd) && pd.Type == "urn:ietf:params:acme:error:accountDoesNotExist" {
		return true
	}
	return err != nil && strings.Contains(err.Error(), "accountDoesNotExist")
}

// validationProblems are the problem types of a failed authorization:
// the CA tried the name and did not get the right answer.
var validationProblems = []string{"unauthorized", "incorrectResponse", "connection", "dns", "caa", "tls"}

// FailedValidation reports whether err means an authorization failed,
// which the CA counts against the name.
func FailedValidation(err error) bool {
	if challengeAnswer(err) {
		return true
	}
	// A request of ours that got no answer validated nothing, whatever
	// its text: an untrusted CA's "tls: failed to verify certificate"
	// read as the tls problem spent the name's failed-validation budget
	// and kept the fallback CA from taking the order.
	var ue *url.Error
	if errors.As(err, &ue) || untrustedCA(err) {
		return false
	}
	msg := err.Error()
	for _, p := range validationProblems {
		if strings.Contains(msg, "urn:ietf:params:acme:error:"+p) || strings.Contains(msg, ": "+p+": ") {
			return true
		}
	}
	return false
}

// untrustedCA reports whether err is our TLS client refusing the CA's
// certificate (untrusted, expired, for another name). Some of lego's
// paths keep only its text (go-jose's nonce request formats it with %v);
// a problem document the CA sent about a validation names its type in
// full and is not this.
func untrustedCA(err error) bool {
	var cv *tls.CertificateVerificationError
	if errors.As(err, &cv) {
		return true
	}
	msg := err.Error()
	return strings.Contains(msg, "tls: failed to verify certificate") && !strings.Contains(msg, "urn:ietf:params:acme:error:")
}

// Refused reports whether the CA answered the order with a problem
// document other than its own failure: it refused the names (for
// example rejectedIdentifier: its policy forbids them), the CSR, or the
// request. No certificate was issued, so none counts against the
// registered domain or the exact set of names.
func Refused(err error) bool {
	if err == nil || strings.Contains(err.Error(), "urn:ietf:params:acme:error:serverInternal") {
		return false
	}
	var pd *legoacme.ProblemDetails
	return errors.As(err, &pd) || strings.Contains(err.Error(), "urn:ietf:params:acme:error:")
}

// ProblemDetail is the detail of the CA's problem document in err, or
// err's text when there is none.
func ProblemDetail(err error) string {
	var pd *legoacme.ProblemDetails
	if errors.As(err, &pd) {
		return pd.Detail
	}
	var rl *legoacme.RateLimitedError
	if errors.As(err, &rl) && rl.ProblemDetails != nil {
		return rl.Detail
	}
	if err == nil {
		return ""
	}
	return err.Error()
}

// replacesError is the CA's refusal of an order that carried "replaces",
// for a reason an order without it may not meet (replacesRejected).
type replacesError struct{ error }

func (e *replacesError) Unwrap() error { return e.error }

// MayHaveIssued reports whether err came once the order's finalize
// request was sent (its answer, a poll of the order, the download, a
// dropped connection, a stop): the CA may have issued a certificate the
// client never got. Such an order is not placed again in the same run,
// and the tokens and ledger place it took stay spent, as for a run killed
// at that point: the CA counts what it issued. The order flow marks it
// (finalizedError); a URL says nothing (a CA named certs.example.com).
func MayHaveIssued(err error) bool {
	return errors.As(err, new(*finalizedError))
}

// ReplacesRefused reports whether the CA refused an order because of
// its "replaces" field (RFC 9773 section 5): the certificate was already
// replaced (409 alreadyReplaced), or it was issued under another account
// than the one ordering ("requester account did not request the
// certificate being replaced", after a fleet's account changed). The
// order is good without it: certmagic#361 left certificates to expire by
// giving up here instead.
func ReplacesRefused(err error) bool {
	if err == nil {
		return false
	}
	if MayHaveIssued(err) {
		return false // after finalize: no refusal of the order's "replaces"
	}
	if errors.As(err, new(*replacesError)) {
		return true
	}
	var pd *legoacme.ProblemDetails
	if errors.As(err, &pd) && (pd.Type == "urn:ietf:params:acme:error:alreadyReplaced" || pd.HTTPStatus == 409) {
		return true
	}
	msg := err.Error()
	return strings.Contains(msg, "alreadyReplaced") || strings.Contains(msg, "being replaced") ||
		strings.Contains(msg, "replaces") && strings.Contains(msg, "urn:ietf:params:acme:error:")
}

// challengeAnswer reports whether err is the CA's verdict on a challenge
// (lego's "invalid challenge" or "invalid authorization"), whatever
// problem type the CA filed it under, or a challenge it left pending with
// an error.
func challengeAnswer(err error) bool {
	var st *StalledChallengeError
	var ce *caError
	if errors.As(err, &st) || errors.As(err, &ce) && ce.challenge {
		return true
	}
	msg := err.Error()
	return strings.Contains(msg, "invalid challenge: ") || strings.Contains(msg, "invalid authorization: ")
}
