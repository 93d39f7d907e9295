// Package acme is the only package that talks to lego and, through it, to
// the CA. It owns the account (register once per server and email, reuse
// the key after that), turns an issuance request into a lego order, and
// checks what comes back before anyone stores it: the key matches the
// certificate and the certificate covers exactly the names asked for.
//
// It does not write certificates (that is store's job) and does not decide
// when to renew (that is policy). It never logs a private key or an EAB
// HMAC key.
package acme

import (
	"bytes"
	"context"
	"crypto"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	legoacme "github.com/go-acme/lego/v4/acme"
	"github.com/go-acme/lego/v4/acme/api"
	"github.com/go-acme/lego/v4/certcrypto"
	"github.com/go-acme/lego/v4/challenge"
	"github.com/go-acme/lego/v4/lego"
	"github.com/go-acme/lego/v4/registration"

	"github.com/lbcert/lbcert/internal/argfile"
	"github.com/lbcert/lbcert/internal/catalog"
	"github.com/lbcert/lbcert/internal/hint"
	"github.com/lbcert/lbcert/internal/store"
)

// Well-known directory URLs.
const (
	LetsEncrypt        = lego.LEDirectoryProduction
	LetsEncryptStaging = lego.LEDirectoryStaging
)

// Options configure a Client.
type Options struct {
	Server    string
	CABundle  string // PEM file of extra roots, for private CAs and Pebble
	Email     string
	AgreeTOS  bool
	EABKid    string
	EABHMAC   string // secret: never logged
	UserAgent string
	Store     catalog.Accounts
	// OrderGate, when set, paces this account's new orders.
	OrderGate OrderGate
	// FailFast gives up the orders in flight once the CA stops
	// answering (ErrCADown), for a fallback CA to take them.
	FailFast bool

	// ConfirmTOS asks a person to accept the terms at url. It is nil when
	// there is no terminal, and then AgreeTOS must be set.
	ConfirmTOS func(url string) (bool, error)
}

// Client is a registered ACME account on one server.
type Client struct {
	ctx  context.Context // the run's: Ctrl-C ends a wait between orders
	opts Options
	// core is lego's ACME protocol layer (JWS, nonces, the directory):
	// lbcert's own order code (flow.go) and lego's registrar share it.
	core      *api.Core
	registrar *registration.Registrar
	hints     *retryHints // the CA's Retry-After times, noted by the transport
	router    *router
	// waiter replaces waitUntil in tests, which see the order's waits
	// without sleeping them.
	waiter func(t time.Time, fetched, stop <-chan struct{}) error

	down *downDetector // FailFast's
}

// NeedsTOS reports whether registering would have to ask about the terms
// of service and cannot: no account yet, no --agree-tos and no terminal.
// Callers check this before any request so the refusal costs nothing.
func NeedsTOS(o Options) bool {
	return !o.AgreeTOS && o.ConfirmTOS == nil && !o.Store.HasAccount(o.Server, o.Email)
}

// HTTPClient builds the client lego uses: the system roots plus the
// CA bundle, and every request bound to ctx so that Ctrl-C aborts an order
// in flight (lego v4 takes no context of its own).
func HTTPClient(ctx context.Context, caBundle string) (*http.Client, error) {
	return httpClient(ctx, caBundle, 90*time.Second, nil)
}

// httpClient is HTTPClient waiting at most headers for a response's
// headers, whose transport notes the CA's Retry-After times in hints
// (nil: nowhere).
func httpClient(ctx context.Context, caBundle string, headers time.Duration, hints *retryHints) (*http.Client, error) {
	var base http.RoundTripper
	if caBundle == "" {
		base = caTransport(nil, headers) // Go reads the system roots at the first connection
	} else {
		pem, err := argfile.Read(caBundle, argfile.Bundle)
		if errors.Is(err, argfile.ErrNotFile) {
			return nil, fmt.Errorf("--ca-bundle %s: %v: give a PEM file of the CA's root certificates", caBundle, err)
		}
		if err != nil {
			return nil, fmt.Errorf("--ca-bundle %s: %v", caBundle, err)
		}
		bundle := x509.NewCertPool()
		if !bundle.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("--ca-bundle %s: no PEM certificates in it", caBundle)
		}
		base = &bundleFirst{bundle: caTransport(bundle, headers), both: sync.OnceValue(func() http.RoundTripper {
			pool := systemRoots().Clone()
			pool.AppendCertsFromPEM(pem)
			return caTransport(pool, headers)
		})}
	}
	return &http.Client{Timeout: 2 * time.Minute, Transport: ctxTransport{ctx: ctx, base: base, hints: hints}}, nil
}

