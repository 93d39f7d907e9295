package e2e

import (
	"bytes"
	"context"
	"fmt"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/lbcert/lbcert/internal/testenv"
)

// TestPacingInAnyCAsWording (issue #27 item 8): a CA that allows a
// burst of 3 new orders, then 3 per 6 s, and words its rateLimited
// answers unlike Let's Encrypt (no count, no period, no link: only the
// Retry-After header says when). With the client budget off, one batch
// of 9 at the default concurrency issues all 9 in the same run (a
// Retry-After within --max-wait is waited out, not deferred), sends no
// new order inside a Retry-After it already received, and meets at most
// 3 rateLimited answers: at most two new orders are in flight until the
// first refusal (so at most one more was on its way when the CA
// refused), one at a time after it, spaced by its Retry-After, so the
// workers never arrive as a herd.
func TestPacingInAnyCAsWording(t *testing.T) {
	t.Parallel()
	e, front, csv, names := plainLimitedBatch(t, 6*time.Second, "any", 9)
	r := e.run(e.batchArgs(csv, "--rate-orders", "off", "--rate-domain", "off", "--rate-names", "off", "--rate-failed-authz", "off")...)
	if r.code != 0 || !strings.Contains(r.stdout, "9 issued") {
		t.Fatalf("batch: exit %d, want all 9 issued in one run\n%s%s", r.code, r.stdout, r.stderr)
	}
	if !allIssued(e, names) {
		t.Fatal("not every name has a certificate")
	}
	events := front.Events()
	limited := 0
	for i, ev := range events {
		if ev.Limited == "" {
			continue
		}
		limited++
		// Inside its Retry-After only the order already on its way
		// beside the refused one may arrive, and the CA refuses it too.
		inside := 0
		for _, later := range events[i+1:] {
			if d := later.At.Sub(ev.At); d < ev.RetryAfter {
				inside++
				if later.Limited == "" || inside > 1 {
					t.Errorf("a new order %v after a rateLimited answer, inside its Retry-After of %v: %+v", d, ev.RetryAfter, later)
				}
			}
		}
	}
	if limited == 0 {
		t.Fatal("the CA never answered rateLimited: the batch did not meet the limit, and the test proves nothing")
	}
	if limited > 3 {
		t.Fatalf("%d rateLimited answers, want at most 3: %+v", limited, events)
	}
	if got := len(events) - limited; got != len(names) {
		t.Fatalf("%d new orders went through for %d names", got, len(names))
	}
}

// TestInterruptWhileOrdersWaitAtTheGate: orders held back by a refusal
// (waiting out its Retry-After, within --max-wait) stop waiting at the
// first Ctrl-C. Before, they went through the gate one by one, each at
// the spacing the refusal set, and the run ended minutes later.
func TestInterruptWhileOrdersWaitAtTheGate(t *testing.T) {
	t.Parallel()
	e, front, csv, _ := plainLimitedBatch(t, 60*time.Second, "held", 10) // 3, then one every 20 s
	args := e.batchArgs(csv, "--concurrency", "10", "--max-wait", "10m", "--rate-orders", "off", "--rate-domain", "off", "--rate-names", "off", "--rate-failed-authz", "off")
	ctx, cancel := context.WithTimeout(context.Background(), runDeadline)
	defer cancel()
	cmd := e.command(ctx, args...)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	refused := func() bool {
		for _, ev := range front.Events() {
			if ev.Limited != "" {
				return true
			}
		}
		return false
	}
	for deadline := time.Now().Add(60 * time.Second); !refused(); time.Sleep(20 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("the CA never refused an order:\n%s", out.String())
		}
	}
	time.Sleep(500 * time.Millisecond) // the other orders queue at the gate
	signalled := time.Now()
	cmd.Process.Signal(syscall.SIGINT)
	err := cmd.Wait()
	took := time.Since(signalled)
	if ee, ok := err.(*exec.ExitError); !ok || ee.ExitCode() != 130 {
		t.Fatalf("after Ctrl-C: %v\n%s", err, out.String())
	}
	// Through the gate one by one, the 6 or more orders held back would
	// take 20 s each; stopping at once takes a second or two.
	if took > 30*time.Second {
		t.Fatalf("the run ended %v after Ctrl-C: the orders held at the gate went on waiting\n%s", took, out.String())
	}
	t.Logf("ended %v after Ctrl-C", took.Round(time.Millisecond))
}

// plainLimitedBatch is a Pebble behind a front that allows a burst of 3
// new orders and then 3 per per, refusing in plain words (no count, no
// period, no link), and a batch file of n names starting with prefix,
// and the names.
func plainLimitedBatch(t *testing.T, per time.Duration, prefix string, n int) (*env, *testenv.RateFront, string, []string) {
	e := newEnv(t, testenv.PebbleOptions{})
	var limits testenv.FrontLimits
	limits.Orders.N, limits.Orders.Per = 3, per
	front, err := testenv.StartRateFront(e.pebble, limits, 1)
	if err != nil {
		t.Fatal(err)
	}
	front.PlainWording = true
	t.Cleanup(front.Stop)
	e.server = front.DirectoryURL
	var names []string
	for i := range n {
		names = append(names, fmt.Sprintf("%s%d.example.net", prefix, i))
	}
	return e, front, writeCSV(t, e.work, prefix+".csv", seedRows(e, names...)), names
}
