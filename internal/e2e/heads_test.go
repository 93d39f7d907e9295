package e2e

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/lbcert/lbcert/internal/testenv"
)

// TestRenewThroughTheHeadsIndex: a full renew pass leaves the heads
// index (package store), the next pass reads every lineage through it
// and so leaves it as it was, and a hand edit of lineage.json made in
// place after that is still seen: the edited certificate is due, and
// renewed, where the index's entry says it is not.
func TestRenewThroughTheHeadsIndex(t *testing.T) {
	t.Parallel()
	e := newEnv(t, testenv.PebbleOptions{})
	http := fmt.Sprintf("127.0.0.1:%d", e.pebble.HTTPPort)
	for _, d := range []string{"hx.example.com", "hy.example.com"} {
		e.mustRun("issue", "-d", d, "--standalone", "--http-addr", http, "--agree-tos")
	}
	before := e.serial("hx.example.com")
	// Entries are kept only once the files are more than a second old.
	time.Sleep(1500 * time.Millisecond)
	e.mustRun("renew", "--days", "7", "--no-random-sleep")
	index := filepath.Join(e.dir, "cache", "heads")
	first, err := os.Stat(index)
	if err != nil {
		t.Fatalf("a full renew pass left no heads index: %v", err)
	}
	e.mustRun("renew", "--days", "7", "--no-random-sleep")
	if again, _ := os.Stat(index); !os.SameFile(first, again) {
		t.Fatalf("a second pass over unchanged lineages rewrote the heads index: it read lineages from disk")
	}

	// A renew refused because another run holds the lock reads no
	// lineage, and leaves the index as it was.
	d, err := os.Open(e.dir)
	if err != nil {
		t.Fatal(err)
	}
	if err := syscall.Flock(int(d.Fd()), syscall.LOCK_EX); err != nil {
		t.Fatal(err)
	}
	r := e.run("renew", "--days", "7", "--no-random-sleep")
	d.Close() // and with it the lock
	if again, _ := os.Stat(index); r.code != 3 || !os.SameFile(first, again) || again.Size() != first.Size() {
		t.Fatalf("a renew refused by the lock (exit %d, want 3) rewrote the heads index (%d bytes, were %d)", r.code, again.Size(), first.Size())
	}

	// In place, as an editor or a script does: same inode.
	p := filepath.Join(e.dir, "live", "hx.example.com", "lineage.json")
	var meta map[string]any
	if err := json.Unmarshal([]byte(readFile(t, p)), &meta); err != nil {
		t.Fatal(err)
	}
	meta["cert"].(map[string]any)["not_after"] = time.Now().Add(48 * time.Hour).UTC().Format(time.RFC3339)
	data, _ := json.MarshalIndent(meta, "", "  ")
	if err := os.WriteFile(p, data, 0o644); err != nil {
		t.Fatal(err)
	}
	r = e.mustRun("renew", "--days", "7", "--no-random-sleep")
	if after := e.serial("hx.example.com"); after == before || !strings.Contains(r.stdout, "1 renewed") {
		t.Fatalf("hx.example.com, edited by hand to expire in 2 days, was not renewed by 'renew --days 7' through the heads index (serial %s, then %s):\n%s", before, after, r.stdout)
	}
}