// caTransport is the transport to a CA trusting roots (nil: the system's).
func caTransport(roots *x509.CertPool, headers time.Duration) *http.Transport {
	tr := http.DefaultTransport.(*http.Transport).Clone()
	tr.TLSClientConfig = &tls.Config{RootCAs: roots, MinVersion: tls.VersionTLS12}
	tr.MaxIdleConnsPerHost = 16
	// Go's 10 s TLS handshake limit is tighter than every other CA
	// timeout here, and a loaded CA failed one run on it; connecting
	// and reading headers get the same 30 s.
	tr.TLSHandshakeTimeout = CATimeout
	tr.ResponseHeaderTimeout = headers
	tr.DialContext = (&net.Dialer{Timeout: CATimeout, KeepAlive: 30 * time.Second}).DialContext
	return tr
}

// systemRoots is the system's trusted roots, read once. Reading them
// (every file in /etc/ssl/certs, parsed) costs a process about 40 ms of
// a 2-core machine's CPU before its first request, a tenth of a small
// run, so a run given --ca-bundle reads them only when a server's
// certificate is not trusted by the bundle.
var systemRoots = sync.OnceValue(func() *x509.CertPool {
	pool, err := x509.SystemCertPool()
	if err != nil || pool == nil {
		return x509.NewCertPool()
	}
	return pool
})

// bundleFirst trusts the CA bundle's roots and the system's, as one pool
// holding both would: a request goes out over connections that trust the
// bundle alone, and when a server's certificate is not trusted by it (a
// public CA beside a private one) the request is sent again, with every
// later one, over connections that trust both. The TLS handshake fails
// before any byte of the request is sent, so the CA never sees it twice.
type bundleFirst struct {
	bundle http.RoundTripper
	both   func() http.RoundTripper
	wide   atomic.Bool // a server was not trusted by the bundle: both from now on
}

func (t *bundleFirst) RoundTrip(r *http.Request) (*http.Response, error) {
	if t.wide.Load() {
		return t.both().RoundTrip(r)
	}
	resp, err := t.bundle.RoundTrip(r)
	var unknown x509.UnknownAuthorityError
	if err == nil || !errors.As(err, &unknown) || r.Body != nil && r.GetBody == nil {
		return resp, err
	}
	again := r.Clone(r.Context())
	if r.Body != nil {
		if again.Body, err = r.GetBody(); err != nil {
			return nil, err
		}
	}
	t.wide.Store(true)
	return t.both().RoundTrip(again)
}

type ctxTransport struct {
	ctx   context.Context
	base  http.RoundTripper
	hints *retryHints
}

func (t ctxTransport) RoundTrip(r *http.Request) (*http.Response, error) {
	if err := t.ctx.Err(); err != nil {
		return nil, err
	}
	resp, err := t.base.RoundTrip(r.WithContext(t.ctx))
	if err == nil && resp.StatusCode >= http.StatusBadRequest {
		dropNullBody(resp)
	}
	if err != nil || r.Method != http.MethodPost {
		return resp, err
	}
	if err := alreadyReplaced(r, resp); err != nil {
		return nil, err
	}
	body := peekJSON(resp)
	if err := stalledChallenge(body); err != nil {
		resp.Body.Close()
		return nil, err
	}
	if d, ok := pollAfter(resp.Header, body); ok {
		t.hints.note(r.URL.String(), d)
	}
	return resp, nil
}

// dropNullBody empties an error answer whose body is JSON's null (a
// gateway's, say): lego decodes it into a nil problem and dereferences
// it, a panic that would stop every order of the run. Empty, it is an
// HTTP error status like any other.
func dropNullBody(resp *http.Response) {
	orig := resp.Body
	body, err := io.ReadAll(io.LimitReader(orig, 1<<16))
	if err == nil && string(bytes.TrimSpace(body)) == "null" {
		body = nil
	}
	resp.Body = struct {
		io.Reader
		io.Closer
	}{io.MultiReader(bytes.NewReader(body), orig), orig}
}

