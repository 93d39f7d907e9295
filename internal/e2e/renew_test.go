package e2e

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/lbcert/lbcert/internal/testenv"
)

// setProfile rewrites a lineage's saved profile, as if it had been issued
// with another one: renewals then come back with a different lifetime,
// which lets a test tell renewed lineages from the rest by --days.
func (e *env) setProfile(t *testing.T, name, profile string) {
	t.Helper()
	p := filepath.Join(e.dir, "live", name, "lineage.json")
	data := readFile(t, p)
	data = strings.Replace(data, `"profile": "shortlived"`, `"profile": "`+profile+`"`, 1)
	if err := os.WriteFile(p, []byte(data), 0o644); err != nil {
		t.Fatal(err)
	}
}

// TestRenewDueOnly: --days renews exactly the certificates that are due;
// the others are untouched; the archive keeps the previous version; a
// dry run saves nothing; a second run is silent and sends no request.
func TestRenewDueOnly(t *testing.T) {
	t.Parallel()
	e := newEnv(t, testenv.PebbleOptions{ShortLived: true})
	http := fmt.Sprintf("127.0.0.1:%d", e.pebble.HTTPPort)
	issue := func(domain, profile string) {
		e.mustRun("issue", "-d", domain, "--standalone", "--http-addr", http, "--agree-tos", "--profile", profile)
	}
	issue("short.example.com", "shortlived")
	issue("long.example.com", "default")
	short1, long1 := e.serial("short.example.com"), e.serial("long.example.com")

	// Dry run: the whole flow against the CA, nothing saved.
	r := e.mustRun("renew", "--days", "7", "--no-random-sleep", "--dry-run")
	if !strings.Contains(r.stdout, "1 would renew (dry run), 1 not due") {
		t.Fatalf("dry run: %q", r.stdout)
	}
	if e.serial("short.example.com") != short1 {
		t.Fatal("dry run saved a certificate")
	}

	prom := filepath.Join(e.work, "textfile", "lbcert.prom")
	os.MkdirAll(filepath.Dir(prom), 0o755)
	r = e.mustRun("--metrics-file", prom, "renew", "--days", "7", "--no-random-sleep", "--json")
	metrics := readFile(t, prom)
	for _, want := range []string{`lbcert_certificate_expiry_timestamp_seconds{lineage="short.example.com"}`,
		`lbcert_run_items{command="renew",outcome="renewed"} 1`, `lbcert_run_items{command="renew",outcome="not_due"} 1`} {
		if !strings.Contains(metrics, want) {
			t.Errorf("metrics file lacks %s:\n%s", want, metrics)
		}
	}
	var rep struct {
		Version int `json:"version"`
		Items   []struct {
			Name    string `json:"name"`
			Outcome string `json:"outcome"`
			Serial  string `json:"serial"`
		} `json:"items"`
	}
	if err := json.Unmarshal([]byte(r.stdout), &rep); err != nil {
		t.Fatalf("--json: %v\n%s", err, r.stdout)
	}
	got := map[string]string{}
	for _, it := range rep.Items {
		got[it.Name] = it.Outcome
	}
	if rep.Version != 1 || len(rep.Items) != 2 || got["short.example.com"] != "renewed" || got["long.example.com"] != "not_due" {
		t.Fatalf("report: %+v", rep)
	}
	short2 := e.serial("short.example.com")
	for _, it := range rep.Items {
		if it.Name == "short.example.com" && (short2 == short1 || it.Serial != short2) {
			t.Fatalf("short not renewed: %s -> %s (report %s)", short1, short2, it.Serial)
		}
	}
	if e.serial("long.example.com") != long1 {
		t.Fatal("long.example.com renewed although not due")
	}
	if _, err := os.Stat(filepath.Join(e.dir, "archive", "short.example.com", "1", "cert.pem")); err != nil {
		t.Fatalf("archive lost the previous version: %v", err)
	}
	meta := readFile(t, filepath.Join(e.dir, "live", "short.example.com", "lineage.json"))
	if !strings.Contains(meta, `"profile": "shortlived"`) || !strings.Contains(meta, `"mode": "standalone"`) {
		t.Fatalf("renewal did not keep the lineage's settings:\n%s", meta)
	}

	// Without --days, the first run asks ARI (Pebble offers it) and saves
	// the window; nothing is due, so it prints nothing.
	r = e.mustRun("renew", "--no-random-sleep")
	if r.stdout != "" || r.stderr != "" {
		t.Fatalf("nothing-due run printed: %q %q", r.stdout, r.stderr)
	}
	var st struct {
		ARISerial   string    `json:"ari_serial"`
		WindowStart time.Time `json:"ari_window_start"`
		WindowEnd   time.Time `json:"ari_window_end"`
		RenewAt     time.Time `json:"ari_renew_at"`
		NextCheck   time.Time `json:"ari_next_check"`
	}
	if err := json.Unmarshal([]byte(readFile(t, filepath.Join(e.dir, "renewal", "long.example.com.json"))), &st); err != nil {
		t.Fatal(err)
	}
	if st.ARISerial != long1 || st.RenewAt.Before(st.WindowStart) || st.RenewAt.After(st.WindowEnd) ||
		st.NextCheck.Sub(time.Now()) < 5*time.Hour || st.NextCheck.Sub(time.Now()) > 7*time.Hour {
		t.Fatalf("saved ARI state: %+v", st)
	}

	// A second run: still nothing, and not a single request to the CA
	// (ARI's Retry-After has not passed).
	before := e.requests()
	r = e.mustRun("renew")
	if r.stdout != "" || r.stderr != "" || r.code != 0 {
		t.Fatalf("second run: %q %q exit %d", r.stdout, r.stderr, r.code)
	}
	if n := e.requests() - before; n != 0 {
		t.Fatalf("nothing-due run sent %d requests to the CA", n)
	}
}

