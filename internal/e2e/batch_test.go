package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/lbcert/lbcert/internal/testenv"
)

func writeCSV(t *testing.T, dir, name, text string) string {
	t.Helper()
	p := filepath.Join(dir, name)
	if err := os.WriteFile(p, []byte(text), 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

// batchArgs are the flags every batch test needs against Pebble: the
// pre-flight route check goes where Pebble's VA goes, and asks Pebble's
// DNS server.
func (e *env) batchArgs(csv string, extra ...string) []string {
	return append([]string{"batch", csv, "--agree-tos", "--http-port", fmt.Sprint(e.pebble.HTTPPort), "--resolver", e.pebble.DNSAddr}, extra...)
}

// TestBatchSeedFormat: seed 004's CSV with good and bad rows behind a
// real HAProxy. Bad rows are reported as FILE:LINE and never reach the
// CA; good rows are issued, deployed with one reload, checked on their
// VIPPort, and each TOAddr gets one mail through the row's relay. A
// second run orders nothing.
func TestBatchSeedFormat(t *testing.T) {
	t.Parallel()
	e := newEnv(t, testenv.PebbleOptions{})
	acmePort := e.pebble.HTTPPort
	tlsAddr := freeAddr(t)
	vip := strings.TrimPrefix(tlsAddr, "127.0.0.1:")
	// The rows name their own relay, which needs no login: the configured
	// SMTP user and password (for another relay) must never reach it.
	smtp, err := testenv.StartSMTP(e.work, "", "")
	if err != nil {
		t.Fatal(err)
	}
	defer smtp.Stop()
	mailEnv := []string{"LBCERT_SMTP_USER=lbcert", "LBCERT_SMTP_PASSWORD=" + smtpSecret, "LBCERT_SMTP_CA_BUNDLE=" + smtp.CABundle, "LBCERT_SMTP_RETRY_DELAY=100ms"}

	// HAProxy needs one certificate to start: issue it the ordinary way.
	hdir := filepath.Join(e.work, "haproxy")
	certs := filepath.Join(hdir, "certs")
	os.MkdirAll(hdir, 0o755)
	conf := filepath.Join(hdir, "haproxy.cfg")
	os.WriteFile(conf, []byte(haproxyConfig(filepath.Join(hdir, "admin.sock"), tlsAddr, certs)), 0o644)
	deployArgs := []string{"--deploy", "haproxy", "--haproxy-conf", conf, "--haproxy-certs", certs}
	e.mustRun(append([]string{"issue", "-d", "first.lb.example.com", "--standalone", "--http-addr", fmt.Sprintf("127.0.0.1:%d", acmePort), "--agree-tos", "--reload-cmd", "true"}, deployArgs...)...)
	h, err := testenv.StartHAProxy(hdir, conf, tlsAddr)
	if err != nil {
		t.Fatal(err)
	}
	defer h.Stop()
	reloads := filepath.Join(hdir, "reloads")
	reload := fmt.Sprintf("echo reload >> %s; kill -USR2 $(cat %s)", reloads, filepath.Join(hdir, "haproxy.pid"))

	relay := fmt.Sprintf("%s,%d", smtp.Host, smtp.Port)
	csv := writeCSV(t, e.work, "import.csv", strings.Join([]string{
		"DOMAIN,VIPPort,ACMEPort,FROMAddr,TOAddr,RELAYAddr,RELAYPort",
		fmt.Sprintf("a.lb.example.com,%s,%d,lb1@example.com,alice@example.net,%s", vip, acmePort, relay),
		fmt.Sprintf("b.lb.example.com,%s,%d,lb1@example.com,bob@example.net,%s", vip, acmePort, relay),
		fmt.Sprintf("bad..lb.example.com,%s,%d", vip, acmePort),
		fmt.Sprintf("c.lb.example.com,99999,%d", acmePort),
		"",
		"# the next one is a copy of line 2",
		fmt.Sprintf("a.lb.example.com,%s,%d", vip, acmePort),
		fmt.Sprintf("d.lb.example.com,%s,%d,lb1@example.com,alice@example.net,%s", vip, acmePort, relay),
		fmt.Sprintf("e.lb.example.com,%s,%d,,,,,too,many", vip, acmePort),
	}, "\r\n")+"\r\n")
	orders := e.pebble.Orders()
	args := e.batchArgs(csv, append(deployArgs, "--http-addr", "127.0.0.1:1", "--reload-cmd", reload, "--vip-host", "127.0.0.1")...)
	r := e.runEnv(mailEnv, args...)
	if r.code != 2 {
		t.Fatalf("mixed file: exit %d, want 2 (partial)", r.code)
	}
	for _, want := range []string{
		csv + `:4: domain "bad..lb.example.com"`,
		csv + `:5: VIPPort "99999": want a port number 1-65535`,
		csv + ":8: a.lb.example.com is already in line 2",
		csv + ":10: 9 columns, want at most 7",
	} {
		if !strings.Contains(r.stderr, want) {
			t.Errorf("stderr lacks %q", want)
		}
	}
	if got := e.pebble.Orders() - orders; got != 3 {
		t.Fatalf("Pebble saw %d new orders, want 3: bad rows must not reach the CA", got)
	}
	if !strings.Contains(r.stdout, "7 rows: 3 issued, 4 invalid") {
		t.Errorf("summary: %s", r.stdout)
	}
	for _, n := range []string{"a.lb.example.com", "b.lb.example.com", "d.lb.example.com"} {
		serial := e.serial(n)
		if got := served(t, tlsAddr, n); got != serial {
			t.Errorf("haproxy serves %s for %s, want %s", got, n, serial)
		}
		meta := readFile(t, filepath.Join(e.dir, "live", n, "lineage.json"))
		if !strings.Contains(meta, `"verify_addr": "`+tlsAddr+`"`) || !strings.Contains(meta, `"http_addr": "127.0.0.1:`+fmt.Sprint(acmePort)+`"`) {
			t.Errorf("%s: VIPPort/ACMEPort not saved:\n%s", n, meta)
		}
	}
	if got := readFile(t, reloads); got != "reload\n" {
		t.Errorf("reloads: %q, want exactly one for the whole batch", got)
	}
	if !strings.Contains(r.stdout, "deploy ok, verify ok") {
		t.Errorf("VIPPort not verified: %s", r.stdout)
	}
	msgs := smtp.Messages()
	to := map[string]string{}
	for _, m := range msgs {
		to[m.To[0]] += m.Data
	}
	if len(msgs) != 2 || !strings.Contains(to["alice@example.net"], "ISSUED a.lb.example.com") || !strings.Contains(to["alice@example.net"], "ISSUED d.lb.example.com") ||
		strings.Contains(to["alice@example.net"], "b.lb.example.com") || !strings.Contains(to["bob@example.net"], "ISSUED b.lb.example.com") {
		t.Fatalf("want one mail each to alice (a, d) and bob (b), got %d: %v", len(msgs), to)
	}
	if smtp.AuthAttempts != 0 || !msgs[0].TLS {
		t.Fatalf("the rows' relay was sent AUTH %d times (TLS %v): the configured password went to another relay", smtp.AuthAttempts, msgs[0].TLS)
	}
	noSecret(t, "batch output", r.stdout, r.stderr)

	// The same file again: nothing to order, the bad rows still bad.
	orders = e.pebble.Orders()
	r = e.runEnv(mailEnv, args...)
	if r.code != 2 || e.pebble.Orders() != orders || !strings.Contains(r.stdout, "3 up to date, 4 invalid") {
		t.Fatalf("second run: exit %d, %d new orders, stdout %s", r.code, e.pebble.Orders()-orders, r.stdout)
	}
	if len(smtp.Messages()) != 2 {
		t.Fatal("a run that changed nothing sent mail")
	}
}

// TestBatchNamedFormat: the header-named format with webroot rows served
// by a real nginx on the validation port, several names per row, key
// types, and pre-flight failures (a route that does not reach lbcert, a
// name whose DNS points elsewhere) that never reach the CA.
func TestBatchNamedFormat(t *testing.T) {
	t.Parallel()
	e := newEnv(t, testenv.PebbleOptions{})
	webroot := filepath.Join(e.work, "acme")
	os.MkdirAll(webroot, 0o755)
	prefix := filepath.Join(e.work, "nginx")
	os.MkdirAll(prefix, 0o755)
	httpAddr := fmt.Sprintf("127.0.0.1:%d", e.pebble.HTTPPort)
	n, err := testenv.StartNginx(prefix, testenv.NginxConfig(prefix, fmt.Sprintf(`
    server {
        listen %s;
        location /.well-known/acme-challenge/ { root %s; }
    }`, httpAddr, webroot)), httpAddr)
	if err != nil {
		t.Fatal(err)
	}
	defer n.Stop()
	if err := e.pebble.SetA("moved.example.org", "127.0.0.2"); err != nil {
		t.Fatal(err)
	}
	elsewhere := freeAddr(t)
	csv := writeCSV(t, e.work, "customers.csv", "\xEF\xBB\xBF"+strings.Join([]string{
		"# customer sites",
		"domains,name,challenge,webroot,http_addr,key_type,deploy,verify_addr,mail_to",
		`"shop.example.net www.shop.example.net",shop,webroot,` + webroot + `,,rsa2048,none,,`,
		`blog.example.org,,,` + webroot + `,,,,,`,
		`api.example.org,,standalone,,` + elsewhere + `,,,,`,
		`moved.example.org,,,` + webroot + `,,,,,`,
		`typo.example.org,,,` + webroot + `,,ec999,,,`,
	}, "\n")+"\n")

	// --check reads and reports, and orders nothing.
	orders := e.pebble.Orders()
	r := e.run("batch", csv, "--check")
	if r.code != 1 || !strings.Contains(r.stderr, csv+`:7: key_type: --key-type "ec999"`) || !strings.Contains(r.stdout, "5 rows (named format): 4 good, 1 bad") {
		t.Fatalf("--check: exit %d\n%s%s", r.code, r.stdout, r.stderr)
	}
	r = e.run(e.batchArgs(csv, "--strict")...)
	if r.code != 1 || !strings.Contains(r.stderr, "1 bad rows; nothing was sent to the CA (--strict)") {
		t.Fatalf("--strict: exit %d %s", r.code, r.stderr)
	}
	r = e.run(e.batchArgs(csv, "--expect-ip", "127.0.0.1", "--concurrency", "3")...)
	if r.code != 2 {
		t.Fatalf("exit %d, want 2", r.code)
	}
	if got := e.pebble.Orders() - orders; got != 2 {
		t.Fatalf("Pebble saw %d orders, want 2 (shop, blog): pre-flight failures must not reach the CA", got)
	}
	if !strings.Contains(r.stderr, "pre-flight HTTP api.example.org: GET http://api.example.org:"+fmt.Sprint(e.pebble.HTTPPort)+"/.well-known/acme-challenge/") ||
		!strings.Contains(r.stderr, "404 Not Found") {
		t.Errorf("route pre-flight failure not reported: %s", r.stderr)
	}
	if !strings.Contains(r.stderr, "pre-flight DNS moved.example.org: it resolves to 127.0.0.2, which is not --expect-ip") {
		t.Errorf("DNS pre-flight failure not reported: %s", r.stderr)
	}
	shop := e.leaf("shop")
	if len(shop.DNSNames) != 2 || shop.PublicKeyAlgorithm.String() != "RSA" {
		t.Fatalf("shop: names %v key %s", shop.DNSNames, shop.PublicKeyAlgorithm)
	}
	e.leaf("blog.example.org")
	for _, name := range []string{"api.example.org", "moved.example.org"} {
		if _, err := os.Stat(filepath.Join(e.dir, "live", name)); err == nil {
			t.Errorf("%s was issued despite failing pre-flight", name)
		}
		// Pre-flight failures start no backoff: the fix works at once.
		if _, err := os.Stat(filepath.Join(e.dir, "renewal", name+".json")); err == nil {
			t.Errorf("%s: pre-flight failure recorded a backoff", name)
		}
	}
	if strings.Count(n.AccessLog(), "lbcert-preflight") < 3 {
		t.Errorf("nginx did not see the pre-flight requests:\n%s", n.AccessLog())
	}

	// Without pre-flight the two bad rows reach the CA and fail there:
	// that starts the backoff renew shares, and the next run leaves them
	// alone instead of spending more failed validations.
	orders = e.pebble.Orders()
	r = e.run(e.batchArgs(csv, "--preflight=false")...)
	if r.code != 2 || e.pebble.Orders()-orders != 2 || !strings.Contains(r.stdout, "2 up to date, 2 failed, 1 invalid") {
		t.Fatalf("without pre-flight: exit %d, %d orders\n%s", r.code, e.pebble.Orders()-orders, r.stdout)
	}
	for _, name := range []string{"api.example.org", "moved.example.org"} {
		if st := readFile(t, filepath.Join(e.dir, "renewal", name+".json")); !strings.Contains(st, `"failures": 1`) {
			t.Errorf("%s: no backoff after a CA failure:\n%s", name, st)
		}
	}
	if b := readFile(t, filepath.Join(e.dir, "ratelimit.json")); !strings.Contains(b, "api.example.org") {
		t.Errorf("failed validation not counted in the budget:\n%s", b)
	}
	orders = e.pebble.Orders()
	r = e.run(e.batchArgs(csv, "--preflight=false")...)
	if e.pebble.Orders() != orders || !strings.Contains(r.stdout, "2 deferred") || !strings.Contains(r.stdout, "waiting after earlier failures") {
		t.Fatalf("backoff not honoured: %d orders\n%s", e.pebble.Orders()-orders, r.stdout)
	}

	// --json: the run report, one item per row, with the outcomes.
	r = e.run(e.batchArgs(csv, "--json", "--preflight=false", "--expect-ip", "127.0.0.1")...)
	for _, want := range []string{`"version": 1`, `"command": "batch"`, `"outcome": "not_due"`, `"outcome": "invalid"`, `"format": "named"`, `"line": 7`} {
		if !strings.Contains(r.stdout, want) {
			t.Errorf("--json lacks %s:\n%s", want, r.stdout)
		}
	}
}

// TestBatchResume: Ctrl-C stops new orders and exits 130; kill -9 in the
// middle of the next run loses nothing and leaves nothing half-written;
// the same command then finishes the rest.
func TestBatchResume(t *testing.T) {
	t.Parallel()
	e := newEnv(t, testenv.PebbleOptions{})
	var rows []string
	names := make([]string, 8)
	for i := range names {
		names[i] = fmt.Sprintf("r%d.resume.example.com", i)
		rows = append(rows, fmt.Sprintf("%s,,%d", names[i], e.pebble.HTTPPort))
	}
	csv := writeCSV(t, e.work, "rows.csv", strings.Join(rows, "\n")+"\n")
	args := e.batchArgs(csv, "--concurrency", "1", "--http-addr", "127.0.0.1:1")
	ctx, cancel := context.WithTimeout(context.Background(), runDeadline)
	defer cancel()
	start := func() (*exec.Cmd, *bytes.Buffer) {
		cmd := e.command(ctx, args...)
		var out bytes.Buffer
		cmd.Stdout, cmd.Stderr = &out, &out
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		return cmd, &out
	}
	issued := func() int {
		n := 0
		for _, name := range names {
			if _, err := os.Stat(filepath.Join(e.dir, "live", name, "cert.pem")); err == nil {
				n++
			}
		}
		return n
	}
	waitIssued := func(n int) {
		for deadline := time.Now().Add(60 * time.Second); issued() < n; time.Sleep(50 * time.Millisecond) {
			if time.Now().After(deadline) {
				t.Fatalf("waited for %d certificates, have %d", n, issued())
			}
		}
	}

	cmd, out := start()
	waitIssued(1)
	cmd.Process.Signal(syscall.SIGINT)
	err := cmd.Wait()
	if ee, ok := err.(*exec.ExitError); !ok || ee.ExitCode() != 130 {
		t.Fatalf("after Ctrl-C: %v\n%s", err, out)
	}
	if !strings.Contains(out.String(), "not started") || issued() == len(names) {
		t.Fatalf("Ctrl-C did not stop new orders (%d issued):\n%s", issued(), out)
	}
	afterInt := issued()

	cmd, out = start()
	waitIssued(afterInt + 1)
	cmd.Process.Signal(syscall.SIGKILL)
	cmd.Wait()
	t.Logf("killed with %d of %d issued:\n%s", issued(), len(names), out)

	orders := e.settledOrders()
	r := e.run(args...)
	if r.code != 0 {
		t.Fatalf("resume: exit %d", r.code)
	}
	if issued() != len(names) {
		t.Fatalf("after resume %d of %d issued", issued(), len(names))
	}
	if got := e.pebble.Orders() - orders; got > len(names)-afterInt-1 {
		t.Fatalf("resume ordered %d, more than the %d rows left", got, len(names)-afterInt-1)
	}
	for _, name := range names {
		e.leaf(name) // parses, key matches, chain complete: nothing half-written
	}
	tmp, _ := filepath.Glob(filepath.Join(e.dir, "archive", "*", ".tmp*"))
	if len(tmp) > 0 {
		t.Fatalf("temporary files left: %v", tmp)
	}
}

// TestBatchPacing: with a budget of 2 orders, 4 rows give 2 certificates
// and 2 rows left for later; the budget is saved, so an immediate second
// run orders nothing, and renew shares it.
func TestBatchPacing(t *testing.T) {
	t.Parallel()
	e := newEnv(t, testenv.PebbleOptions{})
	var rows []string
	for i := range 4 {
		rows = append(rows, fmt.Sprintf("p%d.pace.example.com,,%d", i, e.pebble.HTTPPort))
	}
	csv := writeCSV(t, e.work, "pace.csv", strings.Join(rows, "\n")+"\n")
	args := e.batchArgs(csv, "--http-addr", "127.0.0.1:1", "--rate-orders", "2/1h", "--max-wait", "1s")
	orders := e.pebble.Orders()
	r := e.run(args...)
	if r.code != 2 || e.pebble.Orders()-orders != 2 || !strings.Contains(r.stdout, "2 issued, 2 deferred") ||
		!strings.Contains(r.stdout, "not ordered: the new-orders budget (2/1h per account) is spent; next attempt") {
		t.Fatalf("first run: exit %d, %d orders\n%s", r.code, e.pebble.Orders()-orders, r.stdout)
	}
	if !strings.Contains(readFile(t, filepath.Join(e.dir, "ratelimit.json")), `"orders"`) {
		t.Fatal("budget not saved")
	}
	r = e.run(args...)
	if r.code != 2 || e.pebble.Orders()-orders != 2 || !strings.Contains(r.stdout, "2 up to date, 2 deferred") {
		t.Fatalf("second run: exit %d, %d orders\n%s", r.code, e.pebble.Orders()-orders, r.stdout)
	}
	// issue spends the same budget: a new name is deferred too.
	r = e.run("issue", "-d", "p9.pace.example.com", "--standalone", "--http-addr", fmt.Sprintf("127.0.0.1:%d", e.pebble.HTTPPort),
		"--agree-tos", "--rate-orders", "2/1h", "--max-wait", "1s")
	if r.code != 2 || e.pebble.Orders()-orders != 2 || !strings.Contains(r.stderr, "not ordering p9.pace.example.com: the new-orders budget") {
		t.Fatalf("issue did not share the budget: exit %d, %d orders\n%s%s", r.code, e.pebble.Orders()-orders, r.stdout, r.stderr)
	}
	// A forced renewal counts, "replaces" or not: the CA exempts only a
	// renewal inside the window it suggested (issue --force in a loop is
	// what the budget is there to stop).
	r = e.run("renew", "--force", "--no-random-sleep", "--rate-orders", "2/1h", "--max-wait", "1s")
	if r.code != 2 || e.pebble.Orders()-orders != 2 || !strings.Contains(r.stdout, "2 deferred") {
		t.Fatalf("forced renewals past the spent budget: exit %d, %d orders\n%s%s", r.code, e.pebble.Orders()-orders, r.stdout, r.stderr)
	}
	// Renewals in the CA's ARI window (orders that carry "replaces") are
	// exempt, as Let's Encrypt exempts them: renew goes ahead, once.
	now := time.Now()
	for i := range 4 {
		name := fmt.Sprintf("p%d.pace.example.com", i)
		cert, err := os.ReadFile(filepath.Join(e.dir, "live", name, "cert.pem"))
		if err != nil {
			continue // deferred in the first run: never issued
		}
		if err := e.pebble.SetRenewalInfo(cert, now.Add(-48*time.Hour), now.Add(-24*time.Hour)); err != nil {
			t.Fatal(err)
		}
		// ARI is asked again now, not at the Retry-After the last answer
		// set.
		statusPath := filepath.Join(e.dir, "renewal", name+".json")
		var st map[string]any
		json.Unmarshal([]byte(readFile(t, statusPath)), &st)
		delete(st, "ari_next_check")
		data, _ := json.Marshal(st)
		os.WriteFile(statusPath, data, 0o600)
	}
	r = e.run("renew", "--no-random-sleep", "--rate-orders", "2/1h", "--max-wait", "1s")
	if r.code != 0 || e.pebble.Orders()-orders != 4 || !strings.Contains(r.stdout, "2 renewed") {
		t.Fatalf("ARI renewals held up by the budget: exit %d, %d orders\n%s%s", r.code, e.pebble.Orders()-orders, r.stdout, r.stderr)
	}
	orders = e.pebble.Orders()
	r = e.run(append(args, "--rate-orders", "off")...)
	if r.code != 0 || e.pebble.Orders()-orders != 2 {
		t.Fatalf("without the budget: exit %d, %d orders", r.code, e.pebble.Orders()-orders)
	}
}
