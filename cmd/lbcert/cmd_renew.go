package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/lbcert/lbcert/internal/acme"
	"github.com/lbcert/lbcert/internal/config"
	"github.com/lbcert/lbcert/internal/deploy"
	"github.com/lbcert/lbcert/internal/exit"
	"github.com/lbcert/lbcert/internal/issuer"
	"github.com/lbcert/lbcert/internal/names"
	"github.com/lbcert/lbcert/internal/notify"
	"github.com/lbcert/lbcert/internal/pace"
	"github.com/lbcert/lbcert/internal/renewal"
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
waits 1 hour before the next attempt, then 2, 4, up to 24 hours; --force
overrides that. All deploys happen once, at the end: one config test and
one reload per load balancer.

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
	config.Mark(f, "days", "no-random-sleep", "wait-lock")
	o.pace.register(f)
	cmd.RegisterFlagCompletionFunc("name", a.completeLineages)
	return cmd
}

// renewEntry is one lineage's line in the report.
type renewEntry struct {
	Name        string     `json:"name"`
	Domains     []string   `json:"domains,omitempty"`
	Reason      string     `json:"reason,omitempty"`
	DueAt       *time.Time `json:"due_at,omitempty"`
	OldSerial   string     `json:"old_serial,omitempty"`
	NewSerial   string     `json:"new_serial,omitempty"`
	OldNotAfter *time.Time `json:"old_not_after,omitempty"`
	NewNotAfter *time.Time `json:"new_not_after,omitempty"`
	Deploy      string     `json:"deploy,omitempty"`
	Verify      string     `json:"verify,omitempty"`
	Hook        string     `json:"hook,omitempty"`
	Error       string     `json:"error,omitempty"`
	Hint        string     `json:"hint,omitempty"`
	NextAttempt *time.Time `json:"next_attempt,omitempty"`

	mail store.Mail // the lineage's own recipients, for the report
}

// renewReport is what a run did; --json prints it as is.
type renewReport struct {
	DryRun   bool         `json:"dry_run,omitempty"`
	Renewed  []renewEntry `json:"renewed"`
	NotDue   []renewEntry `json:"not_due"`
	Failed   []renewEntry `json:"failed"`
	Deferred []renewEntry `json:"deferred"`
}

func (a *app) runRenew(ctx context.Context, o *renewOptions) error {
	st := store.New(a.global.Dir)
	if o.Days < 0 {
		return exit.Errorf("--days %d: must be positive", o.Days)
	}
	for _, n := range o.Names {
		if err := names.Lineage(n); err != nil {
			return exit.Errorf("--name: %v", err)
		}
	}
	limits, err := o.pace.limits()
	if err != nil {
		return err
	}
	base, err := a.accountBase(st)
	if err != nil {
		return err
	}
	all, err := st.Names()
	if err != nil {
		return exit.Errorf("read %s: %v", st.Dir, err)
	}
	selected := all
	if len(o.Names) > 0 {
		selected = nil
		for _, n := range o.Names {
			if _, err := st.Load(n); err != nil {
				return exit.Errorf("--name %s: no such lineage in %s", n, st.Dir).WithHint("'lbcert list' shows the lineages")
			}
			selected = append(selected, n)
		}
	}
	if len(selected) == 0 {
		slog.Debug("no lineages", "dir", st.Dir)
		return a.finishRenew(&renewReport{DryRun: o.DryRun}, o)
	}

	lock, err := a.renewLock(ctx, st, o.WaitLock)
	if err != nil {
		return err
	}
	defer lock.Unlock()

	is := a.newIssuer(st)
	is.Account = func(server, email string) acme.Options {
		opts := base
		opts.Server, opts.Email = server, email
		if o.DryRun {
			opts.AgreeTOS = true // a dry run against staging needs its own account
		}
		return opts
	}
	defer is.Close()
	budget, err := a.openBudget(st, limits)
	if err != nil {
		return err
	}
	defer flushBudget(budget)
	r := &renewRun{app: a, o: o, st: st, is: is, budget: budget, report: &renewReport{DryRun: o.DryRun}}
	r.run(ctx, selected)
	err = a.finishRenew(r.report, o)
	if !o.DryRun {
		err = combine(err, a.mailReport(ctx, st, r.report.mailReport(a.now())))
	}
	if ctx.Err() != nil {
		return &exit.Error{Code: exit.Interrupted, Msg: "interrupted; lineages not reached are unchanged, the next run renews them"}
	}
	return err
}

