package e2e

import (
	"fmt"
	"strings"
	"testing"
)

// TestHostile27LineageAtAFallbackHasNoFailover: the README's own
// migration, "Let's Encrypt, then ZeroSSL", for a host whose lineages
// were issued at ZeroSSL before: the operator makes the old CA a
// fallback behind a new primary. A lineage whose home (lineage.json's
// server) is that CA gets ca.Set.For's candidates "its home, then every
// fallback that is not that CA": the home alone. When the old CA is
// down, nothing is tried at the configured primary, though two CAs are
// configured and the primary answers.
//
// Repro (twice): step-ca issues x with --server step-ca; step-ca stops;
// lbcert --server PEBBLE --fallback-ca 'stepca URL ca-bundle=...' renew
// --force --name x: exit 1, "connection refused" at step-ca, no order
// at Pebble.
func TestHostile27LineageAtAFallbackHasNoFailover(t *testing.T) {
	t.Parallel()
	f := newFailoverEnv(t, false, 0)
	http := fmt.Sprintf("127.0.0.1:%d", f.pebble.HTTPPort)
	f.mustRun("--server", f.stepca.DirectoryURL, "--ca-bundle", f.stepca.CABundle,
		"issue", "-d", "old.example.org", "--standalone", "--http-addr", http, "--agree-tos", "--email", "ops@lbcert.test")
	f.stepca.Stop() // the old CA, now the fallback, is down

	before := f.pebble.Orders()
	r := f.run("renew", "--force", "--name", "old.example.org", "--no-random-sleep", "--agree-tos", "--json", "--fallback-ca", f.fallback)
	if r.code != 0 || !strings.Contains(r.stdout, `"outcome": "renewed"`) {
		t.Errorf("renewal with the lineage's CA down and the configured primary up: exit %d\n%s%s", r.code, r.stdout, r.stderr)
	}
	if f.pebble.Orders() == before {
		t.Errorf("no order reached the configured primary (--server) while the lineage's CA was down")
	}
}
