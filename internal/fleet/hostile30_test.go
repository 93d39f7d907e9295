package fleet

import (
	"context"
	"encoding/json"
	"path/filepath"
	"testing"

	"github.com/lbcert/lbcert/internal/store"
)

// H30-1: a member whose record Redis lost (a rebuild from a copy that
// predates its approval) is dropped for good by the next rotation when
// the rotation runs before any holder of its record put it back: after
// the rotation its record in every copy is MAC'd under the old key, so
// lostMembers (which checks the current key) never puts it back, and
// the node waits forever on NotWrapped ("waiting for a member to put
// it back") although nobody removed it.
func TestH30RotationRightAfterRebuildOrphansAMember(t *testing.T) {
	_, sh := startRedis(t)
	ctx := context.Background()
	dir := t.TempDir()
	st := func(n string) *store.Store { return store.New(filepath.Join(dir, n)) }
	lb1, err := Init(ctx, sh, st("lb1"), "lb1")
	if err != nil {
		t.Fatal(err)
	}
	lb2 := joinApproved(t, sh, lb1, dir, "lb2")
	joinApproved(t, sh, lb1, dir, "lb4")
	lb2.loadMembers(ctx, false)                 // lb2's copy lists lb1, lb2, lb4
	lb3 := joinApproved(t, sh, lb1, dir, "lb3") // lb2's copy on disk does not list lb3
	sh.Client().FlushAll(ctx)
	if err := lb2.CheckSeeded(ctx); err != nil { // lb2 rebuilds from its older copy
		t.Fatal(err)
	}
	// The operator removes lb4 on lb2 at once (before lb1's or lb3's
	// heartbeat); lb1 is a member throughout and holds lb3's record.
	if _, err := lb2.Remove(ctx, "lb4"); err != nil {
		t.Fatal(err)
	}
	// Every remaining member's heartbeat runs, many times.
	for i := 0; i < 3; i++ {
		for _, n := range []*Node{lb1, lb2, lb3} {
			n.Refresh(ctx)
			n.loadMembers(ctx, false)
			n.CheckSeeded(ctx)
		}
	}
	err = lb3.Refresh(ctx)
	if l, _ := readLocal(lb3.Local); l.Removed != 0 {
		t.Fatalf("lb3 takes itself for removed: %v", err)
	}
	if err != nil || lb3.Epoch() != 2 {
		t.Fatalf("lb3 was never removed but is left out of epoch 2 for good: epoch %d, %v", lb3.Epoch(), err)
	}
}

// H30-3: a removed node still holds the previous epoch's key, which is
// all the Link MAC asks for: it can rewrite the record of the rotation
// that removed it with a data key of its own, wrapped for a member that
// had not followed it yet. A member that holds the real record puts it
// back at its next heartbeat (redisBehind compares the records), so a
// lagging member that follows after that takes the real key. (Before
// that heartbeat the window is open: see the package doc.)
func TestH30RemovedNodeForgesTheNextKey(t *testing.T) {
	_, sh := startRedis(t)
	ctx := context.Background()
	dir := t.TempDir()
	st := func(n string) *store.Store { return store.New(filepath.Join(dir, n)) }
	lb1, err := Init(ctx, sh, st("lb1"), "lb1")
	if err != nil {
		t.Fatal(err)
	}
	lb2 := joinApproved(t, sh, lb1, dir, "lb2")
	lb3 := joinApproved(t, sh, lb1, dir, "lb3")
	key1, _ := lb3.key(1)
	if _, err := lb1.Remove(ctx, "lb3"); err != nil {
		t.Fatal(err)
	}
	evil, _ := newDataKey()
	ep := Epoch{N: 2, KeyID: keyID(evil), Removed: "lb3"}
	ep.Link = mac(key1, "epoch", lb1.ID, "2", ep.KeyID, "removed", "lb3")
	j, _ := json.Marshal(ep)
	sh.HSet(ctx, "epochs", "2", string(j))
	var m Member
	mj, _ := sh.HGet(ctx, "members", "lb2")
	json.Unmarshal([]byte(mj), &m)
	w, _ := wrap(evil, m.Recipient)
	sh.HSet(ctx, "wrapped:2", "lb2", string(w))
	lb1.CheckSeeded(ctx)
	lb1.loadMembers(ctx, false)
	if err := lb2.Refresh(ctx); err == nil {
		if k, _ := lb2.key(2); keyID(k) == keyID(evil) {
			t.Fatal("lb2 follows epoch 2 into a data key the removed node made (and holds)")
		}
	}
}

// H30-4: an epoch record edited in Redis by someone without any key (a
// bad Link) is refused by a lagging member, as it should be, but no
// member that holds the real record ever puts it back (redisBehind
// only asks whether the record is there): the lagging member stays
// out of the fleet until an operator repairs Redis by hand.
func TestH30TamperedEpochRecordIsNeverPutBack(t *testing.T) {
	_, sh := startRedis(t)
	ctx := context.Background()
	dir := t.TempDir()
	st := func(n string) *store.Store { return store.New(filepath.Join(dir, n)) }
	lb1, err := Init(ctx, sh, st("lb1"), "lb1")
	if err != nil {
		t.Fatal(err)
	}
	lb2 := joinApproved(t, sh, lb1, dir, "lb2")
	joinApproved(t, sh, lb1, dir, "lb3")
	if _, err := lb1.Remove(ctx, "lb3"); err != nil {
		t.Fatal(err)
	}
	var ep Epoch
	raw, _ := sh.HGet(ctx, "epochs", "2")
	json.Unmarshal([]byte(raw), &ep)
	ep.Removed, ep.Link = "lb2", "00"
	j, _ := json.Marshal(ep)
	sh.HSet(ctx, "epochs", "2", string(j))
	for i := 0; i < 3; i++ {
		lb1.Refresh(ctx)
		lb1.CheckSeeded(ctx)
		lb1.loadMembers(ctx, false)
	}
	if err := lb2.Refresh(ctx); err != nil || lb2.Epoch() != 2 {
		t.Fatalf("lb2 after lb1's heartbeats: epoch %d, %v", lb2.Epoch(), err)
	}
}
