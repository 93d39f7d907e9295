// Package engine is lbcert's one run pipeline. issue, batch and renew
// (and, later, a long-running agent on a ticker) build Jobs, call Plan,
// then Execute, and render the Result; none of them orders, saves or
// deploys by itself.
//
// One run, start to end:
//
//  1. Plan decides per job, reading only the storage seam (lineage
//     metadata and status, never an account key or a secret): new, due
//     (renewal's one rule: critical, --days, ARI, lifetime), not due, ARI
//     to ask, or a pending deploy to finish.
//  2. Execute works the plan through one worker pool of Concurrency
//     workers. Per job: take the lineage's lease, ask ARI if needed, check
//     the failure backoff when the work starts (after the random cron
//     delay, not before it), pre-flight, reserve the pace budget (waiting
//     up to MaxWait), obtain, save the version, journal it as pending,
//     switch live/ to it.
//  3. Deploy runs once for the whole run, grouped by load balancer, with
//     a context that an interrupt does not cancel: whatever was obtained
//     is deployed. A certificate whose deploy failed is rolled back and
//     stays pending; later runs deploy it instead of ordering again.
//  4. The Result holds one typed Item per job; the command renders it and
//     maps it to an exit code.
//
// The engine never imports cobra or package exit: errors carry hints
// through package hint, and only cmd/lbcert turns a Result into an exit
// code.
package engine

import (
	"context"
	"errors"
	"fmt"
	"iter"
	"log/slog"
	"runtime"
	"slices"
	"sort"
	"strings"
	"sync"
	"time"

	legochallenge "github.com/go-acme/lego/v4/challenge"

	"github.com/lbcert/lbcert/internal/acme"
	"github.com/lbcert/lbcert/internal/deploy"
	"github.com/lbcert/lbcert/internal/hint"
	"github.com/lbcert/lbcert/internal/issuer"
	"github.com/lbcert/lbcert/internal/names"
	"github.com/lbcert/lbcert/internal/pace"
	"github.com/lbcert/lbcert/internal/preflight"
	"github.com/lbcert/lbcert/internal/renewal"
	"github.com/lbcert/lbcert/internal/secret"
	"github.com/lbcert/lbcert/internal/store"
)

// CA is the engine's way to the ACME server; *issuer.Issuer is the real
// one, engine tests use a fake.
type CA interface {
	// BindAll binds the standalone listeners for addrs, one per port,
	// and returns the error of each port that failed.
	BindAll(addrs []string) map[string]error
	Responder(c store.Challenge) (legochallenge.Provider, error)
	Obtain(ctx context.Context, o issuer.Order) (*acme.Result, error)
	RenewalInfo(ctx context.Context, l *store.Lineage, fullchain []byte) (*acme.RenewalInfo, error)
	// ResetAccount forgets the account for (server, email), so the next
	// order registers a new one.
	ResetAccount(server, email string) error
}

// Deployer puts certificates in front of users; *deploy.Runner is the
// real one.
type Deployer interface {
	Run(ctx context.Context, changes []deploy.Change) []deploy.Result
}

// Budget is the client-side pace budget, shared by every command;
// *pace.Budget is the real one.
type Budget interface {
	Reserve(k pace.Key, o pace.Order) error
	FailedAuthz(k pace.Key, names []string) error
	Limited(k pace.Key, o pace.Order, r pace.RateLimit, until time.Time) error
	Refund(k pace.Key, o pace.Order) error
	Flush() error
}

// Job is one certificate the command wants in place.
type Job struct {
	// Lineage holds the wanted settings: Name and Domains, the server and
	// account, key type, profile, challenge, deploy and mail. For renew
	// it is the saved lineage itself.
	Lineage store.Lineage
	// Line is the CSV line of a batch row, for the report.
	Line int
	// Force orders even when the certificate is valid and not due, and
	// ignores the failure backoff.
	Force bool
	// ReuseKey keeps the live version's private key.
	ReuseKey bool
	// Stored says the job is lineage Lineage.Name with its stored
	// settings, as renew runs it: the plan loads it when it gets to it,
	// once, so that a pass over 100,000 lineages holds one at a time,
	// not all of them before the first is decided.
	Stored bool
}

