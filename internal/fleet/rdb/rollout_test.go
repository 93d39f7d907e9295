package rdb

import (
	"context"
	"testing"
	"time"
)

// The publish script starts a staged rollout in the same step as the new
// head, keeps the version every node may serve while an unfinished one
// is replaced, starts nothing for a first version or an unfenced
// publish, and a delete takes the rollout with it.
func TestPublishStartsRollout(t *testing.T) {
	s := dial(t)
	ctx := context.Background()
	nb := time.Now().Add(-time.Hour).Truncate(time.Millisecond)
	pub := func(v int, fence int64, serial string) {
		t.Helper()
		if err := s.Publish(ctx, &Bundle{Name: "r.com", Version: v, Fence: fence, NotBefore: nb.Add(time.Duration(v) * time.Minute), Serial: serial, Meta: []byte("{}")}); err != nil {
			t.Fatalf("publish v%d: %v", v, err)
		}
	}
	record := func() map[string]string {
		t.Helper()
		m, err := s.RolloutRecords(ctx, []string{"r.com"})
		if err != nil {
			t.Fatal(err)
		}
		return m["r.com"]
	}
	prev := func() int {
		b, err := s.Prev(ctx, "r.com")
		if err != nil {
			return 0
		}
		return b.Version
	}
	// Without waves: nothing staged.
	pub(1, 1, "s1")
	pub(2, 2, "s2")
	if record() != nil || prev() != 0 {
		t.Fatalf("no waves, yet a rollout: %v, previous %d", record(), prev())
	}
	if _, err := s.SetRolloutConfig(ctx, []byte(`{"waves":["lb1","rest"]}`), 2, 0); err != nil {
		t.Fatal(err)
	}
	pub(3, 3, "s3")
	r := record()
	if r["version"] != "3" || r["previous"] != "2" || r["prev_serial"] != "s2" || r["wave"] != "0" || r["state"] != "rolling" || prev() != 2 {
		t.Fatalf("after v3: record %v, previous bundle %d", r, prev())
	}
	if names, _ := s.Rollouts(ctx); len(names) != 1 {
		t.Fatalf("rollouts set: %v", names)
	}
	// v4 replaces an unfinished v3: v2 stays what every node may serve.
	pub(4, 4, "s4")
	r = record()
	if r["version"] != "4" || r["previous"] != "2" || prev() != 2 || r["seq"] != "2" {
		t.Fatalf("after v4: record %v, previous bundle %d", r, prev())
	}
	// The compare-and-set: a stale seq moves nothing.
	if ok, err := s.MoveRollout(ctx, "r.com", 4, 1, false, "wave", "1"); err != nil || ok {
		t.Fatalf("a stale move: %v %v", ok, err)
	}
	if ok, err := s.MoveRollout(ctx, "r.com", 4, 2, false, "wave", "1"); err != nil || !ok || record()["wave"] != "1" || record()["seq"] != "3" {
		t.Fatalf("a move: %v %v %v", ok, err, record())
	}
	if ok, err := s.MoveRollout(ctx, "r.com", 4, 3, true); err != nil || !ok || record() != nil || prev() != 0 {
		t.Fatalf("done: %v %v, record %v, previous %d", ok, err, record(), prev())
	}
	// A finished rollout: the next version's previous is the head.
	pub(5, 5, "s5")
	if r := record(); r["previous"] != "4" || prev() != 4 {
		t.Fatalf("after v5: %v, previous %d", r, prev())
	}
	// An unfenced publish (a rebuild) starts nothing.
	if err := s.Publish(ctx, &Bundle{Name: "r.com", Version: 6, NotBefore: nb.Add(time.Hour), Serial: "s6"}); err != nil {
		t.Fatal(err)
	}
	if r := record(); r["version"] != "5" {
		t.Fatalf("an unfenced publish started a rollout: %v", r)
	}
	if _, _, err := s.DeleteBundle(ctx, "r.com", time.Now()); err != nil {
		t.Fatal(err)
	}
	if names, _ := s.Rollouts(ctx); record() != nil || prev() != 0 || len(names) != 0 {
		t.Fatalf("after the delete: record %v, previous %d, rollouts %v", record(), prev(), names)
	}
}

