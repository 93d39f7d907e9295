package fleet

import (
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"time"

	"github.com/lbcert/lbcert/internal/catalog"
	"github.com/lbcert/lbcert/internal/deploy"
	"github.com/lbcert/lbcert/internal/engine"
	"github.com/lbcert/lbcert/internal/fleet/rdb"
	"github.com/lbcert/lbcert/internal/pace"
	"github.com/lbcert/lbcert/internal/store"
)

// Served is what a node reports serving for one lineage.
type Served struct {
	Version int       `json:"version"` // the fleet version the node serves
	Serial  string    `json:"serial,omitempty"`
	Wanted  int       `json:"wanted"` // the fleet's version when it tried
	OK      bool      `json:"ok"`
	Error   string    `json:"error,omitempty"`
	At      time.Time `json:"at"`
	// Probe is the staged rollout's probe through this node of the
	// version it serves: "ok", or why it failed ("" when none ran).
	Probe string `json:"probe,omitempty"`
	// Checked is when the node last checked the version again while a
	// staged rollout soaks it (its TLS check and probe, every few
	// seconds); zero until then, the deploy's own check being at At.
	Checked time.Time `json:"checked,omitzero"`
	// Verify is how that TLS check went: "ok", or why it failed.
	Verify string `json:"verify,omitempty"`
	// Held says why the node serves an older version than the fleet's
	// newest: a staged rollout has not released it here.
	Held string `json:"held,omitempty"`
}

// Remover takes a deleted lineage off this node's load balancer:
// *deploy.Runner is the real one.
type Remover interface {
	References(ctx context.Context, name string, d store.Deploy, managed map[string]bool) ([]deploy.Reference, error)
	Unlist(ctx context.Context, name string, d store.Deploy, keep bool) error
	Remove(ctx context.Context, name string, d store.Deploy) error
}

// Syncer is the agent's part that makes this node serve what the fleet
// holds. It learns of new versions and deletes from the events stream,
// with a periodic full reconcile as the fallback (never by polling every
// key), and hands each lineage this node does not serve as the fleet
// holds it to an engine run that only installs (engine.Options.
// InstallOnly): the one install step of issue, batch and renew, with
// this node's own deploy settings. It also removes what the fleet
// deleted, keeps copies of the fleet's accounts, and gives back to Redis
// a version Redis lost (invariants I1, I2, I3 of package catalog).
type Syncer struct {
	// Local is this node's state directory; N is set when the fleet's
	// Redis first answers.
	Local  *store.Store
	N      *Node
	Deploy store.Deploy // this node's deploy settings
	Runner engine.Deployer
	Remove Remover
	// Reconcile is the interval of the full reconcile (default 60 s).
	Reconcile time.Duration
	// Settle is how long the agent gathers events into one deploy.
	Settle time.Duration
	// Keep is how many versions a lineage keeps after a deploy, the
	// live one included (default 3), as --keep-versions for runs.
	Keep int
	// Roots is engine.Node's: the roots of a fallback CA's certificates
	// for the deploy check.
	Roots func(*store.Lineage) string

	mu           sync.Mutex
	swept        time.Time
	ledgerCopied time.Time // when copyLedger last ran
	wake         time.Time // when a staged rollout is due a look
}

// Run syncs until ctx ends; beside it, the versions staged rollouts
// soak on this node are checked again and again (soakChecks).
func (s *Syncer) Run(ctx context.Context) {
	if s.Reconcile <= 0 {
		s.Reconcile = time.Minute
	}
	if s.Settle <= 0 {
		s.Settle = 100 * time.Millisecond
	}
	go s.soakChecks(ctx)
	wait := time.Second
	for ctx.Err() == nil {
		if err := s.follow(ctx); err != nil && ctx.Err() == nil {
			slog.Warn("fleet sync stopped; serving from disk and trying again", "err", err, "in", wait)
			select {
			case <-ctx.Done():
			case <-time.After(wait):
			}
			wait = min(wait*2, maxBackoff)
			continue
		}
		wait = time.Second
	}
}

