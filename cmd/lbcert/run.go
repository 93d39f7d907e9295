package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"iter"
	"log/slog"
	"slices"
	"sync"
	"time"

	"github.com/lbcert/lbcert/internal/acme"
	"github.com/lbcert/lbcert/internal/catalog"
	"github.com/lbcert/lbcert/internal/engine"
	"github.com/lbcert/lbcert/internal/exit"
	"github.com/lbcert/lbcert/internal/fleet"
	"github.com/lbcert/lbcert/internal/issuer"
	"github.com/lbcert/lbcert/internal/metrics"
	"github.com/lbcert/lbcert/internal/pace"
	"github.com/lbcert/lbcert/internal/preflight"
	"github.com/lbcert/lbcert/internal/renewal"
	"github.com/lbcert/lbcert/internal/store"
)

// runSpec is what a command asks of one engine run.
type runSpec struct {
	command     string
	limits      pace.Limits
	preflight   *preflight.Checker
	concurrency int
	days        int
	dryRun      bool
	maxWait     time.Duration
	randomDelay time.Duration
	waitLock    time.Duration
	observe     func(*engine.Item)
	// scheduled says the run is the kind cron makes (renew over every
	// lineage), so it is recorded for the cadence check; a hand-typed
	// renew --name would hide the real gaps between cron's.
	scheduled bool
}

// runEngine is the one driver of issue, batch and renew: take the lock,
// build the jobs under it (so they see what another run just saved),
// plan, execute. Listeners are bound inside the run, after the lock, so
// a second run exits "locked" (3) rather than "port in use".
func (a *app) runEngine(ctx context.Context, h *host, spec runSpec, jobs func() (iter.Seq[engine.Job], int, error)) (*engine.Result, error) {
	if err := a.checkKeep(); err != nil {
		return nil, err
	}
	if a.global.HookConc < 1 {
		return nil, exit.Errorf("--hook-concurrency %d: want 1 or more", a.global.HookConc)
	}
	st := h.st
	lock, err := a.renewLock(ctx, st, spec.waitLock)
	if err != nil {
		return nil, err
	}
	defer lock.Unlock()
	js, n, err := jobs()
	if err != nil {
		return nil, err
	}
	// Certificates this node kept while a fleet's Redis was away go
	// first, so the plan sees them and orders nothing twice.
	if err := h.prepare(ctx); err != nil {
		return nil, err
	}
	ebudget, budget, err := h.budget(spec.limits)
	if err != nil {
		return nil, err
	}
	is := &issuer.Issuer{CABundle: a.global.CABundle, UserAgent: userAgent()}
	h.tokens(is)
	is.Account = a.lazyAccount(h.accounts, spec.dryRun)
	defer is.Close()
	gap := a.runGap(st, spec)
	e := &engine.Engine{
		Catalog: h.catalog,
		Node:    h.node,
		CA:      is,
		Budget:  ebudget,
		Opts: engine.Options{
			Command:     spec.command,
			Concurrency: spec.concurrency,
			Days:        spec.days,
			DryRun:      spec.dryRun,
			MaxWait:     spec.maxWait,
			RandomDelay: spec.randomDelay,
			Preflight:   spec.preflight,
			RunGap:      gap,
			Now:         a.now,
			Observe:     spec.observe,
			LeaseTTL:    a.fleetOpts.LeaseTTL,
		},
	}
	plan, err := e.PlanSeq(ctx, js, n)
	if err != nil {
		return nil, exit.Errorf("%w", err)
	}
	res := plan.Execute(ctx)
	a.addRolloutNotes(ctx, h, res)
	if gap > 0 && slices.ContainsFunc(res.Items, func(it *engine.Item) bool { return it.Cadence != "" }) {
		if err := st.MarkCadenceWarned(a.now()); err != nil {
			slog.Warn("could not record the schedule warning", "err", err)
		}
	}
	if a.global.MetricsFile != "" && !spec.dryRun {
		// Monitoring is not the run: a metrics file that cannot be
		// written is a warning, never a failed renewal.
		if err := metrics.Write(ctx, a.global.MetricsFile, metrics.Source{Catalog: h.catalog, Local: st}, res, budget, a.now()); err != nil {
			slog.Warn("could not write the metrics file", "path", a.global.MetricsFile, "err", err)
		}
		h.after(ctx)
	}
	return res, nil
}

