package acme

import (
	"errors"
	"math/rand/v2"
	"regexp"
	"time"

	legoacme "github.com/go-acme/lego/v4/acme"
	"github.com/go-acme/lego/v4/certificate"
)

// OrderTries is how many orders one name gets from a CA at most in a
// run when the CA fails them itself (a 5xx before the finalize; the
// engine orders again, each order reserved in the rate budget), and how
// many times a finalize is tried and a certificate fetched.
const OrderTries = 5

// orderTries is OrderTries, as this package's loops say it.
const orderTries = OrderTries

// order runs one order for req (obtainOrder). It never orders again
// itself: another order is one the CA counts, so the engine decides it
// (after a 5xx, RetryPause apart) and reserves it in the rate budget. A
// refused "replaces" is told apart here (replacesError) for the engine.
func (c *Client) order(req certificate.ObtainRequest) (*certificate.Resource, error) {
	res, err := c.obtainOrder(req)
	if err != nil && !MayHaveIssued(err) && req.ReplacesCertID != "" && replacesRejected(err, c.core.GetDirectory().NewOrderURL) {
		// Finalized orders are not asked: a 409 there is not about
		// "replaces".
		return nil, &replacesError{err}
	}
	return res, err
}

// FinalizeRefused reports whether every finalize of an order failed
// while it stayed ready: nothing was issued, and another order at the
// same CA would meet the same finalize.
func FinalizeRefused(err error) bool { return errors.As(err, new(*finalizeRefused)) }

// OrderNotPlaced reports whether err came before the CA created an
// order: before the new-order request was sent, or from the CA's answer
// refusing it. Nothing of the order counts at the CA.
func OrderNotPlaced(err error) bool { return errors.As(err, new(*notPlacedError)) }

// notPlacedError is an order's error from before the CA created it.
type notPlacedError struct{ error }

func (e *notPlacedError) Unwrap() error { return e.error }

// serverFault reports whether err is the CA's answer that it failed
// itself: a 5xx problem, the serverInternal type, or a 5xx whose body
// is no problem document at all (a proxy's "503 Service Unavailable"
// page in front of a CA that is down, which lego reports as
// "503 :: POST :: URL :: ..."). A challenge the CA judged is never one.
func serverFault(err error) bool {
	if err == nil || challengeAnswer(err) {
		return false
	}
	var pd *legoacme.ProblemDetails
	if errors.As(err, &pd) {
		return pd.HTTPStatus >= 500 || pd.Type == "urn:ietf:params:acme:error:serverInternal"
	}
	return plain5xx.MatchString(err.Error())
}

// plain5xx is lego's wording of an error status without a problem
// document: "503 :: GET :: URL" or "503 ::GET :: URL".
var plain5xx = regexp.MustCompile(`(^|[^0-9])(5[0-9][0-9]) ::`)

// RetryPause is retryPause, for the engine's orders again.
func RetryPause(try int) time.Duration { return retryPause(try) }

// retryPause is 0.5 to 1.5 s, random, times the try: the orders of a
// burst spread out further each time.
func retryPause(try int) time.Duration {
	return time.Duration(try) * (500*time.Millisecond + rand.N(time.Second))
}
