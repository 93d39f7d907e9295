package engine

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sort"
	"strings"
	"sync"
	"time"
	"unicode/utf8"

	"github.com/lbcert/lbcert/internal/acme"
	"github.com/lbcert/lbcert/internal/catalog"
	"github.com/lbcert/lbcert/internal/hint"
	"github.com/lbcert/lbcert/internal/issuer"
	"github.com/lbcert/lbcert/internal/renewal"
	"github.com/lbcert/lbcert/internal/secret"
	"github.com/lbcert/lbcert/internal/store"
)

// Execute works the plan: one pool of workers for every order and
// install, then one deploy for the whole run. The context cancels new
// work; what was obtained before the cancel is saved and deployed all
// the same.
func (p *Plan) Execute(ctx context.Context) *Result {
	e := p.e
	res := &Result{Version: SchemaVersion, Command: e.Opts.Command, DryRun: e.Opts.DryRun, Started: p.started}
	r := &run{e: e, ctx: ctx, started: p.started, res: res}
	res.Items = p.items
	if e.Opts.Observe != nil {
		working := make(map[*Item]bool, len(p.steps))
		for _, s := range p.steps {
			working[s.item] = true
		}
		for _, it := range p.items {
			if !working[it] { // decided in the plan: reported now
				e.Opts.Observe(it)
			}
		}
	}
	work := p.steps
	r.bindAddrs = standaloneAddrs(work)

	workers := e.Opts.Concurrency
	if workers < 1 {
		workers = DefaultConcurrency
	}
	jobs := make(chan *step)
	var wg sync.WaitGroup
	for range min(workers, len(work)) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for s := range jobs {
				r.one(s)
				if e.Opts.Observe != nil {
					e.Opts.Observe(s.item)
				}
			}
		}()
	}
	for i, s := range work {
		if ctx.Err() != nil {
			for _, left := range work[i:] {
				left.item.Outcome = NotStarted
				left.item.Error = "interrupted before it started; run the same command again to finish"
			}
			slog.Warn("interrupted: no new orders started", "left", len(work)-i)
			break
		}
		jobs <- s
	}
	close(jobs)
	wg.Wait()

	r.deployAll()
	r.warnings(p.items)
	r.rolloutNotes()
	if e.Budget != nil && !e.Opts.InstallOnly {
		if err := e.Budget.Flush(); err != nil {
			slog.Warn("could not save the rate budget", "err", err)
		}
	}
	res.CAs = r.caStatus(p.items)
	res.Interrupted = ctx.Err() != nil
	res.Finished = e.now()
	res.Count()
	return res
}

// rolloutNotes puts the staged rollouts that need an operator (held,
// aborted, overridden near expiry) into the result (its JSON and mail)
// and warns of each. A fleet that cannot say is a warning, never a
// failed run.
func (r *run) rolloutNotes() {
	if r.e.Node.Notes == nil || r.e.Opts.InstallOnly {
		return
	}
	ctx, cancel := context.WithTimeout(context.WithoutCancel(r.ctx), 30*time.Second)
	defer cancel()
	notes, err := r.e.Node.Notes(ctx, r.e.now())
	if err != nil {
		slog.Warn("could not read the fleet's staged rollouts", "err", oneLine(err))
		return
	}
	for _, n := range notes {
		if n.State != "rolling" {
			r.res.Rollouts = append(r.res.Rollouts, n)
			slog.Warn(n.Text)
		}
	}
	if len(r.res.Rollouts) > 0 {
		slog.Warn(RolloutHint)
	}
}

// run is one Execute's shared state.
type run struct {
	e       *Engine
	ctx     context.Context
	started time.Time

	bindOnce  sync.Once
	bindAddrs []string
	bindErrs  map[string]error

	delayOnce sync.Once

	mu      sync.Mutex
	reset   map[string]*sync.Once // accounts reset this run
	caFails map[string]int        // consecutive unreachable answers per CA
	res     *Result
	wants   []*want
	owed    map[string]*step // lineage name -> step whose want is in wants
}

