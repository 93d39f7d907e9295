package acme

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"regexp"
	"strings"
	"sync"
	"syscall"
	"time"

	legoacme "github.com/go-acme/lego/v4/acme"
	"github.com/go-acme/lego/v4/acme/api"
	"github.com/go-acme/lego/v4/certcrypto"
	"github.com/go-acme/lego/v4/certificate"
	"github.com/go-acme/lego/v4/challenge"
)

// One order from new-order to certificate (RFC 8555 section 7.4),
// through lego's api calls and with lbcert's own waits. It replaces
// lego's Certifier.Obtain, which waits where the protocol does not ask
// it to (traced request by request in internal/bench, #29): 1/18 s
// before each authorization fetch; one name's validation after the
// other's; a first authorization poll at once after the challenge, before
// the CA has fetched the token (Pebble then answers "pending" with
// Retry-After, and lego backs off from a randomized 1 s), or 5 s later
// when the CA gives no Retry-After; and, for a processing order, a poll at
// once and then every 1.5 s whatever the CA said. Here:
//
//   - every authorization is fetched, and every challenge answered, at
//     once and in parallel;
//   - the first poll of an authorization comes when the CA said
//     (Retry-After on the challenge's answer), else just after lbcert's
//     own responder has served the token to the CA (section 7.5.1: a
//     client that can tell when the server has validated SHOULD NOT poll
//     before it has seen the validation request), else on the schedule
//     below;
//   - every later poll of an authorization or of a processing order
//     comes exactly at the CA's Retry-After, never before it, and
//     without one on a schedule of 250 ms doubling to 5 s;
//   - a finalize answer that is already valid is not polled at all;
//   - only the certificate URL is fetched, not its alternates, unless a
//     preferred chain has to be chosen among them.
const (
	// orderWait bounds each phase's polling (validation, issuance).
	orderWait = 90 * time.Second
	// firstPoll and maxPoll shape the schedule without Retry-After.
	firstPoll = 250 * time.Millisecond
	maxPoll   = 5 * time.Second
)

// fetchSettle is how long after lbcert's responder has served the token
// the first poll comes: the CA checks what it fetched and records the
// result in that time. Too early a poll finds the challenge processing,
// and then the CA's Retry-After (1 s at Pebble) is the wait. Measured
// over batches of 200 against Pebble on a loaded 2-core machine
// (authorization requests per order, 2 when the first poll finds it
// valid): 0 ms 2.35, 10 ms 2.03, 25 ms 2.00 to 2.10, 50 ms 2.00 to 2.01.
var fetchSettle = 50 * time.Millisecond

// fetchWatcher is a challenge provider that can tell when the CA has
// fetched a token: a channel closed at the first fetch, or nil when it
// cannot tell (a webroot is served by the web server).
type fetchWatcher interface {
	Fetched(domain, token string) <-chan struct{}
}

// obtainOrder places one order for req and returns its certificate.
func (c *Client) obtainOrder(req certificate.ObtainRequest) (*certificate.Resource, error) {
	order, err := c.core.Orders.NewWithOptions(req.Domains, &api.OrderOptions{Profile: req.Profile, ReplacesCertID: req.ReplacesCertID})
	if err != nil {
		if answered(err) && !serverFault(err) || notSent(err) {
			// The CA refused the order, or never saw it: none was
			// created. A 5xx or a dropped answer may hide one that
			// was (a gateway's 500 after the CA created it).
			err = &notPlacedError{err}
		}
		return nil, err
	}
	if err := c.authorize(order); err != nil {
		return nil, err
	}
	cn := ""
	if len(req.Domains[0]) <= 64 {
		cn = req.Domains[0]
	}
	san := []string{}
	if cn != "" {
		san = append(san, cn)
	}
	for _, id := range order.Identifiers {
		if id.Value != cn {
			san = append(san, id.Value)
		}
	}
	csr, err := certcrypto.CreateCSR(req.PrivateKey, certcrypto.CSROptions{Domain: cn, SAN: san})
	if err != nil {
		return nil, err
	}
	// From here the CA may issue: whatever fails (the finalize answer, a
	// poll of the order, the download, a dropped connection, a stop)
	// says so (MayHaveIssued).
	var certURL string
	o, err := c.core.Orders.UpdateForCSR(order.Finalize, csr)
	if err != nil && notSent(err) {
		return nil, err // the CA never saw it: a failure like any before
	}
	if err == nil {
		certURL, err = c.awaitIssued(order, o, c.hints.take(order.Finalize))
	}
	if err != nil {
		if certURL, err = c.afterFailedFinalize(order, csr, err); err != nil {
			return nil, err
		}
	}
	return c.fetchIssued(certURL, req)
}

