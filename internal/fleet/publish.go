package fleet

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"time"

	"github.com/lbcert/lbcert/internal/catalog"
	"github.com/lbcert/lbcert/internal/fleet/rdb"
	"github.com/lbcert/lbcert/internal/store"
)

// Publish records a certificate obtained under lease as the fleet's
// newest version of l.Name (catalog.Catalog.Publish). The version
// number comes from Redis alone (invariant I2): when Redis does not
// answer, even after waiting out a restart or failover, the certificate
// is kept on this node, unnumbered, and published with its lease's
// fence by the next run or this node's agent once Redis answers
// (*KeptHere); it is never ordered twice and never given a number
// someone else could give too.
func (c *Catalog) Publish(ctx context.Context, lease catalog.Lease, l *store.Lineage, files store.Files) (int, error) {
	token := lease.Token()
	// The certificate takes its order's ledger place before anything can
	// fail: one kept on this node and published later (by the agent, in
	// another process) is counted under that place, not twice (the
	// place, and again under its serial; hostile review).
	if l.LedgerID == "" {
		l.LedgerID = c.N.takeReserved(LedgerSet(l.Server, l.Domains))
	}
	var v int
	err := withRedis(ctx, "keeping the certificate on this node", func(ctx context.Context) (err error) {
		v, err = c.N.publish(ctx, token, l, files)
		return err
	})
	// Anything but a refusal (the name deleted, the lease lost) or this
	// node's removal keeps the certificate here: the CA counted it, and
	// the next run or the agent publishes it once the cause is gone.
	if err != nil && !errors.As(err, new(*catalog.ErrStale)) && !errors.As(err, new(*Removed)) {
		if serr := c.spool(l, files, token); serr != nil {
			return 0, fmt.Errorf("%w; and keeping it on this node failed too: %v", err, serr)
		}
		return 0, &KeptHere{Name: l.Name, Serial: l.Cert.Serial, Err: err}
	}
	return v, err
}

// publish numbers, seals and publishes one certificate, fenced by token
// (0: a node rebuilding Redis from its disk). A rotation of the data key
// that ran since this process opened the fleet is followed and the key
// sealed again under the new one (invariant I5); a Redis that lost its
// epoch since (emptied, or an older snapshot) is rebuilt or repaired
// from this node first, as opening the fleet would, so a certificate
// the CA already counted is not thrown away.
func (n *Node) publish(ctx context.Context, token int64, l *store.Lineage, files store.Files) (int, error) {
	// Waiting for the other nodes after a rebuild has bounds of its own
	// (catchUpWait, lookWait); the caller's deadline for one attempt
	// (withRedis: 5 s, for a Redis that does not answer) is not one of
	// them. Cut short, the certificate the CA issued would be neither
	// published nor kept.
	wctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), catchUpWait+lookWait+10*time.Second)
	defer cancel()
	if err := n.awaitCatchUp(wctx); err != nil {
		return 0, err
	}
	// The wait may have used up the caller's deadline for one attempt:
	// the Redis calls that follow get one of their own, or they fail as
	// if Redis did not answer.
	var cancels []context.CancelFunc
	defer func() {
		for _, c := range cancels {
			c()
		}
	}()
	base := context.WithoutCancel(ctx)
	fresh := func() context.Context {
		c, cancel := context.WithTimeout(base, attemptTimeout)
		cancels = append(cancels, cancel)
		return c
	}
	ctx = fresh()
	if l.LedgerID == "" {
		l.LedgerID = n.takeReserved(LedgerSet(l.Server, l.Domains))
	}
	for attempt := 0; ; attempt++ {
		v, err := n.Shared.NextVersion(ctx, l.Name, n.versionFloor(l.Name))
		if err != nil {
			return 0, err
		}
		bd, err := n.bundle(l, files, v, token)
		if err != nil {
			return 0, err
		}
		staged, err := n.Shared.PublishStaged(ctx, bd)
		var stale *rdb.ErrStale
		if errors.As(err, &stale) && stale.Why == "epoch" && attempt == 0 {
			if err := n.Refresh(wctx); err != nil {
				return 0, err
			}
			if err := n.CheckSeeded(wctx); err != nil {
				return 0, err
			}
			if err := n.awaitCatchUp(wctx); err != nil {
				return 0, err
			}
			ctx = fresh()
			continue
		}
		if errors.As(err, &stale) {
			return 0, &catalog.ErrStale{Name: l.Name, Reason: err.Error()}
		}
		if err != nil {
			return 0, err
		}
		l.Version = v
		n.noteIssued(l)
		if staged {
			n.startedRollout(ctx, l.Name)
		} else {
			n.publishedPlain(l.Name, v, true)
		}
		return v, nil
	}
}

