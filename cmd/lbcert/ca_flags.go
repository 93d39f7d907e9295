package main

import (
	"net/mail"
	"strings"
	"sync"
	"time"

	"github.com/spf13/pflag"

	"github.com/lbcert/lbcert/internal/acme"
	"github.com/lbcert/lbcert/internal/ca"
	"github.com/lbcert/lbcert/internal/catalog"
	"github.com/lbcert/lbcert/internal/engine"
	"github.com/lbcert/lbcert/internal/exit"
	"github.com/lbcert/lbcert/internal/issuer"
	"github.com/lbcert/lbcert/internal/pace"
	"github.com/lbcert/lbcert/internal/store"
)

// caOptions are the CAs after the primary (--server with the account
// flags): the fallbacks, in the order they are tried, and how long a CA
// that keeps failing is passed over (README "Certificate authorities").
type caOptions struct {
	Fallbacks []string
	Backoff   time.Duration

	list []ca.CA // the fallbacks, parsed by checkCAs
}

func (o *caOptions) register(f *pflag.FlagSet) {
	f.StringArrayVar(&o.Fallbacks, "fallback-ca", nil, "a CA to order from when the one before it fails itself: NAME [URL] [email=, eab-kid=, eab-hmac-key-file=, ca-bundle=, preferred-chain=, verify-roots=, profile=FROM:TO] (repeat, in order; its EAB HMAC key from the file or LBCERT_EAB_HMAC_KEY_NAME)")
	f.DurationVar(&o.Backoff, "ca-backoff", 5*time.Minute, "how long a CA that failed several orders in a row is passed over for the next one, before an order tries it again (doubling while it keeps failing, up to 1h)")
}

// checkCAs parses every fallback before any command runs, so a bad one
// is refused before anything is written or sent. It reads no secret.
func (a *app) checkCAs() error {
	o := &a.caOpts
	o.list = nil
	for _, spec := range o.Fallbacks {
		c, err := ca.Parse(spec)
		if err != nil {
			return exit.Errorf("--fallback-ca: %v", err).WithHint("one CA per --fallback-ca (a list in the config file), like 'zerossl eab-kid=KID eab-hmac-key-file=/etc/lbcert/zerossl.hmac'")
		}
		if c.EABKid != "" && c.EABHMACFile == "" && a.getenv(c.HMACEnv()) == "" {
			return exit.Errorf("--fallback-ca %s has eab-kid but no HMAC key: set %s or add eab-hmac-key-file=FILE", c.Name, c.HMACEnv())
		}
		if c.Email != "" {
			if addr, err := mail.ParseAddress(c.Email); err != nil || addr.Address != c.Email || !strings.Contains(c.Email, ".") {
				return exit.Errorf("--fallback-ca %s: email=%q is not an email address", c.Name, c.Email)
			}
		}
		o.list = append(o.list, c)
	}
	if o.Backoff < time.Second || o.Backoff > ca.MaxBackoff {
		return exit.Errorf("--ca-backoff %s: want 1s to %s", o.Backoff, ca.MaxBackoff)
	}
	if len(o.list) > 0 {
		if primary, err := a.serverURL(); err == nil {
			if _, err := ca.NewSet(primary, o.list, nil); err != nil {
				return exit.Errorf("--fallback-ca: %v", err)
			}
		}
	}
	return nil
}

// checkFallbackTOS refuses, before anything is ordered, fallbacks whose
// account would have to accept terms of service with nobody to ask: in
// an outage they could take nothing.
func (a *app) checkFallbackTOS(primary acme.Options) error {
	for _, c := range a.caOpts.list {
		o := primary
		o.Server = c.Server
		if c.Email != "" {
			o.Email = c.Email
		}
		if acme.NeedsTOS(o) {
			return exit.Errorf("--fallback-ca %s: no account at %s yet, and no terminal to ask about its terms of service: pass --agree-tos to accept them", c.Name, c.Server)
		}
	}
	return nil
}

