package e2e

import (
	"bufio"
	"crypto/tls"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/lbcert/lbcert/internal/testenv"
)

// nobody is the unprivileged user nginx's workers run as in these
// tests, as Debian's nginx runs them as www-data.
const nobody = 65534

// TestNginxIncludeServesEveryLineage: with --nginx-include, a real nginx
// whose master runs as root and whose workers run as nobody serves every
// name of a two-name lineage and of a lineage issued without --deploy,
// serves clients without SNI from the default server (the first block),
// and no private key the config names is readable by the workers' user.
// renew rewrites the file (one test, one reload); a broken server body
// rolls the run back with the file restored byte for byte; delete takes a
// lineage's block out (one issued without --deploy included), and an
// include file with no lineage left passes nginx -t.
func TestNginxIncludeServesEveryLineage(t *testing.T) {
	t.Parallel()
	e := newEnv(t, testenv.PebbleOptions{})
	http := fmt.Sprintf("127.0.0.1:%d", e.pebble.HTTPPort)
	tlsAddr, plain := freeAddr(t), freeAddr(t)
	prefix := filepath.Join(e.work, "nginx")
	os.MkdirAll(filepath.Join(prefix, "conf.d"), 0o755)
	body := filepath.Join(prefix, "lbcert-server.conf")
	goodBody := fmt.Sprintf("listen %s ssl;\nreturn 200 \"ok\\n\";\n", tlsAddr)
	os.WriteFile(body, []byte(goodBody), 0o644)
	include := filepath.Join(prefix, "conf.d", "lbcert.conf")
	// Debian's layout: conf.d/*.conf included in http, matching nothing
	// until lbcert writes its file.
	conf := testenv.NginxConfigAs(prefix, "nobody nogroup",
		fmt.Sprintf("    server { listen %s; return 204; }\n    include %s/conf.d/*.conf;", plain, prefix))
	n, err := testenv.StartNginx(prefix, conf, plain)
	if err != nil {
		t.Fatal(err)
	}
	defer n.Stop()
	if workers := workerUIDs(t, n.MasterPID()); len(workers) == 0 || workers[0] != nobody {
		t.Fatalf("nginx workers run as %v, want uid %d", workers, nobody)
	}

	e.mustRun("issue", "-d", "b.example.com", "--standalone", "--http-addr", http, "--agree-tos")
	issueA := []string{"issue", "-d", "a.example.com", "-d", "www.a.example.com", "--standalone", "--http-addr", http,
		"--deploy", "nginx", "--nginx-conf", n.Conf, "--nginx-bin", n.Bin, "--nginx-include", include, "--nginx-server-body", body,
		"--verify-addr", tlsAddr}
	if r := e.mustRun(issueA...); !strings.Contains(r.stdout, "deploy    deployed, verified") {
		t.Fatalf("issue with --nginx-include: %s", r.stdout)
	}
	a1, b1 := e.serial("a.example.com"), e.serial("b.example.com")
	for name, want := range map[string]string{"a.example.com": a1, "www.a.example.com": a1, "b.example.com": b1} {
		if got := served(t, tlsAddr, name); got != want {
			t.Errorf("SNI %s: served %s, want %s", name, got, want)
		}
	}
	if got := servedNoSNI(t, tlsAddr); got != a1 {
		t.Errorf("no SNI: served %s, want the default server's (a.example.com, the first block) %s", got, a1)
	}
	if got := keysUnreadable(t, n, nobody); got != 2 {
		t.Errorf("nginx -T names %d private keys, want 2 (one per lineage)", got)
	}
	meta := readFile(t, filepath.Join(e.dir, "live", "a.example.com", "lineage.json"))
	if !strings.Contains(meta, `"nginx_include": "`+include+`"`) || !strings.Contains(meta, `"nginx_server_body": "`+body+`"`) {
		t.Errorf("the include settings are not saved with the lineage:\n%s", meta)
	}
	pid := n.MasterPID()

	// renew: both lineages renewed, the file rewritten once, nginx
	// tested and reloaded once, every name on its new certificate.
	before := readFile(t, include)
	e.mustRun("renew", "--force", "--no-random-sleep")
	a2, b2 := e.serial("a.example.com"), e.serial("b.example.com")
	if a2 == a1 || b2 == b1 {
		t.Fatal("renew --force renewed nothing")
	}
	after := readFile(t, include)
	if after == before || !strings.Contains(after, "# a.example.com (version 2): a.example.com www.a.example.com") ||
		!strings.Contains(after, "# b.example.com (version 2): b.example.com") {
		t.Fatalf("include file after renew:\n%s", after)
	}
	servedEventually(t, tlsAddr, "www.a.example.com", a2)
	servedEventually(t, tlsAddr, "b.example.com", b2)
	if n.MasterPID() != pid {
		t.Fatal("nginx was restarted, not reloaded")
	}

	// A broken server body: nginx -t fails, the run rolls back, and the
	// include file is the one before the run, byte for byte.
	os.WriteFile(body, []byte(goodBody+"no_such_directive on;\n"), 0o644)
	r := e.run("issue", "-d", "a.example.com", "-d", "www.a.example.com", "--standalone", "--http-addr", http, "--force")
	if r.code != 1 || !strings.Contains(r.stderr, "nginx -t -c "+n.Conf+" failed") || !strings.Contains(r.stderr, "no_such_directive") {
		t.Fatalf("deploy with a broken body: exit %d\n%s", r.code, r.stderr)
	}
	if got := readFile(t, include); got != after {
		t.Fatalf("include file not restored byte for byte:\n%s\nwant:\n%s", got, after)
	}
	if got := e.serial("a.example.com"); got != a2 {
		t.Fatalf("live certificate %s after the rollback, want %s", got, a2)
	}
	os.WriteFile(body, []byte(goodBody), 0o644)

	// delete b, issued without --deploy: its block leaves a's include
	// file and nginx is reloaded before its files go.
	r = e.mustRun("delete", "--name", "b.example.com", "--yes")
	if !strings.Contains(r.stdout, "b.example.com: removed from "+include+", nginx reloaded") {
		t.Fatalf("delete of a lineage without --deploy: %s", r.stdout)
	}
	if got := readFile(t, include); strings.Contains(got, "b.example.com") {
		t.Fatalf("include file still names the deleted lineage:\n%s", got)
	}
	servedEventually(t, tlsAddr, "b.example.com", a2) // the default server now
	if got := keysUnreadable(t, n, nobody); got != 1 {
		t.Errorf("nginx -T names %d private keys after the delete, want 1", got)
	}

	// The last lineage: an include file with no block passes nginx -t.
	e.mustRun("delete", "--name", "a.example.com", "--yes")
	if got := readFile(t, include); strings.Contains(got, "server {") {
		t.Fatalf("include file with no lineage:\n%s", got)
	}
	if out, err := exec.Command(n.Bin, "-t", "-c", n.Conf).CombinedOutput(); err != nil {
		t.Fatalf("nginx -t with the empty include file: %v\n%s", err, out)
	}
	waitNoTLS(t, tlsAddr)
}