// one takes a step through everything before the deploy.
func (r *run) one(s *step) {
	e, ctx, it := r.e, r.ctx, s.item
	if ctx.Err() != nil {
		it.Outcome, it.Error = NotStarted, "interrupted before it started; run the same command again to finish"
		return
	}
	if s.act == actInstall {
		// No lease and no backoff: installing what the catalog holds
		// writes nothing shared and spends none of the CA's limits; the
		// run after the config is fixed deploys, whenever it comes.
		r.install(s)
		return
	}
	// The random cron delay and the backoff come before the lease: a
	// lease held through an 8-minute sleep would keep every other node
	// (and a delete) waiting on a name nobody is ordering yet.
	if s.act == actOrder && !r.mayStart(s) {
		return
	}
	ttl := e.Opts.LeaseTTL
	if ttl <= 0 {
		ttl = 10 * time.Minute
	}
	lease, err := e.Catalog.Acquire(ctx, s.job.Lineage.Name, ttl)
	if errors.Is(err, catalog.ErrLeaseHeld) {
		r.defer_(s, "another run holds this lineage", time.Time{}, err)
		return
	}
	if err != nil {
		r.defer_(s, oneLine(err), time.Time{}, err)
		return
	}
	defer lease.Release()
	if r.doneMeanwhile(s) {
		return
	}
	if s.act == actCheckARI {
		if !r.askARI(s) || s.act == actOrder && !r.mayStart(s) {
			return
		}
	}
	if s.act == actReconfigure {
		r.reconfigure(s)
		return
	}
	r.order(s, lease)
}

// askARI asks the CA's renewal window and decides again; it reports
// whether the step still has an order to place.
func (r *run) askARI(s *step) bool {
	e, it := r.e, s.item
	r.checkARI(s)
	d := renewal.Decide(s.prev.Cert, s.status, e.now(), renewal.Options{Days: e.Opts.Days, ARIOffered: s.ari, Name: s.job.Lineage.Name})
	it.Reason, it.DueAt = string(d.Reason), timePtr(d.At)
	if d.Due {
		s.act, s.replace, it.dueNow = actOrder, s.ari, true
		return true
	}
	if settingsChanged(s.prev, &s.job.Lineage) {
		it.Reason = reasonSettingsChanged
		s.act = actReconfigure
		return true
	}
	it.Outcome = NotDue
	logNotDue(s.job.Lineage.Name, d, s.prev.Cert, s.status, e.now())
	return false
}

// doneMeanwhile checks again, under the lease, whether the work is still
// needed: between the plan and the lease another run (in a fleet,
// another node) may have obtained the certificate, as certmagic's
// renewCert checks too. It reports true when s is settled.
func (r *run) doneMeanwhile(s *step) bool {
	e, it := r.e, s.item
	if s.act != actOrder || s.job.Force {
		return false
	}
	fresh, err := e.Catalog.Head(r.ctx, s.job.Lineage.Name)
	if err != nil || !sameNames(fresh.Domains, s.job.Lineage.Domains) ||
		s.prev != nil && fresh.Cert.Serial == s.prev.Cert.Serial {
		return false
	}
	st, _ := e.Catalog.Status(r.ctx, fresh.Name)
	d := renewal.Decide(fresh.Cert, st, e.now(), renewal.Options{Days: e.Opts.Days, Name: fresh.Name})
	if d.Due {
		return false
	}
	s.prev = fresh
	it.Outcome, it.Reason, it.DueAt, it.dueNow = NotDue, "obtained by another run meanwhile", timePtr(d.At), false
	it.Serial, it.NotAfter = fresh.Cert.Serial, timePtr(fresh.Cert.NotAfter)
	slog.Info("not ordering: another run obtained it meanwhile", "name", fresh.Name, "serial", fresh.Cert.Serial)
	if !e.Opts.DryRun && e.owesGated(r.ctx, s, fresh, true) {
		r.install(s) // this node serves it now, not at its agent's next turn
	}
	return true
}