// follow reconciles everything, then applies events as they come,
// reconciling again every Reconcile. It returns on a Redis error.
func (s *Syncer) follow(ctx context.Context) error {
	rctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	last, err := s.N.Shared.LastEvent(rctx)
	cancel()
	if err != nil {
		return err
	}
	if err := s.reconcile(ctx); err != nil {
		return err
	}
	s.took(ctx, last)
	next := time.Now().Add(s.Reconcile)
	for ctx.Err() == nil {
		if err := s.tick(ctx); err != nil {
			return err
		}
		block := min(time.Until(next), 2*time.Second)
		if block <= 0 {
			if err := s.reconcile(ctx); err != nil {
				return err
			}
			next = time.Now().Add(s.Reconcile)
			continue
		}
		evs, err := s.N.Shared.Events(ctx, last, block)
		if err != nil {
			return err
		}
		if len(evs) == 0 {
			continue
		}
		// Events come in bursts (a batch publishing): gather a little
		// longer, so one deploy covers the burst.
		time.Sleep(s.Settle)
		more, err := s.N.Shared.Events(ctx, evs[len(evs)-1].ID, 10*time.Millisecond)
		if err != nil {
			return err
		}
		evs = append(evs, more...)
		last = evs[len(evs)-1].ID
		var names, gone []string
		for _, e := range evs {
			switch {
			case e.Config:
				// The waves changed: read them before anything published
				// after the change (later in the stream) is installed.
				if err := s.N.FollowRolloutConfig(ctx); err != nil {
					return err
				}
			case e.Deleted:
				gone = append(gone, e.Name)
			default:
				names = append(names, e.Name)
			}
		}
		if err := s.forget(ctx, compact(gone)); err != nil {
			return err
		}
		s.took(ctx, last)
		if err := s.sync(ctx, compact(names)); err != nil {
			return err
		}
	}
	return nil
}

// took says in Redis that this node has applied the events up to id:
// every delete among them is on its disk (Catalog.Delete waits for it).
func (s *Syncer) took(ctx context.Context, id string) {
	rctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	s.N.Shared.MarkTook(rctx, s.N.Name, id)
}

func compact(s []string) []string {
	slices.Sort(s)
	return slices.Compact(s)
}

// reconcile compares every lineage the fleet holds with what this node
// serves, and every lineage this node serves with what the fleet holds.
func (s *Syncer) reconcile(ctx context.Context) error {
	rctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	if err := s.N.FollowRolloutConfig(rctx); err != nil {
		return err
	}
	if err := s.N.SyncAccounts(rctx); err != nil {
		return err
	}
	if err := s.forgetDeleted(rctx); err != nil {
		return err
	}
	s.sweepPace()
	s.copyLedger(rctx)
	if err := s.N.putBackLedger(rctx); err != nil {
		return err
	}
	if err := s.N.freeDeadLeases(rctx); err != nil {
		return err
	}
	names, err := s.N.Shared.Names(rctx)
	if err != nil {
		return err
	}
	heads, err := s.N.Shared.Heads(rctx, names)
	if err != nil {
		return err
	}
	s.N.noteSeen(heads)
	if err := s.giveBack(rctx, heads); err != nil {
		return err
	}
	// What Redis holds of this node's reports, not what this agent
	// remembers sending: a report Redis lost (a failover, a pause, a
	// restart from an older snapshot, a rebuild) is sent again.
	said, err := s.N.Shared.Served(rctx, s.N.Name)
	if err != nil {
		return err
	}
	targets, recs, err := s.N.Targets(rctx, heads)
	if err != nil {
		return err
	}
	digest := store.DeployDigest(s.Deploy)
	var todo []string
	fine := map[string]Served{}
	for _, name := range names {
		h := heads[name]
		if h.Version == 0 {
			continue
		}
		// What this node may serve: the head, or the version a staged
		// rollout keeps it on.
		t, staged := targets[name]
		if !staged {
			t = Target{Version: h.Version, Serial: h.Serial}
		}
		live, _ := s.Local.LiveVersion(name)
		j, _ := s.Local.Journal(name)
		d := j.Deployed
		if j.Pending != nil || live != t.Version || d == nil || d.Version != t.Version || d.Serial != t.Serial || d.With != digest {
			todo = append(todo, name)
			continue
		}
		var rep Served
		if json.Unmarshal([]byte(said[name]), &rep) != nil || rep.Version != t.Version || rep.Serial != t.Serial || !rep.OK || rep.Held != t.Held {
			fine[name] = Served{Version: t.Version, Serial: t.Serial, Wanted: h.Version, OK: true, At: time.Now().UTC(), Held: t.Held}
		}
	}
	if err := s.report(ctx, fine); err != nil {
		return err
	}
	if err := s.sync(ctx, todo); err != nil {
		return err
	}
	return s.judge(ctx, recs, heads)
}

