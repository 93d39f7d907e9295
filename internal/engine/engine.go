// Package engine is lbcert's one run pipeline. issue, batch and renew
// build Jobs, call Plan, then Execute, and render the Result; the fleet
// agent is an engine run too, one that only installs (Options.
// InstallOnly) what the fleet's catalog holds and this node does not
// serve yet. None of them orders, saves or deploys by itself.
//
// The engine sees storage through two seams: the shared catalog
// (package catalog: the state directory on one host, the fleet's Redis
// in a fleet) and this node's Local store with its one install step
// (Node). Nothing here knows which mode it runs in. A fleet that stages
// rollouts gives the Node a Gate, which says which version a node may
// serve (the head, or the one before it until the node's wave is
// released); the install step installs that, through the same steps.
//
// One run, start to end:
//
//  1. Plan decides per job, reading only the catalog's head and status
//     and this node's journal (never an account key or a secret): new,
//     due (renewal's one rule: critical, --days, ARI, lifetime), not
//     due, ARI to ask, a head this node must still install (a deploy
//     that failed, a version another node ordered, new deploy settings),
//     or new settings to save.
//  2. Execute works the plan through one worker pool of Concurrency
//     workers. An order takes the lineage's lease, asks ARI if needed,
//     checks the failure backoff when the work starts (after the random
//     cron delay, not before it), pre-flights, reserves the pace budget
//     (waiting up to MaxWait), obtains, and publishes to the catalog,
//     which numbers the version. Then, for orders and installs alike,
//     Node.prepare stages the version on this node, journals it as owed
//     and makes it live.
//  3. Node.deployAll runs once for the whole run, grouped by load
//     balancer, with a context an interrupt does not cancel: whatever
//     was obtained is deployed. A certificate whose deploy failed is
//     rolled back and stays owed; later runs (and the agent) deploy it
//     instead of ordering again.
//  4. The Result holds one typed Item per job; the command renders it and
//     maps it to an exit code.
//
// The engine never imports cobra or knows exit codes: errors carry hints
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
	"runtime/debug"
	"slices"
	"sort"
	"sync"
	"time"

	legochallenge "github.com/go-acme/lego/v4/challenge"

	"github.com/lbcert/lbcert/internal/acme"
	"github.com/lbcert/lbcert/internal/ca"
	"github.com/lbcert/lbcert/internal/catalog"
	"github.com/lbcert/lbcert/internal/deploy"
	"github.com/lbcert/lbcert/internal/issuer"
	"github.com/lbcert/lbcert/internal/names"
	"github.com/lbcert/lbcert/internal/pace"
	"github.com/lbcert/lbcert/internal/preflight"
	"github.com/lbcert/lbcert/internal/renewal"
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
	RenewalInfo(ctx context.Context, l *store.Lineage) (*acme.RenewalInfo, error)
	// ResetAccount forgets the account for (server, email), so the next
	// order registers a new one.
	ResetAccount(server, email string) error
}

// Deployer puts certificates in front of users; *deploy.Runner is the
// real one.
type Deployer interface {
	Run(ctx context.Context, changes []deploy.Change) []deploy.Result
	// Test runs d's config test on what the load balancer has now and
	// returns the failure's Check, or "" when it passes.
	Test(ctx context.Context, d store.Deploy) string
}