// install puts the catalog's head of s on this node, or the version a
// staged rollout lets this node serve instead.
func (r *run) install(s *step) {
	e, it := r.e, s.item
	name := s.job.Lineage.Name
	l, err := e.Catalog.Head(r.ctx, name)
	var g Gated
	if err == nil {
		g, err = e.Node.target(r.ctx, l, true)
	}
	if err == nil && g.Want != l && !e.Node.owes(g.Want) {
		r.heldBack(s, g)
		return
	}
	if err == nil {
		it.Held, it.Override = g.Held, g.Override
		l = g.Want
		var w *want
		w, err = e.Node.prepare(r.ctx, l, func() (store.Files, error) {
			fl, f, err := e.Catalog.Fetch(r.ctx, name, l.Version)
			if err == nil && fl.Version != l.Version {
				err = catalog.ErrSuperseded // published again meanwhile: the next install takes it
			}
			return f, err
		})
		if err == nil && w == nil {
			if it.Outcome == "" {
				it.Outcome, it.Reason = NotDue, "deployed by another process of this node"
			}
			it.Serial, it.NotAfter, it.Version = l.Cert.Serial, timePtr(l.Cert.NotAfter), l.Version
			return
		}
		if err == nil {
			if it.Outcome == "" {
				it.Outcome = Deployed
			}
			it.Serial, it.NotAfter, it.Version = l.Cert.Serial, timePtr(l.Cert.NotAfter), l.Version
			it.life = l.Cert.NotAfter.Sub(l.Cert.NotBefore)
			slog.Info("installing a certificate from the catalog", "name", name, "version", l.Version, "serial", l.Cert.Serial)
			r.owe(s, w)
			return
		}
	}
	if errors.Is(err, store.ErrNotFound) {
		it.Outcome, it.Reason = NotDue, "deleted meanwhile"
		return
	}
	r.fail(s, fmt.Errorf("install %s: %w", name, err), false)
}

// stageHeld keeps a new certificate that a staged rollout has not
// released to this node's wave (or whose rollout could not be read:
// err): this node goes on serving what it serves, and its agent installs
// the new version when the wave is released.
func (r *run) stageHeld(s *step, l *store.Lineage, files store.Files, g Gated, err error) {
	e, it := r.e, s.item
	it.Deploy = "held"
	if err != nil {
		g = Gated{Held: "could not read the rollout (" + oneLine(err) + "); this node's agent installs it when its wave is released"}
	}
	it.Held = g.Held
	if serr := e.Node.stage(r.ctx, l, files); serr != nil {
		slog.Warn("could not keep the new certificate on this node", "name", l.Name, "err", serr)
	}
	if err == nil && e.Node.owes(g.Want) {
		r.install(s)
	}
}

// heldBack records that a staged rollout keeps this node on the version it
// serves: nothing to install.
func (r *run) heldBack(s *step, g Gated) {
	it := s.item
	it.Held, it.Override = g.Held, g.Override
	if it.Outcome == "" {
		it.Outcome, it.Reason = NotDue, "held back by the rollout"
		it.Serial, it.NotAfter, it.Version = g.Want.Cert.Serial, timePtr(g.Want.Cert.NotAfter), g.Want.Version
	}
	slog.Info("not installing here yet: a staged rollout holds it", "name", s.job.Lineage.Name, "serving", g.Want.Version, "why", g.Held)
}

// order obtains, publishes and installs a new certificate for s.
func (r *run) order(s *step, lease catalog.Lease) {
	e, ctx := r.e, r.ctx
	l := s.job.Lineage
	if l.Challenge.Mode == "standalone" {
		if err := r.bind(l.Challenge.HTTPAddr); err != nil {
			r.fail(s, err, false)
			return
		}
	}
	if e.Opts.Preflight != nil {
		responder, err := e.CA.Responder(l.Challenge)
		if err == nil {
			slog.Debug("pre-flight", "domains", strings.Join(l.Domains, ","))
			err = e.Opts.Preflight.Check(ctx, l.Domains, responder)
		}
		if err != nil {
			// No backoff: nothing reached the CA, and the fix (DNS, a
			// route) should work on the very next run.
			r.fail(s, err, false)
			return
		}
	}
	var reuse []byte
	keyType := l.KeyType
	if (s.job.ReuseKey || l.ReuseKey) && s.prev != nil {
		_, files, err := e.Catalog.Fetch(ctx, l.Name, s.prev.Version)
		if err != nil {
			r.fail(s, fmt.Errorf("reuse key: %w", err), false)
			return
		}
		reuse, keyType = files.Key, s.prev.KeyType
	}
	r.orderFrom(s, lease, reuse, keyType)
}

