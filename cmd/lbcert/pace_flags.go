package main

import (
	"fmt"
	"net"
	"net/netip"
	"strconv"
	"strings"

	"github.com/spf13/pflag"

	"github.com/lbcert/lbcert/internal/hint"
	"github.com/lbcert/lbcert/internal/names"
	"github.com/lbcert/lbcert/internal/pace"
	"github.com/lbcert/lbcert/internal/preflight"
	"github.com/lbcert/lbcert/internal/store"
)

// paceFlags are the client-side rate limits of issue, renew and batch.
// They all spend one budget, saved in the state directory.
type paceFlags struct {
	orders, domain, exactSet, failedAuthz string
}

func (p *paceFlags) register(f *pflag.FlagSet) {
	le := pace.LetsEncrypt
	f.StringVar(&p.orders, "rate-orders", le.Orders.String(), "new orders per account the client allows itself (COUNT/PERIOD, or off)")
	f.StringVar(&p.domain, "rate-domain", le.Domain.String(), "new certificates per registered domain; renewals are exempt (COUNT/PERIOD, or off)")
	f.StringVar(&p.exactSet, "rate-names", le.ExactSet.String(), "new certificates per exact set of names, renewals included (COUNT/PERIOD, or off)")
	f.StringVar(&p.failedAuthz, "rate-failed-authz", le.FailedAuthz.String(), "failed validations per name per account before it waits (COUNT/PERIOD, or off)")
}

func (p *paceFlags) limits() (pace.Limits, error) {
	var l pace.Limits
	for _, x := range []struct {
		flag string
		val  string
		dst  *pace.Limit
	}{{"--rate-orders", p.orders, &l.Orders}, {"--rate-domain", p.domain, &l.Domain}, {"--rate-names", p.exactSet, &l.ExactSet},
		{"--rate-failed-authz", p.failedAuthz, &l.FailedAuthz}} {
		v, err := pace.ParseLimit(x.val)
		if err != nil {
			return l, fmt.Errorf("%s %w", x.flag, err)
		}
		*x.dst = v
	}
	return l, nil
}

func (a *app) openBudget(st *store.Store, l pace.Limits) (*pace.Budget, error) {
	b, err := pace.Open(st.Dir, l, a.now)
	if err != nil {
		return nil, hint.Wrap(fmt.Errorf("read the rate budget: %w", err), "remove %s/%s to start with a full budget", st.Dir, pace.FileName)
	}
	return b, nil
}

// preflightFlags are the checks made before ordering.
type preflightFlags struct {
	on          bool
	expectIP    []string
	expectCNAME string
	resolver    string
	httpPort    int
}

func (p *preflightFlags) register(f *pflag.FlagSet, on bool) {
	f.BoolVar(&p.on, "preflight", on, "before ordering, fetch a token through http://NAME:--http-port/.well-known/acme-challenge/ and check DNS")
	f.StringArrayVar(&p.expectIP, "expect-ip", nil, "pre-flight: every name must resolve only to these addresses (repeatable)")
	f.StringVar(&p.expectCNAME, "expect-cname", "", "pre-flight: or every name must be a CNAME to this name")
	f.StringVar(&p.resolver, "resolver", "", "pre-flight: DNS server (host:port) to ask instead of the system's")
	f.IntVar(&p.httpPort, "http-port", 80, "pre-flight: the port the CA connects to for HTTP-01")
}

// checker returns the configured checks, or nil when pre-flight is off.
// --expect-ip and --expect-cname turn it on.
func (p *preflightFlags) checker() (*preflight.Checker, error) {
	if !p.on && len(p.expectIP) == 0 && p.expectCNAME == "" {
		return nil, nil
	}
	c := &preflight.Checker{HTTPPort: p.httpPort, Resolver: p.resolver}
	for _, s := range p.expectIP {
		for _, f := range strings.FieldsFunc(s, func(r rune) bool { return r == ',' || r == ' ' }) {
			ip, err := netip.ParseAddr(f)
			if err != nil {
				return nil, fmt.Errorf("--expect-ip %q is not an IP address", f)
			}
			c.ExpectIPs = append(c.ExpectIPs, ip.Unmap())
		}
	}
	if p.expectCNAME != "" {
		if _, err := names.Domain(p.expectCNAME); err != nil {
			return nil, fmt.Errorf("--expect-cname: %w", err)
		}
		c.ExpectCNAME = p.expectCNAME
	}
	if p.httpPort < 1 || p.httpPort > 65535 {
		return nil, fmt.Errorf("--http-port %d: want 1-65535", p.httpPort)
	}
	if p.resolver != "" {
		host, port, err := net.SplitHostPort(p.resolver)
		n, perr := strconv.Atoi(port)
		if err != nil || host == "" || perr != nil || n < 1 || n > 65535 {
			return nil, fmt.Errorf("--resolver %q: want host:port, like 127.0.0.1:53", p.resolver)
		}
	}
	return c, nil
}
