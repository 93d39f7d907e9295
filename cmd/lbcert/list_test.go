package main

import (
	"bytes"
	"context"
	"flag"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/lbcert/lbcert/internal/store"
)

var update = flag.Bool("update", false, "rewrite golden files")

// fixedNow is the clock for golden tests.
var fixedNow = time.Date(2026, 11, 22, 12, 0, 0, 0, time.UTC)

// fixtureStore writes three lineages: healthy, due by lifetime, and
// failing with a backoff.
func fixtureStore(t *testing.T) string {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "state")
	st := store.New(dir)
	add := func(name string, domains []string, notBefore time.Time, days int, ch store.Challenge, d store.Deploy) {
		_, _, err := st.Save(&store.Lineage{
			Name: name, Domains: domains, Server: "https://acme.test/dir", KeyType: "ec256", Challenge: ch, Deploy: d,
			Cert: store.CertInfo{Serial: "0a1b2c", NotBefore: notBefore, NotAfter: notBefore.Add(time.Duration(days) * 24 * time.Hour)},
		}, store.Files{Cert: []byte("c"), Chain: []byte("c"), Fullchain: []byte("cc"), Key: []byte("k")})
		if err != nil {
			t.Fatal(err)
		}
	}
	add("example.com", []string{"example.com", "www.example.com"}, fixedNow.Add(-10*24*time.Hour), 90,
		store.Challenge{Mode: "webroot", Webroot: "/var/www/acme"}, store.Deploy{Target: "nginx"})
	add("due.example.net", []string{"due.example.net"}, fixedNow.Add(-70*24*time.Hour), 90,
		store.Challenge{Mode: "standalone", HTTPAddr: "127.0.0.1:8888"}, store.Deploy{Target: "haproxy"})
	add("broken.example.org", []string{"broken.example.org"}, fixedNow.Add(-80*24*time.Hour), 90,
		store.Challenge{Mode: "standalone", HTTPAddr: ":80"}, store.Deploy{})
	err := st.WriteStatus("broken.example.org", store.Status{
		Failures: 2, LastError: "obtain broken.example.org: connection: connect: connection refused",
		LastAttempt: fixedNow.Add(-time.Hour), NextAttempt: fixedNow.Add(time.Hour),
	})
	if err != nil {
		t.Fatal(err)
	}
	return dir
}

func runGolden(t *testing.T, tty bool, args ...string) string {
	t.Helper()
	var out, errb bytes.Buffer
	a := &app{out: &out, err: &errb, getenv: func(string) string { return "" }, now: func() time.Time { return fixedNow },
		ctx: context.Background(), stdoutTTY: tty}
	if code := a.run(args); code != 0 {
		t.Fatalf("lbcert %v: exit %d: %s", args, code, errb.String())
	}
	return out.String()
}

func golden(t *testing.T, name, got string) {
	t.Helper()
	p := filepath.Join("testdata", "golden", name)
	if *update {
		if err := os.WriteFile(p, []byte(got), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	want, err := os.ReadFile(p)
	if err != nil {
		t.Fatalf("%v (run go test -update)", err)
	}
	if got != string(want) {
		t.Errorf("%s differs from golden file (go test -update to accept):\n--- got\n%s--- want\n%s", name, got, want)
	}
}

func TestListGolden(t *testing.T) {
	dir := fixtureStore(t)
	replaceDir := func(s string) string { return strings.ReplaceAll(s, dir, "$DIR") }
	golden(t, "list-terminal.txt", runGolden(t, true, "--dir", dir, "list"))
	golden(t, "list-pipe.txt", runGolden(t, false, "--dir", dir, "list"))
	golden(t, "list.json", replaceDir(runGolden(t, false, "--dir", dir, "list", "--json")))
	golden(t, "show-terminal.txt", replaceDir(runGolden(t, true, "--dir", dir, "show", "broken.example.org")))
}
