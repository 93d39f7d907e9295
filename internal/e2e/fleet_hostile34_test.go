package e2e

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/lbcert/lbcert/internal/testenv"
)

// The findings of the hostile review of the deploy's config test check
// and of the ledger's put-back after a Redis rollback, each run as the
// reviewer ran it.

// Two new lineages whose nginx server blocks name each other's files,
// issued one at a time: each first deploy fails on the other's missing
// files. A later run deploys both together; the config test check
// (a deploy owed on a broken config is not tried while the config still
// fails the same way) must not hold them back, as a failure on
// lbcert's own files is the run's to fix.
func TestH34CrossReferencedNewLineagesDeploy(t *testing.T) {
	e := newEnv(t, testenv.PebbleOptions{})
	crossReferenced(t, e, filepath.Join(e.dir, "live"))
}

// The same with the nginx config naming the files through a symbolic
// link to the state directory (hostile review: held back for good).
func TestH35CrossReferencedThroughASymlink(t *testing.T) {
	e := newEnv(t, testenv.PebbleOptions{})
	os.MkdirAll(e.dir, 0o700)
	link := filepath.Join(e.work, "lbcert-link")
	if err := os.Symlink(e.dir, link); err != nil {
		t.Fatal(err)
	}
	crossReferenced(t, e, filepath.Join(link, "live"))
}

// crossReferenced runs the two lineages, the config naming their files
// under liveDir.
func crossReferenced(t *testing.T, e *env, liveDir string) {
	http := fmt.Sprintf("127.0.0.1:%d", e.pebble.HTTPPort)
	tlsAddr, plainAddr := freeAddr(t), freeAddr(t)
	prefix := filepath.Join(e.work, "nginx")
	os.MkdirAll(prefix, 0o755)
	n, err := testenv.StartNginx(prefix, testenv.NginxConfig(prefix, fmt.Sprintf(`
    server { listen %s; return 200 "ok\n"; }`, plainAddr)), plainAddr)
	if err != nil {
		t.Fatal(err)
	}
	defer n.Stop()
	block := `
    server {
        listen %s ssl;
        server_name %s;
        ssl_certificate %s/fullchain.pem;
        ssl_certificate_key %[3]s/privkey.pem;
        return 200 "ok\n";
    }`
	la, lb := filepath.Join(liveDir, "a34.example.com"), filepath.Join(liveDir, "b34.example.com")
	os.WriteFile(n.Conf, []byte(testenv.NginxConfig(prefix, fmt.Sprintf(`
    server { listen %s; return 200 "ok\n"; }`, plainAddr)+
		fmt.Sprintf(block, tlsAddr, "b34.example.com", lb)+fmt.Sprintf(block, tlsAddr, "a34.example.com", la))), 0o644)
	dep := []string{"--standalone", "--http-addr", http, "--agree-tos", "--deploy", "nginx", "--nginx-conf", n.Conf, "--nginx-bin", n.Bin}
	for _, name := range []string{"a34.example.com", "b34.example.com"} {
		if r := e.run(append([]string{"issue", "-d", name}, dep...)...); r.code != 1 {
			t.Fatalf("issue %s, the other's files missing: exit %d, want 1\n%s%s", name, r.code, r.stdout, r.stderr)
		}
	}
	orders := e.pebble.Orders()
	r := e.run("renew", "--no-random-sleep", "--concurrency", "1")
	if r.code != 0 {
		t.Fatalf("renew with both certificates owed: exit %d, want both deployed\n%s%s", r.code, r.stdout, r.stderr)
	}
	if got := e.pebble.Orders() - orders; got != 0 {
		t.Errorf("%d orders to deploy what was owed", got)
	}
	for _, live := range []string{la, lb} {
		if _, err := os.Stat(filepath.Join(live, "fullchain.pem")); err != nil {
			t.Error(err)
		}
	}
}