// alreadyReplaced turns the CA's 409 alreadyReplaced answer to an order
// that carried "replaces" (RFC 9773 section 5) into an error lego does
// not act on: on that answer lego orders again at once without
// "replaces", inside one call, and that second order, no longer an ARI
// renewal, would reach the CA without the rate budget counting it. The
// engine orders it instead (ReplacesRefused), counted.
func alreadyReplaced(r *http.Request, resp *http.Response) error {
	if resp.StatusCode != http.StatusConflict || !strings.HasPrefix(resp.Header.Get("Content-Type"), "application/problem+json") {
		return nil
	}
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 1<<16))
	resp.Body.Close()
	pd := &legoacme.ProblemDetails{}
	json.Unmarshal(body, pd)
	if pd.Type != "urn:ietf:params:acme:error:alreadyReplaced" {
		// Not ours to judge: lego reads it as the CA sent it.
		resp.Body = io.NopCloser(bytes.NewReader(body))
		return nil
	}
	pd.HTTPStatus, pd.Method, pd.URL = resp.StatusCode, r.Method, r.URL.String()
	return &replacesError{pd}
}

// pollAfter is the Retry-After of an answer about an object the CA has
// not decided yet (pending or processing): when the order may ask for
// it again (RFC 8555 sections 7.4 and 8.2). body is the response's, from
// peekJSON.
func pollAfter(h http.Header, body []byte) (time.Duration, bool) {
	ra := h.Get("Retry-After")
	if ra == "" || body == nil {
		return 0, false
	}
	var o struct {
		Status string `json:"status"`
	}
	if json.Unmarshal(body, &o) != nil || o.Status != "processing" && o.Status != "pending" {
		return 0, false
	}
	d, err := api.ParseRetryAfter(ra)
	if err != nil {
		return 0, false
	}
	return max(d, 0), true
}

// New loads the account for (Server, Email) or registers one, and
// returns a client ready to order certificates.
func New(ctx context.Context, o Options) (*Client, error) {
	if NeedsTOS(o) {
		return nil, errors.New("no terminal to ask about the CA's terms of service: pass --agree-tos to accept them")
	}
	// A CA that accepts a request and never answers it: with another
	// CA to go to, it gets what connecting and the handshake get.
	headers := 90 * time.Second
	if o.FailFast {
		headers = CATimeout
	}
	hints := &retryHints{}
	hc, err := httpClient(ctx, o.CABundle, headers, hints)
	if err != nil {
		return nil, err
	}
	u := &user{email: o.Email}
	keyPEM, regJSON, err := o.Store.ReadAccount(o.Server, o.Email)
	switch {
	case errors.Is(err, store.ErrNotFound):
		key, err := certcrypto.GeneratePrivateKey(certcrypto.EC256)
		if err != nil {
			return nil, err
		}
		u.key = key
	case err != nil:
		return nil, fmt.Errorf("read account: %w", err)
	default:
		key, err := certcrypto.ParsePEMPrivateKey(keyPEM)
		if err != nil {
			return nil, fmt.Errorf("account key for %s at %s: %v", displayEmail(o.Email), o.Server, err)
		}
		u.key = key
		if regJSON != nil {
			var reg registration.Resource
			if err := json.Unmarshal(regJSON, &reg); err != nil {
				return nil, fmt.Errorf("account %s at %s: %v", displayEmail(o.Email), o.Server, err)
			}
			u.reg = &reg
		}
	}

	c := &Client{ctx: ctx, opts: o, hints: hints, router: &router{byDomain: map[string]challenge.Provider{}}}
	if o.FailFast {
		c.down = &downDetector{}
		watched := *hc
		watched.Transport = watchTransport{base: hc.Transport, d: c.down}
		hc = &watched
	}
	if o.OrderGate != nil {
		// Only new orders wait for the gate; the newOrder URL is the
		// directory's, which api.New reads (a GET, ungated) before any.
		gated := *hc
		gated.Transport = &gateTransport{ctx: ctx, base: hc.Transport, gate: o.OrderGate, newOrder: c.newOrderURL}
		hc = &gated
	}
	var kid string
	if u.reg != nil {
		kid = u.reg.URI
	}
	core, err := api.New(hc, o.UserAgent, o.Server, kid, u.key)
	if err != nil {
		return nil, Explain(fmt.Errorf("ACME server %s: %w", o.Server, err))
	}
	c.core, c.registrar = core, registration.NewRegistrar(core, u)
	if u.reg == nil {
		if err := c.register(u); err != nil {
			return nil, err
		}
	}
	return c, nil
}

