package main

import (
	"context"
	"errors"
	"log/slog"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"time"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"

	"github.com/lbcert/lbcert/internal/acme"
	"github.com/lbcert/lbcert/internal/challenge"
	"github.com/lbcert/lbcert/internal/config"
	"github.com/lbcert/lbcert/internal/deploy"
	"github.com/lbcert/lbcert/internal/exit"
	"github.com/lbcert/lbcert/internal/issuer"
	"github.com/lbcert/lbcert/internal/names"
	"github.com/lbcert/lbcert/internal/notify"
	"github.com/lbcert/lbcert/internal/pace"
	"github.com/lbcert/lbcert/internal/preflight"
	"github.com/lbcert/lbcert/internal/renewal"
	"github.com/lbcert/lbcert/internal/store"
)

type issueOptions struct {
	Domains    []string
	Name       string
	KeyType    string
	Profile    string
	ReuseKey   bool
	Webroot    string
	Standalone bool
	HTTPAddr   string
	Force      bool
	deploy     deployFlags
	pace       paceFlags
	preflight  preflightFlags
	flags      *pflag.FlagSet

	httpAddrSet bool
}

// newIssueCmd builds "lbcert issue". runF replaces the run function in
// tests that only check flag parsing.
func (a *app) newIssueCmd(runF func(context.Context, *issueOptions) error) *cobra.Command {
	o := &issueOptions{}
	cmd := &cobra.Command{
		Use:   "issue -d NAME [-d NAME...] (--webroot DIR | --standalone)",
		Short: "Obtain a certificate for one or more names",
		Long: `Obtain one certificate covering every -d name, proving control of each
name with HTTP-01: either by writing token files under --webroot, which
the web server must serve at /.well-known/acme-challenge/, or from
lbcert's own listener on --http-addr (--standalone).

The certificate is saved under <dir>/live/<name>/ as cert.pem, chain.pem,
fullchain.pem and privkey.pem. If the lineage already holds a valid
certificate for the same names that is not yet due for renewal, issue
does nothing and exits 0; --force issues anyway.`,
		Example: `  lbcert issue -d example.com -d www.example.com --webroot /var/www/acme
  lbcert issue -d shop.example.net --standalone --http-addr 127.0.0.1:8888`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			o.httpAddrSet = cmd.Flags().Changed("http-addr")
			o.flags = cmd.Flags()
			if runF != nil {
				return runF(cmd.Context(), o)
			}
			return a.runIssue(cmd.Context(), o)
		},
	}
	f := cmd.Flags()
	f.StringArrayVarP(&o.Domains, "domain", "d", nil, "a name the certificate covers (repeat for more)")
	f.StringVar(&o.Name, "name", "", "lineage name, the directory under live/ (default: the first domain)")
	f.StringVar(&o.KeyType, "key-type", "ec256", "private key type: "+strings.Join(acme.KeyTypes, ", "))
	f.StringVar(&o.Profile, "profile", "", "ACME profile to request, such as Let's Encrypt's shortlived")
	f.BoolVar(&o.ReuseKey, "reuse-key", false, "keep the lineage's current private key")
	f.StringVar(&o.Webroot, "webroot", "", "directory the web server serves /.well-known/acme-challenge/ from")
	f.BoolVar(&o.Standalone, "standalone", false, "answer HTTP-01 from lbcert's own listener on --http-addr")
	f.StringVar(&o.HTTPAddr, "http-addr", ":80", "listen address for --standalone")
	f.BoolVar(&o.Force, "force", false, "issue even if a valid certificate for the same names exists")
	config.Mark(f, "key-type", "profile", "http-addr")
	o.deploy.register(f)
	o.pace.register(f)
	o.preflight.register(f, false)
	return cmd
}

// issuePlan is a checked issue request: everything validated, nothing
// touched yet.
type issuePlan struct {
	domains   []string
	name      string
	mode      store.Challenge
	acme      acme.Options
	limits    pace.Limits
	preflight *preflight.Checker
}

