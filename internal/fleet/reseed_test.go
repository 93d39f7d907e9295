package fleet

import (
	"context"
	"slices"
	"testing"
	"time"

	"github.com/lbcert/lbcert/internal/store"
)

// A name deleted on lb1 just before Redis was emptied, before lb2 saw
// the delete (e2e TestFleetDefectDeleteSurvivesFlushall, in full test
// runs): lb1 looked at the rebuilt Redis, then lb2 saw lb1's look and
// published its certificates, the deleted name among them, before lb1
// put its tombstone back. A node's tombstones are in Redis before it
// says it has looked, so lb2's copy is refused and the name is never
// back in the fleet (I3).
func TestTombstonesGoInBeforeTheLook(t *testing.T) {
	lookWait = 10 * time.Second
	defer func() { lookWait = 0 }()
	_, sh := startRedis(t)
	ctx := context.Background()
	dir := t.TempDir()
	lb1 := firstNode(t, sh, dir)
	lb2 := joinApproved(t, sh, lb1, dir, "lb2")
	issued := time.Now().Add(-time.Minute)
	for _, n := range []*Node{lb1, lb2} {
		if _, _, err := n.Local.Save(&store.Lineage{Name: "gone.example", Domains: []string{"gone.example"}, IssuedAt: issued, Cert: store.CertInfo{Serial: "0a", NotBefore: issued, NotAfter: issued.Add(time.Hour)}},
			store.Files{Cert: []byte("C"), Chain: []byte("CH"), Fullchain: []byte("F"), Key: []byte("K")}); err != nil {
			t.Fatal(err)
		}
	}
	if err := (&Catalog{N: lb1}).Delete(ctx, "gone.example"); err != nil {
		t.Fatal(err)
	}
	sh.Client().FlushAll(ctx)

	// lb1 rebuilds, looks, and waits for lb2's look.
	done := make(chan error, 1)
	go func() { done <- lb1.CheckSeeded(ctx) }()
	waitFor(t, func() bool {
		gen, _ := sh.HGet(ctx, "meta", "gen")
		looked, _ := sh.Looked(ctx, gen)
		return gen != "" && looked["lb1"]
	})
	time.Sleep(100 * time.Millisecond) // lb1 is in its wait between two looks
	if err := lb2.CheckSeeded(ctx); err != nil {
		t.Fatalf("lb2's catch-up: %v", err)
	}
	if names, _ := sh.Names(ctx); slices.Contains(names, "gone.example") {
		t.Errorf("lb2 published a name lb1 deleted before Redis was emptied: %v", names)
	}
	if err := <-done; err != nil {
		t.Fatalf("lb1's rebuild: %v", err)
	}
	if names, _ := sh.Names(ctx); slices.Contains(names, "gone.example") {
		t.Errorf("after both rebuilt: %v", names)
	}
	if gone, _ := sh.IsDeleted(ctx, "gone.example"); !gone {
		t.Error("the tombstone is not in the rebuilt Redis")
	}
}

// Delete returns once every other live agent has taken it (its tombstone
// on that node's disk), or after deleteWait naming the ones that have
// not: a delete only in Redis and on the deleting node is lost to a
// FLUSHALL while that node is down (hostile review).
func TestDeleteWaitsForTheAgentsToTakeIt(t *testing.T) {
	deleteWait = 2 * time.Second
	defer func() { deleteWait = 0 }()
	_, sh := startRedis(t)
	ctx := context.Background()
	dir := t.TempDir()
	lb1 := firstNode(t, sh, dir)
	joinApproved(t, sh, lb1, dir, "lb2")
	sh.Heartbeat(ctx, "lb2", []byte(`{"addr":"127.0.0.1:9"}`), time.Minute)
	sh.Heartbeat(ctx, "lb1", []byte(`{"addr":"127.0.0.1:9"}`), time.Minute) // its own agent is not waited for
	start := time.Now()
	if err := (&Catalog{N: lb1}).Delete(ctx, "a.example"); err != nil {
		t.Fatal(err)
	}
	if took := time.Since(start); took < deleteWait {
		t.Errorf("delete returned after %v with lb2's agent not having taken it, want the wait (%v)", took, deleteWait)
	}
	// lb2's agent takes every event as it comes.
	stop := make(chan struct{})
	defer close(stop)
	go func() {
		for {
			select {
			case <-stop:
				return
			case <-time.After(50 * time.Millisecond):
			}
			if id, err := sh.LastEvent(ctx); err == nil {
				sh.MarkTook(ctx, "lb2", id)
			}
		}
	}()
	start = time.Now()
	if err := (&Catalog{N: lb1}).Delete(ctx, "b.example"); err != nil {
		t.Fatal(err)
	}
	if took := time.Since(start); took > time.Second {
		t.Errorf("delete waited %v for an agent that took it at once", took)
	}
}

// A version this node holds only in its archive (its deploy failed, so
// it never went live) was handed out all the same: a rebuilt Redis gets
// its counter back, and the name issued again elsewhere is numbered
// above it (torture run 15, I2).
func TestArchivedVersionCountsAfterARebuild(t *testing.T) {
	_, sh := startRedis(t)
	ctx := context.Background()
	lb1, err := Init(ctx, sh, store.New(t.TempDir()), "lb1")
	if err != nil {
		t.Fatal(err)
	}
	l := &store.Lineage{Name: "a.example", Version: 1, Domains: []string{"a.example"}, IssuedAt: time.Now(), Cert: store.CertInfo{Serial: "0a", NotBefore: time.Now(), NotAfter: time.Now().Add(time.Hour)}}
	if err := lb1.Local.Stage(l, store.Files{Cert: []byte("C"), Chain: []byte("CH"), Fullchain: []byte("F"), Key: []byte("K")}); err != nil {
		t.Fatal(err)
	}
	if v, err := lb1.Local.LiveVersion("a.example"); err == nil && v != 0 {
		t.Fatalf("version %d is live; the test wants it archived only", v)
	}
	sh.Client().FlushAll(ctx)
	if err := lb1.CheckSeeded(ctx); err != nil {
		t.Fatal(err)
	}
	if v, err := sh.NextVersion(ctx, "a.example", 0); err != nil || v != 2 {
		t.Errorf("the next version of a name whose version 1 is archived on a member: %d, %v; want 2", v, err)
	}
}
