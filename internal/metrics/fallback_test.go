package metrics

import (
	"bytes"
	"context"
	"testing"
	"time"

	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"

	"github.com/lbcert/lbcert/internal/catalog"
	"github.com/lbcert/lbcert/internal/engine"
	"github.com/lbcert/lbcert/internal/store"
)

// The textfile says which CA issued each live certificate and whether it
// is a fallback, how many the last run got from a fallback, and which
// CA is passed over.
func TestFallbackMetrics(t *testing.T) {
	now := time.Date(2026, 12, 1, 2, 17, 0, 0, time.UTC)
	st := store.New(t.TempDir())
	cert := store.CertInfo{Serial: "0a", NotBefore: now.Add(-time.Hour), NotAfter: now.Add(24 * time.Hour)}
	files := store.Files{Cert: []byte("c"), Chain: []byte("c"), Fullchain: []byte("cc"), Key: []byte("k")}
	st.Save(&store.Lineage{Name: "p.example.com", Domains: []string{"p.example.com"}, Server: "https://primary.test/dir", Cert: cert}, files)
	st.Save(&store.Lineage{Name: "f.example.com", Domains: []string{"f.example.com"}, Server: "https://step.test/dir", Cert: cert,
		Fallback: store.Fallback{Primary: "https://primary.test/dir", CA: "stepca", Reason: "primary.test did not answer"}}, files)
	until := now.Add(time.Minute)
	res := &engine.Result{Command: "batch", Started: now, Finished: now,
		Items: []*engine.Item{{Name: "f.example.com", Outcome: engine.Issued, CA: "stepca", Fallback: "primary.test did not answer"}},
		CAs:   []engine.CAStatus{{Name: "primary.test", Server: "https://primary.test/dir", PassedOverUntil: &until}, {Name: "stepca", Server: "https://step.test/dir", Issued: 1}}}
	res.Count()
	data, err := Render(context.Background(), Source{Catalog: catalog.NewDir(st), Local: st}, res, nil, now)
	if err != nil {
		t.Fatal(err)
	}
	parser := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := parser.TextToMetricFamilies(bytes.NewReader(data))
	if err != nil {
		t.Fatalf("Prometheus cannot parse it: %v\n%s", err, data)
	}
	labels := func(fam string) []map[string]string {
		var out []map[string]string
		for _, m := range fams[fam].GetMetric() {
			l := map[string]string{"value": model.SampleValue(m.GetGauge().GetValue()).String()}
			for _, lp := range m.Label {
				l[lp.GetName()] = lp.GetValue()
			}
			out = append(out, l)
		}
		return out
	}
	info := map[string]map[string]string{}
	for _, l := range labels("lbcert_certificate_issuer_info") {
		info[l["lineage"]] = l
	}
	if l := info["f.example.com"]; l["ca"] != "stepca" || l["fallback"] != "1" || l["server"] != "https://step.test/dir" {
		t.Errorf("fallback's certificate: %v", l)
	}
	if l := info["p.example.com"]; l["ca"] != "primary.test" || l["fallback"] != "0" {
		t.Errorf("primary's certificate: %v", l)
	}
	if got := labels("lbcert_run_fallback_certificates"); len(got) != 1 || got[0]["value"] != "1" {
		t.Errorf("run fallbacks: %v", got)
	}
	for _, l := range labels("lbcert_ca_passed_over") {
		if want := map[string]string{"primary.test": "1", "stepca": "0"}[l["ca"]]; l["value"] != want {
			t.Errorf("passed over: %v", l)
		}
	}
}
