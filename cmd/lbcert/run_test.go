package main

import (
	"bytes"
	"runtime/debug"
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

// --version says what a binary built without the Makefile is: the
// module version, or the VCS revision and whether the tree was dirty.
func TestBuildVersion(t *testing.T) {
	info := func(v string, settings ...debug.BuildSetting) *debug.BuildInfo {
		return &debug.BuildInfo{Main: debug.Module{Version: v}, Settings: settings}
	}
	rev := debug.BuildSetting{Key: "vcs.revision", Value: "0123456789abcdef0123"}
	dirty := debug.BuildSetting{Key: "vcs.modified", Value: "true"}
	cases := []struct {
		info *debug.BuildInfo
		want string
	}{
		{info("v1.4.0"), "v1.4.0"},
		{info("(devel)", rev), "dev-0123456789ab"},
		{info("(devel)", rev, dirty), "dev-0123456789ab-dirty"},
		{info("(devel)"), "dev"},
	}
	for _, c := range cases {
		if got := buildVersion(c.info, true); got != c.want {
			t.Errorf("buildVersion = %q, want %q", got, c.want)
		}
	}
	old := version
	version = "v9.9.9-from-ldflags"
	defer func() { version = old }()
	if got := buildVersion(info("v1.4.0"), true); got != "v9.9.9-from-ldflags" {
		t.Errorf("-ldflags version lost: %q", got)
	}
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
