package engine

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/lbcert/lbcert/internal/deploy"
	"github.com/lbcert/lbcert/internal/store"
)

// Node is the host the engine installs on. Every certificate reaches a
// load balancer through its one install step, whoever obtained it and
// whatever command or agent runs: stage the version in the node's Local
// store, journal it as owed, make it live, deploy once for the whole
// run with this node's settings, then record it as deployed (with the
// digest of those settings) or roll back and keep it owed.
type Node struct {
	Local  store.Local
	Deploy Deployer
	// Settings is how this node deploys lineage l: on one host the
	// lineage's own saved settings; in a fleet the node's own (its
	// agent's), whoever ordered.
	Settings func(l *store.Lineage) store.Deploy
	// Keep is how many archived versions a lineage keeps after a
	// successful deploy, the live one included (default 3).
	Keep int
	// Lock, when set, is held around each install step and around the
	// deploy: fleet mode's short write lock, which the agent and the
	// runs of this node share.
	Lock func(ctx context.Context) (unlock func(), err error)
	// Report, when set, is told what this node serves after a deploy:
	// the fleet's per-node report, which 'fleet status' reads.
	Report func(ctx context.Context, served []Served)
	// Roots, when set, names the roots the deploy check verifies a
	// certificate's served chain to, when its issuing CA is not the
	// lineage's primary (ca.Set.RootsFor); "" keeps --verify-roots.
	Roots func(l *store.Lineage) string
	// Gate, when set, says which version of a lineage this node may
	// serve now: the catalog's head, or an older version while a staged
	// rollout has not released the head to this node (package fleet's
	// waves). Every install asks it with fresh set, after reading the
	// head, so what is installed is gated, not how: the install step is
	// the same for the head and for the version before it. Planning may
	// accept an answer a moment old.
	Gate func(ctx context.Context, head *store.Lineage, fresh bool) (Gated, error)
	// Notes, when set, are the staged rollouts on their way (a fleet's):
	// a run's result carries those that need an operator.
	Notes func(ctx context.Context, now time.Time) ([]Note, error)

	checkMu sync.Mutex
	checked map[string]checked     // DeployDigest → the last config test (stillBroken)
	testing map[string]*sync.Mutex // DeployDigest → held while its test runs

	// deployMu makes the runs that share this Node (the agent's slices
	// of a large install) reach the load balancer one at a time: HAProxy
	// keeps one certificate transaction for all its runtime-API clients,
	// and two reloads at once would test each other's files.
	deployMu sync.Mutex
}

// Gated is a Gate's answer.
type Gated struct {
	Want *store.Lineage // the version this node may serve now
	// Held says why Want is not the head ("" when it is).
	Held string
	// Override is the warning of a rollout overridden because the
	// version it would keep is about to expire.
	Override string
}

// target asks the Gate, if any, what this node may serve of head.
func (n *Node) target(ctx context.Context, head *store.Lineage, fresh bool) (Gated, error) {
	if n.Gate == nil {
		return Gated{Want: head}, nil
	}
	g, err := n.Gate(ctx, head, fresh)
	if err == nil && g.Want == nil {
		g.Want = head
	}
	return g, err
}

// Served is what a node serves of one lineage after an install.
type Served struct {
	Name    string
	Version int    // the version now live here
	Serial  string // its serial, when OK
	Wanted  int    // the version the install tried
	OK      bool
	Error   string
}

func (n *Node) settings(l *store.Lineage) store.Deploy {
	if n.Settings == nil {
		return l.Deploy
	}
	return n.Settings(l)
}

func (n *Node) keep() int {
	if n.Keep > 0 {
		return n.Keep
	}
	return 3
}

func (n *Node) lock(ctx context.Context) (func(), error) {
	if n.Lock == nil {
		return func() {}, nil
	}
	return n.Lock(ctx)
}

// owes reports whether this node must still install head: it serves
// another version, a deploy of it is still owed, what it holds under
// head's number is another certificate (the catalog renumbered after a
// Redis loss), or it deployed it with other settings than its own now.
func (n *Node) owes(head *store.Lineage) bool {
	live, _ := n.Local.LiveVersion(head.Name)
	j, _ := n.Local.Journal(head.Name)
	if live != head.Version || j.Pending != nil {
		return true
	}
	if d := j.Deployed; d != nil {
		return d.Version != head.Version || d.Serial != head.Cert.Serial || d.With != store.DeployDigest(n.settings(head))
	}
	// Deployed by a release that kept no record: the version here is
	// taken as deployed with its own saved settings, if it is the same
	// certificate.
	have, err := n.Local.LoadVersion(head.Name, live)
	return err != nil || have.Cert.Serial != head.Cert.Serial || store.DeployDigest(n.settings(have)) != store.DeployDigest(n.settings(head))
}

