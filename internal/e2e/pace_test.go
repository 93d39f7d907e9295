package e2e

import (
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/lbcert/lbcert/internal/testenv"
)

// withFront puts a rate-limiting front with limits in front of e's
// Pebble, and points lbcert at it.
func (e *env) withFront(t *testing.T, limits testenv.FrontLimits) *testenv.RateFront {
	t.Helper()
	f, err := testenv.StartRateFront(e.pebble, limits, 1)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(f.Stop)
	e.server = f.DirectoryURL
	return f
}

func seedRows(e *env, names ...string) string {
	var rows []string
	for _, n := range names {
		rows = append(rows, fmt.Sprintf("%s,,%d", n, e.pebble.HTTPPort))
	}
	return strings.Join(rows, "\n") + "\n"
}

// TestPacingAgainstRateLimitingCA: a batch larger than the CA's order
// limit, with lbcert's budget set to the same limit, finishes over
// several runs without the CA ever answering rateLimited.
func TestPacingAgainstRateLimitingCA(t *testing.T) {
	t.Parallel()
	e := newEnv(t, testenv.PebbleOptions{})
	limits := testenv.LetsEncryptLimits()
	// A burst of 3, then one every 15 s: slow beside an order here (3 to
	// 5 s on a loaded CI machine), so one run cannot do all five.
	limits.Orders.N, limits.Orders.Per = 3, 45*time.Second
	front := e.withFront(t, limits)
	var names []string
	for i := range 5 {
		names = append(names, fmt.Sprintf("b%d.bulk%d.example.com", i, i))
	}
	csv := writeCSV(t, e.work, "bulk.csv", seedRows(e, names...))
	args := e.batchArgs(csv, "--rate-orders", "3/45s", "--max-wait", "0s")
	runs := 0
	for ; runs < 40; runs++ {
		r := e.run(args...)
		if r.code == 0 {
			break
		}
		if r.code != 2 || !strings.Contains(r.stdout, "not ordered: the new-orders budget (3/45s per account) is spent") {
			t.Fatalf("run %d: exit %d\n%s%s", runs+1, r.code, r.stdout, r.stderr)
		}
		time.Sleep(2 * time.Second)
	}
	for _, n := range names {
		e.leaf(n)
	}
	if runs == 0 {
		t.Fatal("one run issued more than the CA's limit allows; the test proves nothing")
	}
	if n := front.RateLimited(); n != 0 {
		t.Fatalf("the CA answered rateLimited %d times: %+v", n, front.Events())
	}
	if got := len(front.Events()); got != len(names) {
		t.Fatalf("the CA saw %d new orders for %d names", got, len(names))
	}
}