// TestRenewBackoff: a lineage whose validation fails is retried only after
// its backoff; --force overrides it; the other lineages are not held up.
func TestRenewBackoff(t *testing.T) {
	t.Parallel()
	e := newEnv(t, testenv.PebbleOptions{})
	http := fmt.Sprintf("127.0.0.1:%d", e.pebble.HTTPPort)
	e.mustRun("issue", "-d", "good.example.com", "--standalone", "--http-addr", http, "--agree-tos")
	e.mustRun("issue", "-d", "broken.example.com", "--standalone", "--http-addr", http, "--agree-tos")
	// broken's listener moves to a port the CA does not validate on: a real
	// validation failure at the CA, as after a firewall change.
	p := filepath.Join(e.dir, "live", "broken.example.com", "lineage.json")
	os.WriteFile(p, []byte(strings.Replace(readFile(t, p), http, freeAddr(t), 1)), 0o644)

	r := e.run("renew", "--days", "100", "--no-random-sleep")
	// The CA gets a 404 (good's listener answers the port) or no answer,
	// depending on whether good's order is still in flight.
	if r.code != 2 || !strings.Contains(r.stderr, "lbcert: error: renew broken.example.com: obtain broken.example.com: ") {
		t.Fatalf("first run: exit %d stderr %s", r.code, r.stderr)
	}
	if !strings.Contains(r.stdout, "1 renewed, 0 not due, 1 failed") {
		t.Fatalf("summary: %s", r.stdout)
	}
	var st struct {
		Failures    int       `json:"failures"`
		NextAttempt time.Time `json:"next_attempt"`
		LastError   string    `json:"last_error"`
	}
	json.Unmarshal([]byte(readFile(t, filepath.Join(e.dir, "renewal", "broken.example.com.json"))), &st)
	if st.Failures != 1 || time.Until(st.NextAttempt) < 55*time.Minute || time.Until(st.NextAttempt) > 61*time.Minute || st.LastError == "" {
		t.Fatalf("backoff after one failure: %+v", st)
	}

	// Next run: broken waits (no order for it), good renews again. The
	// error recorded, edited by hand to span lines, is said on one.
	rec := filepath.Join(e.dir, "renewal", "broken.example.com.json")
	os.WriteFile(rec, []byte(strings.Replace(readFile(t, rec), `"last_error": "`, `"last_error": "edited\nby hand: `, 1)), 0o600)
	before := e.pebble.FullLog()
	r = e.run("renew", "--days", "100", "--no-random-sleep")
	if r.code != 2 || !strings.Contains(r.stdout, "1 renewed, 0 not due, 0 failed, 1 deferred") || !strings.Contains(r.stdout, "waiting after earlier failures: edited by hand: ") {
		t.Fatalf("run during backoff: exit %d\n%s%s", r.code, r.stdout, r.stderr)
	}
	if strings.Contains(e.pebble.FullLog()[len(before):], "broken.example.com") {
		t.Fatal("a lineage in backoff reached the CA")
	}

	// --force ignores the backoff; the failure doubles it.
	r = e.run("renew", "--name", "broken.example.com", "--force", "--no-random-sleep")
	if r.code != 1 {
		t.Fatalf("forced run: exit %d", r.code)
	}
	json.Unmarshal([]byte(readFile(t, filepath.Join(e.dir, "renewal", "broken.example.com.json"))), &st)
	if st.Failures != 2 || time.Until(st.NextAttempt) < 115*time.Minute {
		t.Fatalf("backoff after two failures: %+v", st)
	}
}

