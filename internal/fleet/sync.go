package fleet

import (
	"context"
	"encoding/json"
	"errors"
	"log/slog"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/lbcert/lbcert/internal/deploy"
	"github.com/lbcert/lbcert/internal/store"
	"github.com/lbcert/lbcert/internal/fleet/rdb"
)

// Served is what a node reports serving for one lineage.
type Served struct {
	Version int       `json:"version"` // the fleet version the node serves
	Serial  string    `json:"serial,omitempty"`
	Wanted  int       `json:"wanted"` // the fleet's version when it tried
	OK      bool      `json:"ok"`
	Error   string    `json:"error,omitempty"`
	At      time.Time `json:"at"`
}

// Deployer is the deploy step: *deploy.Runner, the one renew uses.
type Deployer interface {
	Run(ctx context.Context, changes []deploy.Change) []deploy.Result
}

// Syncer installs on this node what the fleet publishes: it learns of
// new versions from the events stream (with a periodic full reconcile
// as the fallback, never by polling every key), unseals each key only
// here, writes it through the node's atomic store, and deploys a batch
// of changes at once with this node's own settings: one config test,
// one reload, rollback and the TLS check, as renew does.
type Syncer struct {
	N      *Node
	Deploy store.Deploy // this node's deploy settings
	Runner Deployer
	// Reconcile is the interval of the full reconcile (default 60 s).
	Reconcile time.Duration
	// Settle is how long the agent gathers events into one deploy.
	Settle time.Duration
	// Keep is how many versions a lineage keeps after a deploy, the
	// live one included (default 3), as --keep-versions for runs.
	Keep int

	mu       sync.Mutex
	reported map[string]Served
}

// Run syncs until ctx ends.
func (s *Syncer) Run(ctx context.Context) {
	if s.Reconcile <= 0 {
		s.Reconcile = time.Minute
	}
	if s.Settle <= 0 {
		s.Settle = 100 * time.Millisecond
	}
	s.reported = map[string]Served{}
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
	next := time.Now().Add(s.Reconcile)
	for ctx.Err() == nil {
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
			if e.Deleted {
				gone = append(gone, e.Name)
			} else {
				names = append(names, e.Name)
			}
		}
		if err := s.sync(ctx, compact(names)); err != nil {
			return err
		}
		s.forget(ctx, compact(gone))
	}
	return nil
}

func compact(s []string) []string {
	slices.Sort(s)
	return slices.Compact(s)
}

// reconcile compares every lineage's fleet version with this node's,
// and syncs what differs, what failed to deploy, and what a killed
// agent left pending.
func (s *Syncer) reconcile(ctx context.Context) error {
	rctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	names, err := s.N.Shared.Names(rctx)
	if err != nil {
		return err
	}
	vers, err := s.N.Shared.Versions(rctx, names)
	if err != nil {
		return err
	}
	var todo []string
	for _, name := range names {
		v := vers[name]
		if v == 0 {
			continue
		}
		live, _ := s.N.Local.LiveVersion(name)
		st, _ := s.N.Local.ReadStatus(name)
		s.mu.Lock()
		rep, ok := s.reported[name]
		s.mu.Unlock()
		if live != v || st.Pending != nil || !ok || rep.Version != v || !rep.OK {
			todo = append(todo, name)
		}
	}
	return s.sync(ctx, todo)
}

type pulled struct {
	name  string
	v     int
	l     *store.Lineage
	files store.Files // empty when the version is already on disk
}