// want is one certificate on its way to this node's load balancer.
type want struct {
	l        *store.Lineage // the version, its settings as the catalog holds them
	previous int            // live before it, to roll back to
	deploy   store.Deploy   // this node's settings for it
}

// prepare stages l (fetching its files only when the node lacks it),
// journals it as owed and makes it live. It returns what to deploy.
func (n *Node) prepare(ctx context.Context, l *store.Lineage, files func() (store.Files, error)) (*want, error) {
	unlock, err := n.lock(ctx)
	if err != nil {
		return nil, err
	}
	defer unlock()
	// Under the lock, again: another process of this node (a run, or the
	// agent) may have installed the very version meanwhile, or be in the
	// middle of deploying it. Deploying it twice would run every deploy
	// hook twice.
	if n.settled(l) {
		return nil, nil
	}
	// A certificate issued before the name was deleted (a plan made
	// before the delete, which another process of this node ran
	// meanwhile) is not installed again: it would stay on the load
	// balancer after the delete took the name off (invariant I3).
	if t, _ := n.Local.ReadTombstone(l.Name); t != nil && !l.BornAt().After(t.At) {
		slog.Info("not installing a certificate of a name deleted since it was planned", "name", l.Name, "version", l.Version)
		return nil, nil
	}
	if have, err := n.Local.LoadVersion(l.Name, l.Version); err != nil || have.Cert.Serial != l.Cert.Serial {
		f, err := files()
		if err != nil {
			return nil, err
		}
		if err := n.Local.Stage(l, f); err != nil {
			return nil, fmt.Errorf("save %s version %d on this node: %w", l.Name, l.Version, err)
		}
	}
	live, _ := n.Local.LiveVersion(l.Name)
	j, _ := n.Local.Journal(l.Name)
	if err := n.stillBroken(ctx, l, j.Pending, live); err != nil {
		return nil, err
	}
	previous := live
	if p := j.Pending; p != nil && live == p.Version {
		previous = p.Previous // a deploy a killed run left half-done
	}
	pid, start := store.Self()
	j.Pending = &store.Pending{Version: l.Version, Previous: previous, Since: time.Now().UTC(), PID: pid, Start: start}
	if err := n.Local.SetJournal(l.Name, j); err != nil {
		return nil, fmt.Errorf("journal %s version %d: %w", l.Name, l.Version, err)
	}
	if err := n.Local.Activate(l.Name, l.Version); err != nil {
		return nil, fmt.Errorf("make %s version %d live: %w", l.Name, l.Version, err)
	}
	return &want{l: l, previous: previous, deploy: n.settings(l)}, nil
}

// stillBroken keeps a deploy owed because the load balancer's config
// test failed from being tried again while that test, run on what the
// load balancer has now, still fails the same way: the config is broken
// whatever the certificate, and swapping the new files in and out again
// would only let an nginx that reads them per connection serve the new
// certificate for the moment of each test. One test per load balancer
// is shared by every lineage for checkedFor.
func (n *Node) stillBroken(ctx context.Context, l *store.Lineage, p *store.Pending, live int) error {
	if p == nil || p.Check == "" || p.Version == live || n.Deploy == nil {
		return nil
	}
	c := n.configTest(ctx, n.settings(l))
	if c.check != p.Check {
		return nil
	}
	return &stillBrokenError{fmt.Sprintf("not deployed: the load balancer's config test fails without this certificate too, as when it was last tried (%s); fix the config, and the next run or the agent's next pass deploys it", strings.TrimSuffix(strings.TrimSuffix(p.Error, rolledBackNote), noPreviousNote))}
}

// configTest is the config test of the load balancer d deploys to, run
// at most once per checkedFor and never twice at once: the lineages of
// one run that owe a deploy to it ask together, and each test of a
// config of 10,000 certificates takes many seconds.
func (n *Node) configTest(ctx context.Context, d store.Deploy) checked {
	key := store.DeployDigest(d)
	n.checkMu.Lock()
	if n.checked == nil {
		n.checked, n.testing = map[string]checked{}, map[string]*sync.Mutex{}
	}
	one := n.testing[key]
	if one == nil {
		one = &sync.Mutex{}
		n.testing[key] = one
	}
	n.checkMu.Unlock()
	one.Lock()
	defer one.Unlock()
	n.checkMu.Lock()
	c, ok := n.checked[key]
	n.checkMu.Unlock()
	if ok && time.Since(c.at) <= checkedFor {
		return c // tested by another lineage's worker meanwhile
	}
	c = checked{check: n.Deploy.Test(ctx, d), at: time.Now()}
	n.checkMu.Lock()
	n.checked[key] = c
	n.checkMu.Unlock()
	return c
}