// Options are a run's switches; the zero value is a sensible default
// for everything but Command.
type Options struct {
	Command     string // "issue", "batch", "renew": names the report
	Concurrency int    // workers; default 8
	Days        int    // --days: due when fewer than this many days remain
	DryRun      bool   // order, but save, deploy and charge nothing
	// MaxWait is how long a job may wait for the pace budget or a short
	// Retry-After before it is deferred to a later run.
	MaxWait time.Duration
	// RandomDelay is the longest random pause before the run's first
	// order (cron runs), so that hosts do not hit the CA in step.
	RandomDelay time.Duration
	// Preflight checks names before ordering; nil skips it.
	Preflight *preflight.Checker
	// KeepVersions is how many archived versions a lineage keeps after
	// a successful deploy, the live one included (default 3).
	KeepVersions int
	// LeaseTTL bounds how long a stalled holder keeps a lineage.
	LeaseTTL time.Duration
	// RunGap is the longest gap between this host's recent renew runs
	// (renewal.RunGap); when set, an item whose certificate gets fewer
	// than renewal.MinChances runs between its renewal time and expiry
	// carries a warning.
	RunGap time.Duration

	Now   func() time.Time
	Rand  func(n int64) int64                             // [0, n); for the ARI pick and the delay
	Sleep func(ctx context.Context, d time.Duration) bool // false when ctx ended first
	// Observe is called once per finished item, from the worker that
	// finished it (progress bars, log lines).
	Observe func(*Item)
}

// Engine runs plans against one storage backend.
type Engine struct {
	Store  store.Backend
	CA     CA
	Deploy Deployer
	Budget Budget
	Opts   Options
}

func (e *Engine) now() time.Time {
	if e.Opts.Now != nil {
		return e.Opts.Now()
	}
	return time.Now()
}

func (e *Engine) rand(n int64) int64 {
	if n <= 0 {
		return 0
	}
	if e.Opts.Rand != nil {
		return e.Opts.Rand(n)
	}
	return renewal.RandInt64N(n)
}

func (e *Engine) sleep(ctx context.Context, d time.Duration) bool {
	if e.Opts.Sleep != nil {
		return e.Opts.Sleep(ctx, d)
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-ctx.Done():
		return false
	}
}

// action is what the plan does with a job.
type action int

const (
	actNone          action = iota // outcome already decided
	actOrder                       // obtain a certificate
	actCheckARI                    // ask the CA's renewal window, then maybe order
	actDeployPending               // deploy a version obtained by an earlier run
	actReconfigure                 // not due, but new settings: save them, deploy if the target changed
)

type step struct {
	job     Job
	item    *Item
	act     action
	prev    *store.Lineage // live version, if any
	status  store.Status
	pending *store.Lineage // the pending version's metadata
	restore *store.Lineage // metadata to put back if a reconfigured deploy fails
	ari     bool           // the CA offers ARI for this lineage
	replace bool           // an ARI renewal of prev: send "replaces"
}

// Plan is a decided run, ready to Execute.
type Plan struct {
	e       *Engine
	items   []*Item // every job's, in job order
	steps   []*step // the jobs that have work; decided ones keep only their item
	started time.Time
}

// Plan decides what each job needs. It reads lineage metadata and
// status only, and writes nothing.
func (e *Engine) Plan(ctx context.Context, jobs []Job) (*Plan, error) {
	return e.PlanSeq(ctx, slices.Values(jobs), len(jobs))
}

// PlanSeq is Plan over jobs made one at a time (n of them, a hint for
// the report's size): renew's 100,000 jobs are each a name, made when
// the plan reaches it, instead of 600 bytes apiece held for the run.
func (e *Engine) PlanSeq(ctx context.Context, jobs iter.Seq[Job], n int) (*Plan, error) {
	now := e.now()
	p := &Plan{e: e, started: now, items: make([]*Item, 0, n)}
	// Deciding is reading two small files and parsing JSON per lineage:
	// a few goroutines decide a batch at a time, in job order, so the
	// cores share the work and no more than a batch is held at once.
	batch := make([]*step, 0, planBatch)
	flush := func() {
		var wg sync.WaitGroup
		next := make(chan *step)
		for range min(runtime.GOMAXPROCS(0)*2, len(batch)) {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for s := range next {
					e.decide(s, now)
				}
			}()
		}
		for _, s := range batch {
			next <- s
		}
		close(next)
		wg.Wait()
		for _, s := range batch {
			p.items = append(p.items, s.item)
			// Decided for good: keep the item, let the step and its
			// lineage go. A nothing-due pass over 100,000 lineages would
			// otherwise hold every one of them until the run ends.
			if s.act != actNone {
				p.steps = append(p.steps, s)
			}
		}
		batch = batch[:0]
	}
	for j := range jobs {
		batch = append(batch, &step{job: j, item: &Item{Name: j.Lineage.Name, Line: j.Line, Domains: j.Lineage.Domains, mail: mailOf(j.Lineage.Mail)}})
		if len(batch) == planBatch {
			flush()
		}
	}
	flush()
	return p, nil
}

// planBatch is how many jobs the plan decides at once.
const planBatch = 256

