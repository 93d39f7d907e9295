package e2e

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	pemenc "encoding/pem"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/lbcert/lbcert/internal/testenv"
)

// served returns the serial (hex) of the leaf served at addr for SNI name.
func served(t *testing.T, addr, name string) string {
	t.Helper()
	conn, err := tls.DialWithDialer(&net.Dialer{Timeout: 3 * time.Second}, "tcp", addr, &tls.Config{ServerName: name, InsecureSkipVerify: true})
	if err != nil {
		t.Fatalf("TLS to %s for %s: %v", addr, name, err)
	}
	defer conn.Close()
	return fmt.Sprintf("%x", conn.ConnectionState().PeerCertificates[0].SerialNumber)
}

// servedEventually waits up to 10s for addr to serve want for name: a
// reload takes effect asynchronously.
func servedEventually(t *testing.T, addr, name, want string) {
	t.Helper()
	var got string
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(200 * time.Millisecond) {
		if got = served(t, addr, name); got == want {
			return
		}
	}
	t.Fatalf("%s serves %s for %s, want %s", addr, got, name, want)
}

func (e *env) serial(name string) string {
	return fmt.Sprintf("%x", e.leaf(name).SerialNumber)
}

func freeAddr(t *testing.T) string {
	p, err := testenv.FreePort()
	if err != nil {
		t.Fatal(err)
	}
	return fmt.Sprintf("127.0.0.1:%d", p)
}