func (c *Client) register(u *user) error {
	o := c.opts
	// Save the key before registering (and only once the CA has answered
	// its directory, so an unreachable server leaves nothing behind): if
	// we crash after the CA has the account, the next run registers the
	// same key again and the CA returns the existing account.
	if err := o.Store.WriteAccountKey(o.Server, o.Email, certcrypto.PEMEncode(u.key)); err != nil {
		return fmt.Errorf("save account key: %w", err)
	}
	if !o.AgreeTOS {
		if o.ConfirmTOS == nil {
			return errors.New("no terminal to ask about the CA's terms of service: pass --agree-tos to accept them")
		}
		ok, err := o.ConfirmTOS(c.core.GetDirectory().Meta.TermsOfService)
		if err != nil {
			return err
		}
		if !ok {
			return errors.New("the CA's terms of service were not accepted; nothing was registered")
		}
	}
	var reg *registration.Resource
	var err error
	switch {
	case o.EABKid != "":
		reg, err = c.registrar.RegisterWithExternalAccountBinding(registration.RegisterEABOptions{
			TermsOfServiceAgreed: true, Kid: o.EABKid, HmacEncoded: o.EABHMAC,
		})
	case c.core.GetDirectory().Meta.ExternalAccountRequired:
		return errors.New("this CA requires external account binding: pass --eab-kid and the HMAC key (LBCERT_EAB_HMAC_KEY or --eab-hmac-key-file) from your CA account page")
	default:
		reg, err = c.registrar.Register(registration.RegisterOptions{TermsOfServiceAgreed: true})
	}
	if err != nil {
		return registerError(err, o)
	}
	data, err := json.MarshalIndent(reg, "", "  ")
	if err != nil {
		return err
	}
	if err := o.Store.WriteAccount(o.Server, o.Email, data); err != nil {
		return fmt.Errorf("save account: %w", err)
	}
	u.reg = reg
	return nil
}

// registerError explains a refused registration. With EAB, a CA that
// refuses the binding may not say so: step-ca answers an unknown key ID,
// a wrong HMAC key and a key already bound to another account alike,
// with a 500 "internal error". The hint names what to check instead.
func registerError(err error, o Options) error {
	err = explain("register account "+displayEmail(o.Email), err)
	if o.EABKid != "" && !Unreachable(err) {
		err = hint.Set(err, fmt.Sprintf("the CA refused the account with EAB key ID %s: check the key ID and the HMAC key (LBCERT_EAB_HMAC_KEY or --eab-hmac-key-file) on the CA's account page; a key binds one account only, so each --email needs its own", o.EABKid))
	}
	return err
}

func displayEmail(e string) string {
	if e == "" {
		return "(no email)"
	}
	return e
}

// user implements lego's registration.User.
type user struct {
	email string
	key   crypto.PrivateKey
	reg   *registration.Resource
}

func (u *user) GetEmail() string                        { return u.email }
func (u *user) GetRegistration() *registration.Resource { return u.reg }
func (u *user) GetPrivateKey() crypto.PrivateKey        { return u.key }

// router is the single HTTP-01 provider lego knows about. It hands each
// challenge to the provider of the order that owns the name, so concurrent
// orders on one client can use different webroots or listeners.
type router struct {
	mu       sync.Mutex
	byDomain map[string]challenge.Provider
}

func (r *router) set(domains []string, p challenge.Provider) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, d := range domains {
		if _, busy := r.byDomain[d]; busy {
			return fmt.Errorf("%s: another order for this name is in progress", d)
		}
	}
	for _, d := range domains {
		r.byDomain[d] = p
	}
	return nil
}

func (r *router) clear(domains []string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, d := range domains {
		delete(r.byDomain, d)
	}
}

func (r *router) get(domain string) (challenge.Provider, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	p, ok := r.byDomain[domain]
	if !ok {
		return nil, fmt.Errorf("no HTTP-01 responder for %s", domain)
	}
	return p, nil
}

func (r *router) Present(domain, token, keyAuth string) error {
	p, err := r.get(domain)
	if err != nil {
		return err
	}
	return p.Present(domain, token, keyAuth)
}

// fetched is the provider's signal that the CA fetched token, nil when
// it cannot tell.
func (r *router) fetched(domain, token string) <-chan struct{} {
	if p, err := r.get(domain); err == nil {
		if w, ok := p.(fetchWatcher); ok {
			return w.Fetched(domain, token)
		}
	}
	return nil
}

func (r *router) CleanUp(domain, token, keyAuth string) error {
	p, err := r.get(domain)
	if err != nil {
		return err
	}
	return p.CleanUp(domain, token, keyAuth)
}

// flatten makes lego's multi-line errors one line.
func flatten(s string) string {
	return strings.Join(strings.Fields(s), " ")
}