func (e *Engine) decide(s *step, now time.Time) {
	name := s.job.Lineage.Name
	prev, err := e.Store.Load(name)
	if s.job.Stored && errors.Is(err, store.ErrNotFound) {
		// A stored lineage whose metadata is gone is broken, not new:
		// ordering it would be ordering nothing.
		s.item.Outcome, s.item.Error = Failed, fmt.Sprintf("%s: no %s: not a lineage lbcert can renew", e.Store.LivePaths(name).Dir, store.MetaFile)
		s.item.Hint = "move the directory aside, or issue the names again under this name"
		return
	}
	if err == nil && s.job.Stored {
		s.job.Lineage = *prev
		s.item.Domains, s.item.mail = prev.Domains, mailOf(prev.Mail)
	}
	if err != nil && !errors.Is(err, store.ErrNotFound) {
		s.item.Outcome = Failed
		s.item.Error = oneLine(err)
		s.item.Hint = fmt.Sprintf("move the broken lineage %s aside, or issue it under another name", e.Store.LivePaths(name).Dir)
		return
	}
	s.prev = prev
	s.status, _ = e.Store.ReadStatus(name)
	if prev != nil {
		s.item.OldSerial = prev.Cert.Serial
		s.item.OldNotAfter = timePtr(prev.Cert.NotAfter)
		s.item.life = prev.Cert.NotAfter.Sub(prev.Cert.NotBefore)
		s.ari = !now.Before(s.status.ARIUnsupported) && prev.Cert.ARICertID != ""
	}
	if prev != nil && e.Opts.RunGap > 0 {
		d := renewal.Decide(prev.Cert, s.status, now, renewal.Options{Days: e.Opts.Days, ARIOffered: s.ari, Name: name})
		s.item.Cadence = renewal.CadenceWarning(prev.Cert, d.At, e.Opts.RunGap)
	}
	same := prev != nil && sameNames(prev.Domains, s.job.Lineage.Domains)
	if prev != nil && s.job.Lineage.Profile == "" {
		// A profile sticks: a job that names none keeps the lineage's
		// (Traefik drops it on renewal; lbcert does not).
		s.job.Lineage.Profile = prev.Profile
	}
	if prev != nil && s.job.Lineage.PreferredChain == "" {
		s.job.Lineage.PreferredChain = prev.PreferredChain // sticks as the profile does
	}
	profile := s.job.Lineage.Profile
	if profile == "" && slices.ContainsFunc(s.job.Lineage.Domains, names.IsAddress) {
		profile = acme.ShortLived // what the order will pick for an address
	}
	if err := pace.CheckProfileNames(s.job.Lineage.Server, profile, len(s.job.Lineage.Domains)); err != nil {
		s.item.Outcome, s.item.Error = Invalid, err.Error()
		s.item.Hint = "split the names over several lineages, or choose a profile that allows more with --profile"
		return
	}

	// A certificate obtained earlier and never deployed comes first: it
	// is valid and paid for, and ordering again would spend the CA's
	// five-per-week limit on the same names.
	if pend := s.status.Pending; pend != nil && !s.job.Force && !e.Opts.DryRun {
		pl, err := e.Store.LoadVersion(name, pend.Version)
		if err == nil && sameNames(pl.Domains, s.job.Lineage.Domains) {
			d := renewal.Decide(pl.Cert, store.Status{}, now, renewal.Options{Days: e.Opts.Days, Name: name})
			if !d.Due {
				s.act, s.pending = actDeployPending, pl
				s.item.Reason = "pending deploy"
				s.item.Pending = pend.Error
				return
			}
		}
		// Gone, expired or for other names: forget it and decide afresh.
		s.status.Pending = nil
	}

	switch {
	case prev == nil:
		s.act, s.item.Reason = actOrder, "new"
		return
	case !same:
		s.act, s.item.Reason = actOrder, "names changed"
		return
	case s.job.Force:
		s.act, s.item.Reason = actOrder, string(renewal.Forced)
		s.replace = s.ari
		return
	}
	d := renewal.Decide(prev.Cert, s.status, now, renewal.Options{Days: e.Opts.Days, ARIOffered: s.ari, Name: name})
	s.item.Reason, s.item.DueAt = string(d.Reason), timePtr(d.At)
	switch {
	case d.Due:
		s.act, s.replace, s.item.dueNow = actOrder, s.ari, true
	case d.CheckARI:
		s.act = actCheckARI
	default:
		s.item.Outcome = NotDue
		if settingsChanged(prev, &s.job.Lineage) {
			s.act = actReconfigure
			s.item.Outcome = ""
			s.item.Reason = "settings changed"
			return
		}
		logNotDue(name, d, prev.Cert, s.status, now)
	}
}

// logNotDue says with -v why a lineage is left alone, whichever step
// decided it (issue #26 item 11: renew -v printed nothing when nothing
// was due and no CA was asked).
func logNotDue(name string, d renewal.Decision, cert store.CertInfo, st store.Status, now time.Time) {
	if !slog.Default().Enabled(context.Background(), slog.LevelDebug) {
		return // a nothing-due pass over 100,000 lineages formats nothing
	}
	slog.Debug("not due", "name", name, "rule", renewal.Rule(d, cert, st, now), "due_at", d.At.Format(time.RFC3339))
}

