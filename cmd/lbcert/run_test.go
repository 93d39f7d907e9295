package main

import (
	"bytes"
	"testing"
	"time"

	"github.com/spf13/pflag"

	"github.com/lbcert/lbcert/internal/engine"
)

// The run report's JSON schema, every key, pinned.
func TestRunReportSchema(t *testing.T) {
	at := func(d int) *time.Time { x := fixedNow.Add(time.Duration(d) * 24 * time.Hour); return &x }
	res := &engine.Result{Version: engine.SchemaVersion, Command: "batch", File: "import.csv", Format: "positional",
		Started: fixedNow, Finished: fixedNow.Add(time.Minute), Items: []*engine.Item{
			{Name: "shop.example.com", Line: 2, Domains: []string{"shop.example.com"}, Outcome: engine.Renewed, Reason: "ari",
				DueAt: at(-1), OldSerial: "0a", OldNotAfter: at(20), Serial: "0b", NotAfter: at(90), Deploy: "ok", Verify: "ok", Hook: "ok"},
			{Name: "blog.example.com", Line: 3, Domains: []string{"blog.example.com"}, Outcome: engine.Failed, Reason: "lifetime",
				OldSerial: "1a", OldNotAfter: at(5), Serial: "1b", NotAfter: at(90), Deploy: "rolled_back",
				Pending: "nginx -t: syntax error; rolled back to the previous certificate", Error: "deploy: nginx -t: syntax error",
				Hint: "fix the config", NextAttempt: at(1)},
			{Name: "api.example.com", Line: 4, Domains: []string{"api.example.com"}, Outcome: engine.Deferred,
				Error: "not ordered: the new-orders budget (300/3h per account) is spent", NextAttempt: at(1)},
			{Line: 5, Outcome: engine.Invalid, Error: `domain "*.x": wildcard names need DNS-01 validation`},
		}}
	res.Count()
	var out bytes.Buffer
	a := &app{out: &out}
	a.printJSON(res)
	golden(t, "run-report.json", out.String())
	// renew --json through the whole command, on a lineage not due.
	got := runGolden(t, false, "--dir", fixtureStore(t), "renew", "--json", "--name", "example.com")
	golden(t, "renew.json", got)
}

// The relay a lineage saves is saved whole: its TLS mode and roots go
// with its host and port, never the password.
func TestLineageMailSavesTheWholeRelay(t *testing.T) {
	a := &app{}
	fs := pflag.NewFlagSet("t", pflag.ContinueOnError)
	a.mail.register(fs)
	if err := fs.Parse([]string{"--smtp-host", "mx.example.com", "--smtp-port", "2525", "--smtp-tls", "none", "--mail-to", "ops@example.com"}); err != nil {
		t.Fatal(err)
	}
	m := a.lineageMail(fs, nil)
	if m.Host != "mx.example.com" || m.Port != 2525 || m.TLS != "none" || len(m.To) != 1 {
		t.Fatalf("saved %+v", m)
	}
	// A reissue that names no relay keeps the saved one, TLS mode included.
	fs2 := pflag.NewFlagSet("t", pflag.ContinueOnError)
	a2 := &app{}
	a2.mail.register(fs2)
	fs2.Parse(nil)
	if kept := a2.lineageMail(fs2, &m); kept.TLS != "none" || kept.Host != "mx.example.com" {
		t.Fatalf("kept %+v", kept)
	}
}