// mayStart checks the failure backoff and sleeps the run's random delay:
// it reports whether the order goes ahead.
func (r *run) mayStart(s *step) bool {
	e, it := r.e, s.item
	// Backoff is checked when the work starts: a lineage that could go
	// after the random delay is not deferred for a whole day because of
	// a check made before it.
	if !s.job.Force && renewal.InBackoff(s.status, e.now().Add(e.Opts.RandomDelay)) {
		r.backedOff(s)
		return false
	}
	r.delay()
	if r.ctx.Err() != nil {
		it.Outcome, it.Error = NotStarted, "interrupted before it started; run the same command again to finish"
		return false
	}
	if !s.job.Force && renewal.InBackoff(s.status, e.now()) {
		r.backedOff(s)
		return false
	}
	return true
}

// obtained publishes a new certificate to the catalog, which numbers it,
// then installs it on this node: the version first, then the journal
// entry that says it is owed a deploy, then the live/ switch. A kill at
// any point leaves either the old version live with nothing owed, or an
// entry the next run (or the agent) finishes.
func (r *run) obtained(s *step, l store.Lineage, got *acme.Result, lease catalog.Lease) {
	e, it := r.e, s.item
	r.newVersion(s, &l, got)
	it.Serial, it.NotAfter = got.Info.Serial, timePtr(got.Info.NotAfter)
	it.dueNow = false
	it.life = got.Info.NotAfter.Sub(got.Info.NotBefore)
	outcome := Issued
	if s.prev != nil && sameNames(s.prev.Domains, l.Domains) {
		outcome = Renewed
	}
	if e.Opts.DryRun {
		it.Outcome = outcome
		slog.Info("obtained (dry run, not saved)", "name", l.Name, "serial", got.Info.Serial)
		return
	}
	version, err := e.Catalog.Publish(r.ctx, lease, &l, got.Files)
	var later interface{ Later() bool }
	if errors.As(err, &later) && later.Later() {
		r.defer_(s, oneLine(err), time.Time{}, err)
		return
	}
	// Obtained, not saved: what was live stays live, nothing is
	// deployed, and the command must not say "issued" (a full disk).
	it.unsaved = err != nil
	if notTheNamesFault(err) {
		r.fail(s, err, false) // a catalog that says why, as a fleet refusing a stale writer does
		return
	}
	if err != nil {
		r.fail(s, hint.Wrap(fmt.Errorf("save %s: %w", l.Name, err), "the certificate was obtained but not saved; free space (or fix the state directory) and run the same command again: it orders anew"), false)
		return
	}
	l.Version, it.Version = version, version
	// A new certificate starts with no renewal history: no ARI answer,
	// no backoff; only what the order learnt of the CA (no ARI at all:
	// list then says the lifetime rule decides, not "ARI not asked yet").
	st := store.Status{}
	if got.NoARI {
		st = renewal.NoARI(st, e.now())
	}
	if st != s.status { // a new lineage has none to reset: a fleet saves a Redis round trip per order
		if err := e.Catalog.SetStatus(r.ctx, l.Name, st); err != nil {
			slog.Warn("could not reset the renewal status", "name", l.Name, "err", err)
		}
	}
	s.status = st
	it.Outcome = outcome
	slog.Info(string(outcome), "name", l.Name, "serial", got.Info.Serial, "expires", got.Info.NotAfter.Format(time.DateOnly))
	if g, err := e.Node.target(r.ctx, &l, true); err != nil || g.Want != &l {
		r.stageHeld(s, &l, got.Files, g, err)
		return
	}
	w, err := e.Node.prepare(r.ctx, &l, func() (store.Files, error) { return got.Files, nil })
	if sb := new(stillBrokenError); errors.As(err, &sb) {
		// Not deployed, as a failed deploy is not: said as one.
		r.fail(s, err, false)
		it.Pending, it.Hint = sb.msg, deployOwedHint
		return
	}
	if err != nil {
		r.fail(s, err, false)
		// Obtained and in the catalog: only this node's copy failed, and
		// the next run (or the fleet's agent) installs it.
		it.Outcome, it.Deploy, it.Hint = outcome, notInstalled, ""
		return
	}
	if w == nil {
		it.Deploy = "ok" // this node's agent deployed it already, with the same settings
		return
	}
	r.owe(s, w)
}