// settingsChanged reports whether a job asks for other challenge, deploy,
// mail or profile settings than the lineage has: those take effect
// without a new certificate. (A new key type needs one: that is --force.)
func settingsChanged(prev, want *store.Lineage) bool {
	return prev.Challenge != want.Challenge || prev.Deploy != want.Deploy || prev.Profile != want.Profile ||
		!slices.Equal(prev.Mail.To, want.Mail.To) || prev.Mail.From != want.Mail.From || prev.Mail.Host != want.Mail.Host ||
		prev.Mail.Port != want.Mail.Port || prev.Mail.TLS != want.Mail.TLS || prev.Mail.CABundle != want.Mail.CABundle
}

// Execute works the plan: one pool of workers for every order, then one
// deploy for the whole run. The context cancels new work; what was
// obtained before the cancel is saved and deployed all the same.
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
		workers = 8
	}
	jobs := make(chan *step)
	var wg sync.WaitGroup
	for range min(workers, len(work)) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for s := range jobs {
				r.one(s)
				if e.Opts.Observe != nil && !r.owesDeploy(s) {
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
	if e.Budget != nil {
		if err := e.Budget.Flush(); err != nil {
			slog.Warn("could not save the rate budget", "err", err)
		}
	}
	res.Interrupted = ctx.Err() != nil
	res.Finished = e.now()
	res.Count()
	return res
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
	changes []deploy.Change
	owed    map[string]*step // lineage name -> step whose change is in changes
}

func (r *run) owesDeploy(s *step) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.owed[s.job.Lineage.Name] == s
}

// one takes a step through everything before the deploy.
func (r *run) one(s *step) {
	e, ctx, it := r.e, r.ctx, s.item
	name := s.job.Lineage.Name
	if ctx.Err() != nil {
		it.Outcome, it.Error = NotStarted, "interrupted before it started; run the same command again to finish"
		return
	}
	ttl := e.Opts.LeaseTTL
	if ttl <= 0 {
		ttl = 10 * time.Minute
	}
	lease, err := e.Store.Acquire(ctx, name, ttl)
	if errors.Is(err, store.ErrLeaseHeld) {
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
		r.checkARI(s)
		d := renewal.Decide(s.prev.Cert, s.status, e.now(), renewal.Options{Days: e.Opts.Days, ARIOffered: s.ari, Name: s.job.Lineage.Name})
		it.Reason, it.DueAt = string(d.Reason), timePtr(d.At)
		if !d.Due {
			if settingsChanged(s.prev, &s.job.Lineage) {
				it.Reason = "settings changed"
				r.reconfigure(s)
				return
			}
			it.Outcome = NotDue
			logNotDue(name, d, s.prev.Cert, s.status, e.now())
			return
		}
		s.act, s.replace, it.dueNow = actOrder, s.ari, true
	}

	if s.act == actReconfigure {
		r.reconfigure(s)
		return
	}
	if s.act == actDeployPending {
		// No backoff here: the backoff protects the CA's limits, and a
		// deploy retry spends none of them. The run after the config is
		// fixed deploys, whenever it comes.
		r.activatePending(s)
		return
	}
	r.order(s)
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
	fresh, err := e.Store.Load(s.job.Lineage.Name)
	if err != nil || !sameNames(fresh.Domains, s.job.Lineage.Domains) ||
		s.prev != nil && fresh.Cert.Serial == s.prev.Cert.Serial {
		return false
	}
	st, _ := e.Store.ReadStatus(fresh.Name)
	d := renewal.Decide(fresh.Cert, st, e.now(), renewal.Options{Days: e.Opts.Days, Name: fresh.Name})
	if d.Due {
		return false
	}
	s.prev = fresh
	it.Outcome, it.Reason, it.DueAt, it.dueNow = NotDue, "obtained by another run meanwhile", timePtr(d.At), false
	it.Serial, it.NotAfter = fresh.Cert.Serial, timePtr(fresh.Cert.NotAfter)
	slog.Info("not ordering: another run obtained it meanwhile", "name", fresh.Name, "serial", fresh.Cert.Serial)
	return true
}