func (a *app) renewLock(ctx context.Context, st *store.Store, wait time.Duration) (*store.Lock, error) {
	if wait <= 0 {
		return a.lock(st)
	}
	wctx, cancel := context.WithTimeout(ctx, wait)
	defer cancel()
	l, err := st.WaitLock(wctx)
	var le *store.LockedError
	if errors.As(err, &le) {
		return nil, &exit.Error{Code: exit.Locked, Msg: fmt.Sprintf("%v; waited %s", le, wait)}
	}
	if err != nil {
		return nil, exit.Errorf("%v", err)
	}
	return l, nil
}

// renewRun is one renew run's state.
type renewRun struct {
	app     *app
	o       *renewOptions
	st      *store.Store
	is      *issuer.Issuer
	budget  *pace.Budget
	report  *renewReport
	slept   bool
	changes []deploy.Change
	byName  map[string]int // change index -> report.Renewed index
}

func (r *renewRun) run(ctx context.Context, selected []string) {
	now := r.app.now()
	r.byName = map[string]int{}
	for _, name := range selected {
		if ctx.Err() != nil {
			slog.Warn("interrupted: no new renewals started", "left", len(selected))
			break
		}
		r.one(ctx, name, now)
		now = r.app.now()
	}
	if len(r.changes) > 0 && !r.o.DryRun {
		results := (&deploy.Runner{Store: r.st}).Run(ctx, r.changes)
		r.applyDeploy(results)
	}
}

// one decides about and, if due, renews lineage name.
func (r *renewRun) one(ctx context.Context, name string, now time.Time) {
	l, err := r.st.Load(name)
	if err != nil {
		r.fail(renewEntry{Name: name}, err, store.Status{}, false)
		return
	}
	status, _ := r.st.ReadStatus(name)
	entry := renewEntry{Name: name, Domains: l.Domains, OldSerial: l.Cert.Serial, OldNotAfter: timePtr(l.Cert.NotAfter), mail: l.Mail}
	opts := renewal.Options{Days: r.o.Days, ARIOffered: !now.Before(status.ARIUnsupported)}
	d := renewal.Decide(l.Cert, status, now, opts)
	if d.CheckARI && !d.Due && !r.o.Force {
		status = r.checkARI(ctx, l, status, now)
		opts.ARIOffered = !now.Before(status.ARIUnsupported)
		d = renewal.Decide(l.Cert, status, now, opts)
	}
	if r.o.Force {
		d.Due, d.Reason = true, renewal.Forced
	}
	entry.Reason = string(d.Reason)
	entry.DueAt = timePtr(d.At)
	if !d.Due {
		slog.Debug("not due", "name", name, "rule", d.Reason, "due_at", d.At.Format(time.RFC3339))
		r.report.NotDue = append(r.report.NotDue, entry)
		return
	}
	if renewal.InBackoff(status, now) && !r.o.Force {
		entry.Error = status.LastError
		entry.NextAttempt = timePtr(status.NextAttempt)
		slog.Warn("due but waiting after a failure", "name", name, "until", status.NextAttempt.Format(time.RFC3339), "failures", status.Failures)
		r.report.Deferred = append(r.report.Deferred, entry)
		return
	}
	r.sleepOnce(ctx)
	if ctx.Err() != nil {
		return
	}
	req := issuer.Request{Lineage: *l, DryRun: r.o.DryRun}
	if opts.ARIOffered {
		req.Replaces = l.Cert.ARICertID
	}
	if r.o.DryRun {
		req.Lineage.Server = dryRunServer(l.Server)
		req.Replaces = ""
	}
	if l.ReuseKey {
		if req.ReuseKey, err = r.st.ReadKey(name); err != nil {
			r.fail(entry, err, status, true)
			return
		}
	}
	// The budget is shared with batch and issue; a spent one defers the
	// lineage to a later run instead of finding the CA's limit.
	key := pace.Key{Server: req.Lineage.Server, Email: req.Lineage.Email}
	if !r.o.DryRun {
		if err := r.budget.Reserve(key, l.Domains); err != nil {
			if d, ok := denied(err); ok {
				entry.Error = "not ordered: " + d.Reason
				entry.NextAttempt = timePtr(r.app.now().Add(d.Wait))
				slog.Warn("due but the rate budget is spent", "name", name, "reason", d.Reason, "next", entry.NextAttempt.Format(time.RFC3339))
				r.report.Deferred = append(r.report.Deferred, entry)
				return
			}
			r.fail(entry, err, status, false)
			return
		}
	}
	slog.Info("renewing", "name", name, "reason", d.Reason)
	got, err := r.is.Obtain(ctx, req)
	if err != nil {
		if !r.o.DryRun {
			spend(r.budget, key, l.Domains, err, r.app.now())
		}
		r.fail(entry, err, status, !r.o.DryRun)
		return
	}
	entry.NewSerial = got.Lineage.Cert.Serial
	entry.NewNotAfter = timePtr(got.Lineage.Cert.NotAfter)
	if !r.o.DryRun {
		// Fresh certificate, fresh history: ARI for the new serial is
		// asked on a later run, and the backoff is over.
		if err := r.st.RemoveStatus(name); err != nil {
			slog.Warn("could not reset renewal status", "name", name, "err", err)
		}
		r.byName[name] = len(r.report.Renewed)
		r.changes = append(r.changes, got.Change)
	}
	r.report.Renewed = append(r.report.Renewed, entry)
}

