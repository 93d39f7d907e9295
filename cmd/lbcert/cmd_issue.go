package main

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"iter"
	"slices"
	"strings"
	"time"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"

	"github.com/lbcert/lbcert/internal/acme"
	"github.com/lbcert/lbcert/internal/challenge"
	"github.com/lbcert/lbcert/internal/engine"
	"github.com/lbcert/lbcert/internal/names"
	"github.com/lbcert/lbcert/internal/renewal"
	"github.com/lbcert/lbcert/internal/store"
)

type issueOptions struct {
	Domains    []string
	Name       string
	KeyType    string
	Profile    string
	Chain      string
	ReuseKey   bool
	Webroot    string
	Standalone bool
	HTTPAddr   string
	Force      bool
	Days       int
	JSON       bool
	MaxWait    time.Duration
	WaitLock   time.Duration
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
orders nothing and exits 0: it says so, and when settings changed (the
deploy target, mail, challenge) it saves them and, for a new deploy
target, deploys the current certificate there; --force issues anyway.`,
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
	f.StringVar(&o.Chain, "preferred-chain", "", "pick the chain whose top issuer has this common name, when the CA offers several")
	f.BoolVar(&o.ReuseKey, "reuse-key", false, "keep the lineage's current private key")
	f.StringVar(&o.Webroot, "webroot", "", "directory the web server serves /.well-known/acme-challenge/ from")
	f.BoolVar(&o.Standalone, "standalone", false, "answer HTTP-01 from lbcert's own listener on --http-addr")
	f.StringVar(&o.HTTPAddr, "http-addr", ":80", "listen address for --standalone")
	f.BoolVar(&o.Force, "force", false, "issue even if a valid certificate for the same names exists, and ignore the failure backoff")
	f.IntVar(&o.Days, "days", 0, "renew the existing certificate when fewer than N days remain, instead of ARI and the lifetime rule (as renew --days)")
	f.BoolVar(&o.JSON, "json", false, "print the run's report as JSON on stdout")
	f.DurationVar(&o.MaxWait, "max-wait", 5*time.Minute, "wait at most this long for the rate budget or a Retry-After before giving up for this run")
	f.DurationVar(&o.WaitLock, "wait-lock", 0, "wait this long for another lbcert run to finish, instead of failing at once")
	o.deploy.register(f)
	o.pace.register(f)
	o.preflight.register(f, false)
	return cmd
}

// checkIssue validates every input that can be checked offline, in the
// order a user would fix them, and returns the job and the run without
// their account and saved settings. It writes nothing.
func (a *app) checkIssue(st *store.Store, o *issueOptions) (engine.Job, runSpec, error) {
	var job engine.Job
	var spec runSpec
	if err := renewal.CheckDays(o.Days); err != nil {
		return job, spec, err
	}
	domains, err := names.Domains(o.Domains)
	if err != nil {
		return job, spec, err
	}
	l := store.Lineage{Name: cmp.Or(o.Name, names.LineageFor(domains[0])), Domains: domains, KeyType: o.KeyType,
		Profile: o.Profile, PreferredChain: o.Chain, ReuseKey: o.ReuseKey}
	if err := names.Lineage(l.Name); err != nil {
		return job, spec, fmt.Errorf("--name: %w", err)
	}
	if err := acme.CheckKeyType(o.KeyType); err != nil {
		return job, spec, err
	}
	m := a.mode()
	if err := m.mayOrder("issue"); err != nil {
		return job, spec, err
	}
	if l.Challenge, err = m.challenge(challengeFlags{webroot: o.Webroot, standalone: o.Standalone, httpAddr: o.HTTPAddr, addrSet: o.httpAddrSet, fs: o.flags}); err != nil {
		return job, spec, err
	}
	if l.Challenge.Mode == "standalone" {
		if err := probe(st, l.Challenge.HTTPAddr); err != nil {
			return job, spec, err
		}
	}
	spec = runSpec{waitLock: o.WaitLock, Options: engine.Options{Command: "issue", Concurrency: 1, Days: o.Days, MaxWait: o.MaxWait}}
	if spec.limits, err = o.pace.Limits(); err != nil {
		return job, spec, err
	}
	spec.Preflight, err = o.preflight.Checker()
	return engine.Job{Force: o.Force, ReuseKey: o.ReuseKey, Lineage: l}, spec, err
}

// probe refuses a listen address in use before anything is written,
// unless another lbcert run holds it: then the answer is "locked".
func probe(st *store.Store, addr string) error {
	err := challenge.Probe(addr)
	if err != nil {
		if held := st.Held(); held != nil {
			return held
		}
	}
	return err
}

func (a *app) runIssue(ctx context.Context, o *issueOptions) error {
	st := store.New(a.global.Dir)
	job, spec, err := a.checkIssue(st, o)
	if err != nil {
		return err
	}
	// Deploy settings are checked against the lineage's saved ones now,
	// read-only, so bad input leaves nothing behind. The settings in
	// force are the served version's: a newer one whose deploy failed
	// does not pass its failed settings on.
	var prevDeploy *store.Deploy
	var prevMail *store.Mail
	prev, err := st.Load(job.Lineage.Name)
	if err != nil {
		prev, err = st.Newest(job.Lineage.Name)
	}
	if err == nil {
		prevDeploy, prevMail = &prev.Deploy, &prev.Mail
	}
	job.Lineage.Mail = a.lineageMail(o.flags, prevMail)
	if job.Lineage.Deploy, err = a.mode().deploy(&o.deploy, st.Dir, prevDeploy); err != nil {
		return err
	}
	h, err := a.mode().open(ctx, "issue")
	if err != nil {
		return err
	}
	defer h.close()
	opts, err := a.acmeOptions(h.accounts)
	if err != nil {
		return err
	}
	job.Lineage.Server, job.Lineage.Email = opts.Server, opts.Email
	res, err := a.runEngine(ctx, h, spec, func() (iter.Seq[engine.Job], int, error) { return slices.Values([]engine.Job{job}), 1, nil })
	if err != nil {
		return err
	}
	if o.JSON {
		a.printJSON(res)
	} else {
		a.printIssue(st, res.Items[0])
	}
	return runError(res, a.mailReport(ctx, st, res.Report()))
}

// printIssue says what happened to the one certificate: results on
// stdout, failures on stderr in lbcert's voice.
func (a *app) printIssue(st *store.Store, it *engine.Item) {
	if !a.global.Quiet {
		it.IssueText(a.out, st.LivePaths(it.Name), a.now())
	}
	if it.NotInstalled() {
		a.say.warningf("%s: %s", it.Name, it.DeployWords())
	}
	switch it.Outcome {
	case engine.Failed, engine.Deferred, engine.NotStarted, engine.Aborted:
		switch {
		case it.Outcome == engine.Deferred:
			a.say.errorf("not ordering %s: %s", it.Name, strings.TrimPrefix(it.Error, "not ordered: "))
		case it.Serial != "":
			a.say.errorf("%s: %s", it.Name, it.Error)
		default: // the CA's errors say "obtain <names>: ..." themselves
			a.say.errorf("%s", it.Error)
		}
		if it.Hint != "" {
			a.say.hintf("%s", it.Hint)
		}
		if it.NextAttempt != nil && it.Outcome == engine.Deferred && !strings.Contains(it.Hint, "next attempt") {
			a.say.hintf("next attempt after %s", it.NextAttempt.Format(time.RFC3339))
		}
	}
}

func isNotFound(err error) bool { return errors.Is(err, store.ErrNotFound) }
