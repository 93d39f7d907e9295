// Package issuer turns a lineage's settings into a saved certificate: it
// answers HTTP-01 through the lineage's webroot or a shared standalone
// listener, orders through acme, saves through store, and hands back the
// deploy.Change for the run's single deploy step.
//
// It is what issue, renew and batch share. It keeps one ACME client per
// (server, email) and one listener per standalone address for the whole
// run, so a batch of 500 certificates registers nothing twice and binds
// each port once. It never deploys and never decides what is due.
package issuer

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"time"

	legochallenge "github.com/go-acme/lego/v4/challenge"

	"github.com/lbcert/lbcert/internal/acme"
	"github.com/lbcert/lbcert/internal/challenge"
	"github.com/lbcert/lbcert/internal/deploy"
	"github.com/lbcert/lbcert/internal/exit"
	"github.com/lbcert/lbcert/internal/store"
)

// Issuer is one run's access to the CA.
type Issuer struct {
	Store *store.Store
	// Account returns the options for (server, email); the caller knows
	// the CA bundle, ToS and EAB settings.
	Account func(server, email string) acme.Options
	Now     func() time.Time

	mu        sync.Mutex
	clients   map[string]*clientOnce
	listeners map[string]*challenge.Standalone
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
	co.once.Do(func() { co.c, co.err = acme.New(ctx, is.Account(server, email)) })
	return co.c, co.err
}

// Listen binds the standalone listener for addr now, or returns the one
// already bound. Callers bind before taking the lock or asking the CA, so
// a port in use is reported as bad input.
func (is *Issuer) Listen(addr string) (*challenge.Standalone, error) {
	is.mu.Lock()
	defer is.mu.Unlock()
	if is.listeners == nil {
		is.listeners = map[string]*challenge.Standalone{}
	}
	if l, ok := is.listeners[addr]; ok {
		return l, nil
	}
	l, err := challenge.Listen(addr)
	if err != nil {
		return nil, err
	}
	is.listeners[addr] = l
	return l, nil
}

// Close stops every listener.
func (is *Issuer) Close() {
	is.mu.Lock()
	defer is.mu.Unlock()
	for _, l := range is.listeners {
		l.Close()
	}
	is.listeners = nil
}

// Provider returns the HTTP-01 responder for c: a webroot, or the shared
// standalone listener of its address.
func (is *Issuer) Provider(c store.Challenge) (legochallenge.Provider, error) {
	switch c.Mode {
	case "webroot":
		return &challenge.Webroot{Root: c.Webroot}, nil
	case "standalone":
		l, err := is.Listen(c.HTTPAddr)
		if err != nil {
			return nil, exit.Errorf("%v", err)
		}
		return l, nil
	}
	return nil, fmt.Errorf("unknown challenge mode %q", c.Mode)
}

// Request is one certificate to obtain for a lineage.
type Request struct {
	// Lineage holds the settings; Cert, Version and IssuedAt are filled
	// in from the new certificate.
	Lineage store.Lineage
	// ReuseKey is the PEM key to reuse, if any.
	ReuseKey []byte
	// Replaces is the RFC 9773 CertID of the certificate being renewed.
	Replaces string
	// DryRun orders the certificate but saves nothing.
	DryRun bool
}

// Obtained is a certificate obtained (and, unless DryRun, saved).
type Obtained struct {
	Lineage store.Lineage
	Change  deploy.Change
}

// Obtain orders, checks and saves one certificate.
func (is *Issuer) Obtain(ctx context.Context, r Request) (*Obtained, error) {
	l := r.Lineage
	p, err := is.Provider(l.Challenge)
	if err != nil {
		return nil, err
	}
	client, err := is.Client(ctx, l.Server, l.Email)
	if err != nil {
		return nil, err
	}
	slog.Info("requesting certificate", "name", l.Name, "domains", strings.Join(l.Domains, ","), "challenge", l.Challenge.Mode)
	res, err := client.Obtain(acme.Request{
		Domains: l.Domains, KeyType: l.KeyType, Profile: l.Profile, Key: r.ReuseKey, Provider: p, Replaces: r.Replaces,
	})
	if err != nil {
		return nil, withChallengeHint(err, l)
	}
	l.Cert = res.Info
	l.IssuedAt = is.Now().UTC()
	out := &Obtained{Lineage: l, Change: deploy.Change{
		Name: l.Name, Domains: l.Domains, Serial: res.Info.Serial, Deploy: l.Deploy,
	}}
	if r.DryRun {
		return out, nil
	}
	// A Ctrl-C that arrived while the CA answered: the certificate is
	// valid and paid for in rate limit, so keeping it is the better half
	// of the bargain; the save is atomic either way.
	version, previous, err := is.Store.Save(&l, res.Files)
	if err != nil {
		return nil, exit.Errorf("save %s: %v", l.Name, err).
			WithHint("the previous certificate, if any, is still live; check free space and permissions under %s", is.Store.Dir)
	}
	out.Lineage.Version = version
	out.Change.Previous = previous
	return out, nil
}

// withChallengeHint replaces a generic HTTP-01 hint with one that names
// the set-up in use, which is what the user has to check.
func withChallengeHint(err error, l store.Lineage) error {
	var e *exit.Error
	if !errors.As(err, &e) || !strings.Contains(e.Hint, "/.well-known/acme-challenge/") {
		return err
	}
	names := strings.Join(l.Domains, ", ")
	if l.Challenge.Mode == "webroot" {
		e.Hint = fmt.Sprintf("does the web server serve %s/.well-known/acme-challenge/ over plain HTTP on port 80 for %s?", l.Challenge.Webroot, names)
	} else {
		e.Hint = fmt.Sprintf("does port 80 for %s reach lbcert's listener on %s (for HAProxy, an ACL on path_beg /.well-known/acme-challenge/)?", names, l.Challenge.HTTPAddr)
	}
	return err
}
