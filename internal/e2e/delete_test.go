package e2e

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/lbcert/lbcert/internal/testenv"
)

// TestDeleteNginxReferencesAndRevoke: delete refuses while a real nginx
// config (through an include) uses the lineage, deletes once it does not,
// revokes at Pebble, reloads nginx, and removes the cron entry with the
// last lineage.
func TestDeleteNginxReferencesAndRevoke(t *testing.T) {
	t.Parallel()
	e := newEnv(t, testenv.PebbleOptions{})
	http := fmt.Sprintf("127.0.0.1:%d", e.pebble.HTTPPort)
	tlsAddr := freeAddr(t)
	e.mustRun("issue", "-d", "gone.example.com", "--standalone", "--http-addr", http, "--agree-tos")
	serial := e.serial("gone.example.com")

	prefix := filepath.Join(e.work, "nginx")
	os.MkdirAll(filepath.Join(prefix, "sites"), 0o755)
	live := filepath.Join(e.dir, "live", "gone.example.com")
	site := filepath.Join(prefix, "sites", "gone.conf")
	os.WriteFile(site, []byte(fmt.Sprintf(`server {
    listen %s ssl;
    server_name gone.example.com;
    ssl_certificate %s/fullchain.pem;
    ssl_certificate_key %s/privkey.pem;
    return 200 "ok\n";
}
`, tlsAddr, live, live)), 0o644)
	plain := freeAddr(t)
	conf := testenv.NginxConfig(prefix, fmt.Sprintf("    server { listen %s; return 204; }\n    include %s/sites/*.conf;", plain, prefix))
	n, err := testenv.StartNginx(prefix, conf, tlsAddr)
	if err != nil {
		t.Fatal(err)
	}
	defer n.Stop()
	// Attach the nginx deploy settings to the lineage.
	e.mustRun("issue", "-d", "gone.example.com", "--standalone", "--http-addr", http, "--force",
		"--deploy", "nginx", "--nginx-conf", n.Conf, "--nginx-bin", n.Bin)
	serial = e.serial("gone.example.com")
	cron := filepath.Join(e.work, "cron.d-lbcert")
	os.WriteFile(cron, []byte("17 2 * * * root lbcert renew -q\n"), 0o644)

	// Referenced by an included file: refused, nothing removed.
	r := e.run("delete", "--name", "gone.example.com", "--yes", "--revoke", "--cron-file", cron)
	if r.code != 1 || !strings.Contains(r.stderr, "nginx config still uses gone.example.com: "+site+": ssl_certificate "+live) {
		t.Fatalf("delete with references: exit %d\n%s", r.code, r.stderr)
	}
	if _, err := os.Stat(live); err != nil {
		t.Fatal("a refused delete removed the lineage")
	}
	if st, err := e.pebble.CertStatus(serial); err != nil || st != "Valid" {
		t.Fatalf("a refused delete revoked the certificate: %s %v", st, err)
	}

	// Without the reference: revoke, delete, reload, drop the cron entry.
	os.Remove(site)
	pid := n.MasterPID()
	r = e.mustRun("delete", "-d", "gone.example.com", "--yes", "--revoke", "--reason", "cessationOfOperation", "--cron-file", cron)
	for _, want := range []string{"revoked certificate " + serial, "gone.example.com: deleted", "nginx reloaded", "removed " + cron} {
		if !strings.Contains(r.stdout, want) {
			t.Errorf("delete output lacks %q:\n%s", want, r.stdout)
		}
	}
	if st, err := e.pebble.CertStatus(serial); err != nil || st != "Revoked" {
		t.Fatalf("Pebble says %q (%v), want Revoked", st, err)
	}
	for _, p := range []string{live, filepath.Join(e.dir, "archive", "gone.example.com")} {
		if _, err := os.Stat(p); !os.IsNotExist(err) {
			t.Errorf("%s still exists", p)
		}
	}
	if _, err := os.Stat(cron); !os.IsNotExist(err) {
		t.Error("cron entry not removed with the last lineage")
	}
	if n.MasterPID() != pid {
		t.Error("nginx restarted instead of reloading")
	}
	if !strings.Contains(readFile(t, filepath.Join(prefix, "error.log")), "signal 1 (SIGHUP) received") {
		t.Error("nginx was not reloaded after the delete")
	}
}

// TestDeleteChecksEveryLineagesConfig: a lineage issued without --deploy
// is still named by the nginx config another lineage deploys to; delete
// finds that config through the other lineage and refuses, so the next
// reload does not fail on a missing file. --force deletes anyway.
func TestDeleteChecksEveryLineagesConfig(t *testing.T) {
	t.Parallel()
	e := newEnv(t, testenv.PebbleOptions{})
	http := fmt.Sprintf("127.0.0.1:%d", e.pebble.HTTPPort)
	tlsAddr := freeAddr(t)
	e.mustRun("issue", "-d", "nodeploy.example.com", "--standalone", "--http-addr", http, "--agree-tos")

	prefix := filepath.Join(e.work, "nginx")
	os.MkdirAll(filepath.Join(prefix, "sites"), 0o755)
	live := filepath.Join(e.dir, "live", "nodeploy.example.com")
	site := filepath.Join(prefix, "sites", "nodeploy.conf")
	os.WriteFile(site, []byte(fmt.Sprintf("server {\n    listen %s ssl;\n    server_name nodeploy.example.com;\n"+
		"    ssl_certificate %s/fullchain.pem;\n    ssl_certificate_key %s/privkey.pem;\n    return 200;\n}\n", tlsAddr, live, live)), 0o644)
	conf := testenv.NginxConfig(prefix, fmt.Sprintf("    include %s/sites/*.conf;", prefix))
	n, err := testenv.StartNginx(prefix, conf, tlsAddr)
	if err != nil {
		t.Fatal(err)
	}
	defer n.Stop()
	e.mustRun("issue", "-d", "deployed.example.com", "--standalone", "--http-addr", http,
		"--deploy", "nginx", "--nginx-conf", n.Conf, "--nginx-bin", n.Bin)

	r := e.run("delete", "--name", "nodeploy.example.com", "--yes")
	if r.code != 1 || !strings.Contains(r.stderr, "nginx config still uses nodeploy.example.com: "+site+": ssl_certificate "+live) {
		t.Fatalf("delete of a lineage another lineage's nginx config names: exit %d\n%s", r.code, r.stderr)
	}
	if _, err := os.Stat(live); err != nil {
		t.Fatal("a refused delete removed the lineage")
	}
	e.mustRun("delete", "--name", "nodeploy.example.com", "--yes", "--force")
	if _, err := os.Stat(live); !os.IsNotExist(err) {
		t.Fatalf("delete --force left %s", live)
	}
}
