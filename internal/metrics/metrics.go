// Package metrics writes a Prometheus textfile (node_exporter's textfile
// collector format) after every run: per lineage its expiry, next renewal,
// last issuance and consecutive failures; per run its duration and what
// it renewed, failed and deferred; and the pace budget left. Let's
// Encrypt no longer mails expiry warnings, so monitoring is the other net.
//
// The file is written atomically (temp file, fsync, rename), so the
// collector never reads half of it. The package reads the storage seam
// and the run's result; it never talks to the network.
package metrics

import (
	"bytes"
	"context"
	"fmt"
	"sort"
	"strings"
	"time"

	"github.com/lbcert/lbcert/internal/catalog"
	"github.com/lbcert/lbcert/internal/engine"
	"github.com/lbcert/lbcert/internal/fleet"
	"github.com/lbcert/lbcert/internal/renewal"
	"github.com/lbcert/lbcert/internal/store"
)

// Source is what the metrics read of the state: the catalog, and this
// node's copy (what it serves, what it still owes).
type Source struct {
	Catalog catalog.Catalog
	Local   store.Local
}

// Budget reports how many new orders an account may still place now.
type Budget interface {
	OrdersLeft() map[string]float64 // by "server email"
}

// Render returns the textfile for the state in src after run res.
func Render(ctx context.Context, src Source, res *engine.Result, budget Budget, now time.Time) ([]byte, error) {
	var b bytes.Buffer
	family := func(name, typ, help string) {
		fmt.Fprintf(&b, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, typ)
	}
	names, err := src.Catalog.Names(ctx)
	if err != nil {
		return nil, err
	}
	type row struct {
		name                    string
		expiry, renewAt, issued time.Time
		failures                int
		pending                 bool
	}
	var rows []row
	for _, n := range names {
		l, err := src.Catalog.Head(ctx, n)
		if err != nil {
			continue // a broken lineage is reported by list and the run
		}
		st, _ := src.Catalog.Status(ctx, n)
		j, _ := src.Local.Journal(n)
		live, _ := src.Local.LiveVersion(n)
		d := renewal.Decide(l.Cert, st, now, renewal.Options{ARIOffered: !now.Before(st.ARIUnsupported), Name: n})
		rows = append(rows, row{name: n, expiry: l.Cert.NotAfter, renewAt: d.At, issued: l.IssuedAt, failures: st.Failures,
			pending: j.Pending != nil || live != l.Version})
	}
	series := func(name, typ, help string, val func(r row) float64) {
		family(name, typ, help)
		for _, r := range rows {
			fmt.Fprintf(&b, "%s{lineage=%q} %s\n", name, r.name, num(val(r)))
		}
	}
	unix := func(t time.Time) float64 { return float64(t.Unix()) }
	series("lbcert_certificate_expiry_timestamp_seconds", "gauge", "When the live certificate expires.", func(r row) float64 { return unix(r.expiry) })
	series("lbcert_certificate_renewal_timestamp_seconds", "gauge", "When renew will next renew the lineage (ARI window or lifetime rule).", func(r row) float64 { return unix(r.renewAt) })
	series("lbcert_certificate_last_success_timestamp_seconds", "gauge", "When the live certificate was obtained.", func(r row) float64 { return unix(r.issued) })
	series("lbcert_certificate_consecutive_failures", "gauge", "Failed attempts since the last success.", func(r row) float64 { return float64(r.failures) })
	series("lbcert_certificate_pending_deploy", "gauge", "1 when a certificate was obtained but is not deployed yet.", func(r row) float64 {
		if r.pending {
			return 1
		}
		return 0
	})

	if res != nil {
		cmd := res.Command
		family("lbcert_run_duration_seconds", "gauge", "How long the last run took.")
		fmt.Fprintf(&b, "lbcert_run_duration_seconds{command=%q} %s\n", cmd, num(res.Finished.Sub(res.Started).Seconds()))
		family("lbcert_run_timestamp_seconds", "gauge", "When the last run finished.")
		fmt.Fprintf(&b, "lbcert_run_timestamp_seconds{command=%q} %s\n", cmd, num(unix(res.Finished)))
		family("lbcert_run_items", "gauge", "What the last run did, by outcome.")
		for _, o := range engine.Outcomes {
			fmt.Fprintf(&b, "lbcert_run_items{command=%q,outcome=%q} %d\n", cmd, string(o), res.Counts[o])
		}
	}
	if budget != nil {
		left := budget.OrdersLeft()
		keys := make([]string, 0, len(left))
		for k := range left {
			keys = append(keys, k)
		}
		sort.Strings(keys)
		family("lbcert_budget_orders_left", "gauge", "New orders the client-side budget allows now, per account.")
		for _, k := range keys {
			server, email, _ := strings.Cut(k, " ")
			fmt.Fprintf(&b, "lbcert_budget_orders_left{server=%q,email=%q} %s\n", server, email, num(left[k]))
		}
	}
	return b.Bytes(), nil
}