// versionFloor is the highest version number this node knows name by:
// its archive's, the highest it saw the fleet give (seen.go), or its
// tombstone's once the name was deleted (the
// files are gone; a Redis that lost its counter must still number the
// name, issued again, above it: I2).
func (n *Node) versionFloor(name string) int {
	v := max(n.Local.MaxVersion(name), n.seenVersion(name))
	if t, _ := n.Local.ReadTombstone(name); t != nil {
		v = max(v, t.Version)
	}
	return v
}

// bundle seals l's key under the fleet's current data key.
func (n *Node) bundle(l *store.Lineage, files store.Files, v int, fence int64) (*rdb.Bundle, error) {
	epoch, sealed, err := n.SealBundleKey(l.Name, v, files.Key)
	if err != nil {
		return nil, err
	}
	cp := *l
	cp.Version, cp.Format = v, store.FormatVersion
	cp.Challenge = store.Challenge{Mode: "fleet"}
	meta, _ := json.Marshal(&cp)
	return &rdb.Bundle{Name: l.Name, Version: v, Fence: fence, NotBefore: l.Cert.NotBefore, IssuedAt: l.IssuedAt, Born: l.BornAt(), Epoch: epoch, Node: n.Name,
		Serial: l.Cert.Serial, Meta: meta, Cert: files.Cert, Chain: files.Chain, Fullchain: files.Fullchain, SealedKey: sealed}, nil
}

// KeptHere is a certificate obtained while the fleet's Redis did not
// answer: it waits on this node to be published.
type KeptHere struct {
	Name, Serial string
	Err          error
}

func (e *KeptHere) Error() string {
	if errors.As(e.Err, new(*rdb.Unavailable)) {
		return fmt.Sprintf("obtained certificate %s for %s, but the fleet's Redis did not answer (%v): it is kept on this node and published when Redis answers", e.Serial, e.Name, e.Err)
	}
	return fmt.Sprintf("obtained certificate %s for %s, but could not publish it to the fleet (%v): it is kept on this node and published by the next run or the agent", e.Serial, e.Name, e.Err)
}
func (e *KeptHere) Unwrap() error { return e.Err }

// NoBackoff: the name is fine.
func (e *KeptHere) NoBackoff() bool { return true }

// Later makes the engine report it as deferred, not failed: nothing is
// lost, and nothing is ordered again.
func (e *KeptHere) Later() bool { return true }

// HintText makes *KeptHere a hint.Hinter.
func (e *KeptHere) HintText() string {
	return "nothing to do once Redis is back: this node's agent or next run publishes it, and no other node orders the name meanwhile"
}

// spooled is a certificate waiting on this node for Redis:
// <dir>/fleet/unpublished/<name>.json (0600, in the node's 0700 state
// directory, as its archive is).
type spooled struct {
	Token   int64         `json:"fence"`
	Lineage store.Lineage `json:"lineage"`
	Files   store.Files   `json:"files"`
}

func spoolDir(st *store.Store) string { return filepath.Join(fleetDir(st), "unpublished") }

func (c *Catalog) spool(l *store.Lineage, files store.Files, token int64) error {
	if err := os.MkdirAll(spoolDir(c.N.Local), 0o700); err != nil {
		return err
	}
	data, err := json.Marshal(spooled{Token: token, Lineage: *l, Files: files})
	if err != nil {
		return err
	}
	slog.Warn("the fleet's Redis did not answer; the certificate is kept on this node and published when Redis is back", "name", l.Name, "serial", l.Cert.Serial)
	return store.WriteFile(filepath.Join(spoolDir(c.N.Local), l.Name+".json"), data, 0o600)
}

// spooledFor returns what waits for name, if anything.
func spooledFor(st *store.Store, name string) *spooled {
	data, err := os.ReadFile(filepath.Join(spoolDir(st), name+".json"))
	if err != nil {
		return nil
	}
	var sp spooled
	if json.Unmarshal(data, &sp) != nil {
		return nil
	}
	return &sp
}