// stillBrokenError is stillBroken's: a deploy this node owes and did
// not try, which is a failed deploy to the run's report.
type stillBrokenError struct{ msg string }

func (e *stillBrokenError) Error() string { return e.msg }

// What a rolled-back deploy left live: the certificate before it, or,
// for a name's first, nothing (its live files are taken away again, so
// that no load balancer config names a certificate it was not tested
// with).
const (
	rolledBackNote = "; rolled back to the previous certificate"
	noPreviousNote = "; taken out of the live files again, since this name had no certificate before"
)

// checked is one load balancer config test's result.
type checked struct {
	check string
	at    time.Time
}

// checkedFor is how long a config test's result stands for the deploys
// that follow.
const checkedFor = 30 * time.Second

// stage keeps l on this node without making it live: the node that
// ordered a version a staged rollout holds back keeps a copy, as every
// node keeps what it holds, so a rebuilt catalog gets it back.
func (n *Node) stage(ctx context.Context, l *store.Lineage, files store.Files) error {
	unlock, err := n.lock(ctx)
	if err != nil {
		return err
	}
	defer unlock()
	return n.Local.Stage(l, files)
}

// settled reports whether this node needs nothing more for l: it is
// deployed with this node's settings, or another process of this node
// that still runs journalled it and is deploying it now (a kill -9
// leaves an entry whose process is gone, a zombie, or whose PID another
// process took: that deploy is owed, not in progress; Pending.Running).
func (n *Node) settled(l *store.Lineage) bool {
	j, _ := n.Local.Journal(l.Name)
	live, _ := n.Local.LiveVersion(l.Name)
	if p := j.Pending; p != nil {
		return p.Version == l.Version && p.PID != os.Getpid() && p.Running()
	}
	d := j.Deployed
	return live == l.Version && d != nil && d.Version == l.Version && d.Serial == l.Cert.Serial && d.With == store.DeployDigest(n.settings(l))
}

// installed is what the deploy did to one want.
type installed struct {
	res    deploy.Result
	done   bool // deployed (or already deployed by someone else)
	errMsg string
}

// deployAll deploys every want at once (one config test and one reload
// per load balancer), then records each as deployed or still owed. It
// runs with a context an interrupt does not cancel: what is live on disk
// should be what the load balancer serves.
func (n *Node) deployAll(ctx context.Context, wants []*want) []installed {
	out := make([]installed, len(wants))
	if len(wants) == 0 {
		return out
	}
	unlock, err := n.lock(ctx)
	if err != nil {
		for i := range out {
			out[i].errMsg = "deploy: " + oneLine(err)
		}
		return out
	}
	// Under the lock, again: the agent of this node may have deployed
	// the very version meanwhile.
	var changes []deploy.Change
	var idx []int
	already := make([]bool, len(wants))
	atOnce(len(wants), readWorkers, func(i int) { already[i] = n.deployedAlready(wants[i]) })
	for i, w := range wants {
		if already[i] {
			out[i] = installed{done: true, res: deploy.Result{Name: w.l.Name, Deployed: true}}
			continue
		}
		c := deploy.Change{Name: w.l.Name, Domains: w.l.Domains, Serial: w.l.Cert.Serial, Previous: w.previous, Deploy: w.deploy}
		if n.Roots != nil {
			c.Roots = n.Roots(w.l)
		}
		changes = append(changes, c)
		idx = append(idx, i)
	}
	n.deployMu.Lock()
	results := n.Deploy.Run(ctx, changes)
	n.deployMu.Unlock()
	n.recordAll(wants, idx, results, out)
	// The report goes after the lock: in a fleet it may probe through
	// this node's load balancer, which takes seconds when it fails.
	unlock()
	n.report(ctx, wants, out)
	return out
}

// recordWorkers is how many lineages' old versions are pruned at once.
const recordWorkers = 32