// TestStricterCAThanTheBudget: a CA whose limits are lower than lbcert's
// budget answers rateLimited once per scope (here the account's orders
// and one registered domain); lbcert then sends nothing in that scope
// before the CA's Retry-After, in that run or the next, keeps ordering
// outside it, defers instead of failing, and paces by the CA's stated
// limit afterwards, so the CA never has to say it twice.
func TestStricterCAThanTheBudget(t *testing.T) {
	t.Parallel()
	e := newEnv(t, testenv.PebbleOptions{})
	limits := testenv.LetsEncryptLimits()
	// Refills slow beside an order here (3 to 5 s on a loaded CI
	// machine), so the answers below come in this order whatever the load.
	limits.Orders.N, limits.Orders.Per = 3, 90*time.Second // one more every 30 s
	limits.Domain.N, limits.Domain.Per = 2, 40*time.Second // one more every 20 s
	front := e.withFront(t, limits)
	// In order: two of example.com, a third (over the domain limit), one
	// elsewhere (the third order), one over the order limit, then one
	// more of each scope, which lbcert must hold back itself.
	names := []string{"d1.example.com", "d2.example.com", "d3.example.com", "o1.example.org", "o2.example.net", "d4.example.com", "o3.example.info"}
	csv := writeCSV(t, e.work, "strict.csv", seedRows(e, names...))
	// One order at a time: the CA's answers depend on the order in which
	// the rows reach it (at the default concurrency the first two
	// example.com rows race the third).
	args := e.batchArgs(csv, "--max-wait", "0s", "--concurrency", "1")

	r := e.run(args...)
	if r.code != 2 || !strings.Contains(r.stdout, "3 issued, 4 deferred") {
		t.Fatalf("first run: exit %d, want 2 with 3 issued and 4 deferred\n%s%s", r.code, r.stdout, r.stderr)
	}
	for _, want := range []string{"the CA rate-limited certificates for example.com", "the CA rate-limited new orders on this account",
		// Held back by lbcert itself ("not ordered"), by the CA's block or
		// the limit it stated, whichever ends later.
		"d4.example.com   deferred  not ordered: ", "o3.example.info  deferred  not ordered: "} {
		if !strings.Contains(r.stdout, want) {
			t.Fatalf("first run does not say %q:\n%s%s", want, r.stdout, r.stderr)
		}
	}
	if strings.Contains(readFileOrEmpty(filepath.Join(e.dir, "renewal", "d3.example.com.json")), `"failures"`) {
		t.Fatal("a rateLimited row was put into failure backoff")
	}
	var last time.Time
	for _, ev := range front.Events() {
		if ev.Limited != "" && ev.At.Add(ev.RetryAfter).After(last) {
			last = ev.At.Add(ev.RetryAfter)
		}
	}
	// The next run, after the CA's Retry-After: it orders again, and only
	// as much as the CA's stated limit allows.
	time.Sleep(time.Until(last) + time.Second)
	r = e.run(args...)
	if r.code != 2 || !strings.Contains(r.stdout, "issued") {
		t.Fatalf("second run, after Retry-After: exit %d, want some issued and the rest deferred\n%s%s", r.code, r.stdout, r.stderr)
	}

	events := front.Events()
	scopes := map[string]int{}
	for i, ev := range events {
		if ev.Limited == "" {
			continue
		}
		scopes[ev.Limited]++
		for _, later := range events[i+1:] {
			if later.At.Sub(ev.At) >= ev.RetryAfter {
				break
			}
			if inScope(ev.Limited, later) {
				t.Errorf("sent %v %v after the CA's %s answer, inside its Retry-After of %v", later.Names, later.At.Sub(ev.At), ev.Limited, ev.RetryAfter)
			}
		}
	}
	if len(scopes) != 2 || scopes["orders"] != 1 || scopes["domain example.com"] != 1 {
		t.Fatalf("want exactly one rateLimited answer for the orders and one for example.com, got %v", scopes)
	}
}

func allIssued(e *env, names []string) bool {
	for _, n := range names {
		if e.serialOrEmpty(n) == "" {
			return false
		}
	}
	return true
}

// inScope reports whether new order ev falls in the scope of a
// rateLimited answer.
func inScope(scope string, ev testenv.FrontEvent) bool {
	kind, name, _ := strings.Cut(scope, " ")
	switch kind {
	case "orders":
		return true // one account throughout
	case "domain":
		for _, n := range ev.Names {
			if n == name || strings.HasSuffix(n, "."+name) {
				return true
			}
		}
	}
	return false
}

// TestFailingNameStopsBeforeTheCALimit: a name that keeps failing
// validation, retried with --force, is stopped by lbcert's own budget
// after the fifth failure, before the CA's failed-authorization limit
// would answer rateLimited.
func TestFailingNameStopsBeforeTheCALimit(t *testing.T) {
	t.Parallel()
	e := newEnv(t, testenv.PebbleOptions{})
	front := e.withFront(t, testenv.LetsEncryptLimits())
	nobody := freeAddr(t) // nothing answers there: every validation fails
	for i := range 5 {
		r := e.run("issue", "-d", "broken.example.com", "--standalone", "--http-addr", nobody, "--agree-tos", "--force")
		if r.code != 1 {
			t.Fatalf("attempt %d: exit %d, want a failed validation\n%s", i+1, r.code, r.stderr)
		}
	}
	r := e.run("issue", "-d", "broken.example.com", "--standalone", "--http-addr", nobody, "--agree-tos", "--force", "--max-wait", "0s")
	if r.code == 0 || !strings.Contains(r.stderr, "broken.example.com failed validation 5 times within 1h") {
		t.Fatalf("sixth attempt: exit %d\n%s", r.code, r.stderr)
	}
	if got, limited := len(front.Events()), front.RateLimited(); got != 5 || limited != 0 {
		t.Fatalf("the CA saw %d orders and answered rateLimited %d times; want 5 and 0", got, limited)
	}
}

// serialOrEmpty is name's live serial, or "" when it has none yet.
func (e *env) serialOrEmpty(name string) string {
	data, err := os.ReadFile(filepath.Join(e.dir, "live", name, "cert.pem"))
	if err != nil {
		return ""
	}
	b, _ := pem.Decode(data)
	if b == nil {
		return ""
	}
	c, err := x509.ParseCertificate(b.Bytes)
	if err != nil {
		return ""
	}
	return fmt.Sprintf("%x", c.SerialNumber)
}

func readFileOrEmpty(p string) string {
	data, _ := os.ReadFile(p)
	return string(data)
}