// fetchIssued downloads the certificate the CA has issued, trying again
// after a failure, paused as the order's own retries are: a GET costs
// nothing the CA counts, while giving up leaves a certificate the CA
// counts against the names and no one holds.
func (c *Client) fetchIssued(certURL string, req certificate.ObtainRequest) (*certificate.Resource, error) {
	var err error
	for try := 1; try <= orderTries; try++ {
		if try > 1 {
			select {
			case <-time.After(retryPause(try - 1)):
			case <-c.ctx.Done():
				return nil, AfterFinalize(err)
			}
		}
		var res *certificate.Resource
		if res, err = c.download(certURL, req); err == nil {
			return res, nil
		}
		if c.ctx.Err() != nil {
			break
		}
	}
	return nil, AfterFinalize(err)
}

// notSent reports whether a request failed before it reached the CA:
// no nonce could be had (lego signs before it posts), or no connection
// was made (a CA killed mid-batch). A dropped connection or a timeout
// after the request went out may have reached it, and is not one of
// these; nor is any answer of the CA's, whatever its detail says (a 500
// to a finalize reading "storing certificate: dial tcp ...: connection
// refused" came after the CA took it).
func notSent(err error) bool {
	if answered(err) {
		return false
	}
	var op *net.OpError
	if errors.As(err, &op) && op.Op == "dial" || errors.As(err, new(*net.DNSError)) || errors.Is(err, syscall.ECONNREFUSED) {
		return true
	}
	msg := err.Error()
	return strings.Contains(msg, "failed to sign content") || strings.Contains(msg, "Error generating nonce") ||
		strings.Contains(msg, "failed to get nonce") || strings.Contains(msg, "connect: connection refused") || strings.Contains(msg, "no such host")
}

// answered reports whether err is the CA's answer: a problem document,
// or an HTTP error status without one.
func answered(err error) bool {
	var pd *legoacme.ProblemDetails
	return errors.As(err, &pd) || answeredStatus.MatchString(err.Error())
}

// answeredStatus is lego's wording of an HTTP error status the CA
// answered without a problem document: "500 :: POST :: URL".
var answeredStatus = regexp.MustCompile(`(^|[^0-9])[1-5][0-9][0-9] ::`)

// afterFailedFinalize looks at the order whose finalize failed (ferr):
// the CA may have issued (valid, or processing and then valid: the
// certificate is fetched, not ordered again), may still issue on the same order (ready: finalized again;
// step-ca answers concurrent finalizes with a 500 now and then), or has
// failed the order (invalid: nothing issued, and another order may go).
// Any other answer, or none, is "may have issued".
func (c *Client) afterFailedFinalize(order legoacme.ExtendedOrder, csr []byte, ferr error) (string, error) {
	// step-ca answers two updates of one order at once with a 500: the
	// look and the finalize again are tried a few times, paused as the
	// order's own retries are.
	ready := false             // the last look found the order ready, and finalized it again
	refused := caRefusal(ferr) // every finalize so far answered by the CA itself
	for try := 1; try <= orderTries && order.Location != ""; try++ {
		if c.ctx.Err() != nil {
			break
		}
		if try > 1 {
			select {
			case <-time.After(retryPause(try - 1)):
			case <-c.ctx.Done():
				return "", AfterFinalize(ferr)
			}
		}
		o, err := c.core.Orders.Get(order.Location)
		ready = err == nil && o.Status == legoacme.StatusReady
		switch {
		case err != nil:
			continue
		case o.Status == legoacme.StatusValid && o.Certificate != "",
			o.Status == legoacme.StatusProcessing:
			slog.Info("the CA failed the finalize answer but took the order; fetching the certificate", "order", order.Location, "status", o.Status, "err", flatten(ferr.Error()))
			certURL, err := c.awaitIssued(order, o, c.hints.take(order.Location))
			if err != nil {
				return "", AfterFinalize(err)
			}
			return certURL, nil
		case o.Status == legoacme.StatusReady:
			certURL, err := c.finalize(order, csr)
			if err == nil {
				return certURL, nil
			}
			ferr, refused = err, refused && caRefusal(err)
		case o.Status == legoacme.StatusInvalid:
			return "", ferr
		default:
			return "", AfterFinalize(ferr)
		}
	}
	if ready && refused && c.ctx.Err() == nil {
		// Every finalize failed with the CA's own answer (caRefusal:
		// not a gateway's, behind which the CA may still take it
		// later); if the order is still ready after the last, the CA
		// took none of them and issued nothing.
		if o, err := c.core.Orders.Get(order.Location); err == nil && o.Status == legoacme.StatusReady {
			return "", &finalizeRefused{ferr}
		}
	}
	return "", AfterFinalize(ferr)
}

