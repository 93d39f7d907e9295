package fleet

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"testing"

	"github.com/lbcert/lbcert/internal/hint"
	"github.com/lbcert/lbcert/internal/store"
)

// The waves' change count is Redis's, and a rebuild puts back the
// newest copy a node kept. After an emptied Redis was rebuilt from a
// node whose copy is older (it was down when the waves last changed),
// the next change gets a count this node's copy already has: the node
// that makes the change ('fleet rollout off' here) keeps its older copy
// of the waves under the same count, and the next emptied Redis gets
// the waves back from it, although the operator turned them off.
func TestRolloutOffSticksThroughRebuilds(t *testing.T) {
	_, sh := startRedis(t)
	ctx := context.Background()
	n, err := Init(ctx, sh, store.New(t.TempDir()), "lb1")
	if err != nil {
		t.Fatal(err)
	}
	old := &RolloutConfig{Waves: []string{"lb1", "rest"}, Margin: 0.15}
	if err := n.SetRolloutConfig(ctx, old); err != nil { // count 1
		t.Fatal(err)
	}
	if err := n.SetRolloutConfig(ctx, &RolloutConfig{Waves: []string{"lb2", "rest"}, Margin: 0.15}); err != nil { // count 2
		t.Fatal(err)
	}
	if err := sh.Client().FlushAll(ctx).Err(); err != nil {
		t.Fatal(err)
	}
	// Another node, whose copy is count 1, rebuilds first.
	raw, _ := json.Marshal(old)
	if _, err := sh.SetRolloutConfig(ctx, raw, len(old.Waves), 1); err != nil {
		t.Fatal(err)
	}
	// The operator turns staging off on lb1.
	if err := n.SetRolloutConfig(ctx, &RolloutConfig{}); err != nil {
		t.Fatal(err)
	}
	if c := readConfigCopy(n.Local); c == nil || c.Staged() {
		t.Errorf("lb1 turned staging off, but its own copy (kept for a rebuild) still has waves %v (count %d)", c.Waves, c.Seq)
	}
	if err := sh.Client().FlushAll(ctx).Err(); err != nil {
		t.Fatal(err)
	}
	if cfg, err := n.RolloutConfig(ctx, true); err != nil || cfg.Staged() {
		t.Errorf("after the next emptied Redis, lb1 judges by waves %v (%v): staging came back on by itself", cfg.Waves, err)
	}
}

// Two copies of the waves with the same change number (changes made on
// two nodes while Redis was lost, each from an older copy): Redis keeps
// the one a node's own copy keeps (newerConfig), whichever is seeded
// first, so an emptied Redis gets the same waves back from any node.
func TestRolloutConfigTiesBrokenAlike(t *testing.T) {
	_, sh := startRedis(t)
	ctx := context.Background()
	a := &RolloutConfig{Waves: []string{"lb1", "rest"}, Margin: 0.15, By: "lb1", Seq: 9}
	b := &RolloutConfig{Waves: []string{"lb2", "rest"}, Margin: 0.15, By: "lb2", Seq: 9}
	want := a
	if newerConfig(b, a) {
		want = b
	}
	if newerConfig(a, b) == newerConfig(b, a) {
		t.Fatalf("newerConfig orders neither copy first: %v", newerConfig(a, b))
	}
	for _, order := range [][]*RolloutConfig{{a, b}, {b, a}} {
		if err := sh.Client().FlushAll(ctx).Err(); err != nil {
			t.Fatal(err)
		}
		for _, c := range order {
			if _, err := sh.SetRolloutConfig(ctx, configJSON(c), len(c.Waves), c.Seq); err != nil {
				t.Fatal(err)
			}
		}
		raw, seq, err := sh.RolloutConfig(ctx)
		if err != nil || seq != 9 || string(raw) != string(configJSON(want)) {
			t.Errorf("seeded %s then %s: Redis keeps %s (seq %d, %v), want %s", order[0].By, order[1].By, raw, seq, err, configJSON(want))
		}
	}
	// A new change is numbered above the floor its node gives.
	if seq, err := sh.ChangeRolloutConfig(ctx, configJSON(&RolloutConfig{}), 0, 0, 1000); err != nil || seq != 1001 {
		t.Errorf("a change with floor 1000 over seq 9: numbered %d (%v), want 1001", seq, err)
	}
}