// FinishLocal deploys what this agent left pending when it was killed
// in the middle of a deploy, from disk and without Redis: the version
// is in the archive, the journal says what was live before it. It is
// reported to the fleet when Redis answers; a reconcile catches any
// newer version after that.
func (s *Syncer) FinishLocal(ctx context.Context, st *store.Store) {
	names, err := st.Names()
	if err != nil {
		slog.Warn("could not list this node's certificates to finish a pending deploy", "err", err)
		return
	}
	var work []*pulled
	for _, name := range names {
		status, _ := st.ReadStatus(name)
		p := status.Pending
		if p == nil || p.By != pendingByAgent {
			continue
		}
		l, err := st.LoadVersion(name, p.Version)
		if err != nil {
			slog.Warn("a pending deploy's certificate is not on disk; the fleet's copy is fetched when Redis answers", "name", name, "version", p.Version, "err", err)
			continue
		}
		work = append(work, &pulled{name: name, v: p.Version, l: l})
	}
	if len(work) == 0 {
		return
	}
	slog.Info("finishing the deploy the agent was stopped in", "count", len(work))
	// Not remembered as reported: the first reconcile, once Redis
	// answers, finds the version live and tells the fleet.
	if _, err := s.installLocked(ctx, st, work); err != nil {
		slog.Warn("could not finish the pending deploy; the reconcile tries again", "err", err)
	}
}

// pendingByAgent marks the journal entries the agent writes.
const pendingByAgent = "agent"

// sync brings names to the fleet's version on this node.
func (s *Syncer) sync(ctx context.Context, names []string) error {
	if len(names) == 0 {
		return nil
	}
	got := make([]*pulled, len(names))
	errs := make([]error, len(names))
	each(len(names), 8, func(i int) { got[i], errs[i] = s.pull(ctx, names[i]) })
	for i, err := range errs {
		if errors.As(err, new(*rdb.Unavailable)) {
			return err
		}
		if err != nil {
			slog.Warn("could not fetch a certificate from the fleet", "name", names[i], "err", err)
		}
	}
	var work []*pulled
	for _, p := range got {
		if p != nil {
			work = append(work, p)
		}
	}
	if len(work) == 0 {
		return nil
	}
	return s.install(ctx, work)
}

// pull fetches and unseals name's bundle, or returns nil when this node
// already serves it (and has said so), or when a run of this node holds
// the name's lease (it deploys it itself).
func (s *Syncer) pull(ctx context.Context, name string) (*pulled, error) {
	rctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	if holder, _, err := s.N.Shared.Holder(rctx, name); err != nil {
		return nil, err
	} else if strings.HasPrefix(holder, s.N.Name+"/") {
		return nil, nil // the reconcile after that run picks it up
	}
	b, err := s.N.Shared.Bundle(rctx, name)
	if errors.Is(err, rdb.ErrNoBundle) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	l, err := metaOf(b)
	if err != nil {
		return nil, err
	}
	key, err := s.N.OpenBundleKey(b)
	if err != nil {
		return nil, err
	}
	return &pulled{name: b.Name, v: b.Version, l: l, files: store.Files{Cert: b.Cert, Chain: b.Chain, Fullchain: b.Fullchain, Key: key}}, nil
}

// install writes the pulled versions, makes them live and deploys them
// once, under the node's short write lock, then reports what the node
// serves.
func (s *Syncer) install(ctx context.Context, work []*pulled) error {
	reports, err := s.installLocked(ctx, s.N.Local, work)
	if err != nil {
		return err
	}
	return s.report(ctx, reports)
}