// caRefusal reports whether err is the CA's own answer, not a gateway's
// in front of it: an ACME problem document (its type in RFC 8555's
// namespace; lego takes any JSON error body for a problem) with a status
// a gateway does not give for a backend it timed out or lost (502, 503,
// 504).
func caRefusal(err error) bool {
	var pd *legoacme.ProblemDetails
	return errors.As(err, &pd) && strings.HasPrefix(pd.Type, "urn:ietf:params:acme:error:") &&
		pd.HTTPStatus != http.StatusBadGateway && pd.HTTPStatus != http.StatusServiceUnavailable && pd.HTTPStatus != http.StatusGatewayTimeout
}

// finalizeRefused is the error of an order whose every finalize failed
// while it stayed ready: nothing was issued, so what it reserved goes
// back and a fallback CA may take the names, but it is not ordered again
// from the same CA in this run (its finalize is what fails).
type finalizeRefused struct{ error }

func (e *finalizeRefused) Unwrap() error { return e.error }

// AfterFinalize marks err as an order's error once its finalize request
// was sent (MayHaveIssued).
func AfterFinalize(err error) error { return &finalizedError{err} }

// finalizedError is an order's error once its finalize request was sent.
type finalizedError struct{ error }

func (e *finalizedError) Unwrap() error { return e.error }

// authorize validates every authorization of order in parallel. When one
// fails the others stop, and those the CA still holds pending are
// deactivated (section 7.5.2), as lego did: they would otherwise count
// against the account's pending authorizations.
func (c *Client) authorize(order legoacme.ExtendedOrder) error {
	stop := make(chan struct{})
	var once sync.Once
	errs := make([]error, len(order.Authorizations))
	pending := make([]bool, len(order.Authorizations))
	var wg sync.WaitGroup
	for i, u := range order.Authorizations {
		wg.Go(func() {
			pending[i], errs[i] = c.validate(u, stop)
			if errs[i] != nil {
				once.Do(func() { close(stop) })
			}
		})
	}
	wg.Wait()
	var failed []error
	for _, e := range errs {
		if e != nil && !errors.Is(e, errStopped) {
			failed = append(failed, e)
		}
	}
	if len(failed) == 0 {
		return nil
	}
	for i, u := range order.Authorizations {
		if pending[i] {
			c.core.Authorizations.Deactivate(u) // best effort: the order failed either way
		}
	}
	return fmt.Errorf("error: one or more domains had a problem: %w", errors.Join(failed...))
}

// errStopped is a validation given up because another name of the order
// failed: it says nothing of its own name.
var errStopped = errors.New("stopped: another name of the order failed")