// order obtains, saves and journals a new certificate for s.
func (r *run) order(s *step) {
	e, ctx, it := r.e, r.ctx, s.item
	l := s.job.Lineage
	// Backoff is checked when the work starts: a lineage that could go
	// after the random delay is not deferred for a whole day because of
	// a check made before it.
	if !s.job.Force && renewal.InBackoff(s.status, e.now().Add(e.Opts.RandomDelay)) {
		r.defer_(s, "waiting after earlier failures: "+s.status.LastError, s.status.NextAttempt, nil)
		return
	}
	r.delay()
	if ctx.Err() != nil {
		it.Outcome, it.Error = NotStarted, "interrupted before it started; run the same command again to finish"
		return
	}
	if !s.job.Force && renewal.InBackoff(s.status, e.now()) {
		r.defer_(s, "waiting after earlier failures: "+s.status.LastError, s.status.NextAttempt, nil)
		return
	}
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
	if r.caDown(l.Server) {
		r.defer_(s, "CA unreachable: "+l.Server+" did not answer the orders before this one; not ordering until the next run", time.Time{}, nil)
		return
	}
	o := issuer.Order{Lineage: l}
	if s.replace && s.prev != nil {
		o.Replaces = s.prev.Cert.ARICertID
	}
	if (s.job.ReuseKey || l.ReuseKey) && s.prev != nil {
		key, err := e.Store.ReadKey(l.Name)
		if err != nil {
			r.fail(s, fmt.Errorf("reuse key: %w", err), false)
			return
		}
		o.ReuseKey = key
		o.Lineage.KeyType = s.prev.KeyType
	}
	key := pace.Key{Server: l.Server, Email: l.Email}
	reserved := false // one token per order the CA sees: a retry after an account reset is the same order
	for attempt := 0; ; attempt++ {
		if !reserved && !e.Opts.DryRun && e.Budget != nil {
			if !r.reserve(s, key, o.Replaces) {
				return
			}
			reserved = true
		}
		if e.Opts.DryRun {
			o.Replaces = ""
		}
		slog.Debug("ordering", "name", l.Name, "reason", it.Reason)
		got, err := e.CA.Obtain(ctx, o)
		r.caResult(l.Server, err)
		if err == nil {
			r.obtained(s, o.Lineage, got)
			return
		}
		if ctx.Err() != nil {
			it.Outcome, it.Error = Aborted, "interrupted while ordering; nothing was saved; run the same command again to finish"
			return
		}
		if acme.AccountGone(err) && attempt == 0 {
			// The CA lost the account (a restarted or rebuilt CA): register
			// again, once, and say so, instead of failing every lineage
			// until someone deletes accounts/ by hand. Several workers
			// may find it at once; one resets it and says so.
			r.resetOnce(l.Server, l.Email)
			continue
		}
		if notTheNamesFault(err) && reserved && e.Budget != nil {
			// Stopped before the CA validated (a fleet agent that did not
			// answer, Redis away): no certificate, nothing to count.
			if berr := e.Budget.Refund(key, r.paceOrder(s, o.Replaces)); berr != nil {
				slog.Warn("could not save the rate budget", "err", berr)
			}
		}
		wait, scope, limited := r.spend(key, r.paceOrder(s, o.Replaces), err)
		if limited && attempt == 0 && wait <= e.Opts.MaxWait {
			slog.Warn("the CA said rateLimited; waiting as it asked", "name", l.Name, "scope", scope.String(), "retry_after", wait)
			if !e.sleep(ctx, wait) {
				it.Outcome, it.Error = Aborted, "interrupted while waiting for the CA's Retry-After"
				return
			}
			reserved = false // a new order after the CA's Retry-After
			continue
		}
		if limited {
			r.defer_(s, "the CA rate-limited "+scope.String()+": "+oneLine(err), e.now().Add(wait), err)
			return
		}
		// An account that cannot be set up, or a CA that does not answer,
		// is not this lineage's fault: no backoff, so the next run after
		// the fix goes ahead.
		r.fail(s, err, !e.Opts.DryRun && !errors.As(err, new(*issuer.AccountError)) && !acme.Unreachable(err) && !notTheNamesFault(err))
		return
	}
}

// caDownAfter is how many orders in a row may find a CA unreachable
// before the run starts no more orders from it: a dead CA costs a few
// timeouts, not rows ÷ concurrency × 2 minutes, and puts no lineage into
// backoff as if its domain were broken.
const caDownAfter = 3

// caResult counts consecutive unreachable answers per CA.
func (r *run) caResult(server string, err error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.caFails == nil {
		r.caFails = map[string]int{}
	}
	if acme.Unreachable(err) {
		r.caFails[server]++
		if r.caFails[server] == caDownAfter {
			slog.Error("the CA did not answer several orders in a row; starting no more orders from it in this run", "server", server)
			r.res.Unreachable = append(r.res.Unreachable, server)
		}
		return
	}
	r.caFails[server] = 0
}

func (r *run) caDown(server string) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.caFails[server] >= caDownAfter
}