// TestDeployNginx: issue and deploy to a real nginx, then the failure
// paths: a config that fails nginx -t, a failing reload command, a deploy
// hook's environment, and a hook that hangs past its timeout.
func TestDeployNginx(t *testing.T) {
	t.Parallel()
	e := newEnv(t, testenv.PebbleOptions{})
	http := fmt.Sprintf("127.0.0.1:%d", e.pebble.HTTPPort)
	tlsAddr := freeAddr(t)
	// This test forces many renewals of one set; the exact-set budget
	// (which counts forced renewals) is not what it is about.
	issue := []string{"issue", "-d", "site.example.com", "-d", "www.site.example.com", "--standalone", "--http-addr", http, "--agree-tos", "--rate-names", "off"}

	if r := e.mustRun(issue...); !strings.Contains(r.stdout, "  deploy    none (no --deploy target)") || strings.Contains(r.stdout, "deployed") {
		t.Fatalf("--deploy none said: %q", r.stdout)
	}
	v1 := e.serial("site.example.com")

	prefix := filepath.Join(e.work, "nginx")
	os.MkdirAll(prefix, 0o755)
	live := filepath.Join(e.dir, "live", "site.example.com")
	servers := fmt.Sprintf(`
    server {
        listen %s ssl;
        server_name site.example.com www.site.example.com;
        ssl_certificate %s/fullchain.pem;
        ssl_certificate_key %s/privkey.pem;
        return 200 "ok\n";
    }`, tlsAddr, live, live)
	conf := testenv.NginxConfig(prefix, servers)
	n, err := testenv.StartNginx(prefix, conf, tlsAddr)
	if err != nil {
		t.Fatal(err)
	}
	defer n.Stop()
	if got := served(t, tlsAddr, "site.example.com"); got != v1 {
		t.Fatalf("nginx serves %s, want %s", got, v1)
	}
	pid := n.MasterPID()

	// Deploy: test, reload, verify over TLS for every name.
	r := e.mustRun(append(issue, "--force", "--deploy", "nginx", "--nginx-conf", n.Conf, "--nginx-bin", n.Bin, "--verify-addr", tlsAddr)...)
	v2 := e.serial("site.example.com")
	if v2 == v1 || !strings.Contains(r.stdout, "deploy    deployed, verified") {
		t.Fatalf("deploy: v1 %s v2 %s stdout %q", v1, v2, r.stdout)
	}
	servedEventually(t, tlsAddr, "www.site.example.com", v2)
	if n.MasterPID() != pid {
		t.Fatal("nginx was restarted, not reloaded")
	}
	meta := readFile(t, filepath.Join(live, "lineage.json"))
	if !strings.Contains(meta, `"target": "nginx"`) || !strings.Contains(meta, `"verify_addr": "`+tlsAddr+`"`) {
		t.Fatalf("deploy settings not saved:\n%s", meta)
	}

	// A config that fails nginx -t: roll back, no reload, old cert served.
	os.WriteFile(n.Conf, []byte(conf+"\nthis_is_not_a_directive;\n"), 0o644)
	r = e.run(append(issue, "--force")...) // deploy settings come from the lineage
	if r.code != 1 || !strings.Contains(r.stderr, "nginx -t -c "+n.Conf+" failed") || !strings.Contains(r.stderr, "rolled back to the previous certificate") {
		t.Fatalf("broken config: exit %d stderr %s", r.code, r.stderr)
	}
	// stdout says so too, not only stderr and the exit code.
	if !strings.Contains(r.stdout, "  deploy    rolled back: nginx -t -c "+n.Conf+" failed") {
		t.Fatalf("stdout of a rolled-back deploy: %q", r.stdout)
	}
	if !strings.Contains(r.stderr, "this_is_not_a_directive") {
		t.Errorf("the error does not carry nginx's own output: %s", r.stderr)
	}
	if got := e.serial("site.example.com"); got != v2 {
		t.Fatalf("after rollback live/ has %s, want %s", got, v2)
	}
	if got := served(t, tlsAddr, "site.example.com"); got != v2 {
		t.Fatalf("after rollback nginx serves %s, want %s", got, v2)
	}
	if _, err := os.Stat(filepath.Join(e.dir, "archive", "site.example.com", "3", "cert.pem")); err != nil {
		t.Fatalf("the rolled-back version should stay in the archive: %v", err)
	}
	// A name's first certificate has nothing to roll back to: it is
	// taken out of the live files, and neither output names a previous
	// certificate or live paths that are not there.
	r = e.run("issue", "-d", "first.example.com", "--standalone", "--http-addr", http, "--agree-tos", "--deploy", "nginx", "--nginx-conf", n.Conf, "--nginx-bin", n.Bin)
	firstLive := filepath.Join(e.dir, "live", "first.example.com", "fullchain.pem")
	if r.code != 1 || strings.Contains(r.stderr, "previous certificate") || !strings.Contains(r.stderr, "taken out of the live files again, since this name had no certificate before") ||
		!strings.Contains(r.stdout, "  fullchain (none yet: kept in the archive, live at "+firstLive+" once deployed)") || strings.Contains(r.stdout, "  key ") {
		t.Fatalf("a first certificate's failed deploy: exit %d\nstdout %s\nstderr %s", r.code, r.stdout, r.stderr)
	}
	if _, err := os.Stat(firstLive); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("a first certificate whose deploy failed is live: %v", err)
	}
	if r := e.mustRun("show", "first.example.com"); !strings.Contains(r.stdout, "none live on this host yet") || strings.Contains(r.stdout, "privkey.pem") {
		t.Fatalf("show names live files that are not there:\n%s", r.stdout)
	}
	os.WriteFile(n.Conf, []byte(conf), 0o644)

	// A reload command that fails: the same rollback.
	r = e.run(append(issue, "--force", "--reload-cmd", "echo reload broke >&2; exit 3")...)
	if r.code != 1 || !strings.Contains(r.stderr, "reload broke") || !strings.Contains(r.stderr, "rolled back") {
		t.Fatalf("failing reload: exit %d stderr %s", r.code, r.stderr)
	}
	if got := e.serial("site.example.com"); got != v2 {
		t.Fatalf("after failed reload live/ has %s, want %s", got, v2)
	}

	// A deploy hook sees the documented environment, certbot's included.
	out := filepath.Join(e.work, "hook.env")
	e.mustRun(append(issue, "--force", "--deploy-hook", `env | grep -E '^(LBCERT_|RENEWED_)' | sort > `+out)...)
	env := readFile(t, out)
	v5 := e.serial("site.example.com")
	for _, want := range []string{
		"LBCERT_NAME=site.example.com",
		"LBCERT_DOMAINS=site.example.com www.site.example.com",
		"LBCERT_CERT_PATH=" + live + "/cert.pem",
		"LBCERT_KEY_PATH=" + live + "/privkey.pem",
		"LBCERT_CHAIN_PATH=" + live + "/chain.pem",
		"LBCERT_FULLCHAIN_PATH=" + live + "/fullchain.pem",
		"LBCERT_SERIAL=" + v5,
		"RENEWED_LINEAGE=" + live,
		"RENEWED_DOMAINS=site.example.com www.site.example.com",
	} {
		if !slices.Contains(strings.Split(env, "\n"), want) {
			t.Errorf("hook environment lacks %s:\n%s", want, env)
		}
	}
	servedEventually(t, tlsAddr, "site.example.com", v5)

	// lbcert's secrets never reach a hook, and a hook that prints what it
	// has and fails leaves no secret in the error line, the status file
	// or the spooled report.
	secrets := []string{"LBCERT_SMTP_PASSWORD=smtp-pw-e2e-secret", "LBCERT_EAB_HMAC_KEY=eab-e2e-secret", "LBCERT_SMTP_USER=ops",
		"LBCERT_SMTP_PORT=1", "LBCERT_MAIL_TO=ops@example.com", "LBCERT_SMTP_RETRY_DELAY=10ms"}
	r = e.runEnv(secrets, append(issue, "--force", "--deploy-hook", "env; echo smtp-pw-e2e-secret; exit 3")...)
	if r.code == 0 {
		t.Fatal("a failing hook passed")
	}
	leaks := r.stdout + r.stderr
	status, _ := os.ReadFile(filepath.Join(e.dir, "renewal", "site.example.com.json"))
	leaks += string(status)
	reports, _ := filepath.Glob(filepath.Join(e.dir, "reports", "*"))
	if len(reports) == 0 {
		t.Fatal("the unmailable report was not spooled")
	}
	for _, rp := range reports {
		leaks += readFile(t, rp)
	}
	for _, s := range []string{"smtp-pw-e2e-secret", "eab-e2e-secret"} {
		if strings.Contains(leaks, s) {
			t.Fatalf("secret %q leaked into output, status or report:\n%s", s, leaks)
		}
	}
	if !strings.Contains(leaks, "[secret]") || !strings.Contains(leaks, "LBCERT_NAME=site.example.com") {
		t.Fatalf("the hook's own output is not there, scrubbed:\n%s", leaks)
	}

	// A hook that hangs is killed at its timeout and fails the run.
	start := time.Now()
	r = e.run(append(issue, "--force", "--deploy-hook", "sleep 60", "--hook-timeout", "1s")...)
	if r.code != 1 || !strings.Contains(r.stderr, `deploy hook "sleep 60": timed out after 1s and was killed`) {
		t.Fatalf("hanging hook: exit %d stderr %s", r.code, r.stderr)
	}
	if d := time.Since(start); d > 30*time.Second {
		t.Fatalf("hanging hook held the run for %s", d)
	}
}

