package e2e

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
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
	la, lb := filepath.Join(e.dir, "live", "a34.example.com"), filepath.Join(e.dir, "live", "b34.example.com")
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
