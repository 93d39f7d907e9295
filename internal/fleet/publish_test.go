package fleet

import (
	"context"
	"errors"
	"fmt"
	"os/exec"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/lbcert/lbcert/internal/catalog/catalogtest"
	"github.com/lbcert/lbcert/internal/fleet/rdb"
	"github.com/lbcert/lbcert/internal/pace"
	"github.com/lbcert/lbcert/internal/store"
)

// A run that ordered before Redis lost its data (restarted without it,
// or FLUSHALL) publishes into a Redis that names no data key epoch: it
// rebuilds Redis from this node first, as opening the fleet would, and
// publishes, instead of throwing away a certificate the CA counted.
// Found by TestFleetRandomFaults seed 1 (short mode): an issue's publish
// 50 ms after redis-server came back empty was refused ("sealed under a
// data key that is no longer the fleet's").
func TestPublishIntoAnEmptiedRedisRebuildsFirst(t *testing.T) {
	_, sh := startRedis(t)
	ctx := context.Background()
	n, err := Init(ctx, sh, store.New(t.TempDir()), "lb1")
	if err != nil {
		t.Fatal(err)
	}
	c := NewCatalog(n)
	lease, err := c.Acquire(ctx, "a.test", time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	defer lease.Release()
	l, files := catalogtest.Cert(t, "a.test", time.Now().UTC().Truncate(time.Second))
	sh.Client().FlushAll(ctx)
	v, err := c.Publish(ctx, lease, l, files)
	if err != nil {
		t.Fatalf("publish into an emptied Redis: %v", err)
	}
	if id, _ := sh.HGet(ctx, "meta", "id"); id != n.ID {
		t.Errorf("Redis holds fleet %q after the publish, want %s rebuilt", id, n.ID)
	}
	b, err := sh.Bundle(ctx, "a.test")
	if err != nil || b.Version != v || b.Serial != l.Cert.Serial {
		t.Fatalf("the fleet's a.test after the publish: %+v, %v; want version %d serial %s", b, err, v, l.Cert.Serial)
	}
}

// A publish right after a rebuild waits for a member that has not
// added its disk yet (catchUpWait), then goes ahead: the wait must not
// use up the deadline of the publish's own Redis calls, which then
// failed as if Redis did not answer, and the certificate the CA issued
// was kept on this node instead of published (the fault test, seed 10:
// the final renewal after every fault healed).
func TestPublishAfterWaitingForACatchUpGoesAhead(t *testing.T) {
	_, sh := startRedis(t)
	ctx := context.Background()
	dir := t.TempDir()
	lb1 := firstNode(t, sh, dir)
	joinApproved(t, sh, lb1, dir, "lb2") // never catches up
	sh.Client().FlushAll(ctx)
	if err := lb1.CheckSeeded(ctx); err != nil {
		t.Fatal(err)
	}
	// lb2's agent beats, and never adds its disk.
	sh.Heartbeat(ctx, "lb2", []byte(`{"addr":"127.0.0.1:9"}`), time.Minute)
	defer func(w time.Duration) { catchUpWait = w }(catchUpWait)
	catchUpWait = attemptTimeout + time.Second
	c := NewCatalog(lb1)
	lease, err := c.Acquire(ctx, "a.test", time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	defer lease.Release()
	l, files := catalogtest.Cert(t, "a.test", time.Now().UTC().Truncate(time.Second))
	v, err := c.Publish(ctx, lease, l, files)
	if err != nil || v != 1 {
		t.Fatalf("publish after waiting for lb2: version %d, %v; want 1 published", v, err)
	}
}

// I2 through a delete and a Redis loss: a name deleted at version 2,
// then issued again after Redis lost its data, is numbered 3, not 1
// again: the deleting node's tombstone keeps the number and gives it
// back to the rebuilt Redis, whichever node orders. Found by
// TestFleetRandomFaults seeds 21, 22 and 23 (150 s): "version 1 names 2
// certificates" after delete, FLUSHALL (or a restart without AOF) and
// issue.
func TestDeletedNameIssuedAgainAfterRedisLossIsNumberedAbove(t *testing.T) {
	_, sh := startRedis(t)
	ctx := context.Background()
	dir := t.TempDir()
	lb1 := firstNode(t, sh, dir)
	fp, _, err := Join(ctx, sh, store.New(filepath.Join(dir, "lb2")), "lb2")
	if err != nil {
		t.Fatal(err)
	}
	if err := lb1.Approve(ctx, "lb2", fp); err != nil {
		t.Fatal(err)
	}
	lb2, err := Open(ctx, sh, store.New(filepath.Join(dir, "lb2")))
	if err != nil {
		t.Fatal(err)
	}
	c1 := NewCatalog(lb1)
	issued := time.Now().UTC().Truncate(time.Second).Add(-time.Hour)
	for i := range 2 {
		l, files := catalogtest.Cert(t, "a.test", issued.Add(time.Duration(i)*time.Minute))
		publishAs(t, c1, l, files)
		if err := lb1.Local.Stage(l, files); err != nil {
			t.Fatal(err)
		}
	}
	if err := c1.Delete(ctx, "a.test"); err != nil {
		t.Fatal(err)
	}
	if ts, _ := lb1.Local.ReadTombstone("a.test"); ts == nil || ts.Version != 2 {
		t.Fatalf("lb1's tombstone of a.test: %+v, want version 2", ts)
	}
	sh.Client().FlushAll(ctx)
	// lb2, which never held a.test, rebuilds; lb1 catches up, as its
	// agent does at its next heartbeat; then lb2 issues a.test again.
	if err := lb2.CheckSeeded(ctx); err != nil {
		t.Fatal(err)
	}
	if err := lb1.CheckSeeded(ctx); err != nil {
		t.Fatal(err)
	}
	l, files := catalogtest.Cert(t, "a.test", time.Now().UTC().Truncate(time.Second))
	if v := publishAs(t, NewCatalog(lb2), l, files); v != 3 {
		t.Errorf("a.test issued again after the delete and the Redis loss is version %d, want 3", v)
	}
}

func publishAs(t *testing.T, c *Catalog, l *store.Lineage, files store.Files) int {
	t.Helper()
	ctx := context.Background()
	lease, err := c.Acquire(ctx, l.Name, time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	defer lease.Release()
	v, err := c.Publish(ctx, lease, l, files)
	if err != nil {
		t.Fatalf("publish %s: %v", l.Name, err)
	}
	return v
}

// Right after a rebuild the heartbeats are gone with Redis's data: an
// order waits for every member to add what it holds, not only those
// whose agent has beaten since; later, only for those with a live agent.
func TestCatchUpWaitsForEveryMemberRightAfterARebuild(t *testing.T) {
	_, sh := startRedis(t)
	ctx := context.Background()
	dir := t.TempDir()
	lb1 := firstNode(t, sh, dir)
	fp, _, err := Join(ctx, sh, store.New(filepath.Join(dir, "lb2")), "lb2")
	if err != nil {
		t.Fatal(err)
	}
	if err := lb1.Approve(ctx, "lb2", fp); err != nil {
		t.Fatal(err)
	}
	sh.Client().FlushAll(ctx)
	if err := lb1.CheckSeeded(ctx); err != nil {
		t.Fatal(err)
	}
	gen, _ := sh.HGet(ctx, "meta", "gen")
	now := time.Now()
	missing, err := lb1.notCaughtUp(ctx, gen, now, now)
	if err != nil || !slices.Equal(missing, []string{"lb2"}) {
		t.Errorf("just after the rebuild: missing %v (%v), want [lb2]", missing, err)
	}
	missing, err = lb1.notCaughtUp(ctx, gen, now.Add(-time.Minute), now)
	if err != nil || len(missing) != 0 {
		t.Errorf("a minute after the rebuild, with no agent alive: missing %v (%v), want none", missing, err)
	}
}

// A version the fleet gave a name, lost with Redis together with its
// only holder (seed 2 of the fault test: the node that renewed it was
// replaced, then Redis restarted empty), is still below the next one:
// every agent notes the versions it sees, gives the counters back to a
// rebuilt Redis, and orders from its node number above them (I2).
func TestSeenVersionsOutliveTheirHolder(t *testing.T) {
	_, sh := startRedis(t)
	ctx := context.Background()
	lb1, err := Init(ctx, sh, store.New(t.TempDir()), "lb1")
	if err != nil {
		t.Fatal(err)
	}
	lb1.noteSeen(map[string]rdb.Head{"a.example": {Version: 2}})
	if v := lb1.versionFloor("a.example"); v != 2 {
		t.Fatalf("floor %d, want 2", v)
	}
	sh.Client().FlushAll(ctx)
	if err := lb1.CheckSeeded(ctx); err != nil {
		t.Fatal(err)
	}
	if v, err := sh.NextVersion(ctx, "a.example", 0); err != nil || v != 3 {
		t.Fatalf("the next version after the rebuild: %d, %v; want 3", v, err)
	}
	// Another process of the node (a command) reads the file.
	other := &Node{Local: lb1.Local}
	if v := other.versionFloor("a.example"); v != 2 {
		t.Fatalf("a command's floor %d, want 2", v)
	}
}

// A certificate kept on this node because Redis did not answer its
// publish carries its order's ledger place: published later (by the
// agent, another process), it counts once, under that place, not again
// under its serial beside it (hostile review: a renewal kept this way
// counted twice, and a legitimate third certificate was refused).
func TestKeptCertificateKeepsItsLedgerPlace(t *testing.T) {
	r, sh := startRedis(t)
	n := firstNode(t, sh, t.TempDir())
	defer func(w time.Duration) { redisWait = w }(redisWait)
	redisWait = time.Second
	pb, err := pace.Open(t.TempDir(), pace.Limits{}, time.Now)
	if err != nil {
		t.Fatal(err)
	}
	b := &Budget{Pace: pb, N: n, Cap: 3, Now: time.Now}
	l, files := catalogtest.Cert(t, "k.test", time.Now().UTC().Truncate(time.Second))
	if err := b.Reserve(pace.Key{Server: l.Server}, pace.Order{Names: l.Domains}); err != nil {
		t.Fatal(err)
	}
	var place string
	for id := range readLedger(n.Local) {
		place = id // the one place Reserve took
	}
	c := NewCatalog(n)
	lease, err := c.Acquire(context.Background(), "k.test", time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	r.Stop()
	_, err = c.Publish(context.Background(), lease, l, files)
	if !errors.As(err, new(*KeptHere)) {
		t.Fatalf("publish with Redis stopped: %v, want kept on this node", err)
	}
	sp := spooledFor(n.Local, "k.test")
	if sp == nil || place == "" || sp.Lineage.LedgerID != place {
		t.Fatalf("kept with ledger place %q, want the order's %q", func() string {
			if sp == nil {
				return "(nothing kept)"
			}
			return sp.Lineage.LedgerID
		}(), place)
	}
}

// The agent frees the leases its node's exited processes left (killed,
// or unable to hand one back while Redis was away), so another node's
// run does not wait out the TTL; a lease of a running process, of
// another node, of a process whose PID this agent cannot see (another
// PID namespace or host), or whose certificate still waits on this node
// to be published stays (the fault test, seed 3: the final renewal deferred,
// "another run holds this lineage").
func TestAgentFreesLeasesOfExitedProcesses(t *testing.T) {
	_, sh := startRedis(t)
	dir := t.TempDir()
	lb1 := firstNode(t, sh, dir)
	lb2 := joinApproved(t, sh, lb1, dir, "lb2")
	ctx := context.Background()
	gone := exec.Command("true")
	if err := gone.Run(); err != nil {
		t.Fatal(err)
	}
	running := exec.Command("sleep", "60")
	if err := running.Start(); err != nil {
		t.Fatal(err)
	}
	defer running.Process.Kill()
	take := func(n *Node, name string, pid int, space string) {
		t.Helper()
		c := NewCatalog(n)
		c.Holder = fmt.Sprintf("%s/%d%s", n.Name, pid, space)
		if _, err := c.Acquire(ctx, name, time.Minute); err != nil {
			t.Fatal(err)
		}
	}
	here := processSpace()
	take(lb1, "dead.test", gone.Process.Pid, here)
	take(lb1, "kept.test", gone.Process.Pid, here)
	take(lb1, "alive.test", running.Process.Pid, here)
	take(lb2, "other.test", gone.Process.Pid, here)
	// A process of lb1 in another PID namespace (a container sharing
	// the state directory) or on another host with the same node name:
	// its PID means nothing here, so it is not judged.
	take(lb1, "elsewhere.test", gone.Process.Pid, "@4026532999.0123456789ab")
	take(lb1, "oldformat.test", gone.Process.Pid, "")
	l, files := catalogtest.Cert(t, "kept.test", time.Now().UTC().Truncate(time.Second))
	if err := NewCatalog(lb1).spool(l, files, 1); err != nil {
		t.Fatal(err)
	}
	if err := lb1.freeDeadLeases(ctx); err != nil {
		t.Fatal(err)
	}
	for name, want := range map[string]bool{"dead.test": false, "kept.test": true, "alive.test": true, "other.test": true, "elsewhere.test": true, "oldformat.test": true} {
		holder, _, err := sh.Holder(ctx, name)
		if err != nil || (holder != "") != want {
			t.Errorf("%s: held by %q (%v), want held %v", name, holder, err, want)
		}
	}
}

// Without /proc (its own process space unknown) a node judges no lease:
// a PID it cannot place may be a live process elsewhere.
func TestUnknownProcessSpaceJudgesNoLease(t *testing.T) {
	defer func(f func() string) { processSpace = f }(processSpace)
	processSpace = func() string { return unknownSpace }
	gone := exec.Command("true")
	if err := gone.Run(); err != nil {
		t.Fatal(err)
	}
	if pid, dead := exited(fmt.Sprintf("lb1/%d%s", gone.Process.Pid, unknownSpace), "lb1"); dead {
		t.Fatalf("pid %d judged dead from an unknown process space", pid)
	}
}

// A version this node took out of its live files after its deploy
// failed (a first certificate) is still the fleet's: a rebuild from this
// node publishes it, so that its number does not live on this node
// alone (torture seed 15: the node left the fleet, Redis was lost again,
// and the name issued again got the same version for another
// certificate, I2).
func TestRebuildPublishesAVersionTakenOutOfTheLiveFiles(t *testing.T) {
	_, sh := startRedis(t)
	ctx := context.Background()
	st := store.New(t.TempDir())
	n, err := Init(ctx, sh, st, "lb1")
	if err != nil {
		t.Fatal(err)
	}
	l, files := catalogtest.Cert(t, "a.test", time.Now().UTC().Truncate(time.Second))
	v, err := st.SaveVersion(l, files)
	if err != nil {
		t.Fatal(err)
	}
	if err := st.SetJournal("a.test", store.Journal{Pending: &store.Pending{Version: v, Since: time.Now().UTC(), Error: "deploy failed"}}); err != nil {
		t.Fatal(err)
	}
	if live, err := st.LiveVersion("a.test"); err == nil {
		t.Fatalf("a.test is live at %d: the test needs it taken out", live)
	}
	sh.Client().FlushAll(ctx)
	if err := n.CheckSeeded(ctx); err != nil {
		t.Fatal(err)
	}
	b, err := sh.Bundle(ctx, "a.test")
	if err != nil || b == nil || b.Version != v || b.Serial != l.Cert.Serial {
		t.Fatalf("the fleet's a.test after the rebuild: %+v, %v; want version %d serial %s", b, err, v, l.Cert.Serial)
	}
}