// checkIssue validates every input that can be checked offline, in the
// order a user would fix them. It writes nothing.
func (a *app) checkIssue(st *store.Store, o *issueOptions) (*issuePlan, error) {
	domains, err := names.Domains(o.Domains)
	if err != nil {
		return nil, exit.Errorf("%v", err)
	}
	p := &issuePlan{domains: domains, name: o.Name}
	if p.name == "" {
		p.name = domains[0]
	}
	if err := names.Lineage(p.name); err != nil {
		return nil, exit.Errorf("--name: %v", err)
	}
	if err := acme.CheckKeyType(o.KeyType); err != nil {
		return nil, exit.Errorf("%v", err)
	}
	switch {
	case o.Webroot != "" && o.Standalone:
		return nil, exit.Errorf("--webroot and --standalone both given: choose one way to answer HTTP-01")
	case o.Webroot == "" && !o.Standalone:
		return nil, exit.Errorf("no challenge method: pass --webroot DIR or --standalone")
	case o.httpAddrSet && !o.Standalone:
		return nil, exit.Errorf("--http-addr only applies with --standalone")
	case o.Webroot != "":
		root, err := filepath.Abs(o.Webroot)
		if err != nil {
			return nil, exit.Errorf("--webroot %s: %v", o.Webroot, err)
		}
		if err := challenge.CheckWebroot(root); err != nil {
			return nil, exit.Errorf("%v", err)
		}
		p.mode = store.Challenge{Mode: "webroot", Webroot: root}
	default:
		p.mode = store.Challenge{Mode: "standalone", HTTPAddr: o.HTTPAddr}
	}
	if p.limits, err = o.pace.limits(); err != nil {
		return nil, err
	}
	if p.preflight, err = o.preflight.checker(); err != nil {
		return nil, err
	}
	return p, nil
}

