// Package issuer is the engine's way to the CA: it answers HTTP-01
// through a lineage's webroot or a shared standalone listener, orders
// through acme, and returns the checked certificate. It never saves,
// never deploys and never decides what is due: the engine does that.
//
// It keeps one ACME client per (server, email) and one listener per
// port for the whole run, so a batch of 500 certificates registers
// nothing twice and binds each port once. Account options are built
// lazily on the first order, so a run with nothing due reads no account
// key and no EAB secret.
package issuer

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"strings"
	"sync"

	legochallenge "github.com/go-acme/lego/v4/challenge"

	"github.com/lbcert/lbcert/internal/acme"
	"github.com/lbcert/lbcert/internal/challenge"
	"github.com/lbcert/lbcert/internal/hint"
	"github.com/lbcert/lbcert/internal/store"
)

// Issuer is one run's access to the CA.
type Issuer struct {
	// Account returns the options for (server, email); the caller knows
	// the CA bundle, ToS and EAB settings. It is called once per pair,
	// on first use.
	Account func(server, email string) (acme.Options, error)
	// Fleet, when set, answers every HTTP-01 challenge (fleet mode: the
	// token goes to Redis and every node's agent serves it); the run
	// binds no listener and writes no webroot of its own.
	Fleet legochallenge.Provider
	// CABundle and UserAgent are what asking a CA's renewal information
	// needs: no account, so Account is not called for it.
	CABundle, UserAgent string

	mu        sync.Mutex
	clients   map[string]*clientOnce
	aris      map[string]*ariOnce  // by server
	listeners map[string]*listener // by port
	webroots  map[string]*challenge.Webroot
	// reRegister holds the (server, email) pairs whose saved account the
	// CA lost in this run. Their terms of service were accepted when the
	// lost account was registered, so the new registration accepts them
	// again without --agree-tos: a cron renew after a CA rebuild must not
	// stop on a question nobody is there to answer. Whether the terms
	// changed in between is not checked (the accepted terms URL is not
	// saved); README "When the CA misbehaves" says so.
	reRegister map[string]bool
}

type listener struct {
	s   *challenge.Standalone
	err error
}

type ariOnce struct {
	once sync.Once
	a    *acme.ARI
	err  error
}

type clientOnce struct {
	once sync.Once
	c    *acme.Client
	err  error
}

// Client returns the ACME client for (server, email), registering the
// account on first use. Concurrent callers share one registration.
func (is *Issuer) Client(ctx context.Context, server, email string) (*acme.Client, error) {
	is.mu.Lock()
	if is.clients == nil {
		is.clients = map[string]*clientOnce{}
	}
	key := server + "\x00" + email
	co := is.clients[key]
	if co == nil {
		co = &clientOnce{}
		is.clients[key] = co
	}
	is.mu.Unlock()
	co.once.Do(func() {
		o, err := is.Account(server, email)
		if err == nil {
			is.mu.Lock()
			o.AgreeTOS = o.AgreeTOS || is.reRegister[key]
			is.mu.Unlock()
			co.c, err = acme.New(ctx, o)
		}
		if err != nil {
			// A run over saved lineages talks to each one's own server,
			// which --server does not change: name the one that failed.
			if strings.Contains(hint.Of(err), "--server") {
				err = hint.Set(err, fmt.Sprintf("check that this host can reach the ACME server %s (each lineage keeps the server it was issued by; 'lbcert show NAME' shows it)", server))
			}
			co.err = &AccountError{Server: server, Err: err}
		}
	})
	return co.c, co.err
}

// AccountError is a failure to set up the account itself (settings, a
// secret, registration), not anything about one lineage's names: the
// engine gives it no per-lineage backoff.
type AccountError struct {
	Server string
	Err    error
}

func (e *AccountError) Error() string { return e.Err.Error() }
func (e *AccountError) Unwrap() error { return e.Err }