// A Redis back from a snapshot taken after a set's first certificate
// and before its two renewals: not empty, so nothing rebuilds it. No
// node orders a fourth certificate for the set: not the node that
// ordered the three, not one whose agent installed them, not one whose
// agent was down meanwhile (the others' agents put the places back).
func TestH34LedgerThroughARollback(t *testing.T) {
	f := newFleet(t, "lb1", "lb2", "lb3")
	f.form()
	for _, n := range f.order {
		f.startAgent(n, "--reconcile", "2s")
	}
	f.validateVia("lb1")
	const name = "h34ledger.example.com"
	f.mustOn("lb1", "issue", "-d", name, "--agree-tos")
	for _, n := range []string{"lb2", "lb3"} {
		f.waitInstalled(n, name)
	}
	c := f.rdb()
	defer c.Close()
	if err := c.Save(context.Background()).Err(); err != nil {
		t.Fatal(err)
	}
	snap, err := os.ReadFile(filepath.Join(f.redis.Dir, "dump.rdb"))
	if err != nil {
		t.Fatal(err)
	}
	f.stopAgent("lb3")
	for range 2 {
		f.mustOn("lb1", "renew", "--force", "--name", name, "--no-random-sleep")
	}
	f.waitInstalled("lb2", name)
	issued := f.pebble.Issued()
	// Back from the snapshot, AOF off.
	f.redis.Kill()
	os.RemoveAll(filepath.Join(f.redis.Dir, "appendonlydir"))
	os.WriteFile(filepath.Join(f.redis.Dir, "dump.rdb"), snap, 0o600)
	f.redis.Conf = "appendonly no\n"
	if err := f.redis.Start(); err != nil {
		t.Fatal(err)
	}
	// The snapshot holds lb3's heartbeat: its lapse is the wait (an
	// order through a silent agent is abandoned, not what is tested).
	c2 := f.rdb()
	defer c2.Close()
	if !poll(60*time.Second, func() bool { v, _ := c2.Exists(context.Background(), "lbcert:agent:lb3").Result(); return v == 0 }) {
		t.Fatal("lb3's restored heartbeat never lapsed")
	}
	for _, n := range []string{"lb3", "lb2", "lb1"} {
		r := f.on(n, "renew", "--force", "--name", name, "--no-random-sleep")
		if r.code != 2 {
			t.Errorf("%s: renew --force of a set with 3 certificates after the rollback: exit %d, want 2 (deferred)\n%s%s", n, r.code, r.stdout, r.stderr)
		}
	}
	if got := f.pebble.Issued() - issued; got != 0 {
		t.Errorf("%d certificates issued for the set after the rollback (3 before, cap 3)", got)
	}
}

// Two certificates of one set, the second a renewal kept on the node
// (Redis killed while the CA issued) and published by the agent later:
// it counts once in the ledger, so a third certificate is within the
// cap of 3 and is ordered (hostile review: it counted twice, under its
// order's place and its serial, and the third was refused).
func TestH35KeptRenewalCountsOnce(t *testing.T) {
	f := newFleet(t, "lb1", "lb2")
	fr := f.startFront()
	f.form()
	for _, n := range f.order {
		f.startAgent(n, "--reconcile", "2s")
	}
	f.validateVia("lb1")
	const name = "h35twice.example.com"
	f.mustOn("lb1", "issue", "-d", name, "--agree-tos")
	f.waitInstalled("lb2", name)
	var once sync.Once
	fr.onPost(func(path string) {
		if strings.Contains(path, "finalize-order") {
			once.Do(func() { f.redis.Kill() })
		}
	})
	if r := f.on("lb1", "renew", "--force", "--name", name, "--no-random-sleep"); r.code != 2 || !strings.Contains(r.stdout+r.stderr, "kept on this node") {
		t.Fatalf("renew with Redis killed at finalize: exit %d, want 2 and the certificate kept\n%s%s", r.code, r.stdout, r.stderr)
	}
	fr.onPost(nil)
	if err := f.redis.Start(); err != nil {
		t.Fatal(err)
	}
	if !poll(60*time.Second, func() bool { v, _ := f.head(name); return v == 2 }) {
		t.Fatalf("the kept renewal never reached the catalog\n%s", f.nodes["lb1"].agentLog())
	}
	f.waitInstalled("lb2", name)
	issued := f.pebble.Issued()
	r := f.on("lb1", "renew", "--force", "--name", name, "--no-random-sleep")
	if r.code != 0 || f.pebble.Issued()-issued != 1 {
		t.Errorf("renew --force of a set with 2 certificates (cap 3): exit %d, %d issued; want exit 0, 1 issued\n%s%s", r.code, f.pebble.Issued()-issued, r.stdout, r.stderr)
	}
}

// Three certificates of one set through the CA as
// https://localhost:PORT/dir, then the same set as another lineage
// through https://LOCALHOST:PORT/dir, the same CA: refused at the cap
// (hostile review: a fourth certificate, the ledger keyed on the
// directory's spelling).
func TestH35FourthThroughCASpelling(t *testing.T) {
	f := newFleet(t, "lb1", "lb2")
	f.form()
	for _, n := range f.order {
		f.startAgent(n, "--reconcile", "2s")
	}
	f.validateVia("lb1", "lb2")
	const name = "h35spell.example.com"
	f.env.server = strings.Replace(f.pebble.DirectoryURL, "127.0.0.1", "localhost", 1)
	f.mustOn("lb1", "issue", "-d", name, "--agree-tos")
	for range 2 {
		f.mustOn("lb1", "renew", "--force", "--name", name, "--no-random-sleep")
	}
	issued := f.pebble.Issued()
	f.env.server = strings.Replace(f.pebble.DirectoryURL, "127.0.0.1", "LOCALHOST", 1)
	r := f.on("lb2", "issue", "--name", "h35spell-alt", "-d", name, "--agree-tos")
	if got := f.pebble.Issued() - issued; got != 0 || r.code != 2 {
		t.Errorf("a 4th certificate for the set through %s: exit %d, %d issued; want exit 2, none\n%s%s", f.env.server, r.code, got, r.stdout, r.stderr)
	}
}
