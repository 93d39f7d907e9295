package metrics

import (
	"context"

	"bytes"
	"github.com/lbcert/lbcert/internal/catalog"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"

	"github.com/lbcert/lbcert/internal/engine"
	"github.com/lbcert/lbcert/internal/fleet"
	"github.com/lbcert/lbcert/internal/store"
)

type fakeBudget map[string]float64

func (f fakeBudget) OrdersLeft() map[string]float64 { return f }

// The textfile parses with Prometheus's own parser and carries each
// family with the right values; it is written atomically.
func TestTextfile(t *testing.T) {
	now := time.Date(2026, 12, 1, 2, 17, 0, 0, time.UTC)
	st := store.New(t.TempDir())
	for i, name := range []string{"a.example.com", "b.example.com"} {
		_, _, err := st.Save(&store.Lineage{Name: name, Domains: []string{name}, IssuedAt: now.Add(-time.Hour),
			Cert: store.CertInfo{Serial: "0a", NotBefore: now.Add(-24 * time.Hour), NotAfter: now.Add(time.Duration(89-i) * 24 * time.Hour)}},
			store.Files{Cert: []byte("c"), Chain: []byte("c"), Fullchain: []byte("cc"), Key: []byte("k")})
		if err != nil {
			t.Fatal(err)
		}
	}
	st.WriteStatus("b.example.com", store.Status{Failures: 3, LastError: "boom"})
	res := &engine.Result{Command: "renew", Started: now, Finished: now.Add(90 * time.Second),
		Items: []*engine.Item{{Name: "a.example.com", Outcome: engine.Renewed}, {Name: "b.example.com", Outcome: engine.Failed}}}
	res.Count()
	path := filepath.Join(t.TempDir(), "lbcert.prom")
	if err := Write(context.Background(), path, Source{Catalog: catalog.NewDir(st), Local: st}, res, fakeBudget{"https://ca.test/dir ops@example.com": 297}, now); err != nil {
		t.Fatal(err)
	}
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	p := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := p.TextToMetricFamilies(bytes.NewReader(data))
	if err != nil {
		t.Fatalf("Prometheus cannot parse it: %v\n%s", err, data)
	}
	get := func(fam string, labels map[string]string) float64 {
		t.Helper()
		f := fams[fam]
		if f == nil {
			t.Fatalf("no family %s", fam)
		}
	next:
		for _, m := range f.Metric {
			for _, lp := range m.Label {
				if v, ok := labels[lp.GetName()]; ok && v != lp.GetValue() {
					continue next
				}
			}
			return m.GetGauge().GetValue()
		}
		t.Fatalf("%s%v: no such series", fam, labels)
		return 0
	}
	if got := get("lbcert_certificate_expiry_timestamp_seconds", map[string]string{"lineage": "b.example.com"}); got != float64(now.Add(88*24*time.Hour).Unix()) {
		t.Errorf("expiry %v", got)
	}
	if got := get("lbcert_certificate_consecutive_failures", map[string]string{"lineage": "b.example.com"}); got != 3 {
		t.Errorf("failures %v", got)
	}
	if got := get("lbcert_certificate_renewal_timestamp_seconds", map[string]string{"lineage": "a.example.com"}); got <= float64(now.Unix()) {
		t.Errorf("next renewal %v is not in the future", got)
	}
	if got := get("lbcert_run_duration_seconds", map[string]string{"command": "renew"}); got != 90 {
		t.Errorf("duration %v", got)
	}
	if get("lbcert_run_items", map[string]string{"outcome": "renewed"}) != 1 || get("lbcert_run_items", map[string]string{"outcome": "failed"}) != 1 ||
		get("lbcert_run_items", map[string]string{"outcome": "deferred"}) != 0 {
		t.Error("run items")
	}
	if got := get("lbcert_budget_orders_left", map[string]string{"email": "ops@example.com"}); got != 297 {
		t.Errorf("budget %v", got)
	}
	if leftovers, _ := filepath.Glob(filepath.Join(filepath.Dir(path), ".*tmp*")); len(leftovers) != 0 {
		t.Errorf("temporary files left: %v", leftovers)
	}
}

// The fleet's per-node figures parse, sit beside the run's file, and
// carry each node's counts, heartbeat and verdict.
func TestFleetTextfile(t *testing.T) {
	now := time.Date(2026, 12, 1, 2, 17, 0, 0, time.UTC)
	beat := now.Add(-4 * time.Second)
	st := &fleet.Status{Version: fleet.StatusVersion, Fleet: "f1", Lineages: 5, At: now, Nodes: []fleet.NodeStatus{
		{Node: "lb1", Heartbeat: &beat, Newest: 5},
		{Node: "lb2", Newest: 3, Behind: 1, Failed: 1, LagSeconds: 42, Problems: []string{"no heartbeat"}},
	}}
	path := filepath.Join(t.TempDir(), "lbcert.prom")
	if err := WriteFleet(path, st); err != nil {
		t.Fatal(err)
	}
	if FleetPath(path) != filepath.Join(filepath.Dir(path), "lbcert-fleet.prom") {
		t.Fatalf("FleetPath %s", FleetPath(path))
	}
	data, err := os.ReadFile(FleetPath(path))
	if err != nil {
		t.Fatal(err)
	}
	parser := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := parser.TextToMetricFamilies(bytes.NewReader(data))
	if err != nil {
		t.Fatalf("Prometheus cannot parse it: %v\n%s", err, data)
	}
	value := func(fam string, labels ...string) float64 {
		t.Helper()
	next:
		for _, m := range fams[fam].GetMetric() {
			for i := 0; i < len(labels); i += 2 {
				for _, lp := range m.Label {
					if lp.GetName() == labels[i] && lp.GetValue() != labels[i+1] {
						continue next
					}
				}
			}
			return m.GetGauge().GetValue()
		}
		t.Fatalf("%s%v: no such series\n%s", fam, labels, data)
		return 0
	}
	for _, c := range []struct {
		fam    string
		labels []string
		want   float64
	}{
		{"lbcert_fleet_lineages", nil, 5},
		{"lbcert_fleet_node_lineages", []string{"node", "lb1", "state", "newest"}, 5},
		{"lbcert_fleet_node_lineages", []string{"node", "lb2", "state", "behind"}, 1},
		{"lbcert_fleet_node_lineages", []string{"node", "lb2", "state", "failed"}, 1},
		{"lbcert_fleet_node_lag_seconds", []string{"node", "lb2"}, 42},
		{"lbcert_fleet_node_ok", []string{"node", "lb1"}, 1},
		{"lbcert_fleet_node_ok", []string{"node", "lb2"}, 0},
		{"lbcert_fleet_node_heartbeat_timestamp_seconds", []string{"node", "lb1"}, float64(beat.Unix())},
	} {
		if got := value(c.fam, c.labels...); got != c.want {
			t.Errorf("%s%v = %v, want %v", c.fam, c.labels, got, c.want)
		}
	}
	if bytes.Contains(data, []byte(`heartbeat_timestamp_seconds{node="lb2"}`)) {
		t.Error("a node without a heartbeat has a heartbeat series")
	}
}