// Budget is the client-side pace budget, shared by every command;
// *pace.Budget is the real one.
type Budget interface {
	Reserve(k pace.Key, o pace.Order) error
	FailedAuthz(k pace.Key, names []string) error
	Limited(k pace.Key, o pace.Order, r pace.RateLimit, until time.Time) error
	Refund(k pace.Key, o pace.Order) error
	// Unreserve gives back all an order reserved, its new-order token
	// too: the order never reached the CA.
	Unreserve(k pace.Key, o pace.Order) error
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

// DefaultConcurrency is batch's and renew's --concurrency, chosen from
// internal/bench's sweep (#29): 200 orders against Pebble finished in
// 27 s at 8 in flight, 13 s at 32 and 9 s at 64, each order being mostly
// a wait for the CA (its Retry-After), at the same CPU per certificate;
// renew flattened beyond 64. A CA's own limits are the pace budget's
// business, not this one's.
const DefaultConcurrency = 64

// Options are a run's switches; the zero value is a sensible default
// for everything but Command.
type Options struct {
	Command     string // "issue", "batch", "renew", "agent": names the report
	Concurrency int    // workers; default DefaultConcurrency
	Days        int    // --days: due when fewer than this many days remain
	DryRun      bool   // order, but save, deploy and charge nothing
	// InstallOnly never orders: the run installs what the catalog holds
	// and this node does not serve (the fleet agent, a node that never
	// orders).
	InstallOnly bool
	// MaxWait is how long a job may wait for the pace budget or a short
	// Retry-After before it is deferred to a later run.
	MaxWait time.Duration
	// RandomDelay is the longest random pause before the run's first
	// order (cron runs), so that hosts do not hit the CA in step.
	RandomDelay time.Duration
	// Preflight checks names before ordering; nil skips it.
	Preflight *preflight.Checker
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
	// Observe is called once per item when its own work ends (its
	// certificate obtained or installed, or it failed or was deferred),
	// from the worker that did it, before the run's one deploy: a
	// progress bar counts a row when its certificate is obtained.
	Observe func(*Item)
	// Deploying is called once before the run's deploy with the number
	// of certificates it deploys (the deploy is a phase of its own), and
	// Deployed once per deployed item after it, with the deploy's
	// outcome on the item.
	Deploying func(n int)
	Deployed  func(*Item)
}

// Engine runs plans against one catalog and installs on one node.
type Engine struct {
	Catalog catalog.Catalog
	Node    *Node
	CA      CA
	Budget  Budget
	Opts    Options
	// CAs are the fallbacks tried after each lineage's primary, and
	// their breakers; nil orders from the lineage's own CA only.
	CAs *ca.Set
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
	actNone        action = iota // outcome already decided
	actOrder                     // obtain a certificate
	actCheckARI                  // ask the CA's renewal window, then maybe order
	actInstall                   // install the catalog's head on this node
	actReconfigure               // not due, but new settings: save them, install if this node's deploy changed
)

// reasonSettingsChanged is an item's Reason when its step is
// actReconfigure: the certificate is kept and only settings change.
const reasonSettingsChanged = "settings changed"

// reasonPendingDeploy is an item's Reason when its step is actInstall of
// a certificate obtained earlier that this node does not serve yet.
const reasonPendingDeploy = "pending deploy"

type step struct {
	job     Job
	item    *Item
	act     action
	prev    *store.Lineage // the catalog's head, if any
	status  store.Status
	ari     bool // the CA offers ARI for this lineage
	replace bool // an ARI renewal of prev: send "replaces"
	restore *store.Lineage
}

// Plan is a decided run, ready to Execute.
type Plan struct {
	e       *Engine
	items   []*Item // every job's, in job order
	steps   []*step // the jobs that have work; decided ones keep only their item
	started time.Time
}

// Plan decides what each job needs. It reads the catalog and this
// node's journal only, and writes nothing.
func (e *Engine) Plan(ctx context.Context, jobs []Job) (*Plan, error) {
	return e.PlanSeq(ctx, slices.Values(jobs), len(jobs))
}

// PlanSeq is Plan over jobs made one at a time (n of them, a hint for
// the report's size): renew's 100,000 jobs are each a name, made when
// the plan reaches it, instead of 600 bytes apiece held for the run.
func (e *Engine) PlanSeq(ctx context.Context, jobs iter.Seq[Job], n int) (*Plan, error) {
	if n > bigPlan {
		defer bigHeap(n)()
	}
	now := e.now()
	p := &Plan{e: e, started: now, items: make([]*Item, 0, n)}
	// Deciding is reading two small files (or two Redis answers) and
	// parsing JSON per lineage: a few goroutines decide a batch at a
	// time, in job order, so the cores share the work and no more than a
	// batch is held at once.
	batch := make([]*step, 0, planBatch)
	flush := func() {
		var wg sync.WaitGroup
		next := make(chan *step)
		for range min(runtime.GOMAXPROCS(0)*2, len(batch)) {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for s := range next {
					e.decide(ctx, s, now)
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

// bigPlan is the size from which the plan keeps its heap tight.
const bigPlan = 250_000

// bigHeap bounds the heap of a plan of n jobs and returns what undoes
// it. The plan keeps an item per job, about 650 bytes, and Go lets the
// heap grow to twice what is live before it collects: over a GiB for a
// million lineages, half of it garbage. Collecting at a fixed fraction
// more than is live (GOGC 25) keeps it under 850 MiB but collects
// hundreds of times while little is live yet, a fifth of the pass's
// CPU. A memory limit instead lets garbage pile up while the items are
// few and collects often only near the limit: on a million lineages,
// 760 MiB of peak memory and a sixth less CPU than GOGC 25
// (internal/bench/README.md). The limit grows with n, 800 bytes a job,
// so that what is live stays well under it; a lower limit set by the
// operator (GOMEMLIMIT) stays.
func bigHeap(n int) (undo func()) {
	limit := max(int64(760)<<20, int64(n)*800)
	prev := debug.SetMemoryLimit(-1)
	if prev < limit {
		return func() {}
	}
	gc := debug.SetGCPercent(100)
	debug.SetMemoryLimit(limit)
	return func() { debug.SetMemoryLimit(prev); debug.SetGCPercent(gc) }
}

func (e *Engine) decide(ctx context.Context, s *step, now time.Time) {
	if !e.loadHead(ctx, s) {
		return
	}
	name, prev := s.job.Lineage.Name, s.prev
	if e.Opts.InstallOnly {
		e.decideInstall(ctx, s)
		return
	}
	s.status, _ = e.Catalog.Status(ctx, name)
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
	if !e.checkProfile(s) {
		return
	}
	same := prev != nil && sameNames(prev.Domains, s.job.Lineage.Domains)
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
	case !e.Opts.DryRun && e.owesGated(ctx, s, prev, false):
		// A certificate in the catalog that this node does not serve
		// (its deploy failed, another node ordered it, this node's
		// deploy settings changed) comes before anything else: it is
		// valid and paid for, and ordering again would spend the CA's
		// five-per-week limit on the same names.
		s.act, s.item.Reason = actInstall, reasonPendingDeploy
		s.item.Pending = pendingError(e.Node, name)
		if settingsChanged(prev, &s.job.Lineage) {
			// New settings given for it apply to this very deploy.
			s.act, s.item.Reason = actReconfigure, reasonSettingsChanged
		}
	case d.CheckARI:
		s.act = actCheckARI
	case settingsChanged(prev, &s.job.Lineage):
		s.act, s.item.Reason = actReconfigure, reasonSettingsChanged
	default:
		s.item.Outcome = NotDue
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

// loadHead reads the catalog's head into s.prev and merges the stored
// settings into a renew job. It reports false when s is decided.
func (e *Engine) loadHead(ctx context.Context, s *step) bool {
	name := s.job.Lineage.Name
	prev, err := e.Catalog.Head(ctx, name)
	if s.job.Stored && errors.Is(err, store.ErrNotFound) {
		// A stored lineage whose metadata is gone is broken, not new:
		// ordering it would be ordering nothing.
		s.item.Outcome, s.item.Error = Failed, fmt.Sprintf("%s: no %s: not a lineage lbcert can renew", name, store.MetaFile)
		s.item.Hint = "move the directory aside, or issue the names again under this name"
		return false
	}
	if err != nil && !errors.Is(err, store.ErrNotFound) {
		s.item.Outcome = Failed
		s.item.Error = oneLine(err)
		s.item.Hint = "move the broken lineage " + name + " aside, or issue it under another name"
		return false
	}
	s.prev = prev
	if prev == nil {
		return true
	}
	if s.job.Stored {
		s.job.Lineage = *prev
		s.item.Domains, s.item.mail = prev.Domains, mailOf(prev.Mail)
	}
	if s.job.Lineage.Profile == "" {
		// A profile sticks: a job that names none keeps the lineage's
		// (Traefik drops it on renewal; lbcert does not).
		s.job.Lineage.Profile = prev.Profile
	}
	if s.job.Lineage.PreferredChain == "" {
		s.job.Lineage.PreferredChain = prev.PreferredChain // sticks as the profile does
	}
	return true
}

// decideInstall is the plan of a run that never orders: the agent's,
// which asks the rollout's gate afresh (a version it may not serve yet
// is not owed; one it must go back to is).
func (e *Engine) decideInstall(ctx context.Context, s *step) {
	if s.prev == nil {
		s.item.Outcome, s.item.Reason = NotDue, "not in the catalog"
		return
	}
	g, err := e.Node.target(ctx, s.prev, true)
	if err != nil {
		s.item.Outcome, s.item.Error, s.item.err = Failed, "read the rollout: "+oneLine(err), err
		return
	}
	s.item.Held, s.item.Override = g.Held, g.Override
	if e.Node.owes(g.Want) {
		s.act, s.item.Reason = actInstall, "newer in the catalog"
		if g.Want != s.prev {
			s.item.Reason = "held back by the rollout"
		}
		s.item.Pending = pendingError(e.Node, s.prev.Name)
		return
	}
	if g.Want != s.prev {
		slog.Info("not installing here yet: a staged rollout holds it", "name", s.prev.Name, "serving", g.Want.Version, "why", g.Held)
	}
	s.item.Outcome = NotDue
	s.item.Serial, s.item.NotAfter, s.item.Version = g.Want.Cert.Serial, timePtr(g.Want.Cert.NotAfter), g.Want.Version
}

// owesGated reports whether this node must install what the gate lets
// it serve of head; a planning answer, which the install asks again.
func (e *Engine) owesGated(ctx context.Context, s *step, head *store.Lineage, fresh bool) bool {
	g, err := e.Node.target(ctx, head, fresh)
	if err != nil {
		slog.Debug("could not read the rollout; the install asks again", "name", head.Name, "err", err)
		return e.Node.owes(head)
	}
	s.item.Held = g.Held
	return e.Node.owes(g.Want)
}

// checkProfile refuses, before the CA, a profile whose name limit the
// job's names exceed.
func (e *Engine) checkProfile(s *step) bool {
	profile := s.job.Lineage.Profile
	if profile == "" && slices.ContainsFunc(s.job.Lineage.Domains, names.IsAddress) {
		profile = acme.ShortLived // what the order will pick for an address
	}
	if err := pace.CheckProfileNames(s.job.Lineage.Server, profile, len(s.job.Lineage.Domains)); err != nil {
		s.item.Outcome, s.item.Error = Invalid, err.Error()
		s.item.Hint = "split the names over several lineages, or choose a profile that allows more with --profile"
		return false
	}
	return true
}

func pendingError(n *Node, name string) string {
	j, _ := n.Local.Journal(name)
	if j.Pending != nil {
		return j.Pending.Error
	}
	return ""
}

// settingsChanged reports whether a job asks for other challenge, deploy,
// mail or profile settings than the lineage has: those take effect
// without a new certificate. (A new key type needs one: that is --force.)
func settingsChanged(prev, want *store.Lineage) bool {
	return prev.Challenge != want.Challenge || prev.Deploy != want.Deploy || prev.Profile != want.Profile ||
		!slices.Equal(prev.Mail.To, want.Mail.To) || prev.Mail.From != want.Mail.From || prev.Mail.Host != want.Mail.Host ||
		prev.Mail.Port != want.Mail.Port || prev.Mail.TLS != want.Mail.TLS || prev.Mail.CABundle != want.Mail.CABundle ||
		prev.Mail.User != want.Mail.User
}

func sameNames(a, b []string) bool {
	x, y := slices.Clone(a), slices.Clone(b)
	sort.Strings(x)
	sort.Strings(y)
	return slices.Equal(x, y)
}