// checkARI asks the CA for the renewal window and saves the answer.
func (r *renewRun) checkARI(ctx context.Context, l *store.Lineage, st store.Status, now time.Time) store.Status {
	client, err := r.is.Client(ctx, l.Server, l.Email)
	if err != nil {
		slog.Warn("renewal info: no ACME client; using the lifetime rule", "name", l.Name, "err", err)
		return st
	}
	cert, err := r.st.ReadFullchain(l.Name)
	if err != nil {
		return st
	}
	info, err := client.RenewalInfo(cert)
	switch {
	case errors.Is(err, acme.ErrNoARI):
		st.ARIUnsupported = now.Add(7 * 24 * time.Hour).UTC()
	case err != nil:
		slog.Warn("renewal info failed; using the lifetime rule", "name", l.Name, "err", err)
		return st
	default:
		st = renewal.ApplyARI(st, l.Cert.Serial, info.Start, info.End, info.RetryAfter, now, renewal.RandInt64N)
		slog.Debug("renewal info", "name", l.Name, "window_start", info.Start, "window_end", info.End, "renew_at", st.ARIRenewAt, "next_check", st.ARINextCheck)
	}
	if !r.o.DryRun {
		if err := r.st.WriteStatus(l.Name, st); err != nil {
			slog.Warn("could not save renewal info", "name", l.Name, "err", err)
		}
	}
	return st
}

// sleepOnce sleeps a random 0-8 minutes before the first request to the
// CA of a run whose stdout is not a terminal, i.e. from cron.
func (r *renewRun) sleepOnce(ctx context.Context) {
	if r.slept || r.o.NoRandomSleep || r.app.stdoutTTY {
		return
	}
	r.slept = true
	d := time.Duration(rand.Int64N(int64(maxRandomSleep)))
	slog.Info("sleeping before contacting the CA, to spread cron load (--no-random-sleep to skip)", "for", d.Round(time.Second))
	select {
	case <-time.After(d):
	case <-ctx.Done():
	}
}

// fail records a failure and, unless this is a dry run, the backoff.
func (r *renewRun) fail(e renewEntry, err error, st store.Status, backoff bool) {
	e.Error = strings.Join(strings.Fields(err.Error()), " ")
	e.Hint = exit.Hint(err)
	if backoff {
		e.NextAttempt = timePtr(recordFailure(r.st, st, e.Name, e.Error, r.app.now()))
	}
	r.report.Failed = append(r.report.Failed, e)
}

// recordFailure starts or lengthens the per-name backoff that renew and
// batch share (1h, 2h, ... 24h) and returns when the name may be tried
// again.
func recordFailure(s *store.Store, status store.Status, name, msg string, now time.Time) time.Time {
	status = renewal.Failed(status, msg, now)
	if err := s.WriteStatus(name, status); err != nil {
		slog.Warn("could not save backoff", "name", name, "err", err)
	}
	return status.NextAttempt
}

// applyDeploy moves lineages whose deploy failed from renewed to failed.
func (r *renewRun) applyDeploy(results []deploy.Result) {
	failed := map[string]bool{}
	for _, res := range results {
		i := r.byName[res.Name]
		e := &r.report.Renewed[i]
		switch {
		case res.RolledBack:
			e.Deploy = "rolled back"
		case res.Deployed:
			e.Deploy = "ok"
		}
		e.Verify, e.Hook = res.Verify, res.Hook
		if res.Failed() {
			failed[res.Name] = true
			st, _ := r.st.ReadStatus(res.Name)
			msg := res.Err.Error()
			if res.RolledBack {
				msg += "; rolled back to the previous certificate"
			}
			r.fail(*e, errors.New(msg), st, true)
		}
	}
	kept := r.report.Renewed[:0]
	for _, e := range r.report.Renewed {
		if !failed[e.Name] {
			kept = append(kept, e)
		}
	}
	r.report.Renewed = kept
}

