package acme

import (
	"errors"
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
	msg := err.Error()
	for _, p := range validationProblems {
		if strings.Contains(msg, "urn:ietf:params:acme:error:"+p) || strings.Contains(msg, ": "+p+": ") {
			return true
		}
	}
	return false
}