// installLocked is install's local part, under the write lock: it
// returns what the node now serves for each name.
func (s *Syncer) installLocked(ctx context.Context, st *store.Store, work []*pulled) (map[string]Served, error) {
	lctx, cancel := context.WithTimeout(ctx, 5*time.Minute)
	lock, err := st.WriteLock(lctx)
	cancel()
	if err != nil {
		return nil, err
	}
	defer lock.Unlock()
	now := time.Now().UTC()
	// Each name is written, journalled and made live on its own, eight
	// at a time: on a joining node's 10,000 lineages the fsyncs of the
	// atomic store, not the CPU, are the cost, and they overlap.
	type step struct {
		change *deploy.Change
		report *Served
	}
	steps := make([]step, len(work))
	each(len(work), 8, func(i int) {
		p := work[i]
		name, v := p.name, p.v
		l := *p.l
		l.Deploy = s.Deploy // this node's own
		fail := func(live int, what string, err error) {
			steps[i].report = &Served{Version: live, Wanted: v, Error: what + ": " + err.Error(), At: now}
		}
		if _, err := st.LoadVersion(name, v); err != nil {
			if err := st.SaveVersionAt(&l, p.files, v); err != nil {
				fail(0, "save", err)
				return
			}
		}
		live, _ := st.LiveVersion(name)
		status, _ := st.ReadStatus(name)
		previous := live
		if status.Pending != nil && status.Pending.Version == v {
			previous = status.Pending.Previous // a deploy a killed agent left half-done
		} else if live == v {
			// Live and not owed a deploy: this node's own run installed
			// and deployed it, or an earlier agent did and was stopped
			// before it reported. Nothing to redo, and a redo whose test
			// failed must never roll back a certificate already served.
			steps[i].report = &Served{Version: v, Serial: l.Cert.Serial, Wanted: v, OK: true, At: now}
			return
		}
		if err := st.WriteStatus(name, store.Status{Pending: &store.Pending{Version: v, Previous: previous, Since: now, By: pendingByAgent}}); err != nil {
			fail(live, "journal", err)
			return
		}
		if err := st.Activate(name, v); err != nil {
			fail(live, "activate", err)
			return
		}
		steps[i].change = &deploy.Change{Name: name, Domains: l.Domains, Serial: l.Cert.Serial, Previous: previous, Deploy: s.Deploy}
	})
	reports := map[string]Served{}
	var changes []deploy.Change
	var owed []*pulled
	for i, stp := range steps {
		switch {
		case stp.report != nil:
			reports[work[i].name] = *stp.report
		case stp.change != nil:
			changes = append(changes, *stp.change)
			owed = append(owed, work[i])
		}
	}
	if len(changes) > 0 {
		results := s.Runner.Run(context.WithoutCancel(ctx), changes)
		var mu sync.Mutex
		each(len(results), 8, func(i int) {
			res, p := results[i], owed[i]
			name, v := p.name, p.v
			var r Served
			if !res.Failed() {
				st.WriteStatus(name, store.Status{})
				st.Prune(name, s.keep())
				r = Served{Version: v, Serial: p.l.Cert.Serial, Wanted: v, OK: true, At: now}
			} else {
				msg := strings.Join(strings.Fields(res.Err.Error()), " ")
				live, _ := st.LiveVersion(name)
				if res.RolledBack {
					msg += "; rolled back to the previous certificate"
					// The journal is cleared: the reconcile retries the
					// new version itself, and a restart must not
					// "finish" a deploy that was undone on purpose.
					st.WriteStatus(name, store.Status{})
				}
				r = Served{Version: live, Wanted: v, Error: "deploy: " + msg, At: now}
				slog.Warn("deploy of a certificate from the fleet failed", "name", name, "version", v, "err", msg)
			}
			mu.Lock()
			reports[name] = r
			mu.Unlock()
		})
		slog.Info("installed certificates from the fleet", "count", len(changes))
	}
	return reports, nil
}

func (s *Syncer) keep() int {
	if s.Keep > 0 {
		return s.Keep
	}
	return 3
}

// each runs f(0..n-1) on up to workers goroutines and waits for all.
func each(n, workers int, f func(i int)) {
	next := make(chan int)
	var wg sync.WaitGroup
	for range min(workers, n) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range next {
				f(i)
			}
		}()
	}
	for i := range n {
		next <- i
	}
	close(next)
	wg.Wait()
}

func (s *Syncer) report(ctx context.Context, reports map[string]Served) error {
	if len(reports) == 0 {
		return nil
	}
	out := make(map[string][]byte, len(reports))
	s.mu.Lock()
	for name, r := range reports {
		s.reported[name] = r
		out[name], _ = json.Marshal(r)
	}
	s.mu.Unlock()
	rctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	return s.N.Shared.SetServed(rctx, s.N.Name, out)
}

// forget removes lineages the fleet deleted from this node's reports.
// The certificates stay on disk (a config may still name them) until an
// operator runs delete on this node.
func (s *Syncer) forget(ctx context.Context, names []string) {
	if len(names) == 0 {
		return
	}
	s.mu.Lock()
	for _, n := range names {
		delete(s.reported, n)
	}
	s.mu.Unlock()
	rctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	s.N.Shared.DelServed(rctx, s.N.Name, names...)
}
