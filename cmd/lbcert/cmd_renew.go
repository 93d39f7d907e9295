package main

import (
	"context"
	"fmt"
	"iter"
	"log/slog"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/lbcert/lbcert/internal/catalog"
	"github.com/lbcert/lbcert/internal/config"
	"github.com/lbcert/lbcert/internal/engine"
	"github.com/lbcert/lbcert/internal/store"
)

type renewOptions struct {
	Force         bool
	Names         []string
	DryRun        bool
	Days          int
	JSON          bool
	NoRandomSleep bool
	WaitLock      time.Duration
	Concurrency   int
	MaxWait       time.Duration
	PrintUnit     bool
	PrintTimer    bool
	pace          paceFlags
}

// maxRandomSleep spreads cron runs over eight minutes, as certbot and
// lego do, so that every host's "17 2 * * *" does not hit the CA at once.
const maxRandomSleep = 8 * time.Minute

func (a *app) newRenewCmd() *cobra.Command {
	o := &renewOptions{}
	cmd := &cobra.Command{
		Use:   "renew",
		Short: "Renew every certificate that is due (the cron job)",
		Long: `Renew walks every lineage in the state directory and renews the ones that
are due, with each lineage's saved settings: challenge, key type, profile,
deploy target and hook. A certificate is due when:

  - the CA offers ACME Renewal Information (RFC 9773) and the moment lbcert
    picked at random inside the CA's suggested window has come;
  - without ARI, one third of its lifetime remains (half, for lifetimes of
    10 days or less);
  - with --days N, fewer than N days remain (this overrides the rules above);
  - always, when less than 1/20 of its lifetime remains.

When nothing is due, renew prints nothing and exits 0 (add -v to see why).
When stdout is not a terminal and something is due, it first sleeps a
random 0-8 minutes, so that many hosts' cron jobs do not hit the CA at the
same second; --no-random-sleep turns that off. After a failure a lineage
waits 1 hour before the next attempt, then 2, 4, up to 23h50m (so a daily
cron retries every day); --force overrides that. Lineages are renewed
--concurrency at a time (64 by default, measured as for batch). All
deploys happen once, at the end: one config test and one reload per load
balancer. A certificate whose deploy failed is kept as pending and
deployed by a later run; it is never ordered again while it is valid.

` + exitCodesHelp,
		Example: `  17 2 * * * root lbcert renew -q          # the cron line
  lbcert renew --dry-run --no-random-sleep  # try it now, save nothing
  lbcert renew --name shop.example.net --force`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			return a.runRenew(cmd.Context(), o)
		},
		ValidArgsFunction: cobra.NoFileCompletions,
	}
	f := cmd.Flags()
	f.BoolVar(&o.Force, "force", false, "renew every selected certificate now, ignoring due dates and backoff")
	f.StringArrayVar(&o.Names, "name", nil, "renew only this lineage (repeatable)")
	f.BoolVar(&o.DryRun, "dry-run", false, "go through the whole flow but save and deploy nothing (Let's Encrypt production lineages use staging)")
	f.IntVar(&o.Days, "days", 0, "renew when fewer than N days remain, instead of ARI and the lifetime rule")
	f.BoolVar(&o.JSON, "json", false, "print the run's report as JSON on stdout")
	f.BoolVar(&o.NoRandomSleep, "no-random-sleep", false, "do not sleep 0-8 minutes before contacting the CA from cron")
	f.DurationVar(&o.WaitLock, "wait-lock", 0, "wait this long for another lbcert run to finish, instead of failing at once")
	f.IntVar(&o.Concurrency, "concurrency", engine.DefaultConcurrency, "renewals (and ARI look-ups) in flight at once")
	f.DurationVar(&o.MaxWait, "max-wait", 5*time.Minute, "wait at most this long for the rate budget or a Retry-After before leaving a lineage for the next run")
	f.BoolVar(&o.PrintUnit, "print-systemd-unit", false, "print lbcert-renew.service, a unit running this renew with these settings, and exit")
	f.BoolVar(&o.PrintTimer, "print-systemd-timer", false, "print lbcert-renew.timer, which starts that unit on the renew schedule, and exit")
	o.pace.register(f)
	cmd.RegisterFlagCompletionFunc("name", a.completeLineages)
	return cmd
}

