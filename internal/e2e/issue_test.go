package e2e

import (
	"context"
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/lbcert/lbcert/internal/testenv"
)

// TestIssueStandalone: a real certificate from Pebble through lbcert's own
// HTTP-01 listener, then the idempotence rules: same names do nothing,
// --force reissues, new names under the same --name replace.
func TestIssueStandalone(t *testing.T) {
	e := newEnv(t, testenv.PebbleOptions{})
	addr := fmt.Sprintf("127.0.0.1:%d", e.pebble.HTTPPort)
	r := e.mustRun("issue", "-d", "Shop.Example.NET.", "-d", "www.shop.example.net", "--standalone", "--http-addr", addr, "--agree-tos", "--email", "ops@lbcert.test")
	if !strings.Contains(r.stdout, "shop.example.net: issued certificate for shop.example.net, www.shop.example.net") {
		t.Fatalf("stdout: %q", r.stdout)
	}
	c1 := e.leaf("shop.example.net")
	if got := c1.DNSNames; !slices.Equal(sorted(got), []string{"shop.example.net", "www.shop.example.net"}) {
		t.Fatalf("SANs = %v", got)
	}
	if life := c1.NotAfter.Sub(c1.NotBefore); life < 89*24*3600e9 {
		t.Fatalf("lifetime %v, want the 90-day default profile", life)
	}
	checkModes(t, e.dir, "shop.example.net")
	meta := readFile(t, filepath.Join(e.dir, "live", "shop.example.net", "lineage.json"))
	for _, want := range []string{`"mode": "standalone"`, `"http_addr": "` + addr + `"`, `"key_type": "ec256"`, fmt.Sprintf(`"serial": "%x"`, c1.SerialNumber), `"ari_cert_id": "`} {
		if !strings.Contains(meta, want) {
			t.Errorf("lineage.json lacks %s:\n%s", want, meta)
		}
	}
	accounts, _ := filepath.Glob(filepath.Join(e.dir, "accounts", "*", "ops@lbcert.test", "account.key"))
	if len(accounts) != 1 {
		t.Fatalf("account key: %v", accounts)
	}

	// Same names again: nothing to do, no order, exit 0. issue follows
	// renew's due rule, so the first time it asks the CA's renewal window
	// (ARI); the answer is saved, and a third run asks the CA nothing.
	orders := e.pebble.Orders()
	r = e.mustRun("issue", "-d", "shop.example.net", "-d", "www.shop.example.net", "--standalone", "--http-addr", addr, "--email", "ops@lbcert.test")
	if !strings.Contains(r.stdout, "nothing to do") {
		t.Fatalf("second issue: %q", r.stdout)
	}
	if n := e.pebble.Orders(); n != orders {
		t.Fatalf("second issue placed %d orders", n-orders)
	}
	before := e.requests()
	e.mustRun("issue", "-d", "shop.example.net", "-d", "www.shop.example.net", "--standalone", "--http-addr", addr, "--email", "ops@lbcert.test")
	if n := e.requests(); n != before {
		t.Fatalf("third issue sent %d requests to the CA", n-before)
	}
	if e.leaf("shop.example.net").SerialNumber.Cmp(c1.SerialNumber) != 0 {
		t.Fatal("second issue changed the certificate")
	}

	// --force issues anyway, reusing the registered account (no new
	// account request), and the archive keeps the previous version.
	signups := strings.Count(e.pebble.FullLog(), "POST /sign-me-up")
	e.mustRun("issue", "-d", "shop.example.net", "-d", "www.shop.example.net", "--standalone", "--http-addr", addr, "--email", "ops@lbcert.test", "--force", "--key-type", "rsa2048")
	c2 := e.leaf("shop.example.net")
	if c2.SerialNumber.Cmp(c1.SerialNumber) == 0 || c2.PublicKeyAlgorithm.String() != "RSA" {
		t.Fatalf("--force: serial %x key %v", c2.SerialNumber, c2.PublicKeyAlgorithm)
	}
	if n := strings.Count(e.pebble.FullLog(), "POST /sign-me-up"); n != signups {
		t.Errorf("--force sent %d account registrations; the saved account should be reused", n-signups)
	}
	for _, v := range []string{"1", "2"} {
		if _, err := os.Stat(filepath.Join(e.dir, "archive", "shop.example.net", v, "cert.pem")); err != nil {
			t.Errorf("archive version %s: %v", v, err)
		}
	}

	// Different names under the same --name replace the certificate.
	e.mustRun("issue", "--name", "shop.example.net", "-d", "shop.example.net", "--standalone", "--http-addr", addr, "--email", "ops@lbcert.test")
	if got := e.leaf("shop.example.net").DNSNames; !slices.Equal(got, []string{"shop.example.net"}) {
		t.Fatalf("after new names: SANs = %v", got)
	}

	// --reuse-key keeps the private key across a reissue.
	key1 := readFile(t, filepath.Join(e.dir, "live", "shop.example.net", "privkey.pem"))
	e.mustRun("issue", "-d", "shop.example.net", "--standalone", "--http-addr", addr, "--email", "ops@lbcert.test", "--force", "--reuse-key")
	if key2 := readFile(t, filepath.Join(e.dir, "live", "shop.example.net", "privkey.pem")); key2 != key1 {
		t.Fatal("--reuse-key made a new key")
	}
}