// newVersion makes l the lineage of the certificate got: its ledger
// place, profile, issue time and birth.
func (r *run) newVersion(s *step, l *store.Lineage, got *acme.Result) {
	l.Cert = got.Info
	// The ledger place is this certificate's own order's, which the
	// catalog gives it when it publishes; a renewal starts from the
	// previous version's record, whose place was that order's (hostile
	// review: every renewal counted under the first certificate's place,
	// so the nodes that installed three certificates of a set knew one).
	l.LedgerID = ""
	if l.Profile == "" && l.Fallback.Primary == "" {
		l.Profile = got.Profile // picked for the lineage (shortlived for an address): renewals keep it
	}
	l.IssuedAt = r.e.now().UTC()
	// Born decides against a delete (a tombstone beats a lineage born
	// before it): a renewal keeps the lineage's, so a node that missed
	// a delete does not bring the name back by renewing it. A
	// certificate the operator asked for by name (issue, a batch row)
	// is born now: asked for after a delete, it stands, even when a
	// Redis that lost the delete still showed the old lineage (the
	// fault test, seed 3: a batch re-issuing a name just deleted made a
	// renewal of the deleted lineage, which the delete then took away).
	l.Born = l.IssuedAt
	if s.prev != nil && s.job.Stored {
		l.Born = s.prev.BornAt()
	}
}

// reconfigure saves a not-due lineage's new settings in place and, when
// this node's deploy of it changes, installs it again. The CA is never
// asked: changing where a certificate goes must not cost an order.
func (r *run) reconfigure(s *step) {
	e, it := r.e, s.item
	l := s.job.Lineage
	l.Cert, l.Version, l.IssuedAt, l.KeyType, l.Born = s.prev.Cert, s.prev.Version, s.prev.IssuedAt, s.prev.KeyType, s.prev.Born
	l.ReuseKey = s.prev.ReuseKey || s.job.ReuseKey
	if p := s.prev; p.Fallback.Primary != "" {
		// The certificate stays the fallback's: the CA and account that
		// issued it stay with it, and the job's CA is where renewals go.
		home, email := l.Home()
		l.Server, l.Email, l.Fallback = p.Server, p.Email, p.Fallback
		l.Fallback.Primary, l.Fallback.Email = home, email
	}
	it.Serial, it.NotAfter = l.Cert.Serial, timePtr(l.Cert.NotAfter)
	if e.Opts.DryRun {
		it.Outcome = Reconfigured
		return
	}
	if err := e.Catalog.SetMeta(r.ctx, &l); err != nil {
		r.fail(s, fmt.Errorf("save the new settings of %s: %w", l.Name, err), false)
		return
	}
	it.Outcome = Reconfigured
	slog.Info("saved new settings without ordering", "name", l.Name)
	if e.owesGated(r.ctx, s, &l, true) {
		if pendingError(e.Node, l.Name) != "" || s.item.Reason == reasonPendingDeploy {
			it.Outcome = Deployed // a deploy owed, now with the settings given
		}
		s.restore = s.prev
		r.install(s)
	}
}

func (r *run) owe(s *step, w *want) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.owed == nil {
		r.owed = map[string]*step{}
	}
	r.wants = append(r.wants, w)
	r.owed[w.l.Name] = s
}

// deployAll deploys every want once, even after an interrupt: the
// certificates are live on disk, and the load balancer should serve them.
func (r *run) deployAll() {
	e := r.e
	if len(r.wants) == 0 {
		return
	}
	if e.Opts.Deploying != nil {
		e.Opts.Deploying(len(r.wants))
	}
	done := e.Node.deployAll(context.WithoutCancel(r.ctx), r.wants)
	for i, w := range r.wants {
		s := r.owed[w.l.Name]
		r.deployed(s, w, done[i])
		if e.Opts.Deployed != nil {
			e.Opts.Deployed(s.item)
		}
	}
}

const deployOwedHint = "the new certificate is kept, and the next run deploys it again once what failed (the load balancer, its config or its socket) is fixed; no new order is placed"