// TestRenewKill9: kill -9 in the middle of a renew run leaves every
// lineage consistent, and the next run finishes the job.
func TestRenewKill9(t *testing.T) {
	t.Parallel()
	e := newEnv(t, testenv.PebbleOptions{ShortLived: true})
	http := fmt.Sprintf("127.0.0.1:%d", e.pebble.HTTPPort)
	names := []string{"k1.example.com", "k2.example.com", "k3.example.com", "k4.example.com"}
	orig := map[string]string{}
	// Each has a deploy hook: the certificates saved before the kill are
	// owed their deploy, and the next run must run the hook for them.
	hookLog := filepath.Join(e.work, "hook.log")
	for _, n := range names {
		e.mustRun("issue", "-d", n, "--standalone", "--http-addr", http, "--agree-tos", "--profile", "shortlived",
			"--deploy-hook", "echo $LBCERT_NAME >> "+hookLog)
		e.setProfile(t, n, "default") // renewals come back with 90 days
		orig[n] = e.serial(n)
	}

	ctx, cancel := context.WithTimeout(context.Background(), runDeadline)
	defer cancel()
	cmd := e.command(ctx, "renew", "--days", "7", "--no-random-sleep", "--concurrency", "1")
	stderr, _ := cmd.StderrPipe()
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	// Kill it as the third lineage starts: two are done, one is in flight.
	sc := bufio.NewScanner(stderr)
	seen := 0
	for sc.Scan() {
		if strings.Contains(sc.Text(), "requesting certificate") {
			if seen++; seen == 3 {
				time.Sleep(150 * time.Millisecond)
				cmd.Process.Signal(syscall.SIGKILL)
				break
			}
		}
	}
	cmd.Wait()
	if seen < 3 {
		t.Fatalf("renew ended before it could be killed (saw %d orders)", seen)
	}

	renewed := 0
	for _, n := range names {
		c := e.leaf(n) // checks cert/key/chain agree
		meta := readFile(t, filepath.Join(e.dir, "live", n, "lineage.json"))
		if !strings.Contains(meta, fmt.Sprintf(`"serial": "%x"`, c.SerialNumber)) {
			t.Fatalf("%s: lineage.json does not describe cert.pem after kill -9", n)
		}
		if e.serial(n) != orig[n] {
			renewed++
		}
	}
	if renewed < 2 || renewed == len(names) {
		t.Fatalf("after kill -9: %d of %d renewed; want the run cut short", renewed, len(names))
	}
	// The lock died with the process: the next run proceeds and completes.
	// The certificates saved before the kill were never deployed, so the
	// next run deploys them (no new order, "deployed") and renews the
	// rest.
	// The killed run's last request may still be on its way through
	// Pebble's log: count only once it has settled. Certificates issued
	// are counted, not orders: when the killed run's order had already
	// used the old certificate's ARI "replaces", Pebble refuses it a
	// second time and lbcert orders again without it.
	e.settledOrders()
	issuedBefore := e.pebble.Issued()
	os.Remove(hookLog)
	r := e.mustRun("renew", "--days", "7", "--no-random-sleep")
	if hooked := strings.Fields(readFileOrEmpty(hookLog)); len(hooked) != len(names) {
		t.Fatalf("second run ran the deploy hook for %v, want all %d", hooked, len(names))
	}
	// The certificates obtained before the kill are counted as deployed,
	// the rest as renewed.
	if !strings.Contains(r.stdout, fmt.Sprintf("%d renewed, %d deployed, 0 not due", len(names)-renewed, renewed)) ||
		strings.Count(r.stdout, "  deployed  ") != renewed || e.pebble.Issued()-issuedBefore != len(names)-renewed {
		t.Fatalf("second run: %d certificates issued\n%s", e.pebble.Issued()-issuedBefore, r.stdout)
	}
	for _, n := range names {
		if c := e.leaf(n); c.NotAfter.Sub(c.NotBefore) < 80*24*time.Hour {
			t.Fatalf("%s not renewed by the second run", n)
		}
	}
	entries, _ := filepath.Glob(filepath.Join(e.dir, "archive", "*", ".tmp-*"))
	if len(entries) > 1 {
		t.Fatalf("temporary directories left: %v", entries)
	}
}