// recordAll records each deploy result (results[k] is of wants[idx[k]])
// in its lineage's journal, deployed or owed, all journals written
// together (Local.SetJournals: one pair of file-system syncs; one by
// one, a node joining 100,000 lineages waited for 200,000 syncs), then
// prunes the old versions of those deployed.
func (n *Node) recordAll(wants []*want, idx []int, results []deploy.Result, out []installed) {
	lineages := make([]string, len(results))
	js := make([]store.Journal, len(results))
	for k, res := range results {
		w := wants[idx[k]]
		lineages[k] = w.l.Name
		js[k], out[idx[k]] = n.journalAfter(w, res)
	}
	for k, err := range n.Local.SetJournals(lineages, js) {
		switch {
		case err == nil:
		case out[idx[k]].done:
			slog.Warn("could not record the deploy; the next run deploys it again", "name", lineages[k], "err", err)
		default:
			slog.Warn("could not save the pending deploy", "name", lineages[k], "err", err)
		}
	}
	atOnce(len(results), recordWorkers, func(k int) {
		if out[idx[k]].done {
			n.prune(wants[idx[k]])
		}
	})
}

// readWorkers is how many lineages' journals and live links are read at
// once before a deploy and before its report: read one after the other,
// a deploy of 100,000 lineages spent seconds on one core on them.
var readWorkers = runtime.NumCPU()

// atOnce calls fn for each index below n, from at most workers
// goroutines at once, and returns when every call has.
func atOnce(n, workers int, fn func(i int)) {
	var next atomic.Int64
	var wg sync.WaitGroup
	for range min(workers, n) {
		wg.Go(func() {
			for i := int(next.Add(1) - 1); i < n; i = int(next.Add(1) - 1) {
				fn(i)
			}
		})
	}
	wg.Wait()
}

func (n *Node) deployedAlready(w *want) bool {
	j, _ := n.Local.Journal(w.l.Name)
	live, _ := n.Local.LiveVersion(w.l.Name)
	d := j.Deployed
	return j.Pending == nil && live == w.l.Version && d != nil && d.Version == w.l.Version &&
		d.Serial == w.l.Cert.Serial && d.With == store.DeployDigest(w.deploy)
}

// journalAfter is the journal one deploy result leaves: deployed, or
// owed with the reason (the deploy step already rolled the live pointer
// back).
func (n *Node) journalAfter(w *want, res deploy.Result) (store.Journal, installed) {
	name := w.l.Name
	if !res.Failed() {
		j := store.Journal{Deployed: &store.Deployed{Version: w.l.Version, Serial: w.l.Cert.Serial, With: store.DeployDigest(w.deploy), At: time.Now().UTC()}}
		return j, installed{res: res, done: true}
	}
	msg := oneLine(res.Err)
	switch {
	case res.RolledBack && w.previous == 0:
		msg += noPreviousNote
	case res.RolledBack:
		msg += rolledBackNote
	}
	j, _ := n.Local.Journal(name)
	if j.Pending == nil || j.Pending.Version != w.l.Version {
		j.Pending = &store.Pending{Version: w.l.Version, Previous: w.previous, Since: time.Now().UTC()}
	}
	j.Pending.Error, j.Pending.Check = msg, res.Check
	j.Pending.PID, j.Pending.Start = 0, "" // owed, and nobody is at it: any process of the node may try again
	return j, installed{res: res, errMsg: msg}
}

// prune removes the versions of a deployed lineage beyond what is kept.
func (n *Node) prune(w *want) {
	if removed, err := n.Local.Prune(w.l.Name, n.keep(), w.l.Version); err != nil {
		slog.Warn("could not remove old versions", "name", w.l.Name, "err", err)
	} else if len(removed) > 0 {
		slog.Debug("removed old versions", "name", w.l.Name, "versions", removed)
	}
}

func (n *Node) report(ctx context.Context, wants []*want, out []installed) {
	if n.Report == nil {
		return
	}
	served := make([]Served, len(wants))
	atOnce(len(wants), readWorkers, func(i int) {
		w := wants[i]
		live, _ := n.Local.LiveVersion(w.l.Name)
		s := Served{Name: w.l.Name, Version: live, Wanted: w.l.Version, OK: out[i].done}
		if s.OK {
			s.Serial = w.l.Cert.Serial
		} else {
			s.Error = "deploy: " + out[i].errMsg
		}
		served[i] = s
	})
	n.Report(context.WithoutCancel(ctx), served)
}

// errNothingToInstall is a lineage the catalog no longer holds.
var errNothingToInstall = errors.New("the catalog no longer holds this lineage")