// judge moves every rollout on its way as the reports say (Evaluate),
// installs what moved, and forgets the copies of finished ones; it
// notes when to look again.
func (s *Syncer) judge(ctx context.Context, recs map[string]*Record, heads map[string]rdb.Head) error {
	next, err := s.N.Evaluate(ctx)
	if err != nil {
		return err
	}
	s.mu.Lock()
	s.wake = next
	s.mu.Unlock()
	vs := make(map[string]int, len(heads))
	for name, h := range heads {
		vs[name] = h.Version
	}
	return s.N.dropStaleCopies(ctx, recs, vs)
}

// tick looks at the rollouts again when one is due (a soak ended, a
// held version nearing expiry), and installs what that changed.
func (s *Syncer) tick(ctx context.Context) error {
	s.mu.Lock()
	due := !s.wake.IsZero() && !time.Now().Before(s.wake)
	if due {
		s.wake = time.Time{}
	}
	s.mu.Unlock()
	if !due {
		return nil
	}
	next, err := s.N.Evaluate(ctx)
	if err != nil {
		return err
	}
	s.mu.Lock()
	s.wake = sooner(s.wake, next)
	s.mu.Unlock()
	names, err := s.N.Shared.Rollouts(ctx)
	if err != nil {
		return err
	}
	return s.sync(ctx, names)
}

// copyLedger copies the fleet's issuance ledger to this node when the
// agent starts, then every ledgerCopyEvery (Node.copyLedger).
func (s *Syncer) copyLedger(ctx context.Context) {
	if time.Since(s.ledgerCopied) < ledgerCopyEvery {
		return
	}
	s.ledgerCopied = time.Now()
	if err := s.N.copyLedger(ctx); err != nil {
		slog.Debug("could not copy the fleet's issuance ledger to this node", "err", err)
	}
}

// ledgerCopyEvery is how often an agent copies the fleet's ledger: its
// places change only when orders are placed.
const ledgerCopyEvery = 10 * time.Minute

// sweepPace removes, once an hour, the pace budget's fields that hold
// nothing any more, judged by Let's Encrypt's limits (the defaults):
// the fleet's budget keeps a field per name it ever ordered.
func (s *Syncer) sweepPace() {
	if time.Since(s.swept) < time.Hour {
		return
	}
	s.swept = time.Now()
	if n, err := pace.Sweep(PaceStore{Shared: s.N.Shared}, pace.LetsEncrypt, time.Now); err != nil {
		slog.Debug("could not sweep the fleet's pace budget", "err", err)
	} else if n > 0 {
		slog.Debug("swept the fleet's pace budget", "fields", n)
	}
}

// sync installs the fleet's newest version of names on this node,
// through one engine run that only installs, or, for many names and an
// HAProxy updated over its runtime API, through several (inSlices).
func (s *Syncer) sync(ctx context.Context, names []string) error {
	if len(names) == 0 {
		return nil
	}
	node := s.node()
	if len(names) > sliceFrom && s.Deploy.Target == "haproxy" && s.Deploy.HAProxySocket != "" {
		return s.inSlices(ctx, node, names)
	}
	return s.syncRun(ctx, node, names, nil)
}

// Slices of a large install (inSlices): the first is small, so that
// the load balancer's part starts early; each after it twice the one
// before, up to maxSlice, so that the last one's deploy, which nothing
// overlaps, is short. Tests lower them.
var (
	sliceFrom  = 200 // more names than this are installed in slices
	firstSlice = 100
	maxSlice   = 5000
)