// ForgetClient drops the cached client for (server, email), so that the
// next Client call loads or registers the account afresh.
func (is *Issuer) ForgetClient(server, email string) {
	is.mu.Lock()
	defer is.mu.Unlock()
	delete(is.clients, server+"\x00"+email)
}

// ResetAccount forgets the saved account for (server, email), on disk
// and in this run, so that the next order registers a new one: the CA
// said it no longer knows the old one.
func (is *Issuer) ResetAccount(server, email string) error {
	o, err := is.Account(server, email)
	if err != nil {
		return err
	}
	// Forget the client last: a worker that asks for it in between must
	// find the account gone and register, not load the lost one again.
	defer is.ForgetClient(server, email)
	if o.Store == nil {
		return nil
	}
	if o.Store.HasAccount(server, email) {
		is.mu.Lock()
		if is.reRegister == nil {
			is.reRegister = map[string]bool{}
		}
		is.reRegister[server+"\x00"+email] = true
		is.mu.Unlock()
	}
	return o.Store.RemoveAccount(server, email)
}

// PortOf returns the port part of a listen address, the key under which
// one run keeps one listener: ":8888" and "127.0.0.1:8888" are the same
// listener, or the second bind would fail against the first.
func PortOf(addr string) string {
	_, port, err := net.SplitHostPort(addr)
	if err != nil {
		return addr
	}
	return port
}

// BindAll binds one listener per port for addrs. Addresses that share a
// port but name different hosts are served by one wildcard listener on
// that port, which answers on every one of them. It returns the error of
// each port that could not be bound, keyed by port.
func (is *Issuer) BindAll(addrs []string) map[string]error {
	if is.Fleet != nil {
		return map[string]error{}
	}
	hosts := map[string]map[string]bool{}
	var order []string
	for _, a := range addrs {
		p := PortOf(a)
		if hosts[p] == nil {
			hosts[p] = map[string]bool{}
			order = append(order, p)
		}
		h, _, err := net.SplitHostPort(a)
		if err != nil {
			h = ""
		}
		hosts[p][h] = true
	}
	errs := map[string]error{}
	is.mu.Lock()
	defer is.mu.Unlock()
	if is.listeners == nil {
		is.listeners = map[string]*listener{}
	}
	for _, p := range order {
		if _, ok := is.listeners[p]; ok {
			continue
		}
		addr := ":" + p
		if len(hosts[p]) == 1 {
			for h := range hosts[p] {
				addr = net.JoinHostPort(h, p)
			}
		}
		s, err := challenge.Listen(addr)
		is.listeners[p] = &listener{s: s, err: err}
		if err != nil {
			errs[p] = err
		}
	}
	return errs
}

// Close stops every listener.
func (is *Issuer) Close() {
	is.mu.Lock()
	defer is.mu.Unlock()
	for _, l := range is.listeners {
		if l.s != nil {
			l.s.Close()
		}
	}
	is.listeners = nil
}

// Responder returns the HTTP-01 responder for c: a webroot, or the
// shared standalone listener of its port (bound now if BindAll did not).
func (is *Issuer) Responder(c store.Challenge) (legochallenge.Provider, error) {
	if is.Fleet != nil {
		return is.Fleet, nil
	}
	switch c.Mode {
	case "webroot":
		// One responder per webroot for the whole run: rows that share a
		// webroot share its lock, so one row's clean-up cannot remove the
		// challenge directory another row is writing into.
		is.mu.Lock()
		defer is.mu.Unlock()
		if is.webroots == nil {
			is.webroots = map[string]*challenge.Webroot{}
		}
		w := is.webroots[c.Webroot]
		if w == nil {
			w = &challenge.Webroot{Root: c.Webroot}
			is.webroots[c.Webroot] = w
		}
		return w, nil
	case "standalone":
		if errs := is.BindAll([]string{c.HTTPAddr}); errs[PortOf(c.HTTPAddr)] != nil {
			return nil, errs[PortOf(c.HTTPAddr)]
		}
		is.mu.Lock()
		l := is.listeners[PortOf(c.HTTPAddr)]
		is.mu.Unlock()
		if l.err != nil {
			return nil, l.err
		}
		return l.s, nil
	}
	return nil, fmt.Errorf("unknown challenge mode %q", c.Mode)
}