// TestFleetAgentNginxInclude: a fleet node's agent deploys with its own
// --nginx-include settings: a lineage another node orders is served by
// the node's nginx (workers as nobody) for both its names and without
// SNI, no key the config names readable by the workers' user.
func TestFleetAgentNginxInclude(t *testing.T) {
	t.Parallel()
	f := newFleet(t, "lb1", "lb2")
	f.form()
	prefix := filepath.Join(f.work, "nginx-lb2")
	os.MkdirAll(prefix, 0o755)
	tlsAddr, plain := freeAddr(t), freeAddr(t)
	body := filepath.Join(prefix, "lbcert-server.conf")
	os.WriteFile(body, []byte(fmt.Sprintf("listen %s ssl;\nreturn 200;\n", tlsAddr)), 0o644)
	include := filepath.Join(prefix, "lbcert.conf")
	os.WriteFile(include, nil, 0o644) // the include line is there before the first certificate
	conf := testenv.NginxConfigAs(prefix, "nobody nogroup", fmt.Sprintf("    server { listen %s; return 204; }\n    include %s;", plain, include))
	n, err := testenv.StartNginx(prefix, conf, plain)
	if err != nil {
		t.Fatal(err)
	}
	defer n.Stop()
	f.startAgent("lb1")
	f.startAgent("lb2", "--deploy", "nginx", "--nginx-conf", n.Conf, "--nginx-bin", n.Bin,
		"--nginx-include", include, "--nginx-server-body", body, "--reconcile", "2s")
	f.validateVia(f.order...)

	f.mustOn("lb1", "issue", "-d", "two.example.com", "-d", "www.two.example.com", "--agree-tos")
	serial := f.fleetSerial("two.example.com")
	for _, name := range []string{"two.example.com", "www.two.example.com"} {
		waitServed(t, tlsAddr, name, serial, 30*time.Second)
	}
	if got := servedNoSNI(t, tlsAddr); got != serial {
		t.Errorf("no SNI: served %s, want %s", got, serial)
	}
	if got := keysUnreadable(t, n, nobody); got != 1 {
		t.Errorf("nginx -T names %d private keys, want 1", got)
	}
}