// TestIssueWebrootThroughNginx: HTTP-01 answered by a real nginx serving
// the webroot with the README's location block; Pebble's validation
// requests show up in nginx's access log.
func TestIssueWebrootThroughNginx(t *testing.T) {
	e := newEnv(t, testenv.PebbleOptions{})
	webroot := filepath.Join(e.work, "www")
	os.MkdirAll(webroot, 0o755)
	prefix := filepath.Join(e.work, "nginx")
	os.MkdirAll(prefix, 0o755)
	addr := fmt.Sprintf("127.0.0.1:%d", e.pebble.HTTPPort)
	conf := testenv.NginxConfig(prefix, fmt.Sprintf(`
    server {
        listen %s;
        server_name _;
        location ^~ /.well-known/acme-challenge/ {
            root %s;
            default_type text/plain;
        }
        location / { return 404; }
    }`, addr, webroot))
	n, err := testenv.StartNginx(prefix, conf, addr)
	if err != nil {
		t.Fatal(err)
	}
	defer n.Stop()

	e.mustRun("issue", "-d", "blog.example.org", "-d", "www.blog.example.org", "--webroot", webroot, "--agree-tos")
	c := e.leaf("blog.example.org")
	if !slices.Equal(sorted(c.DNSNames), []string{"blog.example.org", "www.blog.example.org"}) {
		t.Fatalf("SANs = %v", c.DNSNames)
	}
	log := n.AccessLog()
	if got := strings.Count(log, "GET /.well-known/acme-challenge/"); got < 2 || !strings.Contains(log, `" 200 `) {
		t.Fatalf("nginx served %d challenge requests; access log:\n%s", got, log)
	}
	entries, _ := os.ReadDir(webroot)
	if len(entries) != 0 {
		t.Fatalf("webroot not cleaned up: %v", entries)
	}
	meta := readFile(t, filepath.Join(e.dir, "live", "blog.example.org", "lineage.json"))
	if !strings.Contains(meta, `"webroot": "`+webroot+`"`) {
		t.Fatalf("lineage.json lacks the webroot:\n%s", meta)
	}
}

// TestIssueValidationFailure: nothing answers on the HTTP-01 port, so the
// CA refuses; lbcert says so in one error line plus a hint, exits 1 and
// saves nothing.
func TestIssueValidationFailure(t *testing.T) {
	e := newEnv(t, testenv.PebbleOptions{})
	webroot := filepath.Join(e.work, "www")
	os.MkdirAll(webroot, 0o755)
	r := e.run("issue", "-d", "nobody-home.example.com", "--webroot", webroot, "--agree-tos")
	if r.code != 1 {
		t.Fatalf("exit %d, want 1", r.code)
	}
	if !strings.Contains(r.stderr, "lbcert: error: obtain nobody-home.example.com: connection: ") ||
		!strings.Contains(r.stderr, "lbcert: hint: the CA could not connect on port 80") {
		t.Fatalf("stderr: %s", r.stderr)
	}
	if _, err := os.Stat(filepath.Join(e.dir, "live", "nobody-home.example.com")); !os.IsNotExist(err) {
		t.Fatalf("a failed issue left live/: %v", err)
	}
}

