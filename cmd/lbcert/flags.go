package main

import (
	"fmt"

	"github.com/spf13/pflag"

	"github.com/lbcert/lbcert/internal/config"
	"github.com/lbcert/lbcert/internal/deploy"
	"github.com/lbcert/lbcert/internal/hint"
	"github.com/lbcert/lbcert/internal/pace"
	"github.com/lbcert/lbcert/internal/preflight"
	"github.com/lbcert/lbcert/internal/store"
)

// deployFlags are the deploy settings of issue, batch and the agent.
// What is given is saved with the lineage; what is not is taken from the
// lineage's saved settings (deploy.Flags.Resolve).
type deployFlags struct {
	fs *pflag.FlagSet
	deploy.Flags
}

func (d *deployFlags) register(f *pflag.FlagSet) {
	d.fs = f
	f.StringVar(&d.Target, "deploy", "none", "load balancer to deploy to: nginx, haproxy or none")
	f.StringVar(&d.NginxConf, "nginx-conf", deploy.DefaultNginxConf, "nginx config to test (nginx -t -c FILE) and reload")
	f.StringVar(&d.NginxBin, "nginx-bin", "nginx", "nginx binary")
	f.StringVar(&d.NginxInclude, "nginx-include", "", "file lbcert writes for 'include FILE;' in nginx's http block: a server block for every lineage, all its names (needs --nginx-server-body)")
	f.StringVar(&d.NginxBody, "nginx-server-body", "", "your server body (listen lines, locations), included in every server block of --nginx-include")
	f.StringVar(&d.HAProxyConf, "haproxy-conf", deploy.DefaultHAProxyConf, "HAProxy config to test (haproxy -c -f FILE)")
	f.StringVar(&d.HAProxyBin, "haproxy-bin", "haproxy", "HAProxy binary")
	f.StringVar(&d.HAProxyCerts, "haproxy-certs", "", "directory of combined PEMs, one <name>.pem per lineage, for 'bind :443 ssl crt DIR' (default <dir>/haproxy)")
	f.StringVar(&d.HAProxySocket, "haproxy-socket", "", "HAProxy runtime API socket (level admin): update certificates without a reload")
	f.StringVar(&d.ReloadCmd, "reload-cmd", "", "command that reloads the load balancer, run with /bin/sh -c (nginx default: SIGHUP to the master in the config's pid file, else nginx -s reload)")
	f.StringVar(&d.Hook, "deploy-hook", "", "command run with /bin/sh -c after each deployed certificate; sees LBCERT_* and RENEWED_* variables")
	f.DurationVar(&d.HookTimeout, "hook-timeout", deploy.DefaultHookTimeout, "how long a deploy hook may run before it is killed")
	f.StringVar(&d.VerifyAddr, "verify-addr", "", "TLS address the load balancer serves on (host:port); checked for the new serial after reload")
	f.StringVar(&d.VerifyRoots, "verify-roots", "", "PEM file of roots: the TLS check also verifies the served chain to one of them (no intermediate is ever pinned)")
}

// resolve checks the deploy settings offline and returns them, filled
// in from prev for anything not given.
func (d *deployFlags) resolve(stateDir string, prev *store.Deploy) (store.Deploy, error) {
	return d.Resolve(func(name string) bool { return config.Given(d.fs, name) }, stateDir, prev)
}

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
