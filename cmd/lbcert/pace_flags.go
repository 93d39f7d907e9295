package main

import (
	"fmt"

	"github.com/spf13/pflag"

	"github.com/lbcert/lbcert/internal/hint"
	"github.com/lbcert/lbcert/internal/pace"
	"github.com/lbcert/lbcert/internal/preflight"
	"github.com/lbcert/lbcert/internal/store"
)

// paceFlags are the client-side rate limits of issue, renew and batch.
// They all spend one budget, saved in the state directory.
type paceFlags struct{ pace.LimitFlags }

func (p *paceFlags) register(f *pflag.FlagSet) {
	le := pace.LetsEncrypt
	f.StringVar(&p.Orders, "rate-orders", le.Orders.String(), "new orders per account the client allows itself (COUNT/PERIOD, or off)")
	f.StringVar(&p.Domain, "rate-domain", le.Domain.String(), "new certificates per registered domain; renewals are exempt (COUNT/PERIOD, or off)")
	f.StringVar(&p.ExactSet, "rate-names", le.ExactSet.String(), "new certificates per exact set of names, renewals included (COUNT/PERIOD, or off)")
	f.StringVar(&p.FailedAuthz, "rate-failed-authz", le.FailedAuthz.String(), "failed validations per name per account before it waits (COUNT/PERIOD, or off)")
}

func (a *app) openBudget(st *store.Store, l pace.Limits) (*pace.Budget, error) {
	b, err := pace.Open(st.Dir, l, a.now)
	if err != nil {
		return nil, hint.Wrap(fmt.Errorf("read the rate budget: %w", err), "remove %s/%s to start with a full budget", st.Dir, pace.FileName)
	}
	return b, nil
}

// preflightFlags are the checks made before ordering.
type preflightFlags struct{ preflight.Flags }

func (p *preflightFlags) register(f *pflag.FlagSet, on bool) {
	f.BoolVar(&p.On, "preflight", on, "before ordering, fetch a token through http://NAME:--http-port/.well-known/acme-challenge/ and check DNS")
	f.StringArrayVar(&p.ExpectIP, "expect-ip", nil, "pre-flight: every name must resolve only to these addresses (repeatable)")
	f.StringVar(&p.ExpectCNAME, "expect-cname", "", "pre-flight: or every name must be a CNAME to this name")
	f.StringVar(&p.Resolver, "resolver", "", "pre-flight: DNS server (host:port) to ask instead of the system's")
	f.IntVar(&p.HTTPPort, "http-port", 80, "pre-flight: the port the CA connects to for HTTP-01")
}