// validate answers one authorization's HTTP-01 challenge and polls it
// until the CA decides. pending reports that the CA may still hold it
// pending (worth deactivating); err names the domain.
func (c *Client) validate(authzURL string, stop <-chan struct{}) (pending bool, err error) {
	authz, err := c.core.Authorizations.Get(authzURL)
	if err != nil {
		return false, err
	}
	domain := challenge.GetTargetedDomain(authz)
	defer func() {
		if err != nil && !errors.Is(err, errStopped) {
			err = fmt.Errorf("%s: %w", domain, err)
		}
	}()
	switch authz.Status {
	case legoacme.StatusValid:
		return false, nil // reused: validated for an earlier order
	case legoacme.StatusPending:
	default:
		return false, fmt.Errorf("the authorization is %s", authz.Status)
	}
	chlg, err := challenge.FindChallenge(challenge.HTTP01, authz)
	if err != nil {
		return true, err
	}
	keyAuth, err := c.core.GetKeyAuthorization(chlg.Token)
	if err != nil {
		return true, err
	}
	if err := c.router.Present(authz.Identifier.Value, chlg.Token, keyAuth); err != nil {
		return true, fmt.Errorf("acme: error presenting token: %w", err)
	}
	defer c.router.CleanUp(authz.Identifier.Value, chlg.Token, keyAuth)
	fetched := c.router.fetched(authz.Identifier.Value, chlg.Token)
	ch, err := c.core.Challenges.New(chlg.URL)
	if err != nil {
		return true, fmt.Errorf("failed to initiate challenge: %w", err)
	}
	switch ch.Status {
	case legoacme.StatusValid:
		return false, nil
	case legoacme.StatusInvalid:
		return false, fmt.Errorf("invalid challenge: %w", ch.Err())
	}
	return c.pollAuthorization(authzURL, c.hints.take(chlg.URL), fetched, stop)
}

// pollAuthorization polls one authorization until it is valid or
// invalid: first at caSaid (the challenge answer's Retry-After) if the CA
// said, else when fetched is closed (plus fetchSettle) or on the
// schedule, whichever comes first; then at each answer's Retry-After, or
// on the schedule.
func (c *Client) pollAuthorization(authzURL string, caSaid time.Time, fetched <-chan struct{}, stop <-chan struct{}) (bool, error) {
	deadline := time.Now().Add(orderWait)
	s := schedule{}
	next, watch := caSaid, fetched
	if next.IsZero() {
		next = s.next()
	} else {
		watch = nil // the CA said when
	}
	for {
		if next.After(deadline) {
			return true, fmt.Errorf("the CA has not validated the challenge after %s", orderWait)
		}
		if err := c.wait(next, watch, stop); err != nil {
			return true, err
		}
		authz, err := c.core.Authorizations.Get(authzURL)
		if err != nil {
			return true, err
		}
		switch authz.Status {
		case legoacme.StatusValid:
			return false, nil
		case legoacme.StatusPending, legoacme.StatusProcessing:
		case legoacme.StatusInvalid:
			for _, ch := range authz.Challenges {
				if ch.Status == legoacme.StatusInvalid && ch.Error != nil {
					return false, fmt.Errorf("invalid authorization: %w", ch.Err())
				}
			}
			return false, errors.New("invalid authorization")
		default:
			return false, fmt.Errorf("the authorization is %s", authz.Status)
		}
		watch = nil // the fetch was seen, or never will be
		if next = c.hints.take(authzURL); next.IsZero() {
			next = s.next()
		}
	}
}

// finalize sends the CSR and waits until the CA has issued, polling a
// processing order only at its Retry-After; it returns the
// certificate's URL.
func (c *Client) finalize(order legoacme.ExtendedOrder, csr []byte) (string, error) {
	o, err := c.core.Orders.UpdateForCSR(order.Finalize, csr)
	if err != nil {
		return "", err
	}
	return c.awaitIssued(order, o, c.hints.take(order.Finalize))
}

