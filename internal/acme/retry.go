package acme

import (
	"errors"
	"log/slog"
	"math/rand/v2"
	"regexp"
	"strings"
	"time"

	legoacme "github.com/go-acme/lego/v4/acme"
	"github.com/go-acme/lego/v4/certificate"
)

// orderTries is how many times one Obtain orders at most: again after
// the CA's internal errors.
const orderTries = 5

// order runs one order for req (obtainOrder), and orders again when the answer was
// not about the names:
//
//   - A 5xx serverInternal answer is the CA's own fault and often
//     passing: step-ca (v0.30.2) answers concurrent orders of one
//     account with one when two requests update the account's order
//     index or an authorization at once ("changed since last read"; in
//     a batch of 200, about one order in five met it at --concurrency
//     8, two in three at 50). It orders again after a random pause that
//     grows with each try, so the retries of a burst spread out. Should
//     every try fail, the error starts no failure backoff (caError).
func (c *Client) order(req certificate.ObtainRequest) (*certificate.Resource, error) {
	res, err := c.obtainOrder(req)
	for try := 1; err != nil && try < orderTries; try++ {
		names := strings.Join(req.Domains, ",")
		switch {
		case MayHaveIssued(err):
			// Finalized: the CA may have issued, and another order would
			// be another certificate for the same names, whatever the
			// answer says (a 409 there is not about "replaces").
			return nil, err
		case errors.As(err, new(*finalizeRefused)):
			return nil, err // another order would meet the same finalize
		case req.ReplacesCertID != "" && replacesRejected(err, c.core.GetDirectory().NewOrderURL):
			return nil, &replacesError{err}
		case serverFault(err):
			slog.Info("the CA answered the order with an internal error; ordering again", "domains", names, "err", flatten(err.Error()))
			select {
			case <-time.After(retryPause(try)):
			case <-c.ctx.Done():
				return nil, err
			}
		default:
			return nil, err
		}
		res, err = c.obtainOrder(req)
	}
	return res, err
}

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

// retryPause is 0.5 to 1.5 s, random, times the try: the orders of a
// burst spread out further each time.
func retryPause(try int) time.Duration {
	return time.Duration(try) * (500*time.Millisecond + rand.N(time.Second))
}
