package main

import (
	"bufio"
	"cmp"
	"context"
	"encoding/json"
	"fmt"
	"iter"
	"log/slog"
	"os"
	"runtime/debug"
	"slices"
	"strings"
	"time"

	"github.com/lbcert/lbcert/internal/acme"
	"github.com/lbcert/lbcert/internal/catalog"
	"github.com/lbcert/lbcert/internal/config"
	"github.com/lbcert/lbcert/internal/engine"
	"github.com/lbcert/lbcert/internal/fleet"
	"github.com/lbcert/lbcert/internal/issuer"
	"github.com/lbcert/lbcert/internal/metrics"
	"github.com/lbcert/lbcert/internal/pace"
	"github.com/lbcert/lbcert/internal/renewal"
	"github.com/lbcert/lbcert/internal/store"
)

// runSpec is what a command asks of one engine run: the engine's
// options (Now, RunGap and LeaseTTL are the run's), its pace limits,
// how long to wait for the lock, and what to do when it ends.
type runSpec struct {
	engine.Options
	limits   pace.Limits
	waitLock time.Duration
	done     func() // when the run ends, before its result is printed
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
	if spec.done != nil {
		defer spec.done()
	}
	if err := cmp.Or(a.checkKeep(), a.mail.CheckLogin(a.getenv("LBCERT_SMTP_PASSWORD"))); err != nil {
		return nil, err
	}
	if a.global.HookConc < 1 {
		return nil, fmt.Errorf("--hook-concurrency %d: want 1 or more", a.global.HookConc)
	}
	st := h.st
	lock, err := st.Take(ctx, spec.waitLock)
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
	is := &issuer.Issuer{CABundle: a.global.acct.CABundle, UserAgent: userAgent()}
	h.tokens(is)
	is.Account = acme.Lazy(func() (acme.Options, error) { return a.accountBase(h.accounts) }, spec.DryRun)
	is.CAs, is.Gates = a.global.cas.Run(h.breakers, a.now, spec.DryRun), &pace.Gates{MaxWait: spec.MaxWait}
	defer is.Close()
	gap := a.runGap(st, spec)
	spec.Now, spec.RunGap, spec.LeaseTTL = a.now, gap, a.fleetOpts.LeaseTTL
	e := &engine.Engine{Catalog: h.catalog, Node: h.node, CA: is, Budget: ebudget, Opts: spec.Options, CAs: is.CAs}
	plan, err := e.PlanSeq(ctx, js, n)
	if err != nil {
		return nil, err
	}
	res := plan.Execute(ctx)
	if gap > 0 && slices.ContainsFunc(res.Items, func(it *engine.Item) bool { return it.Cadence != "" }) {
		renewal.Warned(st, a.now())
	}
	if a.global.MetricsFile != "" && !spec.DryRun {
		// Monitoring is not the run: a metrics file that cannot be
		// written is a warning, never a failed renewal.
		if err := metrics.Write(ctx, a.global.MetricsFile, metrics.Source{Catalog: h.catalog, Local: st}, res, budget, a.now()); err != nil {
			slog.Warn("could not write the metrics file", "path", a.global.MetricsFile, "err", err)
		}
		h.after(ctx)
	}
	return res, nil
}

// runGap is the schedule as it really runs, for renew's cadence
// warning (renewal.Cadence); a scheduled run is recorded.
func (a *app) runGap(st *store.Store, spec runSpec) time.Duration {
	if spec.Command != "renew" || spec.DryRun {
		return 0
	}
	return renewal.Cadence(st, a.now(), spec.scheduled)
}

// checkKeep refuses an archive that would keep nothing to roll back to
// nor the live version itself.
func (a *app) checkKeep() error {
	if a.global.Keep < 1 {
		return fmt.Errorf("--keep-versions %d: want 1 or more (the live version counts; 3 keeps two to roll back to)", a.global.Keep)
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

// sayUnreachable prints the one line for a CA that stopped answering,
// after the warnings about fallback CAs (Result.FallbackWarnings).
func (a *app) sayUnreachable(res *engine.Result) {
	for _, w := range res.FallbackWarnings() {
		a.say.warningf("%s", w)
	}
	for _, s := range res.Unreachable {
		a.say.errorf("the CA %s did not answer several orders in a row; no more orders were started from it, and the lineages left are deferred to the next run", s)
		a.say.hintf("check that this host can reach %s (DNS, firewall, proxy); nothing was put into failure backoff", s)
	}
}

// printJSON writes v, a report in one of the versioned schemas.
func (a *app) printJSON(v any) error {
	enc := json.NewEncoder(a.out)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

// account is the account settings as given, for package acme to check.
func (a *app) account() acme.Settings {
	s := a.global.acct
	s.EABHMAC, s.UserAgent = a.getenv(config.EnvName("eab-hmac-key")), userAgent()
	return s
}

// acmeOptions checks every account setting that can be checked without the
// network, so that bad input never reaches the CA, including whether a
// new account on the chosen server could accept the terms of service.
func (a *app) acmeOptions(st catalog.Accounts) (acme.Options, error) {
	server, err := a.account().ServerURL()
	if err != nil {
		return acme.Options{}, err
	}
	o, err := a.accountBase(st)
	if err != nil {
		return o, err
	}
	o.Server = server
	if acme.NeedsTOS(o) {
		return acme.Options{}, fmt.Errorf("no terminal to ask about the CA's terms of service: pass --agree-tos to accept them")
	}
	return o, a.global.cas.CheckTOS(o)
}

// accountBase is the account options for any server, with a question
// about the terms on a terminal.
func (a *app) accountBase(st catalog.Accounts) (acme.Options, error) {
	o, err := a.account().Options(a.ctx, st)
	if err == nil && a.stdinTTY && a.stderrTTY {
		o.ConfirmTOS = a.confirmTOS
	}
	return o, err
}

// userAgent is what lbcert calls itself to the CA.
func userAgent() string { return "lbcert/" + buildVersion(debug.ReadBuildInfo()) }

func (a *app) confirmTOS(tos string) (bool, error) {
	if tos == "" {
		return true, nil // the CA publishes no terms
	}
	fmt.Fprintf(a.err, "The CA's terms of service are at %s\nDo you agree? [y/N] ", tos)
	line, _ := bufio.NewReader(a.in).ReadString('\n')
	ans := strings.ToLower(strings.TrimSpace(line))
	return ans == "y" || ans == "yes", nil
}

func unwrapPath(err error) error {
	if pe, ok := err.(*os.PathError); ok {
		return pe.Err
	}
	return err
}