// TestRenewQuietWhenCADown: from cron (-q), a nothing-due run whose ARI
// look-up fails because the CA is down prints nothing and exits 0; the
// lifetime rule still says nothing is due.
func TestRenewQuietWhenCADown(t *testing.T) {
	t.Parallel()
	e := newEnv(t, testenv.PebbleOptions{})
	e.mustRun("issue", "-d", "quiet.example.com", "--standalone", "--http-addr", fmt.Sprintf("127.0.0.1:%d", e.pebble.HTTPPort), "--agree-tos")
	e.pebble.Stop()
	r := e.run("renew", "-q", "--no-random-sleep")
	if r.code != 0 || r.stdout != "" || r.stderr != "" {
		t.Fatalf("-q with the CA down and nothing due: exit %d, stdout %q, stderr %q", r.code, r.stdout, r.stderr)
	}
	// Without -q the look-up failure is still said, as information.
	r = e.run("renew", "--no-random-sleep")
	if r.code != 0 || !strings.Contains(r.stderr, "renewal info failed; using the lifetime rule") {
		t.Fatalf("without -q: exit %d, stderr %q", r.code, r.stderr)
	}
	// -q silences information, never a failure: a due renewal that
	// fails still says so, and the exit is not 0.
	r = e.run("renew", "-q", "--force", "--no-random-sleep")
	if r.code == 0 || !strings.Contains(r.stderr, "lbcert: error:") || !strings.Contains(r.stderr, "quiet.example.com") {
		t.Fatalf("-q with a due renewal failing: exit %d, stdout %q, stderr %q", r.code, r.stdout, r.stderr)
	}
}

// TestRenewDeadCA: with the CA down, a renew of many due lineages stops
// ordering after a few failures, says so in one error, defers the rest,
// and puts no lineage into failure backoff.
func TestRenewDeadCA(t *testing.T) {
	t.Parallel()
	e := newEnv(t, testenv.PebbleOptions{})
	http := fmt.Sprintf("127.0.0.1:%d", e.pebble.HTTPPort)
	for i := range 6 {
		e.mustRun("issue", "-d", fmt.Sprintf("dead%d.example.com", i), "--standalone", "--http-addr", http, "--agree-tos")
	}
	e.pebble.Stop()
	// One order at a time, so that "after a few" is exact: at the default
	// concurrency all six would be in flight before the first failed.
	r := e.run("renew", "--force", "--no-random-sleep", "--concurrency", "1")
	if r.code != 2 || !strings.Contains(r.stderr, "did not answer several orders in a row") || !strings.Contains(r.stdout, "3 deferred") {
		t.Fatalf("dead CA: exit %d\n%s%s", r.code, r.stdout, r.stderr)
	}
	statuses, _ := filepath.Glob(filepath.Join(e.dir, "renewal", "*.json"))
	for _, p := range statuses {
		if strings.Contains(readFile(t, p), `"failures"`) {
			t.Fatalf("%s: a lineage was put into backoff for the CA's outage:\n%s", p, readFile(t, p))
		}
	}
}

// TestAccountLostAfterPebbleRestart: a restarted Pebble knows no account.
// The next renew says so once, registers one new account, and renews
// every lineage with it; nobody deletes accounts/ by hand.
func TestAccountLostAfterPebbleRestart(t *testing.T) {
	t.Parallel()
	e := newEnv(t, testenv.PebbleOptions{})
	http := fmt.Sprintf("127.0.0.1:%d", e.pebble.HTTPPort)
	names := []string{"lost1.example.com", "lost2.example.com"}
	before := map[string]string{}
	for _, n := range names {
		e.mustRun("issue", "-d", n, "--standalone", "--http-addr", http, "--agree-tos")
		before[n] = e.serial(n)
	}
	regs, _ := filepath.Glob(filepath.Join(e.dir, "accounts", "*", "*", "account.json"))
	if len(regs) != 1 {
		t.Fatalf("want one saved account before the restart, have %v", regs)
	}
	oldReg := readFile(t, regs[0])
	if err := e.pebble.Restart(); err != nil {
		t.Fatal(err)
	}

	r := e.mustRun("renew", "--force", "--no-random-sleep")
	if n := strings.Count(r.stderr, "no longer knows the saved account"); n != 1 {
		t.Fatalf("want the lost account said once, said %d times:\n%s", n, r.stderr)
	}
	for _, n := range names {
		if e.serial(n) == before[n] {
			t.Fatalf("%s was not renewed after the account was registered again:\n%s", n, r.stdout)
		}
	}
	regs, _ = filepath.Glob(filepath.Join(e.dir, "accounts", "*", "*", "account.json"))
	if len(regs) != 1 || readFile(t, regs[0]) == oldReg {
		t.Fatalf("want one new account saved in place of the old, have %v", regs)
	}
	if log := e.pebble.FullLog(); strings.Count(log, "POST /sign-me-up") != 1 {
		t.Fatalf("the restarted Pebble saw %d registrations, want 1", strings.Count(log, "POST /sign-me-up"))
	}
}