// inSlices installs names in slices, so that one slice is staged while
// the one before it is deployed. A node joining a fleet of 100,000
// lineages otherwise does two long phases one after the other, each
// leaving half the machine idle: staging (its own disk's work) and then
// one runtime-API update per certificate (HAProxy parsing each PEM, on
// one core); and it serves nothing until every lineage is staged. Each
// slice is a whole engine run, installed, deployed, recorded and
// reported on its own, as a run of that many names would be. A slice
// starts once the one before it is staged, and at most two are under
// way, so their deploys come in order, one at a time (node), and
// staging runs at most one slice ahead. A reload comes once per run, so
// once a runtime-API update has failed (HAProxy refused a certificate,
// or its socket is gone: the deploy rolls back or falls back to a
// reload) the names left go in one run. Names are installed once each:
// two runs of this process writing one lineage would not exclude each
// other (WriteLock).
func (s *Syncer) inSlices(ctx context.Context, node *engine.Node, names []string) error {
	names = slices.Compact(slices.Sorted(slices.Values(names)))
	failures := func() int64 { return 0 }
	if f, ok := s.Runner.(interface{ RuntimeAPIFailures() int64 }); ok {
		failures = f.RuntimeAPIFailures
	}
	before := failures()
	var (
		wg    sync.WaitGroup
		mu    sync.Mutex
		first error
	)
	failed := func() bool {
		mu.Lock()
		defer mu.Unlock()
		return first != nil
	}
	running := make(chan struct{}, 2)
	for size := firstSlice; len(names) > 0 && ctx.Err() == nil && !failed(); size = min(2*size, maxSlice) {
		running <- struct{}{}
		if failures() != before {
			size = len(names)
		}
		part := names[:min(size, len(names))]
		names = names[len(part):]
		staged := make(chan struct{})
		wg.Go(func() {
			defer func() { <-running }()
			if err := s.syncRun(ctx, node, part, sync.OnceFunc(func() { close(staged) })); err != nil {
				mu.Lock()
				first = cmp.Or(first, err) // Redis did not answer: the next reconcile goes on
				mu.Unlock()
			}
		})
		<-staged
	}
	wg.Wait()
	return first
}

// installWorkers is how many lineages an agent's run installs at once.
// Installing is reading from Redis and writing to this node's disk, and
// the disk writes wait for file-system syncs that every worker waiting
// at that moment shares (package store's group commit): a node joining
// 20,000 lineages staged a slice of 5,000 in about 11 s with 8 workers
// and in about 4.5 s with 32; 64 was no faster (internal/bench/README.md).
const installWorkers = 32

// syncRun installs names through one engine run on node; staged, when
// set, is called once every name is staged (before the deploy), or
// when the run ends without one.
func (s *Syncer) syncRun(ctx context.Context, node *engine.Node, names []string, staged func()) error {
	if staged == nil {
		staged = func() {}
	}
	defer staged()
	jobs := make([]engine.Job, len(names))
	for i, n := range names {
		jobs[i] = engine.Job{Lineage: store.Lineage{Name: n}, Stored: true}
	}
	e := &engine.Engine{Catalog: NewCatalog(s.N), Node: node, Opts: engine.Options{Command: "agent", InstallOnly: true, Concurrency: installWorkers, Deploying: func(int) { staged() }}}
	plan, err := e.Plan(ctx, jobs)
	if err != nil {
		return err
	}
	res := plan.Execute(ctx)
	fine := map[string]Served{}
	for _, it := range res.Items {
		switch {
		case it.Outcome == engine.NotDue && it.Serial != "":
			fine[it.Name] = Served{Version: it.Version, Serial: it.Serial, Wanted: it.Version, OK: true, At: time.Now().UTC(), Held: it.Held}
		case it.Outcome == engine.Failed && isUnavailable(it.Err()):
			return it.Err()
		case it.Outcome == engine.Failed:
			slog.Warn("could not install a certificate from the fleet", "name", it.Name, "err", it.Error)
		}
	}
	if n := res.Counts[engine.Deployed]; n > 0 {
		slog.Info("installed certificates from the fleet", "count", n)
	}
	return s.report(ctx, fine)
}

func isUnavailable(err error) bool { return err != nil && errors.As(err, new(*rdb.Unavailable)) }

