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
	"fmt"
	"sort"
	"strings"
	"time"

	"github.com/lbcert/lbcert/internal/engine"
	"github.com/lbcert/lbcert/internal/renewal"
	"github.com/lbcert/lbcert/internal/store"
)

// Source is what the metrics read of the state.
type Source interface {
	Names() ([]string, error)
	Load(name string) (*store.Lineage, error)
	ReadStatus(name string) (store.Status, error)
}

// Budget reports how many new orders an account may still place now.
type Budget interface {
	OrdersLeft() map[string]float64 // by "server email"
}

// Render returns the textfile for the state in src after run res.
func Render(src Source, res *engine.Result, budget Budget, now time.Time) ([]byte, error) {
	var b bytes.Buffer
	family := func(name, typ, help string) {
		fmt.Fprintf(&b, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, typ)
	}
	names, err := src.Names()
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
		l, err := src.Load(n)
		if err != nil {
			continue // a broken lineage is reported by list and the run
		}
		st, _ := src.ReadStatus(n)
		d := renewal.Decide(l.Cert, st, now, renewal.Options{ARIOffered: !now.Before(st.ARIUnsupported), Name: n})
		rows = append(rows, row{name: n, expiry: l.Cert.NotAfter, renewAt: d.At, issued: l.IssuedAt, failures: st.Failures, pending: st.Pending != nil})
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
func Write(path string, src Source, res *engine.Result, budget Budget, now time.Time) error {
	data, err := Render(src, res, budget, now)
	if err != nil {
		return err
	}
	return store.WriteFile(path, data, 0o644)
}

func num(f float64) string { return fmt.Sprintf("%g", f) }