// deployed records one deploy's outcome on its item.
func (r *run) deployed(s *step, w *want, in installed) {
	it := s.item
	it.Verify, it.Hook = in.res.Verify, in.res.Hook
	switch {
	case in.res.RolledBack:
		it.Deploy = "rolled_back"
	case w.deploy.Target == "":
		it.Deploy = "none"
	case in.done:
		it.Deploy = "ok"
	}
	if in.done {
		it.Pending = ""
		return
	}
	if s.restore != nil && s.item.Outcome == Reconfigured {
		// A reconfiguration whose deploy failed keeps the old settings,
		// so the next run tries the change again.
		if err := r.e.Catalog.SetMeta(context.WithoutCancel(r.ctx), s.restore); err != nil {
			slog.Warn("could not restore the previous settings", "name", w.l.Name, "err", err)
		}
		it.Outcome, it.Error = Failed, "deploy: "+in.errMsg
		it.Hint = "the settings were not changed; fix the load balancer's config and run the same command again"
		return
	}
	it.Pending = in.errMsg
	it.Outcome, it.Error = Failed, "deploy: "+in.errMsg
	it.Hint = deployOwedHint
	// No next attempt is reported: a deploy owed costs the CA nothing
	// and is retried by every run, so the fix is picked up at the next
	// cron run.
	it.NextAttempt = nil
	slog.Debug("deploy failed", "name", w.l.Name, "err", in.errMsg)
}

// warnings marks the items the report warns about: heading for expiry
// unrenewed, and not warned about in the last day (a cron that runs
// hourly must not mail hourly).
func (r *run) warnings(items []*Item) {
	e := r.e
	if e.Opts.InstallOnly {
		return
	}
	now := e.now()
	for _, it := range items {
		if !it.warnWorthy(now) {
			continue
		}
		st, _ := e.Catalog.Status(r.ctx, it.Name)
		if !st.WarnedAt.IsZero() && now.Sub(st.WarnedAt) < 23*time.Hour {
			continue
		}
		it.warn = true
		if e.Opts.DryRun {
			continue
		}
		st.WarnedAt = now.UTC()
		if err := e.Catalog.SetStatus(r.ctx, it.Name, st); err != nil {
			slog.Warn("could not save the warning time", "name", it.Name, "err", err)
		}
	}
}

// checkARI asks the CA for the renewal window and saves the answer. A
// failure falls back to the lifetime rule.
func (r *run) checkARI(s *step) {
	e, l := r.e, s.prev
	now := e.now()
	info, err := e.CA.RenewalInfo(r.ctx, l)
	switch {
	case errors.Is(err, acme.ErrNoARI):
		s.status = renewal.NoARI(s.status, now)
		s.ari = false
	case err != nil:
		// Info, not a warning: a CA that is down for a nothing-due run
		// changes nothing, and "-q" from cron must stay silent.
		slog.Info("renewal info failed; using the lifetime rule", "name", l.Name, "err", oneLine(err))
		return
	default:
		s.status = renewal.ApplyARI(s.status, l.Cert.Serial, info.Start, info.End, info.RetryAfter, now, e.rand)
		slog.Debug("renewal info", "name", l.Name, "window_start", info.Start, "window_end", info.End, "renew_at", s.status.ARIRenewAt)
	}
	if !e.Opts.DryRun {
		if err := e.Catalog.SetStatus(r.ctx, l.Name, s.status); err != nil {
			slog.Warn("could not save renewal info", "name", l.Name, "err", err)
		}
	}
}

// delay sleeps once per run, a random part of RandomDelay, before the
// first order; every worker waits for it.
func (r *run) delay() {
	r.delayOnce.Do(func() {
		if r.e.Opts.RandomDelay <= 0 {
			return
		}
		d := time.Duration(r.e.rand(int64(r.e.Opts.RandomDelay)))
		slog.Info("sleeping before contacting the CA, to spread cron load (--no-random-sleep to skip)", "for", d.Round(time.Second))
		r.e.sleep(r.ctx, d)
	})
}

// bind binds every standalone port the run may need, once, at the first
// order: one listener per port, whatever host part each lineage's
// address carries.
func (r *run) bind(addr string) error {
	r.bindOnce.Do(func() { r.bindErrs = r.e.CA.BindAll(r.bindAddrs) })
	if err := r.bindErrs[issuer.PortOf(addr)]; err != nil {
		return err
	}
	return nil
}