func (a *app) runRenew(ctx context.Context, o *renewOptions) error {
	switch {
	case o.PrintUnit && o.PrintTimer:
		return fmt.Errorf("--print-systemd-unit and --print-systemd-timer print one unit each: give one")
	case o.PrintUnit:
		if err := a.schedulable(); err != nil {
			return err
		}
		a.printf("%s", a.printedUnit(false))
		return nil
	case o.PrintTimer:
		a.printf("%s", a.printedUnit(true))
		return nil
	}
	st := store.New(a.global.Dir)
	if err := engine.CheckRenewFlags(o.Days, o.Concurrency, o.Names); err != nil {
		return err
	}
	limits, err := o.pace.Limits()
	if err != nil {
		return err
	}
	// Checked now, without reading any secret: a bad --email or
	// --ca-bundle is bad input, not a failure of every lineage.
	if err := a.account().Check(a.ctx); err != nil {
		return err
	}
	if err := a.mode().mayOrder("renew"); err != nil {
		// Cron runs renew on every node; this one leaves ordering to the
		// dedicated node (seed 000), and its agent installs what that
		// node orders. Said only with -v.
		slog.Debug("this node never orders (--no-order); nothing to do")
		return nil
	}
	h, err := a.mode().open(ctx, "renew")
	if err != nil {
		return err
	}
	defer h.close()
	if p, ok := h.catalog.(interface{ Pass() func() }); ok && len(o.Names) == 0 && !o.DryRun {
		defer p.Pass()() // a pass over every lineage: through the heads index
	}
	// failed: never issued, retried (engine.RenewJobs)
	all, failed, err := catalog.NamesBeside(ctx, h.catalog, h.failedNames, "the names never issued are not retried this run: they could not be listed")
	if err != nil {
		return fmt.Errorf("read the lineages: %w", err)
	}
	if len(all)+len(failed) == 0 && len(o.Names) == 0 {
		slog.Debug("no lineages", "dir", st.Dir)
		res := &engine.Result{Version: engine.SchemaVersion, Command: "renew", DryRun: o.DryRun, Started: a.now(), Finished: a.now()}
		res.Count()
		a.renderRenew(res, o)
		return nil
	}
	delay := maxRandomSleep
	if o.NoRandomSleep || a.stdoutTTY {
		delay = 0
	}
	res, err := a.runEngine(ctx, h, runSpec{limits: limits, waitLock: o.WaitLock, scheduled: len(o.Names) == 0, Options: engine.Options{
		Command: "renew", Concurrency: o.Concurrency, Days: o.Days, DryRun: o.DryRun, MaxWait: o.MaxWait, RandomDelay: delay,
	}}, func() (iter.Seq[engine.Job], int, error) {
		return engine.RenewJobs(ctx, h.catalog, all, failed, engine.Renewal{Names: o.Names, Force: o.Force, DryRun: o.DryRun, Where: h.where})
	})
	if err != nil {
		return err
	}
	a.renderRenew(res, o)
	a.sayUnreachable(res)
	var mailErr error
	if !o.DryRun {
		mailErr = a.mailReport(ctx, st, res.Report())
	}
	return runError(res, mailErr)
}

// renderRenew prints the run: JSON, or a summary that is silent when
// nothing happened, so cron sends no mail.
func (a *app) renderRenew(res *engine.Result, o *renewOptions) {
	if o.JSON {
		a.printJSON(res)
		return
	}
	for _, it := range res.Items {
		if it.Outcome == engine.Failed || it.Outcome == engine.Aborted {
			a.say.errorf("renew %s: %s", it.Name, it.Error)
			if it.Hint != "" {
				a.say.hintf("%s", it.Hint)
			}
		}
		if it.Cadence != "" {
			// Even on a nothing-due run: a schedule too slow for the
			// certificates is silent until one expires (-q keeps it).
			a.say.warningf("%s: %s", it.Name, it.Cadence)
		}
	}
	if !a.global.Quiet {
		res.RenewSummary(a.out)
	}
}

// completeLineages completes lineage names for --name and delete/show.
func (a *app) completeLineages(cmd *cobra.Command, args []string, toComplete string) ([]string, cobra.ShellCompDirective) {
	dir := a.global.Dir
	if f := cmd.Flags().Lookup("dir"); f != nil && !f.Changed {
		if v := a.getenv(config.EnvName("dir")); v != "" {
			dir = v
		}
	}
	all, _ := store.New(dir).Lineages()
	var out []string
	for _, n := range all {
		if strings.HasPrefix(n, toComplete) {
			out = append(out, n)
		}
	}
	return out, cobra.ShellCompDirectiveNoFileComp
}