// Order is one certificate to obtain for a lineage.
type Order struct {
	Lineage  store.Lineage // the settings: names, server, account, key type, profile, challenge
	ReuseKey []byte        // PEM key to reuse, if any
	Replaces string        // RFC 9773 CertID of the certificate being renewed
}

// Obtain orders and checks one certificate. It saves nothing.
func (is *Issuer) Obtain(ctx context.Context, o Order) (*acme.Result, error) {
	l := o.Lineage
	p, err := is.Responder(l.Challenge)
	if err != nil {
		return nil, err
	}
	client, err := is.Client(ctx, l.Server, l.Email)
	if err != nil {
		return nil, err
	}
	slog.Info("requesting certificate", "name", l.Name, "domains", strings.Join(l.Domains, ","), "challenge", l.Challenge.Mode)
	res, err := client.Obtain(acme.Request{
		Domains: l.Domains, KeyType: l.KeyType, Profile: l.Profile, Key: o.ReuseKey, Provider: p, Replaces: o.Replaces,
		PreferredChain: l.PreferredChain,
	})
	if err != nil {
		return nil, withChallengeHint(err, l)
	}
	return res, nil
}

// RenewalInfo asks the lineage's CA for the ARI window of its current
// certificate.
func (is *Issuer) RenewalInfo(ctx context.Context, l *store.Lineage) (*acme.RenewalInfo, error) {
	is.mu.Lock()
	if is.aris == nil {
		is.aris = map[string]*ariOnce{}
	}
	ao := is.aris[l.Server]
	if ao == nil {
		ao = &ariOnce{}
		is.aris[l.Server] = ao
	}
	is.mu.Unlock()
	// The directory is read once per server and run, as for orders.
	ao.once.Do(func() { ao.a, ao.err = acme.NewARI(ctx, l.Server, is.CABundle, is.UserAgent) })
	if ao.err != nil {
		return nil, ao.err
	}
	return ao.a.RenewalInfo(ctx, l.Cert.ARICertID)
}

// withChallengeHint replaces a generic HTTP-01 hint with one that names
// the set-up in use, which is what the user has to check.
func withChallengeHint(err error, l store.Lineage) error {
	var e *hint.Error
	if !errors.As(err, &e) || !strings.Contains(e.Text, "/.well-known/acme-challenge/") {
		return err
	}
	names := strings.Join(l.Domains, ", ")
	switch l.Challenge.Mode {
	case "webroot":
		e.Text = fmt.Sprintf("does the web server serve %s/.well-known/acme-challenge/ over plain HTTP on port 80 for %s?", l.Challenge.Webroot, names)
	case "fleet":
		e.Text = fmt.Sprintf("does port 80 for %s reach the fleet's nodes, and does each send /.well-known/acme-challenge/ to its 'lbcert agent' (an HAProxy ACL, an nginx proxy_pass)? A node taken out of the fleet answers no token: take it out of the pool too", names)
	default:
		e.Text = fmt.Sprintf("does port 80 for %s reach lbcert's listener on %s (for HAProxy, an ACL on path_beg /.well-known/acme-challenge/)?", names, l.Challenge.HTTPAddr)
	}
	return err
}

// Revoke revokes l's current certificate (its PEM in cert) at l's CA,
// with the account l was issued under.
func (is *Issuer) Revoke(ctx context.Context, l *store.Lineage, cert []byte, reason uint) error {
	client, err := is.Client(ctx, l.Server, l.Email)
	if err != nil {
		return err
	}
	return client.Revoke(cert, reason)
}