// PublishSpool publishes what waits on this node for Redis, each under
// the fence of the lease it was obtained under: a certificate whose
// name another node took over (or that was deleted) meanwhile is
// dropped, as the fleet holds the newer one. Runs call it before they
// plan, and the agent on every heartbeat.
func (n *Node) PublishSpool(ctx context.Context) error {
	entries, err := os.ReadDir(spoolDir(n.Local))
	if err != nil {
		return nil // nothing waits
	}
	for _, e := range entries {
		name, ok := cutJSON(e.Name())
		if !ok {
			continue
		}
		sp := spooledFor(n.Local, name)
		if sp == nil {
			os.Remove(filepath.Join(spoolDir(n.Local), e.Name()))
			continue
		}
		l := sp.Lineage
		_, err := n.publish(ctx, sp.Token, &l, sp.Files)
		var stale *catalog.ErrStale
		switch {
		case errors.As(err, &stale):
			slog.Warn("dropped a certificate kept on this node while Redis was away: the fleet holds a newer one, or the name was deleted", "name", name, "serial", l.Cert.Serial, "why", err)
		case err != nil:
			return err
		default:
			slog.Info("published a certificate kept on this node while Redis was away", "name", name, "version", l.Version)
		}
		os.Remove(filepath.Join(spoolDir(n.Local), e.Name()))
	}
	return nil
}

func cutJSON(s string) (string, bool) {
	if len(s) > 5 && s[len(s)-5:] == ".json" {
		return s[:len(s)-5], true
	}
	return "", false
}

// awaitCatchUp holds an order's publish (and an account's registration)
// for a short while after Redis was rebuilt, until every member with a
// live agent has added what it holds: otherwise a node that did not
// hold the newest version could number a certificate that another node
// already holds under that number, or register a second account.
func (n *Node) awaitCatchUp(ctx context.Context) error {
	meta, err := n.Shared.HGetAll(ctx, "meta")
	if err != nil {
		return err
	}
	ms, _ := strconv.ParseInt(meta["rebuilt_at"], 10, 64)
	rebuilt := time.UnixMilli(ms)
	if ms == 0 || time.Since(rebuilt) > catchUpWindow {
		return nil
	}
	// This node first: its own agent may be down.
	if err := n.catchUp(ctx); err != nil {
		return err
	}
	deadline := time.Now().Add(catchUpWait)
	for {
		done, err := n.Shared.CaughtUp(ctx, meta["gen"])
		if err != nil {
			return err
		}
		missing, err := n.notDone(ctx, done, rebuilt, time.Now())
		if err != nil || len(missing) == 0 {
			return err
		}
		if time.Now().After(deadline) {
			slog.Warn("Redis was rebuilt and some nodes have not added their certificates yet; going ahead", "nodes", missing)
			return nil
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(250 * time.Millisecond):
		}
	}
}

// catchUpWindow is how long after a rebuild publishes check that the
// members caught up; catchUpWait how long one waits for them;
// catchUpGrace how long after a rebuild every member is waited for, not
// only those with a heartbeat: the heartbeats went with Redis's data,
// and an agent beats again (and catches up) within its longest backoff
// plus one beat.
const (
	catchUpWindow = 10 * time.Minute
	catchUpGrace  = maxBackoff + 3*time.Second
)

var catchUpWait = 20 * time.Second // a variable for the tests

// notCaughtUp lists the members that have not added their disk to Redis
// generation gen, rebuilt at rebuilt: those with a live agent, and until
// catchUpGrace after the rebuild every member (an order placed meanwhile
// could otherwise number a certificate with a number a member's disk
// holds, or its tombstone: I2).
func (n *Node) notCaughtUp(ctx context.Context, gen string, rebuilt, now time.Time) ([]string, error) {
	done, err := n.Shared.CaughtUp(ctx, gen)
	if err != nil {
		return nil, err
	}
	return n.notDone(ctx, done, rebuilt, now)
}

// notDone lists the nodes expected after a rebuild at rebuilt (those with
// a live agent, and until catchUpGrace every member) that done lacks.
func (n *Node) notDone(ctx context.Context, done map[string]bool, rebuilt, now time.Time) ([]string, error) {
	agents, err := n.LiveAgents(ctx)
	if err != nil {
		return nil, err
	}
	expect := map[string]bool{}
	for _, a := range agents {
		expect[a.Node] = true
	}
	if now.Sub(rebuilt) < catchUpGrace {
		for _, m := range n.Members() {
			expect[m.Node] = true
		}
	}
	var missing []string
	for _, node := range slices.Sorted(maps.Keys(expect)) {
		if !done[node] {
			missing = append(missing, node)
		}
	}
	return missing, nil
}
