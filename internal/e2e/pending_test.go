package e2e

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/lbcert/lbcert/internal/testenv"
)

// TestPendingDeploy: a certificate whose deploy failed, or whose deploy
// was cut short by kill -9, is kept as pending. Later runs deploy it and
// never order the same names again, counted at Pebble; nginx ends up
// serving it.
func TestPendingDeploy(t *testing.T) {
	t.Parallel()
	e := newEnv(t, testenv.PebbleOptions{})
	http := fmt.Sprintf("127.0.0.1:%d", e.pebble.HTTPPort)
	tlsAddr := freeAddr(t)
	prefix := filepath.Join(e.work, "nginx")
	os.MkdirAll(prefix, 0o755)
	live := filepath.Join(e.dir, "live", "pend.example.com")
	conf := testenv.NginxConfig(prefix, fmt.Sprintf(`
    server {
        listen %s ssl;
        server_name pend.example.com;
        ssl_certificate %s/fullchain.pem;
        ssl_certificate_key %s/privkey.pem;
        return 200 "ok\n";
    }`, tlsAddr, live, live))

	// nginx needs the files before it starts: issue first, deploy none.
	e.mustRun("issue", "-d", "pend.example.com", "--standalone", "--http-addr", http, "--agree-tos")
	n, err := testenv.StartNginx(prefix, conf, tlsAddr)
	if err != nil {
		t.Fatal(err)
	}
	defer n.Stop()
	// The lineage deploys through a wrapper around the real nginx that
	// can be made to hang in "nginx -t", for the kill -9 below.
	slow := filepath.Join(e.work, "slow")
	inTest := filepath.Join(e.work, "in-nginx-t")
	wrapper := filepath.Join(e.work, "nginx-wrapper")
	os.WriteFile(wrapper, []byte(fmt.Sprintf(`#!/bin/sh
for a in "$@"; do
  if [ "$a" = "-t" ] && [ -e %s ]; then touch %s; sleep 60; fi
done
exec %s "$@"
`, slow, inTest, n.Bin)), 0o755)
	// New deploy settings for a certificate that is not due: saved and
	// deployed, and the CA is not asked.
	before := e.pebble.Orders()
	r0 := e.mustRun("issue", "-d", "pend.example.com", "--standalone", "--http-addr", http,
		"--deploy", "nginx", "--nginx-conf", n.Conf, "--nginx-bin", wrapper, "--verify-addr", tlsAddr)
	if e.pebble.Orders() != before || !strings.Contains(r0.stdout, "saved the new settings without ordering") || !strings.Contains(r0.stdout, "deployed, verified") {
		t.Fatalf("reconfigure: %d orders\n%s", e.pebble.Orders()-before, r0.stdout)
	}
	v1 := e.serial("pend.example.com")
	servedEventually(t, tlsAddr, "pend.example.com", v1)
	// Only the mail sender changes: saved, nothing deployed, and the
	// output says so instead of "deployed".
	r1 := e.mustRun("issue", "-d", "pend.example.com", "--standalone", "--http-addr", http,
		"--deploy", "nginx", "--nginx-conf", n.Conf, "--nginx-bin", wrapper, "--verify-addr", tlsAddr, "--mail-from", "pend@example.com")
	if e.pebble.Orders() != before || !strings.Contains(r1.stdout, "saved the new settings without ordering") || !strings.Contains(r1.stdout, "deploy    unchanged") {
		t.Fatalf("mail-only reconfigure: %d orders\n%s", e.pebble.Orders()-before, r1.stdout)
	}
	if meta := readFile(t, filepath.Join(e.dir, "live", "pend.example.com", "lineage.json")); !strings.Contains(meta, "pend@example.com") {
		t.Fatalf("the new sender was not saved:\n%s", meta)
	}

	// A typo in the config: the renewal is rolled back and kept pending.
	os.WriteFile(n.Conf, []byte(conf+"\nthis_is_not_a_directive;\n"), 0o644)
	orders := e.pebble.Orders()
	r := e.run("renew", "--force", "--no-random-sleep")
	if r.code != 1 || e.pebble.Orders()-orders != 1 || !strings.Contains(r.stderr, "rolled back") {
		t.Fatalf("broken config: exit %d, %d orders\n%s%s", r.code, e.pebble.Orders()-orders, r.stdout, r.stderr)
	}
	if e.serial("pend.example.com") != v1 {
		t.Fatal("the rolled-back certificate is still live")
	}
	if out := e.mustRun("list").stdout; !strings.Contains(out, "pending deploy: ") {
		t.Fatalf("list does not show the pending deploy:\n%s", out)
	}

	// Two more runs with the config still broken: they test the config
	// as it is, see it fails as before, leave the new certificate out
	// of live/ and order nothing.
	orders = e.pebble.Orders()
	for i := range 2 {
		r = e.run("renew", "--no-random-sleep")
		if r.code != 1 || !strings.Contains(r.stderr, "nginx -t") || !strings.Contains(r.stderr, "config test fails without this certificate too") {
			t.Fatalf("run %d with the config broken: exit %d\n%s%s", i+2, r.code, r.stdout, r.stderr)
		}
	}
	if got := e.pebble.Orders() - orders; got != 0 {
		t.Fatalf("%d new orders while the deploy kept failing; want 0", got)
	}
	if got := served(t, tlsAddr, "pend.example.com"); got != v1 {
		t.Fatalf("nginx serves %s during the failures, want the old %s", got, v1)
	}

	// The config is fixed: a plain renew deploys the pending certificate.
	os.WriteFile(n.Conf, []byte(conf), 0o644)
	r = e.mustRun("renew", "--no-random-sleep")
	v2 := e.serial("pend.example.com")
	if v2 == v1 || !strings.Contains(r.stdout, "deployed  pend.example.com") || e.pebble.Orders() != orders {
		t.Fatalf("after the fix: %d orders, live %s\n%s", e.pebble.Orders()-orders, v2, r.stdout)
	}
	servedEventually(t, tlsAddr, "pend.example.com", v2)
	if r := e.mustRun("renew", "--no-random-sleep"); r.stdout != "" {
		t.Fatalf("a run after the deploy still had work: %q", r.stdout)
	}

	// kill -9 while nginx -t runs, after live/ was switched: the next
	// plain renew deploys, and nginx serves the new serial.
	os.WriteFile(slow, nil, 0o644)
	ctx, cancel := context.WithTimeout(context.Background(), runDeadline)
	defer cancel()
	cmd := e.command(ctx, "renew", "--force", "--no-random-sleep")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	for deadline := time.Now().Add(60 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		if _, err := os.Stat(inTest); err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("renew never reached nginx -t")
		}
	}
	cmd.Process.Signal(syscall.SIGKILL)
	cmd.Wait()
	os.Remove(slow)
	v3 := e.serial("pend.example.com")
	if v3 == v2 || served(t, tlsAddr, "pend.example.com") != v2 {
		t.Fatalf("before the next run: live %s (want new), served %s (want %s)", v3, served(t, tlsAddr, "pend.example.com"), v2)
	}
	orders = e.settledOrders()
	r = e.mustRun("renew", "--no-random-sleep")
	if !strings.Contains(r.stdout, "deployed  pend.example.com") || e.pebble.Orders() != orders {
		t.Fatalf("after kill -9: %d orders\n%s", e.pebble.Orders()-orders, r.stdout)
	}
	servedEventually(t, tlsAddr, "pend.example.com", v3)
}