// TestARIWindowInThePast: a CA in an emergency (a mass revocation)
// moves a certificate's ARI window into the past. Once the saved
// Retry-After has passed, the next plain renew asks again, renews the
// certificate whatever its lifetime says, and gives that as the reason.
func TestARIWindowInThePast(t *testing.T) {
	t.Parallel()
	e := newEnv(t, testenv.PebbleOptions{})
	http := fmt.Sprintf("127.0.0.1:%d", e.pebble.HTTPPort)
	e.mustRun("issue", "-d", "revoked.example.com", "--standalone", "--http-addr", http, "--agree-tos")
	before := e.serial("revoked.example.com")
	// A first renew asks ARI: a normal window, nothing due.
	if r := e.mustRun("renew", "--no-random-sleep"); strings.Contains(r.stdout, "renewed") {
		t.Fatalf("renewed a fresh certificate:\n%s", r.stdout)
	}
	statusPath := filepath.Join(e.dir, "renewal", "revoked.example.com.json")
	var st map[string]any
	json.Unmarshal([]byte(readFile(t, statusPath)), &st)
	if st["ari_next_check"] == nil {
		t.Fatalf("ARI not asked:\n%s", readFile(t, statusPath))
	}

	cert := readFile(t, filepath.Join(e.dir, "live", "revoked.example.com", "cert.pem"))
	now := time.Now()
	if err := e.pebble.SetRenewalInfo([]byte(cert), now.Add(-48*time.Hour), now.Add(-24*time.Hour)); err != nil {
		t.Fatal(err)
	}
	// Before the saved Retry-After: not asked, not renewed.
	if r := e.mustRun("renew", "--no-random-sleep"); strings.Contains(r.stdout, "renewed") {
		t.Fatalf("asked ARI before its Retry-After:\n%s", r.stdout)
	}
	// The test shortens the Retry-After it saved.
	st["ari_next_check"] = now.Add(-time.Minute).UTC().Format(time.RFC3339)
	data, _ := json.Marshal(st)
	os.WriteFile(statusPath, data, 0o600)
	r := e.mustRun("renew", "--no-random-sleep")
	if !strings.Contains(r.stdout, "1 renewed") || !strings.Contains(r.stdout, "due: the CA's renewal window had passed") || e.serial("revoked.example.com") == before {
		t.Fatalf("the moved window did not renew it, with that reason:\n%s%s", r.stdout, r.stderr)
	}
}

// The archive keeps --keep-versions versions (the live one included),
// given as a flag or as the config key, and live/ keeps working.
func TestKeepVersions(t *testing.T) {
	t.Parallel()
	e := newEnv(t, testenv.PebbleOptions{})
	addr := fmt.Sprintf("127.0.0.1:%d", e.pebble.HTTPPort)
	e.mustRun("issue", "-d", "keep.example.com", "--standalone", "--http-addr", addr, "--agree-tos")
	archived := func() int {
		entries, err := os.ReadDir(filepath.Join(e.dir, "archive", "keep.example.com"))
		if err != nil {
			t.Fatal(err)
		}
		return len(entries)
	}
	for range 3 {
		e.mustRun("--keep-versions", "2", "renew", "--force", "--no-random-sleep")
	}
	if n := archived(); n != 2 {
		t.Fatalf("with --keep-versions 2 the archive holds %d versions", n)
	}
	e.leaf("keep.example.com") // live/ is whole and matches its key
	conf := filepath.Join(e.work, "keep.yaml")
	os.WriteFile(conf, []byte("keep-versions: 1\n"), 0o644)
	e.mustRun("--config", conf, "renew", "--force", "--no-random-sleep")
	if n := archived(); n != 1 {
		t.Fatalf("with keep-versions: 1 in the config the archive holds %d versions", n)
	}
	e.leaf("keep.example.com")
	if r := e.run("--keep-versions", "0", "renew", "--force", "--no-random-sleep"); r.code != 1 || !strings.Contains(r.stderr, "--keep-versions 0: want 1 or more") {
		t.Fatalf("--keep-versions 0: exit %d\n%s", r.code, r.stderr)
	}
}