// node is this node as the engine installs on it: its own deploy
// settings for every lineage, the short write lock it shares with the
// runs of this node, and a report to the fleet after each deploy.
func (s *Syncer) node() *engine.Node {
	n := &engine.Node{
		Local:    s.Local,
		Deploy:   s.Runner,
		Settings: func(*store.Lineage) store.Deploy { return s.Deploy },
		Keep:     s.Keep,
		Lock:     WriteLock(s.Local),
		Report:   s.served,
		Roots:    s.Roots,
	}
	if s.N != nil {
		n.Gate = s.N.Gate // staged rollouts: what this node may serve
	}
	return n
}

// WriteLock is fleet mode's short write lock of st, as engine.Node
// takes it around each install and deploy. The workers of one process
// hold it together: one engine run's workers never write the same
// lineage, and each install step held it alone, so a joining node
// installed its lineages one after another however many workers it had
// (#29). Other processes (a run, the agent) still wait until none of
// this process's holders is left.
func WriteLock(st *store.Store) func(ctx context.Context) (func(), error) {
	v, _ := writeLocks.LoadOrStore(st.Dir, &sharedLock{})
	sl := v.(*sharedLock)
	return func(ctx context.Context) (func(), error) {
		sl.mu.Lock()
		defer sl.mu.Unlock()
		if sl.holders == 0 {
			lctx, cancel := context.WithTimeout(ctx, 5*time.Minute)
			l, err := st.WriteLock(lctx)
			cancel()
			if err != nil {
				return nil, err
			}
			sl.l = l
		}
		sl.holders++
		var once sync.Once
		return func() {
			once.Do(func() {
				sl.mu.Lock()
				defer sl.mu.Unlock()
				if sl.holders--; sl.holders == 0 {
					sl.l.Unlock()
					sl.l = nil
				}
			})
		}, nil
	}
}

// writeLocks are this process's holds of each state directory's short
// write lock.
var writeLocks sync.Map // dir -> *sharedLock

type sharedLock struct {
	mu      sync.Mutex
	holders int
	l       *store.Lock
}

// served reports what an install left this node serving, and notes the
// certificates in this node's copy of the ledger.
func (s *Syncer) served(ctx context.Context, out []engine.Served) {
	m := make(map[string]Served, len(out))
	var installed []*store.Lineage
	for _, sv := range out {
		m[sv.Name] = Served{Version: sv.Version, Serial: sv.Serial, Wanted: sv.Wanted, OK: sv.OK, Error: sv.Error, At: time.Now().UTC()}
		if l, err := s.Local.LoadVersion(sv.Name, sv.Wanted); err == nil {
			installed = append(installed, l)
		}
	}
	s.N.noteIssued(installed...)
	if err := s.report(ctx, m); err != nil {
		slog.Warn("could not report to the fleet what this node serves; the next reconcile does", "err", err)
	}
}

// ReportServed tells the fleet what a run of this node installed: the
// agent's report, for the node that ordered (with the probe of a staged
// rollout, through this node's load balancer as its agent deploys).
func ReportServed(n *Node) func(ctx context.Context, out []engine.Served) {
	s := &Syncer{Local: n.Local, N: n, Deploy: NodeDeploy(n.Local)}
	return s.served
}

// report tells the fleet what this node serves, with the probe of each
// version a staged rollout is checking, then judges those rollouts at
// once: a wave passes the moment its last node reports.
func (s *Syncer) report(ctx context.Context, reports map[string]Served) error {
	if len(reports) == 0 {
		return nil
	}
	checked, err := s.probes(ctx, reports)
	if err != nil {
		return err
	}
	if err := s.send(ctx, reports); err != nil {
		return err
	}
	if len(checked) == 0 {
		return nil
	}
	next, err := s.N.Evaluate(ctx, checked...)
	s.mu.Lock()
	s.wake = sooner(s.wake, next)
	s.mu.Unlock()
	return err
}

// send writes reports to the fleet. A report lost to a pause, a
// failover or a restart from an older snapshot is sent again by the
// next reconcile, which compares what Redis holds, so fleet status never
// shows a node behind that is not (invariant I1).
func (s *Syncer) send(ctx context.Context, reports map[string]Served) error {
	out := make(map[string][]byte, len(reports))
	for name, r := range reports {
		out[name], _ = json.Marshal(r)
	}
	rctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	return s.N.Shared.SetServed(rctx, s.N.Name, out)
}

