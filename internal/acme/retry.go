package acme

import (
	"errors"
	"log/slog"
	"math/rand/v2"
	"strings"
	"time"

	legoacme "github.com/go-acme/lego/v4/acme"
	"github.com/go-acme/lego/v4/certificate"
)

// orderTries is how many times one Obtain orders at most: once more
// without "replaces" when the CA refuses it, and again after the CA's
// internal errors.
const orderTries = 5

// order runs lego's order for req, and orders again when the answer was
// not about the names:
//
//   - RFC 9773 section 5: a CA may refuse "replaces" (already replaced,
//     not its certificate, or, as Pebble does for some serials, a 500);
//     renewing matters more than the hint, so it orders without it.
//   - A 5xx serverInternal answer is the CA's own fault and often
//     passing: step-ca (v0.30.2) answers concurrent orders of one
//     account with one when two requests update the account's order
//     index or an authorization at once ("changed since last read"; in
//     a batch of 200, about one order in five met it at --concurrency
//     8, two in three at 50). It orders again after a random pause that
//     grows with each try, so the retries of a burst spread out. Should
//     every try fail, the error starts no failure backoff (caError).
func (c *Client) order(req certificate.ObtainRequest) (*certificate.Resource, error) {
	res, err := c.lego.Certificate.Obtain(req)
	for try := 1; err != nil && try < orderTries; try++ {
		names := strings.Join(req.Domains, ",")
		switch {
		case req.ReplacesCertID != "" && replacesRejected(err):
			slog.Info("the CA refused the order that names the certificate it replaces (ARI); ordering again without it",
				"domains", names, "err", flatten(err.Error()))
			req.ReplacesCertID = ""
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
		res, err = c.lego.Certificate.Obtain(req)
	}
	return res, err
}

// serverFault reports whether err is the CA's answer that it failed
// itself: a 5xx problem, or the serverInternal type.
func serverFault(err error) bool {
	var pd *legoacme.ProblemDetails
	return errors.As(err, &pd) && (pd.HTTPStatus >= 500 || pd.Type == "urn:ietf:params:acme:error:serverInternal")
}

// retryPause is 0.5 to 1.5 s, random, times the try: the orders of a
// burst spread out further each time.
func retryPause(try int) time.Duration {
	return time.Duration(try) * (500*time.Millisecond + rand.N(time.Second))
}
