package fleet

import (
	"context"
	"encoding/json"
	"errors"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
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

	swept time.Time
}

// Run syncs until ctx ends.
func (s *Syncer) Run(ctx context.Context) {
	if s.Reconcile <= 0 {
		s.Reconcile = time.Minute
	}
	if s.Settle <= 0 {
		s.Settle = 100 * time.Millisecond
	}
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
		if err := s.forget(ctx, compact(gone)); err != nil {
			return err
		}
		if err := s.sync(ctx, compact(names)); err != nil {
			return err
		}
	}
	return nil
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
	if err := s.N.SyncAccounts(rctx); err != nil {
		return err
	}
	if err := s.forgetDeleted(rctx); err != nil {
		return err
	}
	s.sweepPace()
	names, err := s.N.Shared.Names(rctx)
	if err != nil {
		return err
	}
	heads, err := s.N.Shared.Heads(rctx, names)
	if err != nil {
		return err
	}
	if err := s.giveBack(rctx, heads); err != nil {
		return err
	}
	// What Redis holds of this node's reports, not what this agent
	// remembers sending: a report Redis lost (a failover, a pause, a
	// restart from an older snapshot) is sent again.
	said, err := s.N.Shared.Served(rctx, s.N.Name)
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
		live, _ := s.Local.LiveVersion(name)
		j, _ := s.Local.Journal(name)
		d := j.Deployed
		if j.Pending != nil || live != h.Version || d == nil || d.Version != h.Version || d.Serial != h.Serial || d.With != digest {
			todo = append(todo, name)
			continue
		}
		var rep Served
		if json.Unmarshal([]byte(said[name]), &rep) != nil || rep.Version != h.Version || rep.Serial != h.Serial || !rep.OK {
			fine[name] = Served{Version: h.Version, Serial: h.Serial, Wanted: h.Version, OK: true, At: time.Now().UTC()}
		}
	}
	if err := s.report(ctx, fine); err != nil {
		return err
	}
	return s.sync(ctx, todo)
}

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
// through one engine run that only installs.
func (s *Syncer) sync(ctx context.Context, names []string) error {
	if len(names) == 0 {
		return nil
	}
	jobs := make([]engine.Job, len(names))
	for i, n := range names {
		jobs[i] = engine.Job{Lineage: store.Lineage{Name: n}, Stored: true}
	}
	e := &engine.Engine{Catalog: NewCatalog(s.N), Node: s.node(), Opts: engine.Options{Command: "agent", InstallOnly: true, Concurrency: 8}}
	plan, err := e.Plan(ctx, jobs)
	if err != nil {
		return err
	}
	res := plan.Execute(ctx)
	fine := map[string]Served{}
	for _, it := range res.Items {
		switch {
		case it.Outcome == engine.NotDue && it.Serial != "":
			fine[it.Name] = Served{Version: it.Version, Serial: it.Serial, Wanted: it.Version, OK: true, At: time.Now().UTC()}
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
	return &engine.Node{
		Local:    s.Local,
		Deploy:   s.Runner,
		Settings: func(*store.Lineage) store.Deploy { return s.Deploy },
		Keep:     s.Keep,
		Lock:     WriteLock(s.Local),
		Report:   s.served,
	}
}

// WriteLock is fleet mode's short write lock of st, as engine.Node
// takes it around each install and deploy.
func WriteLock(st *store.Store) func(ctx context.Context) (func(), error) {
	return func(ctx context.Context) (func(), error) {
		lctx, cancel := context.WithTimeout(ctx, 5*time.Minute)
		defer cancel()
		l, err := st.WriteLock(lctx)
		if err != nil {
			return nil, err
		}
		return l.Unlock, nil
	}
}

// served reports what an install left this node serving, and notes the
// certificates in this node's copy of the ledger.
func (s *Syncer) served(ctx context.Context, out []engine.Served) {
	m := make(map[string]Served, len(out))
	for _, sv := range out {
		m[sv.Name] = Served{Version: sv.Version, Serial: sv.Serial, Wanted: sv.Wanted, OK: sv.OK, Error: sv.Error, At: time.Now().UTC()}
		if l, err := s.Local.LoadVersion(sv.Name, sv.Wanted); err == nil {
			s.N.noteIssued(l)
		}
	}
	if err := s.report(ctx, m); err != nil {
		slog.Warn("could not report to the fleet what this node serves; the next reconcile does", "err", err)
	}
}

// ReportServed tells the fleet what a run of this node installed: the
// agent's report, for the node that ordered.
func ReportServed(n *Node) func(ctx context.Context, out []engine.Served) {
	s := &Syncer{Local: n.Local, N: n}
	return s.served
}

func (s *Syncer) report(ctx context.Context, reports map[string]Served) error {
	if len(reports) == 0 {
		return nil
	}
	out := make(map[string][]byte, len(reports))
	for name, r := range reports {
		out[name], _ = json.Marshal(r)
	}
	// A report lost to a pause, a failover or a restart from an older
	// snapshot is sent again by the next reconcile, which compares what
	// Redis holds, so fleet status never shows a node behind that is not
	// (invariant I1).
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
	slog.Info("finishing the deploys this node was stopped in", "count", len(names))
	jobs := make([]engine.Job, len(names))
	for i, n := range names {
		jobs[i] = engine.Job{Lineage: store.Lineage{Name: n}, Stored: true}
	}
	node := s.node()
	node.Report = nil
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
		s.forgetOne(ctx, name, store.Tombstone{At: t.At, Fence: t.Fence})
	}
	rctx, cancel = context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	return s.N.Shared.DelServed(rctx, s.N.Name, names...)
}

func (s *Syncer) forgetOne(ctx context.Context, name string, t store.Tombstone) {
	if l, err := s.Local.Newest(name); err == nil && l.IssuedAt.After(t.At) {
		return // this node holds a certificate issued after the delete
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
	return s.forget(ctx, compact(gone))
}

// giveBack republishes, unfenced, a version this node serves that is
// newer than what Redis holds: Redis lost the write (a restart from an
// old snapshot, a failover that dropped it). The version and notBefore
// rules keep anything newer another node published meanwhile.
func (s *Syncer) giveBack(ctx context.Context, heads map[string]rdb.Head) error {
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