// runGap is the schedule as it really runs: the gaps between the
// recorded renew runs and this one (README "Short lifetimes and IP
// certificates"), said at most once a day, since cron mails every run
// that prints. A scheduled run is recorded.
func (a *app) runGap(st *store.Store, spec runSpec) time.Duration {
	if spec.command != "renew" || spec.dryRun {
		return 0
	}
	var gap time.Duration
	if a.now().Sub(st.CadenceWarnedAt()) >= 23*time.Hour {
		gap = renewal.RunGap(st.Runs(), a.now())
	}
	if spec.scheduled {
		if err := st.RecordRun(a.now()); err != nil {
			slog.Warn("could not record this renew run", "err", err)
		}
	}
	return gap
}

// checkKeep refuses an archive that would keep nothing to roll back to
// nor the live version itself.
func (a *app) checkKeep() error {
	if a.global.Keep < 1 {
		return exit.Errorf("--keep-versions %d: want 1 or more (the live version counts; 3 keeps two to roll back to)", a.global.Keep)
	}
	return nil
}

// writeFleetMetrics refreshes the fleet's per-node figures beside
// --metrics-file (metrics.FleetPath); like the run's own file, a
// failure is a warning.
func (a *app) writeFleetMetrics(ctx context.Context, n *fleet.Node) {
	if a.global.MetricsFile == "" {
		return
	}
	rctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	st, err := n.Report(rctx, a.now(), fleetStatusDefaults.maxLag, fleetStatusDefaults.maxBeat)
	if err == nil {
		err = metrics.WriteFleet(a.global.MetricsFile, st)
	}
	if err != nil {
		slog.Warn("could not write the fleet's metrics file", "path", metrics.FleetPath(a.global.MetricsFile), "err", err)
	}
}

// lazyAccount builds the account options on the first order, not
// before: a run with nothing due reads no EAB secret (gh's Factory).
func (a *app) lazyAccount(st catalog.Accounts, dryRun bool) func(server, email string) (acme.Options, error) {
	var once sync.Once
	var base acme.Options
	var err error
	return func(server, email string) (acme.Options, error) {
		once.Do(func() { base, err = a.accountBase(st) })
		if err != nil {
			return acme.Options{}, err
		}
		o := base
		o.Server, o.Email = server, email
		if dryRun {
			o.AgreeTOS = true // a dry run against staging needs its own account
		}
		// No terms check here: acme.New makes it, after the issuer has
		// carried over the terms a lost account had accepted.
		return o, nil
	}
}

// sayUnreachable prints the one line for a CA that stopped answering.
func (a *app) sayUnreachable(res *engine.Result) {
	for _, s := range res.Unreachable {
		fmt.Fprintf(a.err, "lbcert: error: the CA %s did not answer several orders in a row; no more orders were started from it, and the lineages left are deferred to the next run\n", s)
		fmt.Fprintf(a.err, "lbcert: hint: check that this host can reach %s (DNS, firewall, proxy); nothing was put into failure backoff\n", s)
	}
}

// exitCode is the one rule, for every command that runs the engine
// (README "Exit codes"):
//
//	130 the run was interrupted (what was obtained is saved and deployed)
//	  0 every item is in place: issued, renewed, deployed or not due
//	  1 nothing is in place and nothing was deferred: everything failed
//	  2 anything else: some items failed or were deferred to a later run
//	    (backoff, budget, the CA's Retry-After) while others are fine, or
//	    all were deferred
func exitCode(res *engine.Result) int {
	if res.Interrupted {
		return exit.Interrupted
	}
	deferred := res.Counts[engine.Deferred]
	notDone := len(res.Items) - res.Done()
	switch {
	case notDone == 0:
		return exit.OK
	case res.Done() == 0 && deferred == 0:
		return exit.Failure
	default:
		return exit.Partial
	}
}

// finish turns a rendered result and the mail outcome into the command's
// error: the run's own code wins; a mail failure alone makes it partial.
func finish(res *engine.Result, mailErr error) error {
	switch code := exitCode(res); code {
	case exit.OK:
		return mailErr
	case exit.Interrupted:
		return &exit.Error{Code: code, Msg: "interrupted; certificates already obtained are saved and deployed; run the same command again to finish"}
	default:
		return exit.Reported(code)
	}
}

// checkDays checks --days, the one override of the due rule that issue,
// batch and renew share.
func checkDays(days int) error {
	if days < 0 {
		return exit.Errorf("--days %d: must be positive", days)
	}
	return nil
}

// printJSON writes the run report in the one versioned schema.
func (a *app) printJSON(v any) {
	enc := json.NewEncoder(a.out)
	enc.SetIndent("", "  ")
	enc.Encode(v)
}

// renewLock takes the state-directory lock, waiting up to wait for it.
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
		return nil, dirError(st, err)
	}
	return l, nil
}
