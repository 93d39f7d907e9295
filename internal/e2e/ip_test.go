package e2e

import (
	"crypto/tls"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/lbcert/lbcert/internal/testenv"
)

// servedNoSNI is the serial addr serves to a client that sends no server
// name, as a health check or a client dialling the VIP by address does.
func servedNoSNI(t *testing.T, addr string) string {
	t.Helper()
	conn, err := tls.DialWithDialer(&net.Dialer{Timeout: 3 * time.Second}, "tcp", addr, &tls.Config{InsecureSkipVerify: true})
	if err != nil {
		t.Fatalf("TLS to %s without SNI: %v", addr, err)
	}
	defer conn.Close()
	return fmt.Sprintf("%x", conn.ConnectionState().PeerCertificates[0].SerialNumber)
}

func servedNoSNIEventually(t *testing.T, addr, want string) {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(200 * time.Millisecond) {
		if servedNoSNI(t, addr) == want {
			return
		}
	}
	t.Fatalf("%s serves %s without SNI, want %s", addr, servedNoSNI(t, addr), want)
}

// TestIPCertificates: certificates for load-balancer addresses (RFC
// 8738). 127.0.0.1 is issued over HTTP-01 through the standalone
// listener, under the CA's shortlived profile since none was asked for,
// and deployed to a real nginx as its default_server, its chain checked
// to Pebble's root; 127.0.0.2 goes to a real HAProxy as the bind's
// default certificate. Both are served to clients that send no SNI and
// renewed with their profile; then 127.0.0.1 moves to HAProxy and is
// served there without SNI too; both are deleted.
func TestIPCertificates(t *testing.T) {
	t.Parallel()
	e := newEnv(t, testenv.PebbleOptions{ShortLived: true})
	port := e.pebble.HTTPPort

	// nginx: issue first (nginx cannot start without the files).
	r := e.mustRun("issue", "-d", "127.0.0.1", "--standalone", "--http-addr", fmt.Sprintf("127.0.0.1:%d", port), "--agree-tos")
	if !strings.Contains(r.stderr, "using the CA's shortlived profile") {
		t.Fatalf("no word about the profile picked:\n%s", r.stderr)
	}
	c := e.leaf("127.0.0.1")
	if len(c.IPAddresses) != 1 || !c.IPAddresses[0].Equal(net.ParseIP("127.0.0.1")) || len(c.DNSNames) != 0 {
		t.Fatalf("certificate names %v %v, want the address alone", c.IPAddresses, c.DNSNames)
	}
	if life := c.NotAfter.Sub(c.NotBefore); life > 7*24*time.Hour {
		t.Fatalf("lifetime %v: not the shortlived profile", life)
	}
	if meta := readFile(t, filepath.Join(e.dir, "live", "127.0.0.1", "lineage.json")); !strings.Contains(meta, `"profile": "shortlived"`) {
		t.Fatalf("the picked profile was not saved:\n%s", meta)
	}

	nginxTLS := freeAddr(t)
	prefix := filepath.Join(e.work, "nginx")
	os.MkdirAll(prefix, 0o755)
	live := filepath.Join(e.dir, "live", "127.0.0.1")
	n, err := testenv.StartNginx(prefix, testenv.NginxConfig(prefix, fmt.Sprintf(`
    server {
        listen %s ssl default_server;
        ssl_certificate %s/fullchain.pem;
        ssl_certificate_key %s/privkey.pem;
        return 200 "ok\n";
    }`, nginxTLS, live, live)), nginxTLS)
	if err != nil {
		t.Fatal(err)
	}
	defer n.Stop()
	if got := servedNoSNI(t, nginxTLS); got != e.serial("127.0.0.1") {
		t.Fatalf("nginx serves %s without SNI, want %s", got, e.serial("127.0.0.1"))
	}
	// The check also verifies the served chain to Pebble's root, with the
	// address as the name checked.
	roots, err := e.pebble.Roots()
	if err != nil {
		t.Fatal(err)
	}
	rootsFile := filepath.Join(e.work, "pebble-root.pem")
	os.WriteFile(rootsFile, roots, 0o644)
	r = e.mustRun("issue", "-d", "127.0.0.1", "--standalone", "--http-addr", fmt.Sprintf("127.0.0.1:%d", port), "--force",
		"--deploy", "nginx", "--nginx-conf", n.Conf, "--nginx-bin", n.Bin, "--verify-addr", nginxTLS, "--verify-roots", rootsFile)
	if !strings.Contains(r.stdout, "deployed, verified") {
		t.Fatalf("nginx deploy of the address lineage:\n%s", r.stdout)
	}
	servedNoSNIEventually(t, nginxTLS, e.serial("127.0.0.1"))

	// HAProxy: 127.0.0.2's PEM is the bind's first crt, so HAProxy
	// serves it when no SNI comes; the directory holds the rest.
	hdir := filepath.Join(e.work, "haproxy")
	certs := filepath.Join(hdir, "certs")
	os.MkdirAll(hdir, 0o755)
	haTLS := freeAddr(t)
	conf := filepath.Join(hdir, "haproxy.cfg")
	// The address's PEM first, then the directory (its copy loads once).
	os.WriteFile(conf, []byte(haproxyConfig(filepath.Join(hdir, "admin.sock"), haTLS, certs+"/127.0.0.2.pem crt "+certs)), 0o644)
	e.mustRun("issue", "-d", "127.0.0.2", "--standalone", "--http-addr", fmt.Sprintf("127.0.0.2:%d", port), "--agree-tos",
		"--deploy", "haproxy", "--haproxy-conf", conf, "--haproxy-certs", certs, "--reload-cmd", "true")
	// A name lineage beside it, served by SNI from the same bind.
	e.mustRun("issue", "-d", "named.example.com", "--standalone", "--http-addr", fmt.Sprintf("127.0.0.1:%d", port), "--agree-tos",
		"--profile", "default", "--deploy", "haproxy", "--haproxy-conf", conf, "--haproxy-certs", certs, "--reload-cmd", "true")
	h, err := testenv.StartHAProxy(hdir, conf, haTLS)
	if err != nil {
		t.Fatal(err)
	}
	defer h.Stop()
	if got := servedNoSNI(t, haTLS); got != e.serial("127.0.0.2") {
		t.Fatalf("HAProxy serves %s without SNI, want the address's %s", got, e.serial("127.0.0.2"))
	}
	if got := served(t, haTLS, "named.example.com"); got != e.serial("named.example.com") {
		t.Fatalf("HAProxy serves %s for named.example.com, want %s", got, e.serial("named.example.com"))
	}
	// Now running: updated over the runtime API and verified without SNI.
	r = e.mustRun("issue", "-d", "127.0.0.2", "--standalone", "--http-addr", fmt.Sprintf("127.0.0.2:%d", port), "--force",
		"--haproxy-socket", filepath.Join(hdir, "admin.sock"), "--verify-addr", haTLS)
	if !strings.Contains(r.stdout, "deployed, verified") {
		t.Fatalf("HAProxy deploy of the address lineage:\n%s", r.stdout)
	}
	servedNoSNIEventually(t, haTLS, e.serial("127.0.0.2"))

	// renew: both address lineages, their profile kept, deployed and
	// verified without SNI.
	before1, before2 := e.serial("127.0.0.1"), e.serial("127.0.0.2")
	r = e.mustRun("renew", "--force", "--no-random-sleep", "--name", "127.0.0.1", "--name", "127.0.0.2")
	if !strings.Contains(r.stdout, "2 renewed") {
		t.Fatalf("renew:\n%s%s", r.stdout, r.stderr)
	}
	for _, a := range []string{"127.0.0.1", "127.0.0.2"} {
		c := e.leaf(a)
		if life := c.NotAfter.Sub(c.NotBefore); life > 7*24*time.Hour {
			t.Fatalf("%s renewed with lifetime %v: the profile did not stick", a, life)
		}
	}
	if e.serial("127.0.0.1") == before1 || e.serial("127.0.0.2") == before2 {
		t.Fatal("not renewed")
	}
	servedNoSNIEventually(t, nginxTLS, e.serial("127.0.0.1"))
	servedNoSNIEventually(t, haTLS, e.serial("127.0.0.2"))

	// 127.0.0.1 moves from nginx to HAProxy: its PEM becomes the bind's
	// default, HAProxy reloads, and no-SNI clients get it there too.
	cfg := readFile(t, conf)
	os.WriteFile(conf, []byte(strings.Replace(cfg, "crt "+certs+"/127.0.0.2.pem ", "crt "+certs+"/127.0.0.1.pem ", 1)), 0o644)
	r = e.mustRun("issue", "-d", "127.0.0.1", "--standalone", "--http-addr", fmt.Sprintf("127.0.0.1:%d", port), "--force",
		"--deploy", "haproxy", "--haproxy-conf", conf, "--haproxy-certs", certs, "--verify-addr", haTLS,
		"--reload-cmd", fmt.Sprintf("kill -USR2 $(cat %s)", h.PIDFile))
	if !strings.Contains(r.stdout, "deployed, verified") {
		t.Fatalf("HAProxy deploy of 127.0.0.1:\n%s", r.stdout)
	}
	servedNoSNIEventually(t, haTLS, e.serial("127.0.0.1"))
	if life := e.leaf("127.0.0.1").NotAfter.Sub(e.leaf("127.0.0.1").NotBefore); life > 7*24*time.Hour {
		t.Fatalf("127.0.0.1 re-issued with lifetime %v: the profile did not stick", life)
	}

	if r := e.mustRun("list"); !strings.Contains(r.stdout, "127.0.0.2") {
		t.Fatalf("list does not show the address:\n%s", r.stdout)
	}
	// delete refuses while the config names the PEM; the operator drops
	// the line first.
	if r := e.run("delete", "--name", "127.0.0.1", "--yes"); r.code == 0 || !strings.Contains(r.stderr, "haproxy config still uses 127.0.0.1") {
		t.Fatalf("delete with the address still configured: exit %d\n%s", r.code, r.stderr)
	}
	cfg = readFile(t, conf)
	os.WriteFile(conf, []byte(strings.Replace(cfg, "crt "+certs+"/127.0.0.1.pem ", "", 1)), 0o644)
	n.Stop() // nginx served it before: done with it too
	for _, a := range []string{"127.0.0.1", "127.0.0.2"} {
		e.mustRun("delete", "--name", a, "--yes")
		if _, err := os.Stat(filepath.Join(certs, a+".pem")); !os.IsNotExist(err) {
			t.Fatalf("the deleted lineage's HAProxy PEM is still there: %v", err)
		}
		if _, err := os.Stat(filepath.Join(e.dir, "live", a)); !os.IsNotExist(err) {
			t.Fatalf("the deleted address lineage %s is still live: %v", a, err)
		}
	}
	if r := e.mustRun("list"); strings.Contains(r.stdout, "127.0.0.") {
		t.Fatalf("list still shows a deleted lineage:\n%s", r.stdout)
	}
}