// TestBadInputNeverReachesCA runs bad inputs against a live Pebble and
// counts its requests: none may arrive, and no state may be written.
func TestBadInputNeverReachesCA(t *testing.T) {
	e := newEnv(t, testenv.PebbleOptions{})
	webroot := filepath.Join(e.work, "www")
	os.MkdirAll(webroot, 0o755)
	haConf := filepath.Join(e.work, "haproxy.cfg")
	os.WriteFile(haConf, []byte("global\n"), 0o600)
	before := e.requests()
	for _, args := range [][]string{
		{"-d", "ok.example.com", "--webroot", webroot, "--deploy", "haproxy", "--haproxy-conf", haConf,
			"--haproxy-certs", filepath.Join(e.work, "a;b"), "--haproxy-socket", filepath.Join(e.work, "admin.sock")},
		{"-d", "*.example.com", "--webroot", webroot},
		{"-d", "10.0.0.0/8", "--webroot", webroot},
		{"-d", "127.000.000.001", "--webroot", webroot},
		{"-d", "bad_name.example.com", "--webroot", webroot},
		{"-d", "ok.example.com", "--name", "../x", "--webroot", webroot},
		{"-d", "ok.example.com", "--webroot", filepath.Join(e.work, "missing")},
		{"-d", "ok.example.com", "--standalone", "--http-addr", fmt.Sprintf("127.0.0.1:%d", e.pebble.HTTPPort), "--key-type", "dsa"},
	} {
		r := e.run(append([]string{"issue", "--agree-tos"}, args...)...)
		if r.code != 1 || strings.Count(r.stderr, "\n") != 1 || !strings.HasPrefix(r.stderr, "lbcert: error: ") {
			t.Errorf("%v: exit %d, stderr %q; want one error line and exit 1", args, r.code, r.stderr)
		}
	}
	if n := e.requests(); n != before {
		t.Fatalf("bad input sent %d requests to Pebble", n-before)
	}
	if _, err := os.Stat(e.dir); !os.IsNotExist(err) {
		t.Fatalf("bad input created the state directory: %v", err)
	}
}

func checkModes(t *testing.T, dir, name string) {
	t.Helper()
	for path, want := range map[string]os.FileMode{
		filepath.Join(dir, "live", name, "privkey.pem"): 0o600,
		filepath.Join(dir, "live", name, "cert.pem"):    0o644,
		filepath.Join(dir, "archive", name):             0o700 | os.ModeDir,
		filepath.Join(dir, "live"):                      0o700 | os.ModeDir,
		filepath.Join(dir, "accounts"):                  0o700 | os.ModeDir,
	} {
		fi, err := os.Stat(path)
		if err != nil || fi.Mode() != want {
			t.Errorf("%s: mode %v, %v; want %v", path, fi.Mode(), err, want)
		}
	}
	keys, _ := filepath.Glob(filepath.Join(dir, "accounts", "*", "*", "account.key"))
	for _, k := range keys {
		if fi, _ := os.Stat(k); fi.Mode() != 0o600 {
			t.Errorf("%s: mode %v", k, fi.Mode())
		}
	}
}