// resetOnce resets an account once per run, however many workers meet
// its loss at the same time.
func (r *run) resetOnce(server, email string) {
	r.mu.Lock()
	if r.reset == nil {
		r.reset = map[string]*sync.Once{}
	}
	o := r.reset[server+" "+email]
	if o == nil {
		o = &sync.Once{}
		r.reset[server+" "+email] = o
	}
	r.mu.Unlock()
	o.Do(func() {
		slog.Warn("the CA no longer knows the saved account; registering a new one", "server", server, "email", email)
		if err := r.e.CA.ResetAccount(server, email); err != nil {
			slog.Warn("could not forget the lost account", "server", server, "err", err)
		}
	})
}

// paceOrder is the step's order as the budget counts it.
func (r *run) paceOrder(s *step, replaces string) pace.Order {
	return pace.Order{Names: s.job.Lineage.Domains, Replaces: replaces,
		Renewal: s.prev != nil && sameNames(s.prev.Domains, s.job.Lineage.Domains)}
}

// reserve takes the job's tokens from the budget, waiting up to MaxWait.
func (r *run) reserve(s *step, key pace.Key, replaces string) bool {
	e := r.e
	o := r.paceOrder(s, replaces)
	for {
		err := e.Budget.Reserve(key, o)
		if err == nil {
			return true
		}
		var d *pace.Denied
		if !errors.As(err, &d) {
			r.fail(s, err, false)
			return false
		}
		if d.Wait > e.Opts.MaxWait {
			r.defer_(s, "not ordered: "+d.Reason, e.now().Add(d.Wait),
				hint.Wrap(err, "run again after next_attempt, or loosen --rate-orders/--rate-domain/--rate-names/--rate-failed-authz if your CA allows more"))
			return false
		}
		slog.Debug("waiting for the rate budget", "name", s.job.Lineage.Name, "for", d.Wait.Round(time.Second), "why", d.Reason)
		if !e.sleep(r.ctx, d.Wait) {
			s.item.Outcome, s.item.Error = NotStarted, "interrupted while waiting for the rate budget"
			return false
		}
	}
}

// spend records a failed order in the budget: a failed validation counts
// against each name; a rateLimited answer blocks what it is about (the
// account, a domain, the set of names, a name) for its Retry-After, an
// hour when the CA gives none, and teaches the budget the CA's limit
// when it states a stricter one.
func (r *run) spend(k pace.Key, o pace.Order, err error) (time.Duration, pace.RateLimit, bool) {
	e := r.e
	wait, limited := acme.RateLimited(err)
	budget := e.Budget != nil && !e.Opts.DryRun
	if budget && (limited || acme.FailedValidation(err)) {
		// Refused or failed before issuance: no certificate to count.
		if berr := e.Budget.Refund(k, o); berr != nil {
			slog.Warn("could not save the rate budget", "err", berr)
		}
	}
	if !limited {
		if budget && acme.FailedValidation(err) {
			if berr := e.Budget.FailedAuthz(k, o.Names); berr != nil {
				slog.Warn("could not save the rate budget", "err", berr)
			}
		}
		return 0, pace.RateLimit{}, false
	}
	if wait <= 0 {
		wait = time.Hour
	}
	scope := pace.ParseRateLimit(acme.ProblemDetail(err))
	if e.Budget != nil && !e.Opts.DryRun {
		if berr := e.Budget.Limited(k, o, scope, e.now().Add(wait)); berr != nil {
			slog.Warn("could not save the rate budget", "err", berr)
		}
	}
	return wait, scope, true
}

// obtained saves a new certificate: the version first, then the journal
// entry that says it is owed a deploy, then the live/ switch. A kill at
// any point leaves either the old version live with nothing owed, or a
// pending entry the next run finishes.
func (r *run) obtained(s *step, l store.Lineage, got *acme.Result) {
	e, it := r.e, s.item
	l.Cert = got.Info
	if l.Profile == "" {
		l.Profile = got.Profile // picked for the lineage (shortlived for an address): renewals keep it
	}
	l.IssuedAt = e.now().UTC()
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
	version, err := e.Store.SaveVersion(&l, got.Files)
	if notTheNamesFault(err) {
		r.fail(s, err, false) // a storage that says why, as a fleet refusing a stale writer does
		return
	}
	if err != nil {
		r.fail(s, hint.Wrap(fmt.Errorf("save %s: %w", l.Name, err),
			"the previous certificate, if any, is still live; check free space and permissions of the state directory"), false)
		return
	}
	previous, _ := e.Store.LiveVersion(l.Name)
	// A new certificate starts with no renewal history: no ARI answer,
	// no backoff; only the deploy it is owed. It is journalled even with
	// nowhere to go: the entry is also what lets the next run make a
	// saved version live after a kill between save and activation, rather
	// than order the same names again. (Skipping it for such lineages
	// would save two of the twelve fsyncs per certificate; the CPU
	// benchmark could not tell the difference from its noise.)
	st := store.Status{Pending: &store.Pending{Version: version, Previous: previous, Since: e.now().UTC()}}
	if got.NoARI {
		st = renewal.NoARI(st, e.now()) // known from the order: no "ARI not asked yet" in list
	}
	if err := e.Store.WriteStatus(l.Name, st); err != nil {
		r.fail(s, fmt.Errorf("journal the new version of %s: %w", l.Name, err), false)
		return
	}
	if err := e.Store.Activate(l.Name, version); err != nil {
		r.fail(s, fmt.Errorf("make %s version %d live: %w", l.Name, version, err), false)
		return
	}
	s.status = st
	it.Outcome = outcome
	slog.Info(string(outcome), "name", l.Name, "serial", got.Info.Serial, "expires", got.Info.NotAfter.Format(time.DateOnly))
	r.owe(s, deploy.Change{Name: l.Name, Domains: l.Domains, Serial: got.Info.Serial, Previous: previous, Deploy: l.Deploy})
}

