package fleet

import (
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/lbcert/lbcert/internal/deploy"
	"github.com/lbcert/lbcert/internal/store"
)

type countingDeployer struct{ changes []deploy.Change }

func (d *countingDeployer) Test(context.Context, store.Deploy) string { return "" }

func (d *countingDeployer) Run(_ context.Context, changes []deploy.Change) []deploy.Result {
	d.changes = append(d.changes, changes...)
	out := make([]deploy.Result, len(changes))
	for i, c := range changes {
		out[i] = deploy.Result{Name: c.Name, Deployed: true}
	}
	return out
}

// An agent that starts without Redis finishes the deploys it owes from
// disk, except for a lineage with a staged rollout on its way: what it
// may serve is the rollout's to say (a canary's failed deploy of a held
// version must not be retried before Redis says so).
func TestFinishLocalLeavesRolloutsToRedis(t *testing.T) {
	for _, staged := range []bool{false, true} {
		st := store.New(t.TempDir())
		now := time.Now().UTC()
		for v := 1; v <= 2; v++ {
			l := &store.Lineage{Name: "a.example", Version: v, Domains: []string{"a.example"},
				Cert: store.CertInfo{Serial: string(rune('0' + v)), NotBefore: now, NotAfter: now.Add(time.Hour)}}
			if err := st.Stage(l, store.Files{Cert: []byte("c"), Chain: []byte("c"), Fullchain: []byte("cc"), Key: []byte("k")}); err != nil {
				t.Fatal(err)
			}
		}
		if err := st.Activate("a.example", 1); err != nil {
			t.Fatal(err)
		}
		// The deploy of version 2 failed and rolled back to version 1.
		st.SetJournal("a.example", store.Journal{Pending: &store.Pending{Version: 2, Previous: 1, Since: now, Error: "haproxy -c failed"}})
		if staged {
			r := &Record{Name: "a.example", Version: 2, Serial: "2", Previous: 1, PrevSerial: "1", State: Held, Seq: 3}
			data, _ := json.Marshal(r)
			os.MkdirAll(rolloutDir(st), 0o700)
			os.WriteFile(filepath.Join(rolloutDir(st), "a.example.json"), data, 0o600)
		}
		d := &countingDeployer{}
		s := &Syncer{Local: st, Runner: d}
		s.FinishLocal(context.Background())
		live, _ := st.LiveVersion("a.example")
		switch {
		case staged && (len(d.changes) != 0 || live != 1):
			t.Errorf("with a rollout on its way: %d deploys, live %d; want none, 1", len(d.changes), live)
		case !staged && (len(d.changes) != 1 || live != 2):
			t.Errorf("without one: %d deploys, live %d; want the owed deploy of version 2", len(d.changes), live)
		}
	}
}

// An emptied Redis has no waves, which is not "no waves": a node that
// kept the fleet's waves judges by its copy until they are put back, so
// a record put back first is neither ended nor ignored meanwhile.
func TestEmptiedRedisIsNotStagingOff(t *testing.T) {
	_, sh := startRedis(t)
	ctx := context.Background()
	n, err := Init(ctx, sh, store.New(t.TempDir()), "lb1")
	if err != nil {
		t.Fatal(err)
	}
	if err := n.SetRolloutConfig(ctx, &RolloutConfig{Waves: []string{"lb1", "rest"}}); err != nil {
		t.Fatal(err)
	}
	if err := sh.Client().FlushAll(ctx).Err(); err != nil {
		t.Fatal(err)
	}
	cfg, err := n.RolloutConfig(ctx, true)
	if err != nil || !cfg.Staged() {
		t.Fatalf("after FLUSHALL: %+v %v, want the node's copy of the waves", cfg, err)
	}
	// A record comes back before the waves and the certificates.
	r := &Record{Name: "a.example", Version: 2, Serial: "s2", Previous: 1, PrevSerial: "s1", State: Held, Why: "probe failed", Seq: 3}
	if ok, err := sh.SeedRollout(ctx, r.Name, r.Version, r.Seq, r.fields()...); err != nil || !ok {
		t.Fatalf("seed: %v %v", ok, err)
	}
	if _, err := n.Evaluate(ctx); err != nil {
		t.Fatal(err)
	}
	recs, err := n.Records(ctx, r.Name)
	if err != nil || recs[r.Name] == nil || recs[r.Name].State != Held {
		t.Fatalf("after a look at the rollouts: %+v %v, want the held record kept", recs, err)
	}
	// 'fleet rollout off' is a change of its own: then it ends.
	if err := n.SetRolloutConfig(ctx, &RolloutConfig{}); err != nil {
		t.Fatal(err)
	}
	if _, err := n.Evaluate(ctx); err != nil {
		t.Fatal(err)
	}
	if recs, _ := n.Records(ctx, r.Name); recs[r.Name] != nil {
		t.Fatalf("staging off: the record stays: %+v", recs[r.Name])
	}
}