func readFile(t *testing.T, p string) string {
	t.Helper()
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

func sorted(s []string) []string {
	s = slices.Clone(s)
	slices.Sort(s)
	return s
}

// TestUnwritableDir: as a user who cannot create the state directory,
// lbcert says so and what to do (run as root, or --dir), and asks the CA
// nothing.
func TestUnwritableDir(t *testing.T) {
	e := newEnv(t, testenv.PebbleOptions{})
	setpriv, err := exec.LookPath("setpriv")
	if err != nil {
		t.Fatalf("setpriv (util-linux) is needed to run lbcert as another user: %v", err)
	}
	os.Chmod(filepath.Dir(lbcertBin), 0o755)
	www, err := os.MkdirTemp("", "lbcert-www-") // t.TempDir's parents are 0700
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(www)
	os.Chmod(www, 0o777)
	before := e.requests()
	// Under the suite's deadline like every run (setpriv execs lbcert, so
	// the SIGQUIT reaches it and its goroutine dump is in out).
	ctx, cancel := context.WithTimeout(context.Background(), runDeadline)
	defer cancel()
	cmd := exec.CommandContext(ctx, setpriv, "--reuid=nobody", "--regid=nogroup", "--clear-groups", lbcertBin,
		"--server", e.pebble.DirectoryURL, "--ca-bundle", e.pebble.CABundle, "--dir", filepath.Join(e.work, "state"),
		"--config", os.DevNull, "issue", "-d", "ok.example.com", "--webroot", www, "--agree-tos")
	cmd.Cancel = func() error { return cmd.Process.Signal(syscall.SIGQUIT) }
	cmd.WaitDelay = 10 * time.Second
	out, err := cmd.CombinedOutput()
	if ctx.Err() != nil {
		t.Fatalf("lbcert as nobody: still running after %s:\n%s", runDeadline, out)
	}
	if err == nil || !strings.Contains(string(out), "permission denied") ||
		!strings.Contains(string(out), "lbcert: hint: run lbcert as root (the default --dir /etc/lbcert is root's), or pass --dir") {
		t.Fatalf("exit %v:\n%s", err, out)
	}
	if e.requests() != before {
		t.Fatal("an unusable state directory reached the CA")
	}
}

// TestPreferredChain: Pebble offers a second chain to another root;
// --preferred-chain picks it by the root's name, the choice sticks on
// renew, and without it the CA's default chain is kept. The leaf never
// asks for Must-Staple (Let's Encrypt runs no OCSP).
func TestPreferredChain(t *testing.T) {
	t.Parallel()
	e := newEnv(t, testenv.PebbleOptions{AlternateRoots: 1})
	http := fmt.Sprintf("127.0.0.1:%d", e.pebble.HTTPPort)
	rootCN := func(i int) string {
		data, err := e.pebble.Root(i)
		if err != nil {
			t.Fatal(err)
		}
		b, _ := pem.Decode(data)
		c, err := x509.ParseCertificate(b.Bytes)
		if err != nil {
			t.Fatal(err)
		}
		return c.Subject.CommonName
	}
	topIssuer := func(name string) string {
		data := readFile(t, filepath.Join(e.dir, "live", name, "chain.pem"))
		var last *x509.Certificate
		for rest := []byte(data); ; {
			var b *pem.Block
			if b, rest = pem.Decode(rest); b == nil {
				break
			}
			last, _ = x509.ParseCertificate(b.Bytes)
		}
		return last.Issuer.CommonName
	}
	alt := rootCN(1)
	e.mustRun("issue", "-d", "default.example.com", "--standalone", "--http-addr", http, "--agree-tos")
	if got := topIssuer("default.example.com"); got != rootCN(0) {
		t.Fatalf("default chain tops at %q, want %q", got, rootCN(0))
	}
	e.mustRun("issue", "-d", "alt.example.com", "--standalone", "--http-addr", http, "--agree-tos", "--preferred-chain", alt)
	if got := topIssuer("alt.example.com"); got != alt {
		t.Fatalf("--preferred-chain %q: chain tops at %q", alt, got)
	}
	e.mustRun("renew", "--force", "--no-random-sleep", "--name", "alt.example.com")
	if got := topIssuer("alt.example.com"); got != alt {
		t.Fatalf("after renew the chain tops at %q, want %q: the choice did not stick", got, alt)
	}
	mustStaple := []int{1, 3, 6, 1, 5, 5, 7, 1, 24} // id-pe-tlsfeature
	for _, n := range []string{"default.example.com", "alt.example.com"} {
		for _, ext := range e.leaf(n).Extensions {
			if ext.Id.Equal(mustStaple) {
				t.Fatalf("%s carries the TLS Feature (Must-Staple) extension", n)
			}
		}
	}
}

// A loop that issues one set of names again and again as new lineages
// (no ARI "replaces", which Let's Encrypt exempts from every limit, once
// per certificate) is stopped by lbcert's own budget at the CA's 5
// certificates per exact set per 7 days, with a line that says so,
// before the CA has to: Pebble sees 5 orders, not 6.
func TestIssueLoopStopsAtTheExactSetLimit(t *testing.T) {
	t.Parallel()
	e := newEnv(t, testenv.PebbleOptions{})
	addr := fmt.Sprintf("127.0.0.1:%d", e.pebble.HTTPPort)
	issue := func(i int) result {
		return e.run("issue", "-d", "loop.example.com", "--name", fmt.Sprintf("loop%d", i), "--standalone", "--http-addr", addr, "--agree-tos")
	}
	for i := range 5 {
		if r := issue(i); r.code != 0 {
			t.Fatalf("certificate %d: exit %d\n%s", i+1, r.code, r.stderr)
		}
	}
	before := e.pebble.Orders()
	r := issue(5)
	if r.code == 0 || !strings.Contains(r.stderr, "not ordering loop5: 5 certificates for exactly these names") || !strings.Contains(r.stderr, "--rate-names") {
		t.Fatalf("the sixth certificate for one set of names: exit %d\n%s", r.code, r.stderr)
	}
	if got := e.pebble.Orders() - before; got != 0 {
		t.Fatalf("the refused sixth placed %d orders at the CA", got)
	}
	if got := e.pebble.Issued(); got != 5 {
		t.Fatalf("Pebble issued %d certificates, want 5", got)
	}
}