// reconfigure saves a not-due lineage's new settings in place and, when
// its deploy target changed, owes the current certificate a deploy. The
// CA is never asked: changing where a certificate goes must not cost an
// order.
func (r *run) reconfigure(s *step) {
	e, it := r.e, s.item
	l := s.job.Lineage
	l.Cert, l.Version, l.IssuedAt, l.KeyType = s.prev.Cert, s.prev.Version, s.prev.IssuedAt, s.prev.KeyType
	l.ReuseKey = s.prev.ReuseKey || s.job.ReuseKey
	it.Serial, it.NotAfter = l.Cert.Serial, timePtr(l.Cert.NotAfter)
	if e.Opts.DryRun {
		it.Outcome = Reconfigured
		return
	}
	if err := e.Store.UpdateMeta(&l); err != nil {
		r.fail(s, fmt.Errorf("save the new settings of %s: %w", l.Name, err), false)
		return
	}
	it.Outcome = Reconfigured
	slog.Info("saved new settings without ordering", "name", l.Name)
	if l.Deploy != s.prev.Deploy && l.Deploy.Target != "" {
		s.restore = s.prev
		r.owe(s, deploy.Change{Name: l.Name, Domains: l.Domains, Serial: l.Cert.Serial, Previous: l.Version, Deploy: l.Deploy})
	}
}

// activatePending makes the pending version live again and owes it a
// deploy.
func (r *run) activatePending(s *step) {
	e, it := r.e, s.item
	pend := s.status.Pending
	l := s.pending
	previous, _ := e.Store.LiveVersion(l.Name)
	if previous == pend.Version {
		previous = pend.Previous
	}
	if err := e.Store.Activate(l.Name, pend.Version); err != nil {
		r.fail(s, fmt.Errorf("make pending version %d of %s live: %w", pend.Version, l.Name, err), false)
		return
	}
	it.Outcome = Deployed
	it.Serial, it.NotAfter = l.Cert.Serial, timePtr(l.Cert.NotAfter)
	it.life = l.Cert.NotAfter.Sub(l.Cert.NotBefore)
	slog.Info("deploying a certificate obtained earlier", "name", l.Name, "serial", l.Cert.Serial)
	r.owe(s, deploy.Change{Name: l.Name, Domains: l.Domains, Serial: l.Cert.Serial, Previous: previous, Deploy: l.Deploy})
}

func (r *run) owe(s *step, c deploy.Change) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.owed == nil {
		r.owed = map[string]*step{}
	}
	r.changes = append(r.changes, c)
	r.owed[c.Name] = s
}