func (a *app) runIssue(ctx context.Context, o *issueOptions) error {
	st := store.New(a.global.Dir)
	p, err := a.checkIssue(st, o)
	if err != nil {
		return err
	}

	// Deploy settings are checked against the lineage's saved ones now,
	// read-only, so bad input leaves nothing behind.
	var prevDeploy *store.Deploy
	var prevMail *store.Mail
	if prev, err := st.Load(p.name); err == nil {
		prevDeploy, prevMail = &prev.Deploy, &prev.Mail
	}
	mailSettings := a.lineageMail(o.flags, prevMail)
	deploySettings, err := o.deploy.resolve(st.Dir, prevDeploy)
	if err != nil {
		return err
	}

	is := a.newIssuer(st)
	defer is.Close()
	// Bind the standalone port before the lock and before the CA: a port
	// in use is bad input, and holding it means nobody takes it meanwhile.
	if p.mode.Mode == "standalone" {
		if _, err := is.Listen(p.mode.HTTPAddr); err != nil {
			return exit.Errorf("%v", err)
		}
	}
	if p.acme, err = a.acmeOptions(st); err != nil {
		return err
	}

	lock, err := a.lock(st)
	if err != nil {
		return err
	}
	defer lock.Unlock()

	// Check again under the lock whether there is work to do: another run
	// may have issued this lineage while we waited.
	prev, err := st.Load(p.name)
	if err != nil && !isNotFound(err) {
		return exit.Errorf("%v", err).WithHint("move the broken lineage %s aside, or issue under another --name", st.LivePaths(p.name).Dir)
	}
	var reuse []byte
	keyType := o.KeyType
	if prev != nil {
		if sameNames(prev.Domains, p.domains) && !o.Force {
			if due, _, at := renewal.LifetimeDue(prev.Cert, a.now()); !due {
				a.printf("%s: certificate for %s is valid until %s and not due for renewal before %s; nothing to do (use --force to issue anyway)\n",
					p.name, strings.Join(prev.Domains, ", "), prev.Cert.NotAfter.Format(time.DateOnly), at.Format(time.DateOnly))
				return nil
			}
		}
		if o.ReuseKey {
			if reuse, err = st.ReadKey(p.name); err != nil {
				return exit.Errorf("--reuse-key: %v", err)
			}
			keyType = prev.KeyType
		}
	}

	// Pre-flight and the budget come last, under the lock: they are what
	// stands between this run and the CA.
	responder, err := is.Provider(p.mode)
	if err != nil {
		return err
	}
	if err := runPreflight(ctx, p.preflight, p.domains, responder); err != nil {
		return err
	}
	budget, err := a.openBudget(st, p.limits)
	if err != nil {
		return err
	}
	defer flushBudget(budget)
	key := pace.Key{Server: p.acme.Server, Email: p.acme.Email}
	if err := budget.Reserve(key, p.domains); err != nil {
		if d, ok := denied(err); ok {
			return exit.Errorf("not ordering %s: %v", p.name, d).
				WithHint("wait until then, or loosen --rate-orders/--rate-domain/--rate-failed-authz if your CA allows more")
		}
		return exit.Errorf("%v", err)
	}

	item := notify.Item{Name: p.name, Domains: p.domains, MailTo: mailSettings.To,
		Relay: notify.Relay{Host: mailSettings.Host, Port: mailSettings.Port, From: mailSettings.From}}
	if prev != nil {
		item.OldNotAfter = prev.Cert.NotAfter
	}
	got, err := is.Obtain(ctx, issuer.Request{ReuseKey: reuse, Lineage: store.Lineage{
		Name: p.name, Domains: p.domains, Server: p.acme.Server, Email: p.acme.Email,
		KeyType: keyType, Profile: o.Profile, ReuseKey: o.ReuseKey, Challenge: p.mode, Deploy: deploySettings,
		Mail: mailSettings,
	}})
	if err != nil {
		spend(budget, key, p.domains, err, a.now())
		item.Outcome, item.Error, item.Hint = "failed", oneLine(err), exit.Hint(err)
		return combine(err, a.mailReport(ctx, st, &notify.Report{Command: "issue", Items: []notify.Item{item}}))
	}
	// A new certificate starts with no renewal history.
	if err := st.RemoveStatus(p.name); err != nil {
		slog.Warn("could not reset renewal status", "name", p.name, "err", err)
	}
	paths := st.LivePaths(p.name)
	info := got.Lineage.Cert
	days := int(info.NotAfter.Sub(a.now()).Hours() / 24)
	a.printf("%s: issued certificate for %s\n  serial    %s\n  expires   %s (%d days)\n  fullchain %s\n  key       %s\n",
		p.name, strings.Join(p.domains, ", "), info.Serial, info.NotAfter.Format(time.RFC3339), days, paths.Fullchain, paths.Key)
	runner := &deploy.Runner{Store: st}
	results := runner.Run(ctx, []deploy.Change{got.Change})
	deployErr := a.reportDeploy(results)
	item.Outcome, item.Serial, item.NewNotAfter = "issued", info.Serial, info.NotAfter
	applyResult(&item, results[0])
	return combine(deployErr, a.mailReport(ctx, st, &notify.Report{Command: "issue", Items: []notify.Item{item}}))
}

// applyResult copies a deploy result into a report item; a failed deploy
// makes the item a failure.
func applyResult(it *notify.Item, r deploy.Result) {
	switch {
	case r.RolledBack:
		it.Deploy = "rolled back to the previous certificate"
	case r.Deployed && r.Name != "":
		it.Deploy = "ok"
	}
	it.Verify = r.Verify
	if r.Failed() {
		it.Outcome = "failed"
		it.Error = oneLine(r.Err)
	}
}

func oneLine(err error) string { return strings.Join(strings.Fields(err.Error()), " ") }

func sameNames(a, b []string) bool {
	x, y := slices.Clone(a), slices.Clone(b)
	sort.Strings(x)
	sort.Strings(y)
	return slices.Equal(x, y)
}

func isNotFound(err error) bool { return errors.Is(err, store.ErrNotFound) }