// haproxyConfig is a minimal HAProxy serving TLS on tlsAddr from the
// combined PEMs in certs, with an admin runtime socket.
func haproxyConfig(sock, tlsAddr, certs string) string {
	return fmt.Sprintf(`global
    stats socket %s level admin
defaults
    mode http
    timeout connect 2s
    timeout client 5s
    timeout server 5s
frontend tls
    bind %s ssl crt %s
    http-request return status 200 content-type text/plain string ok
`, sock, tlsAddr, certs)
}

// TestDeployHAProxy: combined PEMs in a crt directory, reload through a
// command, hot update over the runtime API with no reload, a new lineage
// added to the running HAProxy, and rollback when haproxy -c fails.
func TestDeployHAProxy(t *testing.T) {
	t.Parallel()
	e := newEnv(t, testenv.PebbleOptions{})
	http := fmt.Sprintf("127.0.0.1:%d", e.pebble.HTTPPort)
	tlsAddr := freeAddr(t)
	hdir := filepath.Join(e.work, "haproxy")
	certs := filepath.Join(hdir, "certs")
	os.MkdirAll(hdir, 0o755)
	sock := filepath.Join(hdir, "admin.sock")
	conf := filepath.Join(hdir, "haproxy.cfg")
	cfg := haproxyConfig(sock, tlsAddr, certs)
	os.WriteFile(conf, []byte(cfg), 0o644)
	pidfile := filepath.Join(hdir, "haproxy.pid")
	marker := filepath.Join(hdir, "reloaded")
	reload := fmt.Sprintf("touch %s; kill -USR2 $(cat %s)", marker, pidfile)

	issue := func(domain string, extra ...string) []string {
		return append([]string{"issue", "-d", domain, "--standalone", "--http-addr", http, "--agree-tos",
			"--deploy", "haproxy", "--haproxy-conf", conf, "--haproxy-certs", certs}, extra...)
	}
	// First certificate: HAProxy is not running yet, and cannot start
	// without one; the reload command is a no-op.
	e.mustRun(issue("lb.example.com", "--reload-cmd", "true")...)
	v1 := e.serial("lb.example.com")
	pem := readFile(t, filepath.Join(certs, "lb.example.com.pem"))
	if strings.Contains(pem, "\n\n") || !strings.Contains(pem, "PRIVATE KEY") || strings.Count(pem, "BEGIN CERTIFICATE") < 2 {
		t.Fatalf("combined PEM is not chain+key without blank lines:\n%s", pem)
	}
	if fi, _ := os.Stat(filepath.Join(certs, "lb.example.com.pem")); fi.Mode().Perm() != 0o600 {
		t.Fatalf("combined PEM mode %v, want 0600", fi.Mode())
	}

	h, err := testenv.StartHAProxy(hdir, conf, tlsAddr)
	if err != nil {
		t.Fatal(err)
	}
	defer h.Stop()
	if got := served(t, tlsAddr, "lb.example.com"); got != v1 {
		t.Fatalf("haproxy serves %s, want %s", got, v1)
	}

	// Reload through the command (kill -USR2 to the master).
	e.mustRun(issue("lb.example.com", "--force", "--reload-cmd", reload, "--verify-addr", tlsAddr)...)
	v2 := e.serial("lb.example.com")
	servedEventually(t, tlsAddr, "lb.example.com", v2)
	if _, err := os.Stat(marker); err != nil {
		t.Fatal("reload command did not run")
	}
	os.Remove(marker)
	time.Sleep(500 * time.Millisecond) // let the old worker finish
	workers := h.WorkerPIDs()
	master := h.MasterPID()

	// Hot update over the runtime API: no reload, same processes.
	r := e.mustRun(issue("lb.example.com", "--force", "--haproxy-socket", sock)...)
	v3 := e.serial("lb.example.com")
	if v3 == v2 || !strings.Contains(r.stdout, "deployed, verified") {
		t.Fatalf("hot update: %s", r.stdout)
	}
	if got := served(t, tlsAddr, "lb.example.com"); got != v3 {
		t.Fatalf("after hot update haproxy serves %s, want %s", got, v3)
	}
	if _, err := os.Stat(marker); err == nil {
		t.Fatal("hot update ran the reload command")
	}
	if h.MasterPID() != master || !slices.Equal(h.WorkerPIDs(), workers) {
		t.Fatalf("hot update changed processes: master %d->%d workers %v->%v", master, h.MasterPID(), workers, h.WorkerPIDs())
	}

	// A new lineage is added to the running HAProxy's crt-list, even
	// when HAProxy already holds an empty store of its name that no
	// crt-list serves (a run killed after its "new ssl cert"): setting
	// that store alone would serve nothing for the name.
	newPEM := filepath.Join(certs, "new.example.com.pem")
	if out := haproxyAPI(t, sock, "new ssl cert "+newPEM); !strings.Contains(out, "New empty certificate store") {
		t.Fatalf("new ssl cert: %q", out)
	}
	e.mustRun(issue("new.example.com", "--haproxy-socket", sock, "--reload-cmd", reload, "--verify-addr", tlsAddr)...)
	if got, want := served(t, tlsAddr, "new.example.com"), e.serial("new.example.com"); got != want {
		t.Fatalf("new lineage: served %s, want %s", got, want)
	}
	if _, err := os.Stat(marker); err == nil {
		t.Fatal("adding a lineage reloaded HAProxy")
	}
	if !slices.Equal(h.WorkerPIDs(), workers) {
		t.Fatal("adding a lineage changed the workers")
	}

	// A certificate transaction left open in HAProxy, holding another
	// lineage's PEM (a run killed between its set and its commit): the
	// next hot update aborts it instead of failing behind it, and never
	// commits it, which would serve lb.example.com's certificate for
	// new.example.com.
	if out := haproxyAPI(t, sock, "set ssl cert "+newPEM+" <<\n"+readFile(t, filepath.Join(certs, "lb.example.com.pem"))+"\n"); !strings.Contains(out, "Transaction created") {
		t.Fatalf("open a transaction: %q", out)
	}
	r = e.mustRun(issue("lb.example.com", "--force", "--haproxy-socket", sock)...)
	v4 := e.serial("lb.example.com")
	if got := served(t, tlsAddr, "lb.example.com"); got != v4 || !strings.Contains(r.stderr, "aborted a haproxy certificate transaction left open") {
		t.Fatalf("after a transaction left open: serves %s, want %s; stderr %s", got, v4, r.stderr)
	}
	if got, want := served(t, tlsAddr, "new.example.com"), e.serial("new.example.com"); got != want {
		t.Fatalf("new.example.com serves %s, want its own %s", got, want)
	}
	if out := haproxyAPI(t, sock, "show ssl cert"); strings.Contains(out, "# transaction") {
		t.Fatalf("a transaction is still open: %q", out)
	}

	// A PEM HAProxy refuses, through the runtime API: lb.example.com's
	// key is swapped for another, which no longer matches its
	// certificate, and a new reload command (a settings change) deploys
	// the same version again. HAProxy's "set ssl cert" refuses it, so
	// lbcert falls back to a reload; the config test before it reads
	// the same PEM and fails. The PEM is restored byte for byte, nothing
	// is reloaded, and HAProxy serves v4 still.
	keyPath := filepath.Join(e.dir, "live", "lb.example.com", "privkey.pem")
	goodKey := readFile(t, keyPath)
	other, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	der, _ := x509.MarshalECPrivateKey(other)
	if err := os.WriteFile(keyPath, pemenc.EncodeToMemory(&pemenc.Block{Type: "EC PRIVATE KEY", Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
	before := readFile(t, filepath.Join(certs, "lb.example.com.pem"))
	r = e.run(issue("lb.example.com", "--haproxy-socket", sock, "--reload-cmd", reload+"; true")...)
	if r.code != 1 || !strings.Contains(r.stderr, "testing the config and reloading instead") || !strings.Contains(r.stderr, "haproxy -c -f "+conf+" failed") || !strings.Contains(r.stderr, "rolled back") {
		t.Fatalf("a PEM HAProxy refuses: exit %d stderr %s", r.code, r.stderr)
	}
	if after := readFile(t, filepath.Join(certs, "lb.example.com.pem")); after != before {
		t.Fatal("combined PEM not restored after HAProxy refused it")
	}
	if _, err := os.Stat(marker); err == nil {
		t.Fatal("a PEM HAProxy refused was reloaded")
	}
	if got := served(t, tlsAddr, "lb.example.com"); got != v4 || !slices.Equal(h.WorkerPIDs(), workers) {
		t.Fatalf("after a refused PEM haproxy serves %s (want %s), workers %v (were %v)", got, v4, h.WorkerPIDs(), workers)
	}
	if out := haproxyAPI(t, sock, "show ssl cert"); strings.Contains(out, "# transaction") {
		t.Fatalf("a transaction is still open after a refused PEM: %q", out)
	}
	if err := os.WriteFile(keyPath, []byte(goodKey), 0o600); err != nil {
		t.Fatal(err)
	}

	// A config that does not pass "haproxy -c" (an operator's edit, not
	// yet reloaded) does not hold back a runtime-API update: the running
	// HAProxy tests the PEM itself, and the config test is for reloads.
	// The same new reload command as above deploys v4 again, with its
	// own key back, and no order (the CA allows five a week per name).
	os.WriteFile(conf, []byte(cfg+"frontend broken\n    bind %%%%\n"), 0o644)
	r = e.mustRun(issue("lb.example.com", "--haproxy-socket", sock, "--reload-cmd", reload+"; true")...)
	if !strings.Contains(r.stderr, "haproxy updated over its runtime API") || !strings.Contains(r.stdout, "deploy    deployed") {
		t.Fatalf("hot update beside a broken config: stdout %s stderr %s", r.stdout, r.stderr)
	}
	if got := served(t, tlsAddr, "lb.example.com"); got != v4 || !slices.Equal(h.WorkerPIDs(), workers) {
		t.Fatalf("hot update beside a broken config: serves %s, want %s; workers %v were %v", got, v4, h.WorkerPIDs(), workers)
	}
	if _, err := os.Stat(marker); err == nil {
		t.Fatal("hot update beside a broken config ran the reload command")
	}

	// The runtime API gone (its socket path names nothing) and the
	// config broken: the update fails, the config test before the
	// reload fails, and the PEM is restored byte for byte, live/ rolls
	// back, nothing is reloaded.
	before = readFile(t, filepath.Join(certs, "lb.example.com.pem"))
	r = e.run(issue("lb.example.com", "--force", "--haproxy-socket", filepath.Join(hdir, "gone.sock"), "--reload-cmd", reload)...)
	if r.code != 1 || !strings.Contains(r.stderr, "testing the config and reloading instead") || !strings.Contains(r.stderr, "haproxy -c -f "+conf+" failed") || !strings.Contains(r.stderr, "rolled back") {
		t.Fatalf("broken haproxy config: exit %d stderr %s", r.code, r.stderr)
	}
	if _, err := os.Stat(marker); err == nil {
		t.Fatal("a config that failed its test was reloaded")
	}
	if after := readFile(t, filepath.Join(certs, "lb.example.com.pem")); after != before {
		t.Fatal("combined PEM not restored after rollback")
	}
	if got := e.serial("lb.example.com"); got != v4 {
		t.Fatalf("live/ has %s after rollback, want %s", got, v4)
	}
	if got := served(t, tlsAddr, "lb.example.com"); got != v4 {
		t.Fatalf("haproxy serves %s after rollback, want %s", got, v4)
	}
}

// haproxyAPI sends one command to HAProxy's runtime API and returns its
// answer.
func haproxyAPI(t *testing.T, sock, cmd string) string {
	t.Helper()
	c, err := net.Dial("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	io.WriteString(c, cmd+"\n")
	c.(*net.UnixConn).CloseWrite()
	out, _ := io.ReadAll(c)
	return string(out)
}
