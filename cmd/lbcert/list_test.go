package main

import (
	"bytes"
	"context"
	"flag"
	"os"
	"path/filepath"
	"slices"
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
	// example.com mails its own recipient through its own relay.
	l, err := st.Load("example.com")
	if err != nil {
		t.Fatal(err)
	}
	l.Mail = store.Mail{To: []string{"shop-owner@example.net"}, Host: "relay.example.com", Port: 2525, TLS: "tls"}
	if err := st.UpdateMeta(l); err != nil {
		t.Fatal(err)
	}
	// never.example.org's first order failed: no lineage, two failures.
	err = st.WriteStatus("never.example.org", store.Status{
		Failures: 2, LastError: "obtain never.example.org: rejectedIdentifier: forbidden by policy",
		LastAttempt: fixedNow.Add(-time.Hour), NextAttempt: fixedNow.Add(time.Hour),
	})
	if err != nil {
		t.Fatal(err)
	}
	err = st.WriteStatus("broken.example.org", store.Status{
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
	// show says a lineage's own mail settings, and a name whose first
	// order failed is listed and shown, never issued (issue #26 item 21).
	golden(t, "show-mail.txt", replaceDir(runGolden(t, true, "--dir", dir, "show", "example.com")))
	golden(t, "show-never.txt", replaceDir(runGolden(t, true, "--dir", dir, "show", "never.example.org")))
}

// The schedule fits the certificates: twice a day, or every 6 hours once
// a lineage lives 10 days or less; an installed entry keeps its minute
// and first hour and gains the hours it now needs.
func TestCronCadence(t *testing.T) {
	dir := fixtureStore(t)
	cron := filepath.Join(t.TempDir(), "lbcert")
	runGolden(t, false, "--dir", dir, "cron", "install", "--file", cron)
	line := func() []string {
		data, _ := os.ReadFile(cron)
		for _, l := range strings.Split(string(data), "\n") {
			if strings.Contains(l, " renew -q") {
				return strings.Fields(l)
			}
		}
		t.Fatalf("no renew line in\n%s", data)
		return nil
	}
	f := line()
	if hs := strings.Split(f[1], ","); len(hs) != 2 {
		t.Fatalf("90-day lineages: hours %q, want two", f[1])
	}
	st := store.New(dir)
	_, _, err := st.Save(&store.Lineage{Name: "six.example.com", Domains: []string{"six.example.com"}, Server: "https://acme.test/dir", KeyType: "ec256",
		Challenge: store.Challenge{Mode: "standalone", HTTPAddr: ":80"},
		Cert:      store.CertInfo{Serial: "0b", NotBefore: fixedNow, NotAfter: fixedNow.Add(6 * 24 * time.Hour)}},
		store.Files{Cert: []byte("c"), Chain: []byte("c"), Fullchain: []byte("cc"), Key: []byte("k")})
	if err != nil {
		t.Fatal(err)
	}
	runGolden(t, false, "--dir", dir, "cron", "install", "--file", cron)
	g := line()
	hs := strings.Split(g[1], ",")
	if g[0] != f[0] || len(hs) != 4 || !slices.Contains(hs, strings.Split(f[1], ",")[0]) {
		t.Fatalf("with a 6-day lineage: %q %q, want minute %s and four hours including %s", g[0], g[1], f[0], f[1])
	}
	units := t.TempDir()
	runGolden(t, false, "--dir", dir, "cron", "install", "--systemd", "--unit-dir", units)
	timer, _ := os.ReadFile(filepath.Join(units, "lbcert-renew.timer"))
	if !strings.Contains(string(timer), "OnCalendar=*-*-* 00,06,12,18:") {
		t.Fatalf("timer with a 6-day lineage:\n%s", timer)
	}
}

// A weekly renew over 6-day certificates: renew (even with nothing due)
// and list warn, naming the lineage, the gap seen and the gap needed; a
// 90-day lineage under the same schedule gets no warning; renew says it
// once a day (cron mails every run that prints), list every time; a
// hand-typed renew --name is not recorded as a run of the schedule.
func TestCadenceWarning(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "state")
	st := store.New(dir)
	for _, l := range []struct {
		name string
		life time.Duration
	}{{"six.example.com", 6 * 24 * time.Hour}, {"ninety.example.com", 90 * 24 * time.Hour}} {
		_, _, err := st.Save(&store.Lineage{Name: l.name, Domains: []string{l.name}, Server: "https://acme.test/dir", KeyType: "ec256",
			Challenge: store.Challenge{Mode: "standalone", HTTPAddr: ":80"},
			Cert:      store.CertInfo{Serial: "0b", NotBefore: fixedNow, NotAfter: fixedNow.Add(l.life)}},
			store.Files{Cert: []byte("c"), Chain: []byte("c"), Fullchain: []byte("cc"), Key: []byte("k")})
		if err != nil {
			t.Fatal(err)
		}
	}
	for _, at := range []time.Time{fixedNow.Add(-14 * 24 * time.Hour), fixedNow.Add(-7 * 24 * time.Hour)} {
		if err := st.RecordRun(at); err != nil {
			t.Fatal(err)
		}
	}
	renew := func(now time.Time, args ...string) string {
		var out, errb bytes.Buffer
		a := &app{out: &out, err: &errb, getenv: func(string) string { return "" }, now: func() time.Time { return now }, ctx: context.Background()}
		if code := a.run(append([]string{"--dir", dir, "renew", "--no-random-sleep"}, args...)); code != 0 {
			t.Fatalf("renew %v: exit %d\n%s", args, code, errb.String())
		}
		return errb.String()
	}
	if got := renew(fixedNow, "--name", "six.example.com"); !strings.Contains(got, "lbcert: warning: six.example.com: renew runs every 7.0 days") ||
		!strings.Contains(got, "run renew at least every") || strings.Count(got, "renew runs every") != 1 {
		t.Fatalf("renew's warning:\n%s", got)
	}
	if runs := st.Runs(); len(runs) != 2 {
		t.Fatalf("a renew --name was recorded as a scheduled run: %v", runs)
	}
	if got := renew(fixedNow.Add(time.Hour)); strings.Contains(got, "renew runs every") {
		t.Fatalf("warned twice within a day:\n%s", got)
	}
	if runs := st.Runs(); len(runs) != 3 || !runs[2].Equal(fixedNow.Add(time.Hour)) {
		t.Fatalf("the scheduled run was not recorded: %v", runs)
	}
	list := runGolden(t, false, "--dir", dir, "list")
	for _, l := range strings.Split(list, "\n") {
		switch {
		case strings.HasPrefix(l, "six.example.com"):
			if !strings.Contains(l, "warning: renew runs every 7.0 days") {
				t.Fatalf("list:\n%s", list)
			}
		case strings.HasPrefix(l, "ninety.example.com") && strings.Contains(l, "warning"):
			t.Fatalf("a 90-day lineage warned under a weekly schedule:\n%s", list)
		}
	}
}

// cron install and renew --print-systemd-unit refuse what every
// scheduled run would fail on (helper-31 finding 8): CA settings issue
// refuses, a CA bundle that is not there, a password only the
// environment holds; and the mail settings are carried, their password
// file made absolute.
func TestScheduledRunGetsWhatItNeeds(t *testing.T) {
	dir := fixtureStore(t)
	cron := filepath.Join(t.TempDir(), "lbcert")
	env := map[string]string{}
	run := func(args ...string) (int, string) {
		var out, errb bytes.Buffer
		a := &app{out: &out, err: &errb, getenv: func(k string) string { return env[k] }, now: func() time.Time { return fixedNow }, ctx: context.Background()}
		return a.run(append([]string{"--dir", dir}, args...)), errb.String()
	}
	for _, tc := range []struct {
		args []string
		env  string
		want string
	}{
		{[]string{"--staging", "--server", "https://acme.test/dir"}, "", "contradict each other"},
		{[]string{"--server", "http://acme.test/dir"}, "", "requires https"},
		{[]string{"--ca-bundle", filepath.Join(dir, "missing.pem")}, "", "missing.pem"},
		{[]string{"--smtp-user", "u", "--mail-to", "ops@example.com"}, "LBCERT_SMTP_PASSWORD", "--smtp-password-file"},
	} {
		env = map[string]string{}
		if tc.env != "" {
			env[tc.env] = "s3cret"
		}
		for _, cmd := range [][]string{{"cron", "install", "--file", cron}, {"renew", "--print-systemd-unit"}} {
			code, stderr := run(append(append([]string{}, tc.args...), cmd...)...)
			if code == 0 || !strings.Contains(stderr, tc.want) || strings.Contains(stderr, "s3cret") || strings.Count(strings.TrimSpace(stderr), "\n") > 1 {
				t.Errorf("%v %v: exit %d, %q: want it refused, saying %q", tc.args, cmd, code, stderr, tc.want)
			}
		}
		if _, err := os.Stat(cron); err == nil {
			t.Fatalf("%v: a cron file was written", tc.args)
		}
	}
	env = map[string]string{}
	pw := "pw.txt" // relative: the line carries it absolute
	t.Chdir(t.TempDir())
	if err := os.WriteFile(pw, []byte("x"), 0o600); err != nil {
		t.Fatal(err)
	}
	if code, stderr := run("--smtp-user", "u", "--smtp-password-file", pw, "--mail-to", "ops@example.com", "cron", "install", "--file", cron); code != 0 {
		t.Fatalf("cron install with the SMTP password in a file: exit %d: %s", code, stderr)
	}
	data, _ := os.ReadFile(cron)
	abs, _ := filepath.Abs(pw)
	for _, want := range []string{"--smtp-user u", "--smtp-password-file " + abs, "--mail-to ops@example.com"} {
		if !strings.Contains(string(data), want) {
			t.Errorf("cron line without %q:\n%s", want, data)
		}
	}
}

// A list whose names never issued cannot be listed says so, instead of
// leaving them out in silence.
func TestListSaysWhatItLeftOut(t *testing.T) {
	dir := fixtureStore(t)
	records := filepath.Join(dir, "renewal")
	if err := os.RemoveAll(records); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(records, []byte("not a directory"), 0o600); err != nil {
		t.Fatal(err)
	}
	var out, errb bytes.Buffer
	a := &app{out: &out, err: &errb, getenv: func(string) string { return "" }, now: func() time.Time { return fixedNow }, ctx: context.Background()}
	code := a.run([]string{"--dir", dir, "list"})
	if !strings.Contains(errb.String(), "never issued are left out of this list") || !strings.Contains(errb.String(), "not a directory") {
		t.Errorf("list (exit %d) did not say the names never issued were left out, and why: stderr %q", code, errb.String())
	}
	if !strings.Contains(out.String(), "example.com") {
		t.Errorf("list left out the lineages too: %q", out.String())
	}
}