// Write renders and writes the textfile at path atomically.
func Write(ctx context.Context, path string, src Source, res *engine.Result, budget Budget, now time.Time) error {
	data, err := Render(ctx, src, res, budget, now)
	if err != nil {
		return err
	}
	return store.WriteFile(path, data, 0o644)
}

func num(f float64) string { return fmt.Sprintf("%g", f) }

// FleetPath is where the fleet's per-node figures go beside the run's
// textfile: lbcert.prom -> lbcert-fleet.prom. A file of their own,
// since the agent, fleet status and every run in fleet mode refresh
// them, while the run's own file is the last run's; node_exporter's
// textfile collector reads every *.prom in the directory.
func FleetPath(path string) string {
	return strings.TrimSuffix(path, ".prom") + "-fleet.prom"
}

// RenderFleet returns the per-node figures of the fleet status st, the
// ones 'fleet status' prints.
func RenderFleet(st *fleet.Status) []byte {
	var b bytes.Buffer
	family := func(name, help string) {
		fmt.Fprintf(&b, "# HELP %s %s\n# TYPE %s gauge\n", name, help, name)
	}
	family("lbcert_fleet_lineages", "Lineages the fleet holds.")
	fmt.Fprintf(&b, "lbcert_fleet_lineages{fleet=%q} %d\n", st.Fleet, st.Lineages)
	family("lbcert_fleet_status_timestamp_seconds", "When these figures were read from the fleet's Redis.")
	fmt.Fprintf(&b, "lbcert_fleet_status_timestamp_seconds{fleet=%q} %d\n", st.Fleet, st.At.Unix())
	family("lbcert_fleet_node_heartbeat_timestamp_seconds", "The node's agent's last heartbeat (absent: none).")
	for _, n := range st.Nodes {
		if n.Heartbeat != nil {
			fmt.Fprintf(&b, "lbcert_fleet_node_heartbeat_timestamp_seconds{node=%q} %d\n", n.Node, n.Heartbeat.Unix())
		}
	}
	family("lbcert_fleet_node_lineages", "Lineages the node serves at the fleet's newest version, is behind on, or failed to deploy.")
	for _, n := range st.Nodes {
		for _, s := range []struct {
			state string
			n     int
		}{{"newest", n.Newest}, {"behind", n.Behind}, {"failed", n.Failed}} {
			fmt.Fprintf(&b, "lbcert_fleet_node_lineages{node=%q,state=%q} %d\n", n.Node, s.state, s.n)
		}
	}
	family("lbcert_fleet_node_lag_seconds", "How long the oldest change the node does not serve yet has waited (0: none).")
	for _, n := range st.Nodes {
		fmt.Fprintf(&b, "lbcert_fleet_node_lag_seconds{node=%q} %s\n", n.Node, num(n.LagSeconds))
	}
	family("lbcert_fleet_node_ok", "1 when fleet status finds no problem with the node (heartbeat fresh, no failed deploy, not behind too long).")
	for _, n := range st.Nodes {
		ok := 0
		if len(n.Problems) == 0 {
			ok = 1
		}
		fmt.Fprintf(&b, "lbcert_fleet_node_ok{node=%q} %d\n", n.Node, ok)
	}
	return b.Bytes()
}

// WriteFleet writes RenderFleet(st) beside the run's textfile at path.
func WriteFleet(path string, st *fleet.Status) error {
	return store.WriteFile(FleetPath(path), RenderFleet(st), 0o644)
}