// finishRenew prints the report and picks the exit code. A run where
// nothing happened prints nothing, so cron sends no mail.
func (a *app) finishRenew(rep *renewReport, o *renewOptions) error {
	if o.JSON {
		for _, l := range []*[]renewEntry{&rep.Renewed, &rep.NotDue, &rep.Failed, &rep.Deferred} {
			if *l == nil {
				*l = []renewEntry{}
			}
		}
		enc := json.NewEncoder(a.out)
		enc.SetIndent("", "  ")
		enc.Encode(rep)
	} else {
		a.printRenewSummary(rep)
	}
	switch {
	case len(rep.Failed) == 0:
		return nil
	case len(rep.Renewed)+len(rep.NotDue)+len(rep.Deferred) > 0:
		return exit.Reported(exit.Partial)
	default:
		return exit.Reported(exit.Failure)
	}
}

func (a *app) printRenewSummary(rep *renewReport) {
	for _, e := range rep.Failed {
		fmt.Fprintf(a.err, "lbcert: error: renew %s: %s\n", e.Name, e.Error)
		if e.Hint != "" {
			fmt.Fprintf(a.err, "lbcert: hint: %s\n", e.Hint)
		}
	}
	if len(rep.Renewed)+len(rep.Failed)+len(rep.Deferred) == 0 {
		return // nothing due: silence, for cron
	}
	verb := "renewed"
	if rep.DryRun {
		verb = "would renew (dry run)"
	}
	a.printf("lbcert renew: %d %s, %d not due, %d failed, %d waiting after earlier failures\n",
		len(rep.Renewed), verb, len(rep.NotDue), len(rep.Failed), len(rep.Deferred))
	for _, e := range rep.Renewed {
		a.printf("  renewed   %-30s %s -> %s, expires %s (%s)\n", e.Name, e.OldSerial, e.NewSerial, e.NewNotAfter.Format(time.DateOnly), e.Reason)
	}
	for _, e := range rep.Failed {
		a.printf("  failed    %-30s %s\n", e.Name, e.Error)
	}
	for _, e := range rep.Deferred {
		a.printf("  waiting   %-30s next attempt %s\n", e.Name, e.NextAttempt.Format(time.RFC3339))
	}
}

// mailReport turns the run's report into the mail report: renewed and
// failed lineages, and a warning for those within 14 days of expiry that
// this run did not renew.
func (rep *renewReport) mailReport(now time.Time) *notify.Report {
	out := &notify.Report{Command: "renew", Time: now}
	item := func(e renewEntry, outcome string) notify.Item {
		it := notify.Item{Name: e.Name, Domains: e.Domains, Outcome: outcome, Serial: e.NewSerial, Deploy: e.Deploy,
			Verify: e.Verify, Error: e.Error, Hint: e.Hint, MailTo: e.mail.To,
			Relay: notify.Relay{Host: e.mail.Host, Port: e.mail.Port, From: e.mail.From}}
		if e.OldNotAfter != nil {
			it.OldNotAfter = *e.OldNotAfter
		}
		if e.NewNotAfter != nil {
			it.NewNotAfter = *e.NewNotAfter
		}
		return it
	}
	for _, e := range rep.Renewed {
		out.Items = append(out.Items, item(e, "renewed"))
	}
	for _, e := range rep.Failed {
		out.Items = append(out.Items, item(e, "failed"))
	}
	for _, list := range [][]renewEntry{rep.NotDue, rep.Deferred} {
		for _, e := range list {
			if e.OldNotAfter != nil && e.OldNotAfter.Sub(now) < notify.WarnWindow {
				out.Warnings = append(out.Warnings, item(e, "expiring"))
			}
		}
	}
	return out
}

// dryRunServer keeps dry runs off Let's Encrypt's production limits, as
// certbot does.
func dryRunServer(server string) string {
	if server == acme.LetsEncrypt {
		return acme.LetsEncryptStaging
	}
	return server
}

func timePtr(t time.Time) *time.Time {
	if t.IsZero() {
		return nil
	}
	t = t.UTC()
	return &t
}

// completeLineages completes lineage names for --name and delete/show.
func (a *app) completeLineages(cmd *cobra.Command, args []string, toComplete string) ([]string, cobra.ShellCompDirective) {
	dir := a.global.Dir
	if f := cmd.Flags().Lookup("dir"); f != nil && !f.Changed {
		if v := a.getenv(config.EnvName("dir")); v != "" {
			dir = v
		}
	}
	all, _ := store.New(dir).Names()
	var out []string
	for _, n := range all {
		if strings.HasPrefix(n, toComplete) {
			out = append(out, n)
		}
	}
	return out, cobra.ShellCompDirectiveNoFileComp
}