// deployAll deploys every change once, even after an interrupt: the
// certificates are live on disk, and the load balancer should serve them.
func (r *run) deployAll() {
	e := r.e
	if len(r.changes) == 0 {
		return
	}
	results := e.Deploy.Run(context.WithoutCancel(r.ctx), r.changes)
	keep := e.Opts.KeepVersions
	if keep <= 0 {
		keep = 3
	}
	for i, res := range results {
		c := r.changes[i]
		s := r.owed[c.Name]
		it := s.item
		it.Verify, it.Hook = res.Verify, res.Hook
		switch {
		case res.RolledBack:
			it.Deploy = "rolled_back"
		case c.Deploy.Target == "":
			it.Deploy = "none"
		case res.Deployed:
			it.Deploy = "ok"
		}
		if !res.Failed() {
			it.Pending = ""
			// Deployed: nothing is owed any more. (A reconfiguration
			// owed nothing and keeps its renewal history.) What the
			// order learnt of the CA's ARI stays.
			if s.restore == nil {
				if err := e.Store.WriteStatus(c.Name, store.Status{ARIUnsupported: s.status.ARIUnsupported}); err != nil {
					slog.Warn("could not clear the pending deploy", "name", c.Name, "err", err)
				}
			}
			if removed, err := e.Store.Prune(c.Name, keep); err != nil {
				slog.Warn("could not remove old versions", "name", c.Name, "err", err)
			} else if len(removed) > 0 {
				slog.Debug("removed old versions", "name", c.Name, "versions", removed)
			}
			if e.Opts.Observe != nil {
				e.Opts.Observe(it)
			}
			continue
		}
		msg := oneLine(res.Err)
		if s.restore != nil {
			// A reconfiguration whose deploy failed keeps the old
			// settings, so the next run tries the change again.
			if err := e.Store.UpdateMeta(s.restore); err != nil {
				slog.Warn("could not restore the previous settings", "name", c.Name, "err", err)
			}
			it.Outcome, it.Error = Failed, "deploy: "+msg
			it.Hint = "the settings were not changed; fix the load balancer's config and run the same command again"
			if e.Opts.Observe != nil {
				e.Opts.Observe(it)
			}
			continue
		}
		if res.RolledBack {
			msg += "; rolled back to the previous certificate"
		}
		it.Pending = msg
		st := s.status
		if st.Pending != nil {
			p := *st.Pending
			p.Error = msg
			st.Pending = &p
		}
		st = renewal.Failed(st, "deploy: "+msg, r.started)
		if err := e.Store.WriteStatus(c.Name, st); err != nil {
			slog.Warn("could not save the pending deploy", "name", c.Name, "err", err)
		}
		it.Outcome, it.Error = Failed, "deploy: "+msg
		it.Hint = "the new certificate is kept and deployed by the next run once the load balancer's config is fixed; no new order is placed"
		// No next attempt is reported: a pending deploy costs the CA
		// nothing and is retried by every run, so the fix is picked up at
		// the next cron run. The backoff recorded above only paces an
		// order, should the pending certificate itself fall due.
		it.NextAttempt = nil
		slog.Debug("deploy failed", "name", c.Name, "err", msg)
		if e.Opts.Observe != nil {
			e.Opts.Observe(it)
		}
	}
}

// warnings marks the items the report warns about: heading for expiry
// unrenewed, and not warned about in the last day (a cron that runs
// hourly must not mail hourly).
func (r *run) warnings(items []*Item) {
	e := r.e
	now := e.now()
	for _, it := range items {
		if !it.warnWorthy(now) {
			continue
		}
		st, _ := e.Store.ReadStatus(it.Name)
		if !st.WarnedAt.IsZero() && now.Sub(st.WarnedAt) < 23*time.Hour {
			continue
		}
		it.warn = true
		if e.Opts.DryRun {
			continue
		}
		st.WarnedAt = now.UTC()
		if err := e.Store.WriteStatus(it.Name, st); err != nil {
			slog.Warn("could not save the warning time", "name", it.Name, "err", err)
		}
	}
}

// checkARI asks the CA for the renewal window and saves the answer. A
// failure falls back to the lifetime rule.
func (r *run) checkARI(s *step) {
	e, l := r.e, s.prev
	now := e.now()
	fullchain, err := e.Store.ReadFullchain(l.Name)
	if err != nil {
		return
	}
	info, err := e.CA.RenewalInfo(r.ctx, l, fullchain)
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
		if err := e.Store.WriteStatus(l.Name, s.status); err != nil {
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
	it.Outcome, it.Error, it.Hint = Failed, oneLine(err), hint.Of(err)
	if backoff {
		st := renewal.Failed(s.status, it.Error, r.started)
		if werr := r.e.Store.WriteStatus(s.job.Lineage.Name, st); werr != nil {
			slog.Warn("could not save backoff", "name", s.job.Lineage.Name, "err", werr)
		}
		s.status = st
		it.NextAttempt = timePtr(st.NextAttempt)
	}
	slog.Debug("failed", "name", s.job.Lineage.Name, "err", it.Error)
}

// defer_ leaves s for a later run, without backoff.
func (r *run) defer_(s *step, why string, next time.Time, err error) {
	it := s.item
	it.Outcome, it.Error = Deferred, why
	it.Hint = hint.Of(err)
	it.NextAttempt = timePtr(next)
	slog.Debug("deferred", "name", s.job.Lineage.Name, "why", it.Error)
}

func sameNames(a, b []string) bool {
	x, y := slices.Clone(a), slices.Clone(b)
	sort.Strings(x)
	sort.Strings(y)
	return slices.Equal(x, y)
}

// oneLine is an error as one line, without any known secret: it goes
// into status files, reports and mail.
// notTheNamesFault is an error that says the names are not to blame (a
// fleet agent that did not answer, a stale writer refused): no backoff,
// so the next run may try at once.
func notTheNamesFault(err error) bool {
	var nb interface{ NoBackoff() bool }
	return errors.As(err, &nb) && nb.NoBackoff()
}

func oneLine(err error) string { return secret.Scrub(strings.Join(strings.Fields(err.Error()), " ")) }
