package main

import (
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
	"github.com/lbcert/lbcert/internal/engine"
	"github.com/lbcert/lbcert/internal/exit"
	"github.com/lbcert/lbcert/internal/names"
	"github.com/lbcert/lbcert/internal/pace"
	"github.com/lbcert/lbcert/internal/preflight"
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
	if err := checkDays(o.Days); err != nil {
		return nil, err
	}
	domains, err := names.Domains(o.Domains)
	if err != nil {
		return nil, exit.Errorf("%w", err)
	}
	p := &issuePlan{domains: domains, name: o.Name}
	if p.name == "" {
		p.name = names.LineageFor(domains[0])
	}
	if err := names.Lineage(p.name); err != nil {
		return nil, exit.Errorf("--name: %w", err)
	}
	if err := acme.CheckKeyType(o.KeyType); err != nil {
		return nil, exit.Errorf("%w", err)
	}
	m := a.mode()
	if err := m.mayOrder("issue"); err != nil {
		return nil, err
	}
	if p.mode, err = m.challenge(challengeFlags{webroot: o.Webroot, standalone: o.Standalone, httpAddr: o.HTTPAddr, addrSet: o.httpAddrSet}); err != nil {
		return nil, err
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
	// The settings in force are the served version's: a newer one whose
	// deploy failed does not pass its failed settings on.
	prev, err := st.Load(p.name)
	if err != nil {
		prev, err = st.Newest(p.name)
	}
	if err == nil {
		prevDeploy, prevMail = &prev.Deploy, &prev.Mail
	}
	mailSettings := a.lineageMail(o.flags, prevMail)
	deploySettings, err := a.mode().deploy(&o.deploy, st.Dir, prevDeploy)
	if err != nil {
		return err
	}
	h, err := a.mode().open(ctx, "issue")
	if err != nil {
		return err
	}
	defer h.close()
	if p.acme, err = a.acmeOptions(h.accounts); err != nil {
		return err
	}
	job := engine.Job{Force: o.Force, ReuseKey: o.ReuseKey, Lineage: store.Lineage{
		Name: p.name, Domains: p.domains, Server: p.acme.Server, Email: p.acme.Email,
		KeyType: o.KeyType, Profile: o.Profile, PreferredChain: o.Chain, ReuseKey: o.ReuseKey, Challenge: p.mode, Deploy: deploySettings,
		Mail: mailSettings,
	}}
	res, err := a.runEngine(ctx, h, runSpec{
		command: "issue", limits: p.limits, preflight: p.preflight, concurrency: 1, days: o.Days,
		maxWait: o.MaxWait, waitLock: o.WaitLock,
	}, func() (iter.Seq[engine.Job], int, error) { return slices.Values([]engine.Job{job}), 1, nil })
	if err != nil {
		return err
	}
	if o.JSON {
		a.printJSON(res)
	} else {
		a.printIssue(st, res.Items[0])
	}
	a.sayRollouts(res)
	return finish(res, a.mailReport(ctx, st, res.Report()))
}

// printIssue says what happened to the one certificate: results on
// stdout, failures on stderr in lbcert's voice.
func (a *app) printIssue(st *store.Store, it *engine.Item) {
	paths := st.LivePaths(it.Name)
	switch it.Outcome {
	case engine.NotDue:
		at := ""
		if it.DueAt != nil {
			at = " and not due for renewal before " + it.DueAt.Format(time.DateOnly)
		}
		a.printf("%s: certificate for %s is valid until %s%s; nothing to do (use --force to issue anyway)\n",
			it.Name, strings.Join(it.Domains, ", "), it.OldNotAfter.Format(time.DateOnly), at)
		return
	case engine.Reconfigured:
		a.printf("%s: certificate for %s is valid until %s and not due; saved the new settings without ordering\n",
			it.Name, strings.Join(it.Domains, ", "), it.NotAfter.Format(time.DateOnly))
		if it.Deploy == "" {
			// Only mail or challenge settings changed: the certificate
			// already where it was is not deployed again.
			a.printf("  deploy    unchanged (same deploy target; nothing deployed)\n")
		} else {
			a.printf("  deploy    %s\n", deployWords(it))
		}
		return
	case engine.Issued, engine.Renewed, engine.Deployed, engine.Failed:
		if it.Serial == "" {
			break
		}
		verb := "issued certificate"
		if it.Outcome == engine.Deployed {
			verb = "deployed the certificate obtained earlier"
		}
		a.printf("%s: %s for %s\n  serial    %s\n  expires   %s (%s)\n  fullchain %s\n  key       %s\n",
			it.Name, verb, strings.Join(it.Domains, ", "), it.Serial, it.NotAfter.Format(time.RFC3339), timeLeft(it.NotAfter.Sub(a.now())), paths.Fullchain, paths.Key)
		a.printf("  deploy    %s\n", deployWords(it))
	}
	switch it.Outcome {
	case engine.Failed, engine.Deferred, engine.NotStarted, engine.Aborted:
		switch {
		case it.Outcome == engine.Deferred:
			fmt.Fprintf(a.err, "lbcert: error: not ordering %s: %s\n", it.Name, it.Error)
		case it.Serial != "":
			fmt.Fprintf(a.err, "lbcert: error: %s: %s\n", it.Name, it.Error)
		default: // the CA's errors say "obtain <names>: ..." themselves
			fmt.Fprintf(a.err, "lbcert: error: %s\n", it.Error)
		}
		if it.Hint != "" {
			fmt.Fprintf(a.err, "lbcert: hint: %s\n", it.Hint)
		}
		if it.NextAttempt != nil && it.Outcome == engine.Deferred {
			fmt.Fprintf(a.err, "lbcert: hint: next attempt after %s\n", it.NextAttempt.Format(time.RFC3339))
		}
	}
}

// deployWords says on stdout what the deploy step did: "none",
// "deployed, verified, hook ok" or "rolled back: <reason>".
func deployWords(it *engine.Item) string {
	switch it.Deploy {
	case "none":
		return "none (no --deploy target)"
	case "rolled_back":
		return "rolled back: " + it.Pending
	case "held":
		return "held on this node: " + it.Held
	}
	if it.Outcome == engine.Failed {
		return "failed: " + it.Error
	}
	parts := []string{"deployed"}
	if it.Verify == "ok" {
		parts = append(parts, "verified")
	}
	if it.Hook == "ok" {
		parts = append(parts, "hook ok")
	}
	return strings.Join(parts, ", ")
}

func oneLine(err error) string { return strings.Join(strings.Fields(err.Error()), " ") }

func isNotFound(err error) bool { return errors.Is(err, store.ErrNotFound) }