// keysUnreadable checks every ssl_certificate_key that "nginx -T" shows:
// the file (through live/'s symbolic link) is root's and no one else's,
// and a process with uid's credentials fails to read it, while the same
// process reads /etc/passwd (so the failure is the key's permissions).
// It returns how many keys it checked.
func keysUnreadable(t *testing.T, n *testenv.Nginx, uid uint32) int {
	t.Helper()
	out, err := exec.Command(n.Bin, "-T", "-c", n.Conf).Output()
	if err != nil {
		t.Fatalf("nginx -T: %v", err)
	}
	if err := readAs(uid, "/etc/passwd"); err != nil {
		t.Fatalf("a process as uid %d cannot read /etc/passwd either: %v", uid, err)
	}
	keys := regexp.MustCompile(`(?m)^\s*ssl_certificate_key\s+(\S+);`).FindAllStringSubmatch(string(out), -1)
	for _, m := range keys {
		p := m[1]
		fi, err := os.Stat(p)
		if err != nil {
			t.Fatalf("%s: %v", p, err)
		}
		if st := fi.Sys().(*syscall.Stat_t); fi.Mode().Perm()&0o077 != 0 || st.Uid != 0 {
			t.Errorf("%s: mode %04o, owner %d: others may read it", p, fi.Mode().Perm(), st.Uid)
		}
		if err := readAs(uid, p); err == nil || !strings.Contains(err.Error(), "Permission denied") {
			t.Errorf("%s: read as uid %d: %v, want permission denied", p, uid, err)
		}
	}
	return len(keys)
}

// readAs reads path in a child process running as uid (and its group),
// as an nginx worker would.
func readAs(uid uint32, path string) error {
	cmd := exec.Command("/bin/cat", path)
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uid, Gid: uid}}
	cmd.Stdout = nil
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("%v: %s", err, strings.TrimSpace(string(out)))
	}
	return nil
}

// workerUIDs lists the real uid of each child of nginx's master.
func workerUIDs(t *testing.T, master string) []uint32 {
	t.Helper()
	procs, _ := filepath.Glob("/proc/[0-9]*/status")
	var uids []uint32
	for _, p := range procs {
		f, err := os.Open(p)
		if err != nil {
			continue
		}
		var ppid string
		var uid uint32
		sc := bufio.NewScanner(f)
		for sc.Scan() {
			k, v, _ := strings.Cut(sc.Text(), ":")
			switch k {
			case "PPid":
				ppid = strings.TrimSpace(v)
			case "Uid":
				u, _ := strconv.Atoi(strings.Fields(v)[0])
				uid = uint32(u)
			}
		}
		f.Close()
		if ppid == master {
			uids = append(uids, uid)
		}
	}
	return uids
}

// waitNoTLS waits for addr to stop answering TLS: nginx let go of its
// last TLS listener at the reload.
func waitNoTLS(t *testing.T, addr string) {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(200 * time.Millisecond) {
		conn, err := tls.DialWithDialer(&net.Dialer{Timeout: 2 * time.Second}, "tcp", addr, &tls.Config{InsecureSkipVerify: true})
		if err != nil {
			return
		}
		conn.Close()
	}
	t.Fatalf("%s still serves TLS with no lineage left", addr)
}