// After a rebuild the records come back first, then the heads: a head
// published over the previous version the record names becomes the
// previous bundle again; copies are taken only when newer.
func TestRolloutRebuild(t *testing.T) {
	s := dial(t)
	ctx := context.Background()
	nb := time.Now().Add(-time.Hour).Truncate(time.Millisecond)
	if n, err := s.SetRolloutConfig(ctx, []byte(`{"waves":["lb1","rest"]}`), 2, 7); err != nil || n != 7 {
		t.Fatalf("config copy: %d %v", n, err)
	}
	if n, _ := s.SetRolloutConfig(ctx, []byte(`{"waves":["lb1"]}`), 1, 5); n != 0 {
		t.Fatalf("an older config copy was taken")
	}
	kv := []string{"serial", "s9", "previous", "8", "prev_serial", "s8", "wave", "1", "state", "held", "why", "probe failed", "since", "1"}
	if ok, err := s.SeedRollout(ctx, "b.com", 9, 4, kv...); err != nil || !ok {
		t.Fatalf("seed: %v %v", ok, err)
	}
	if ok, _ := s.SeedRollout(ctx, "b.com", 9, 3, "state", "rolling"); ok {
		t.Fatal("an older copy replaced a newer one")
	}
	// A later-wave node rebuilds first: the previous version as head.
	if err := s.Publish(ctx, &Bundle{Name: "b.com", Version: 8, NotBefore: nb, Serial: "s8"}); err != nil {
		t.Fatal(err)
	}
	// The canary then: its head; the previous version goes aside.
	if err := s.Publish(ctx, &Bundle{Name: "b.com", Version: 9, NotBefore: nb.Add(time.Minute), Serial: "s9"}); err != nil {
		t.Fatal(err)
	}
	m, _ := s.RolloutRecords(ctx, []string{"b.com"})
	p, err := s.Prev(ctx, "b.com")
	if err != nil || p.Version != 8 || m["b.com"]["state"] != "held" || m["b.com"]["wave"] != "1" {
		t.Fatalf("rebuilt: record %v, previous %v %v", m["b.com"], p, err)
	}
	// The other order: head first, then the previous bundle from a node
	// that holds it, only for the version the record names.
	if ok, _ := s.SeedRollout(ctx, "c.com", 3, 1, "serial", "c3", "previous", "2", "prev_serial", "c2", "state", "rolling"); !ok {
		t.Fatal("seed c.com")
	}
	if err := s.Publish(ctx, &Bundle{Name: "c.com", Version: 3, NotBefore: nb, Serial: "c3"}); err != nil {
		t.Fatal(err)
	}
	if ok, _ := s.SeedPrev(ctx, &Bundle{Name: "c.com", Version: 1, NotBefore: nb, Serial: "c1"}); ok {
		t.Fatal("a previous bundle the record does not name was taken")
	}
	if ok, err := s.SeedPrev(ctx, &Bundle{Name: "c.com", Version: 2, NotBefore: nb, Serial: "c2"}); err != nil || !ok {
		t.Fatalf("seed prev: %v %v", ok, err)
	}
	// A copy of a rollout the head already passed is not put back.
	if ok, _ := s.SeedRollout(ctx, "c.com", 2, 9, "state", "held"); ok {
		t.Fatal("a record older than the head came back")
	}
}

// The expiry override is noted once per rollout, also on a record a
// rebuild put back: a node's copy carries every field, the override's
// time as 0 when it had not begun, and that is not a start already
// noted.
func TestNoteOverrideAfterRebuild(t *testing.T) {
	s := dial(t)
	ctx := context.Background()
	kv := []string{"serial", "s5", "previous", "4", "prev_serial", "s4", "wave", "0", "state", "held", "override_at", "0", "override_node", ""}
	if ok, err := s.SeedRollout(ctx, "o.com", 5, 2, kv...); err != nil || !ok {
		t.Fatalf("seed: %v %v", ok, err)
	}
	if first, err := s.NoteRollout(ctx, "o.com", 5, "override_at", "1700000000000", "override_node", "lb2"); err != nil || !first {
		t.Fatalf("the override on a put-back record was not noted: %v %v", first, err)
	}
	if first, _ := s.NoteRollout(ctx, "o.com", 5, "override_at", "1800000000000", "override_node", "lb3"); first {
		t.Fatal("the override was noted twice")
	}
	m, _ := s.RolloutRecords(ctx, []string{"o.com"})
	if m["o.com"]["override_at"] != "1700000000000" || m["o.com"]["override_node"] != "lb2" {
		t.Fatalf("record: %v", m["o.com"])
	}
}