// FinishLocal deploys what a run or this agent left owed when it was
// killed in the middle of a deploy, from disk and without Redis: an
// engine run that only installs, over this node's own archive as its
// catalog. The fleet hears of it at the first reconcile once Redis
// answers, which also catches any newer version.
func (s *Syncer) FinishLocal(ctx context.Context) {
	names, err := s.Local.PendingNames()
	if err != nil || len(names) == 0 {
		if err != nil {
			slog.Warn("could not list this node's owed deploys", "err", err)
		}
		return
	}
	// A lineage with a staged rollout on its way waits for Redis: what
	// it may serve is the rollout's to say, and a failed deploy of a
	// version its wave may not get must not be retried from disk.
	copies := recordCopies(s.Local)
	names = slices.DeleteFunc(names, func(n string) bool { return copies[n] != nil })
	if len(names) == 0 {
		return
	}
	slog.Info("finishing the deploys this node was stopped in", "count", len(names))
	jobs := make([]engine.Job, len(names))
	for i, n := range names {
		jobs[i] = engine.Job{Lineage: store.Lineage{Name: n}, Stored: true}
	}
	node := s.node()
	// From disk, without Redis: no report, and no rollout gate (the
	// lineages a rollout is on its way for were left out above).
	node.Report, node.Gate = nil, nil
	e := &engine.Engine{Catalog: catalog.NewDir(s.Local), Node: node, Opts: engine.Options{Command: "agent", InstallOnly: true}}
	if plan, err := e.Plan(ctx, jobs); err == nil {
		plan.Execute(ctx)
	}
}

// forget removes lineages the fleet deleted from this node: off its load
// balancer, then from its disk with a tombstone (store.Local's Forget).
// A lineage the load balancer's config still names is kept on disk, so
// the next reload does not fail, and said so.
func (s *Syncer) forget(ctx context.Context, names []string) error {
	if len(names) == 0 {
		return nil
	}
	rctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	tombs, err := s.N.Shared.Tombstones(rctx)
	cancel()
	if err != nil {
		return err
	}
	unlock, err := WriteLock(s.Local)(ctx)
	if err != nil {
		return err
	}
	defer unlock()
	for _, name := range names {
		t, ok := tombs[name]
		if !ok {
			continue // issued again since
		}
		s.forgetOne(ctx, name, store.Tombstone{At: t.At, Fence: t.Fence, Version: t.Version})
	}
	rctx, cancel = context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	return s.N.Shared.DelServed(rctx, s.N.Name, names...)
}

func (s *Syncer) forgetOne(ctx context.Context, name string, t store.Tombstone) {
	if l, err := s.Local.Newest(name); err == nil && l.BornAt().After(t.At) {
		return // this node holds the name issued again after the delete
	}
	if s.Remove != nil && s.Local.Exists(name) {
		managed := map[string]bool{s.Deploy.NginxInclude: s.Deploy.NginxInclude != ""}
		if refs, err := s.Remove.References(ctx, name, s.Deploy, managed); err == nil && len(refs) > 0 {
			slog.Error("the fleet deleted this lineage, but this node's load balancer config still uses its files: they are kept until the config stops naming them", "name", name, "file", refs[0].File, "line", refs[0].Line)
			s.Local.WriteTombstone(name, t)
			return
		}
		if s.Deploy.Target == "nginx" && s.Deploy.NginxInclude != "" {
			if err := s.Remove.Unlist(ctx, name, s.Deploy, false); err != nil {
				slog.Error("the fleet deleted this lineage, but nginx failed without its block in the include file: its files are kept", "name", name, "err", err)
				s.Local.WriteTombstone(name, t)
				return
			}
		}
		if err := s.Remove.Remove(ctx, name, s.Deploy); err != nil {
			slog.Warn("could not take a deleted lineage off this node's load balancer", "name", name, "err", err)
		}
	}
	if err := s.Local.Forget(name, t); err != nil {
		slog.Warn("could not remove a deleted lineage from this node", "name", name, "err", err)
		return
	}
	slog.Info("removed a lineage the fleet deleted", "name", name)
}

