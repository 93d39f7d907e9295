package main

import (
	"bytes"
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/lbcert/lbcert/internal/store"
)

// BenchmarkRenewNothingDue is the cron pass over 1,000 lineages, none due,
// in process: read every lineage and its status, decide, print nothing.
// make bench runs the 10,000-lineage version against the built binary.
func BenchmarkRenewNothingDue(b *testing.B) {
	dir := b.TempDir()
	st := store.New(dir)
	now := time.Now()
	for i := 0; i < 1000; i++ {
		name := fmt.Sprintf("site%04d.example", i)
		_, _, err := st.Save(&store.Lineage{
			Name: name, Domains: []string{name}, Server: "https://127.0.0.1:1/dir", KeyType: "ec256",
			Challenge: store.Challenge{Mode: "webroot", Webroot: "/var/www"},
			Cert:      store.CertInfo{Serial: "01", NotBefore: now.Add(-24 * time.Hour), NotAfter: now.Add(89 * 24 * time.Hour)},
		}, store.Files{Cert: []byte("c"), Chain: []byte("c"), Fullchain: []byte("cc"), Key: []byte("k")})
		if err != nil {
			b.Fatal(err)
		}
	}
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		var out, errb bytes.Buffer
		a := &app{out: &out, err: &errb, getenv: func(string) string { return "" }, now: time.Now, ctx: context.Background()}
		if code := a.run([]string{"--dir", dir, "renew"}); code != 0 || out.Len()+errb.Len() > 0 {
			b.Fatalf("exit %d: %s%s", code, out.String(), errb.String())
		}
	}
	b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N)/1000, "ns/lineage")
}