func standaloneAddrs(steps []*step) []string {
	seen := map[string]bool{}
	var out []string
	for _, s := range steps {
		c := s.job.Lineage.Challenge
		if c.Mode == "standalone" && !seen[c.HTTPAddr] {
			seen[c.HTTPAddr] = true
			out = append(out, c.HTTPAddr)
		}
	}
	sort.Strings(out)
	return out
}

// fail records a failure; backoff says whether it reached the CA and so
// starts or lengthens the lineage's failure backoff.
func (r *run) fail(s *step, err error, backoff bool) {
	it := s.item
	it.Outcome, it.Error, it.Hint, it.err = Failed, oneLine(err), hint.Of(err), err
	if backoff {
		st := renewal.Failed(s.status, it.Error, r.started)
		if s.prev == nil {
			// Never issued: the status keeps the order's settings, so
			// renew can retry it (RenewJobs).
			req := s.job.Lineage
			st.Request = &req
		}
		if werr := r.e.Catalog.SetStatus(r.ctx, s.job.Lineage.Name, st); werr != nil {
			slog.Warn("could not save backoff", "name", s.job.Lineage.Name, "err", werr)
		}
		s.status = st
		it.NextAttempt = timePtr(st.NextAttempt)
	}
	slog.Debug("failed", "name", s.job.Lineage.Name, "err", it.Error)
}

// backedOff defers s, in failure backoff: the hint says when the next
// attempt is, and that once the cause is fixed --force tries now
// (issue #26 item 15).
func (r *run) backedOff(s *step) {
	next := s.status.NextAttempt
	// The recorded error is text from the disk: one line, as any error
	// (a record edited by hand may hold anything).
	r.defer_(s, "waiting after earlier failures: "+oneLine(errors.New(s.status.LastError)), next,
		hint.Errorf(fmt.Sprintf("the next attempt is after %s; once the cause is fixed, the same command with --force tries now", next.UTC().Format(time.RFC3339)), "in backoff"))
}

// defer_ leaves s for a later run, without backoff.
func (r *run) defer_(s *step, why string, next time.Time, err error) {
	it := s.item
	it.Outcome, it.Error = Deferred, why
	it.Hint = hint.Of(err)
	it.NextAttempt = timePtr(next)
	slog.Debug("deferred", "name", s.job.Lineage.Name, "why", it.Error)
}

// notTheNamesFault is an error that says the names are not to blame (a
// fleet agent that did not answer, a stale writer refused): no backoff,
// so the next run may try at once.
func notTheNamesFault(err error) bool {
	var nb interface{ NoBackoff() bool }
	return errors.As(err, &nb) && nb.NoBackoff()
}

// oneLine is an error as one line, without any known secret: it goes
// into status files, reports and mail, once per lineage. It is cut to
// about maxErrorText bytes: one deploy's error is copied into the record
// of every lineage it carried, so an error that grew with the number of
// certificates would grow the records with its square. The cut keeps the
// start (what failed) and the longer end: a tool's last lines (nginx's
// [emerg]) and the clauses appended to an error ("; and rollback
// failed", what to do) are at the end.
func oneLine(err error) string {
	msg := secret.OneLine(err)
	if len(msg) <= maxErrorText {
		return msg
	}
	head := runeStart(msg, maxErrorText/4, -1)
	tail := runeStart(msg, len(msg)-(maxErrorText-maxErrorText/4), +1)
	return fmt.Sprintf("%s ... (%d bytes cut) ... %s", msg[:head], tail-head, msg[tail:])
}

// runeStart moves i by at most three bytes in direction dir (-1 or +1)
// to the start of a UTF-8 character, so that a cut never splits one;
// text that is not UTF-8 is cut where it is.
func runeStart(s string, i, dir int) int {
	for k := 0; k < utf8.UTFMax-1 && i > 0 && i < len(s) && !utf8.RuneStart(s[i]); k++ {
		i += dir
	}
	return i
}

// maxErrorText is about the most of an error's text saved per lineage.
const maxErrorText = 2000