// caSet is the run's CAs with their breakers in store, or nil with no
// fallback: then a lineage orders from its own CA only, as it always
// did. A dry run's fallbacks stay off Let's Encrypt's production limits.
func (a *app) caSet(breakers ca.Store, dryRun bool) *ca.Set {
	if len(a.caOpts.list) == 0 {
		return nil
	}
	list := make([]ca.CA, len(a.caOpts.list))
	for i, c := range a.caOpts.list {
		if dryRun {
			c.Server = dryRunServer(c.Server)
		}
		list[i] = c
	}
	primary, _ := a.serverURL()
	set, err := ca.NewSet(primary, list, &ca.Breakers{Store: breakers, Now: a.now, Backoff: a.caOpts.Backoff})
	if err != nil {
		set, _ = ca.NewSet("", list, &ca.Breakers{Store: breakers, Now: a.now, Backoff: a.caOpts.Backoff})
	}
	return set
}

// useCAs wires the run's CAs into its issuer and engine: each CA's
// account and bundle, the pacing of every account's new orders (also
// with one CA), the fallbacks with their breakers, and each fallback's
// roots for the deploy check.
func (a *app) useCAs(h *host, is *issuer.Issuer, e *engine.Engine, spec runSpec) {
	set := a.caSet(h.breakers, spec.dryRun)
	is.Account = a.accountsFor(h.accounts, set, spec.dryRun)
	is.BundleFor = a.bundleFor(set)
	is.Gates = &pace.Gates{MaxWait: spec.maxWait}
	e.CAs = set
	if set != nil {
		e.Node.Roots = set.RootsFor
	}
}

// caRoots is the roots of a fallback-issued certificate for the deploy
// check, for an agent that deploys what any node ordered; nil without
// fallbacks.
func (a *app) caRoots() func(*store.Lineage) string {
	if len(a.caOpts.list) == 0 {
		return nil
	}
	set, _ := ca.NewSet("", a.caOpts.list, nil)
	return set.RootsFor
}

// bundleFor is the CA bundle of each CA by its directory.
func (a *app) bundleFor(set *ca.Set) func(server string) string {
	return func(server string) string {
		if c, ok := set.Fallback(server); ok {
			return c.CABundle
		}
		return a.global.CABundle
	}
}

// accountsFor builds each CA's account options on its first order: the
// primary's from the account flags, a fallback's from its own settings,
// its EAB HMAC key read then and only then.
func (a *app) accountsFor(st catalog.Accounts, set *ca.Set, dryRun bool) func(server, email string) (acme.Options, error) {
	primary := a.lazyAccount(st, dryRun)
	var mu sync.Mutex
	hmacs := map[string]string{}
	return func(server, email string) (acme.Options, error) {
		c, ok := set.Fallback(server)
		if !ok {
			o, err := primary(server, email)
			o.FailFast = set.Len() > 1 // another CA can take what this one drops
			return o, err
		}
		o := acme.Options{Server: server, Email: email, CABundle: c.CABundle, AgreeTOS: a.global.AgreeTOS || dryRun,
			EABKid: c.EABKid, UserAgent: userAgent(), Store: st, FailFast: true}
		if a.stdinTTY && a.stderrTTY {
			o.ConfirmTOS = a.confirmTOS
		}
		if c.EABKid == "" {
			return o, nil
		}
		mu.Lock()
		defer mu.Unlock()
		if hmacs[c.Name] == "" {
			key, err := a.readHMAC(c.HMACEnv(), c.EABHMACFile, "--fallback-ca "+c.Name+" eab-hmac-key-file",
				"--fallback-ca "+c.Name+" has eab-kid but no HMAC key: set "+c.HMACEnv()+" or add eab-hmac-key-file=FILE")
			if err != nil {
				return acme.Options{}, err
			}
			hmacs[c.Name] = key
		}
		o.EABHMAC = hmacs[c.Name]
		return o, nil
	}
}
