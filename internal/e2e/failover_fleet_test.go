package e2e

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/lbcert/lbcert/internal/testenv"
)

// TestFleetFailoverSharedBreaker (issue #27 item 7): in a fleet, one
// node finds the primary down (it answers 503 to everything) and takes
// its batch to the fallback; the primary's breaker is then open in the
// fleet's Redis, so another node's order goes straight to the fallback
// without a single request to the primary, and says which node saw it
// down. Both CAs validate through the fleet's agents.
func TestFleetFailoverSharedBreaker(t *testing.T) {
	t.Parallel()
	f := newFleet(t, "n1", "n2")
	os.MkdirAll(filepath.Join(f.work, "stepca"), 0o755)
	s := startStepCA(t, testenv.StepCAOptions{Dir: filepath.Join(f.work, "stepca"), HTTPPort: f.pebble.HTTPPort})
	front, err := testenv.StartCAFront(f.pebble)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(front.Stop)
	f.server = front.DirectoryURL
	fallback := fmt.Sprintf("stepca %s ca-bundle=%s", s.DirectoryURL, s.CABundle)

	f.form()
	for _, n := range f.order {
		f.startAgent(n)
	}
	f.validateVia("n1", "n2")
	f.mustOn("n1", "issue", "-d", "up.example.com", "--agree-tos", "--fallback-ca", fallback)

	front.Set(testenv.Unavailable, 0)
	csv := f.writeCSV("down.csv", 0, 4)
	r := f.mustOn("n1", "batch", csv, "--preflight=false", "--agree-tos", "--concurrency", "1", "--json", "--fallback-ca", fallback)
	rep := parseReport(t, r)
	for _, it := range rep.Items {
		if it.Outcome != "issued" || it.CA != "stepca" {
			t.Fatalf("n1: %+v", it)
		}
	}
	c := f.rdb()
	defer c.Close()
	saved, err := c.HGet(context.Background(), "lbcert:breakers", front.DirectoryURL).Result()
	if err != nil || !strings.Contains(saved, `"by":"n1"`) || !strings.Contains(saved, `"open_until"`) {
		t.Fatalf("the primary's breaker in Redis: %q %v", saved, err)
	}

	before := front.Requests()
	r = f.mustOn("n2", "issue", "-d", "other.example.com", "--agree-tos", "--json", "--fallback-ca", fallback)
	rep = parseReport(t, r)
	it := rep.Items[0]
	if it.Outcome != "issued" || it.CA != "stepca" || !strings.Contains(it.Fallback, "passed over until") || !strings.Contains(it.Fallback, "(seen by node n1)") {
		t.Fatalf("n2: %+v", it)
	}
	if n := front.Requests() - before; n != 0 {
		t.Fatalf("n2 sent %d requests to the primary its fleet knows is down", n)
	}
	// Every node installs both certificates, whichever CA issued them.
	for _, n := range f.order {
		for _, name := range []string{"fleet000.example.com", "other.example.com"} {
			f.waitInstalled(n, name)
		}
	}
}