// forgetDeleted compares tombstones both ways: a delete this node missed
// (it was down) is carried out here, and a tombstone Redis lost is put
// back from this node's disk.
func (s *Syncer) forgetDeleted(ctx context.Context) error {
	tombs, err := s.N.Shared.Tombstones(ctx)
	if err != nil {
		return err
	}
	var gone []string
	for name := range tombs {
		if s.Local.Exists(name) || s.Local.MaxVersion(name) > 0 {
			gone = append(gone, name)
		}
	}
	local, err := s.Local.Tombstones()
	if err != nil {
		return err
	}
	for name, t := range local {
		if rt, ok := tombs[name]; !ok || rt.At.Before(t.At) {
			if err := s.N.Shared.SeedTombstone(ctx, name, t.Fence, t.At, t.Version); err != nil {
				return err
			}
		}
	}
	// Every node keeps every tombstone, with the name's version counter,
	// whether it held the name or not (invariant I3): after a Redis
	// loss, any one member puts back the delete and the number a name
	// issued again must start above (I2), even when the nodes that
	// held it have left the fleet.
	for name, rt := range tombs {
		if lt, ok := local[name]; ok && !lt.At.Before(rt.At) && lt.Version >= rt.Version {
			continue
		}
		if slices.Contains(gone, name) {
			continue // forget writes it
		}
		if err := s.Local.WriteTombstone(name, store.Tombstone{At: rt.At, Fence: rt.Fence, Version: rt.Version}); err != nil {
			slog.Warn("could not keep the fleet's tombstone on this node", "name", name, "err", err)
		}
	}
	return s.forget(ctx, compact(gone))
}

// giveBack republishes, unfenced, a version this node serves that is
// newer than what Redis holds: Redis lost the write (a restart from an
// old snapshot, a failover that dropped it). The version and notBefore
// rules keep anything newer another node published meanwhile.
func (s *Syncer) giveBack(ctx context.Context, heads map[string]rdb.Head) error {
	// Not into a Redis rebuilt since this node last added what it holds:
	// the catch-up does that, after the other members looked at it
	// (awaitLooked), and this node may not have followed the latest
	// rotation yet (invariant I5: sealed under the removed node's key).
	gen, err := s.N.Shared.HGet(ctx, "meta", "gen")
	if err != nil || gen != s.N.caughtUpGen() {
		return err
	}
	names, err := s.Local.Names()
	if err != nil {
		return err
	}
	for _, name := range names {
		live, err := s.Local.LiveVersion(name)
		if err != nil || live <= heads[name].Version || s.Local.IsLost(name, live) {
			continue
		}
		if t, _ := s.Local.ReadTombstone(name); t != nil {
			continue
		}
		if err := s.N.seedRecordCopy(ctx, name); err != nil {
			return err
		}
		err = s.N.publishVersion(ctx, name, live)
		var stale *rdb.ErrStale
		switch {
		case err == nil:
			slog.Warn("the fleet's Redis had lost this node's newest version; published it again", "name", name, "version", live)
		case errors.As(err, &stale) && (stale.Why == "version" || stale.Why == "older"):
			// Another node numbered a certificate of its own in the
			// meantime: this one lost. It goes once the node serves the
			// fleet's (the reconcile installs it next).
			slog.Warn("the fleet's Redis had lost this node's newest version, and another node has published since: this node's goes", "name", name, "version", live)
			if err := s.Local.MarkLost(name, live); err != nil {
				slog.Warn("could not mark the lost version", "name", name, "err", err)
			}
		case isUnavailable(err):
			return err
		}
	}
	return nil
}

// NodeDeploy is this node's deploy settings as its agent saved them
// (<dir>/fleet/deploy.json): runs of this node deploy what they order
// with them, as the agent would. None saved: the certificate is made
// live on disk and deployed by the agent when it starts.
func NodeDeploy(st *store.Store) store.Deploy {
	var d store.Deploy
	if data, err := os.ReadFile(filepath.Join(fleetDir(st), "deploy.json")); err == nil {
		json.Unmarshal(data, &d)
	}
	return d
}

// SaveNodeDeploy records the agent's deploy settings for the runs.
func SaveNodeDeploy(st *store.Store, d store.Deploy) error {
	data, _ := json.MarshalIndent(d, "", "  ")
	if err := os.MkdirAll(fleetDir(st), 0o700); err != nil {
		return err
	}
	return store.WriteFile(filepath.Join(fleetDir(st), "deploy.json"), append(data, '\n'), 0o600)
}