// awaitIssued polls order (last seen as o) until the CA has issued, from
// next (the CA's Retry-After) or the schedule's first poll, and returns
// the certificate's URL.
func (c *Client) awaitIssued(order, o legoacme.ExtendedOrder, next time.Time) (string, error) {
	var err error
	deadline := time.Now().Add(orderWait)
	s := schedule{}
	for o.Status != legoacme.StatusValid {
		if o.Status == legoacme.StatusInvalid {
			return "", fmt.Errorf("invalid order: %w", o.Err())
		}
		if next.IsZero() {
			next = s.next()
		}
		if next.After(deadline) {
			return "", fmt.Errorf("the CA has not issued the certificate %s after the order was finalized (status %s)", orderWait, o.Status)
		}
		if err := c.wait(next, nil, nil); err != nil {
			return "", err
		}
		if o, err = c.core.Orders.Get(order.Location); err != nil {
			return "", err
		}
		next = c.hints.take(order.Location)
	}
	if o.Certificate == "" {
		return "", errors.New("the CA's valid order has no certificate URL")
	}
	return o.Certificate, nil
}

// download fetches the certificate with its chain; with a preferred
// chain, also the alternates the CA links, and keeps the first whose top
// certificate's issuer has that common name (else the default).
func (c *Client) download(certURL string, req certificate.ObtainRequest) (*certificate.Resource, error) {
	res := &certificate.Resource{Domain: req.Domains[0], CertURL: certURL, CertStableURL: certURL, PrivateKey: certcrypto.PEMEncode(req.PrivateKey)}
	if req.PreferredChain == "" {
		cert, issuer, err := c.core.Certificates.Get(certURL, true)
		if err != nil {
			return nil, err
		}
		res.Certificate, res.IssuerCertificate = cert, issuer
		return res, nil
	}
	all, err := c.core.Certificates.GetAll(certURL, true)
	if err != nil {
		return nil, err
	}
	pick := certURL
	for u, rc := range all {
		if chain, err := certcrypto.ParsePEMBundle(rc.Issuer); err == nil && len(chain) > 0 && chain[len(chain)-1].Issuer.CommonName == req.PreferredChain {
			pick = u
			break
		}
	}
	res.CertURL, res.CertStableURL = pick, pick
	res.Certificate, res.IssuerCertificate = all[pick].Cert, all[pick].Issuer
	return res, nil
}

// schedule is the poll interval without Retry-After: 250 ms, doubling
// to 5 s.
type schedule struct{ last time.Duration }

func (s *schedule) next() time.Time {
	if s.last == 0 {
		s.last = firstPoll
	} else {
		s.last = min(2*s.last, maxPoll)
	}
	return time.Now().Add(s.last)
}

// wait is waitUntil, or what a test puts in its place.
func (c *Client) wait(t time.Time, fetched, stop <-chan struct{}) error {
	if c.waiter != nil {
		return c.waiter(t, fetched, stop)
	}
	return c.waitUntil(t, fetched, stop)
}

// waitUntil sleeps until t, or until fetched is closed and fetchSettle
// has passed, whichever is first. It ends early, with an error, when the
// run is cancelled or stop is closed.
func (c *Client) waitUntil(t time.Time, fetched <-chan struct{}, stop <-chan struct{}) error {
	timer := time.NewTimer(time.Until(t))
	defer timer.Stop()
	for {
		select {
		case <-timer.C:
			return nil
		case <-fetched:
			fetched = nil
			if settle := time.Now().Add(fetchSettle); settle.Before(t) {
				timer.Reset(fetchSettle)
			}
		case <-stop:
			return errStopped
		case <-c.ctx.Done():
			return c.ctx.Err()
		}
	}
}

// retryHints are the Retry-After times the CA sent with objects still
// pending or processing, by the URL asked: lego's api calls return the
// objects but not the headers, so the transport notes them here and the
// order's next poll of that URL takes its time.
type retryHints struct {
	mu sync.Mutex
	at map[string]time.Time
}

// note records that url may be asked again at now+after.
func (h *retryHints) note(url string, after time.Duration) {
	if h == nil {
		return
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.at == nil {
		h.at = map[string]time.Time{}
	}
	h.at[url] = time.Now().Add(after)
}

// take returns and forgets the time noted for url, zero if none.
func (h *retryHints) take(url string) time.Time {
	if h == nil {
		return time.Time{}
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	t := h.at[url]
	delete(h.at, url)
	return t
}