// A rollout's waves are resolved once, when it starts, kept in its
// record (every node judges by the same), and put back with the record
// after an emptied Redis: a node that joins meanwhile is in the last
// wave, and the canary stays the canary.
func TestRolloutKeepsItsWaves(t *testing.T) {
	_, sh := startRedis(t)
	ctx := context.Background()
	n, err := Init(ctx, sh, store.New(t.TempDir()), "lb1")
	if err != nil {
		t.Fatal(err)
	}
	cfg := &RolloutConfig{Waves: []string{"1", "rest"}, Margin: 0.15}
	if err := n.SetRolloutConfig(ctx, cfg); err != nil {
		t.Fatal(err)
	}
	n.mu.Lock()
	n.members = append(n.members, Member{Node: "lb2"}, Member{Node: "lb3"})
	n.mu.Unlock()
	r := &Record{Name: "a.example", Version: 5, Serial: "new", Previous: 4, PrevSerial: "old", State: Rolling, Seq: 1}
	if _, err := sh.SeedRollout(ctx, r.Name, r.Version, r.Seq, r.fields()...); err != nil {
		t.Fatal(err)
	}
	recs, err := n.Records(ctx, r.Name)
	if err != nil || recs[r.Name] == nil {
		t.Fatalf("the record: %v %v", recs, err)
	}
	r = recs[r.Name]
	if got := n.wavesOf(ctx, cfg, r); fmt.Sprint(got) != "[[lb1] [lb2 lb3]]" || fmt.Sprint(r.Waves) != "[[lb1] [lb2 lb3]]" {
		t.Fatalf("waves at the start: %v, kept %v; want [[lb1] [lb2 lb3]] kept", got, r.Waves)
	}
	n.mu.Lock()
	n.members = append(n.members, Member{Node: "lb0"})
	n.mu.Unlock()
	if err := sh.Client().FlushAll(ctx).Err(); err != nil {
		t.Fatal(err)
	}
	if err := n.seedRollouts(ctx); err != nil {
		t.Fatal(err)
	}
	recs, err = n.Records(ctx, r.Name)
	if err != nil || recs[r.Name] == nil {
		t.Fatalf("the record after a rebuild: %v %v", recs, err)
	}
	if got := n.wavesOf(ctx, cfg, recs[r.Name]); fmt.Sprint(got) != "[[lb1] [lb2 lb3 lb0]]" {
		t.Errorf("after lb0 joined and Redis was rebuilt, the rollout's waves are %v, want [[lb1] [lb2 lb3 lb0]]", got)
	}
}

// 'fleet rollout off' while a rollout is held would send the held
// version to every node: without --yes it refuses in one line with a
// hint, naming it and why it is held, and staging stays on; with --yes
// it says what it released.
func TestRolloutOffNamesWhatItReleases(t *testing.T) {
	_, sh := startRedis(t)
	ctx := context.Background()
	n, err := Init(ctx, sh, store.New(t.TempDir()), "lb1")
	if err != nil {
		t.Fatal(err)
	}
	if err := n.SetRolloutConfig(ctx, &RolloutConfig{Waves: []string{"lb1", "rest"}, Margin: 0.15}); err != nil {
		t.Fatal(err)
	}
	r := &Record{Name: "a.example", Version: 7, Serial: "new", Previous: 6, PrevSerial: "old", State: Held,
		Why: "probe failed on lb1 (wave 1):\nstatus 500", Node: "lb1", Seq: 2}
	if _, err := sh.SeedRollout(ctx, r.Name, r.Version, r.Seq, r.fields()...); err != nil {
		t.Fatal(err)
	}
	var out strings.Builder
	err = n.RolloutOff(ctx, false, &out)
	const want = "a.example version 7 (held: probe failed on lb1 (wave 1): status 500; nodes keep version 6)"
	if err == nil || !strings.Contains(err.Error(), want) || strings.Contains(err.Error(), "\n") || hint.Of(err) == "" {
		t.Fatalf("rollout off without --yes while a.example is held: %v (hint %q); want one line naming %q, with a hint", err, hint.Of(err), want)
	}
	if cfg, err := n.RolloutConfig(ctx, true); err != nil || !cfg.Staged() {
		t.Errorf("a refused 'rollout off' turned staging off: %v %v", cfg, err)
	}
	if err := n.RolloutOff(ctx, true, &out); err != nil || !strings.Contains(out.String(), "released to every node: "+want) {
		t.Errorf("rollout off --yes: %v\n%s", err, out.String())
	}
}
