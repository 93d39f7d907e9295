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

// The tests in this file are issue #26's "first week" of a single host,
// one per item, each as an operator meets it with the built binary.

// bg starts lbcert against the env's CA with extra environment and
// returns at once; a run still going when the test ends gets SIGTERM.
func (e *env) bg(extra []string, args ...string) *bgRun {
	e.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), runDeadline)
	cmd := e.command(ctx, args...)
	cmd.Env = append(cmd.Env, extra...)
	return startBG(e.t, cmd, cancel)
}

// saysSoon waits up to a minute for the run's stderr to contain s.
func (r *bgRun) saysSoon(t *testing.T, s string) {
	t.Helper()
	if !poll(time.Minute, func() bool { return strings.Contains(r.cmd.stderr(), s) }) {
		t.Fatalf("the run never said %q:\n%s", s, r.cmd.stderr())
	}
}

// subjectOf is a mail's Subject header.
func subjectOf(data string) string {
	for _, line := range strings.Split(data, "\n") {
		if s, ok := strings.CutPrefix(strings.TrimRight(line, "\r"), "Subject: "); ok {
			return s
		}
	}
	return ""
}

// TestMailAfterInterrupt: a batch and a renew stopped by Ctrl-C or
// SIGTERM still mail their report, under a deadline of their own, with
// "interrupted" in the subject; the renew that had done nothing yet
// does not say "nothing to do" (issue #26 item 6: no mail at all, "dial
// failed ... operation was canceled").
func TestMailAfterInterrupt(t *testing.T) {
	t.Parallel()
	e := newEnv(t, testenv.PebbleOptions{})
	smtp, err := testenv.StartSMTP(e.work, "", "")
	if err != nil {
		t.Fatal(err)
	}
	defer smtp.Stop()
	mailEnv := []string{"LBCERT_SMTP_HOST=" + smtp.Host, fmt.Sprintf("LBCERT_SMTP_PORT=%d", smtp.Port),
		"LBCERT_SMTP_CA_BUNDLE=" + smtp.CABundle, "LBCERT_MAIL_TO=ops@example.com"}
	// One order an hour: the second row (and then the renew) waits for
	// the budget, and is stopped while it waits.
	paced := []string{"--rate-orders", "1/1h", "--max-wait", "2h", "-v"}
	csv := writeCSV(t, e.work, "rows.csv", fmt.Sprintf("i1.int.example.com,,%d\ni2.int.example.com,,%d\n", e.pebble.HTTPPort, e.pebble.HTTPPort))
	b := e.bg(mailEnv, append(e.batchArgs(csv, "--concurrency", "1", "--http-addr", "127.0.0.1:1"), paced...)...)
	b.saysSoon(t, "waiting for the rate budget")
	b.proc.Signal(syscall.SIGINT)
	if r := b.wait(t, "batch", 2*time.Minute); r.code != 130 {
		t.Fatalf("batch after Ctrl-C: exit %d, want 130", r.code)
	}
	msgs := smtp.Messages()
	if len(msgs) != 1 {
		t.Fatalf("after the interrupted batch: %d mails, want 1", len(msgs))
	}
	if s := subjectOf(msgs[0].Data); !strings.Contains(s, "interrupted") || !strings.Contains(s, "issued 1") {
		t.Fatalf("batch mail subject %q, want interrupted and issued 1", s)
	}
	if !strings.Contains(msgs[0].Data, "ISSUED i1.int.example.com") {
		t.Fatalf("batch mail lacks the row it issued:\n%s", msgs[0].Data)
	}

	// A renew stopped in cron's random sleep (stdout is no terminal
	// here): nothing done yet, and the mail says it was interrupted.
	r := e.bg(mailEnv, "renew", "--force")
	r.saysSoon(t, "sleeping before contacting the CA")
	r.proc.Signal(syscall.SIGTERM)
	if res := r.wait(t, "renew", 2*time.Minute); res.code != 130 {
		t.Fatalf("renew after SIGTERM: exit %d, want 130", res.code)
	}
	msgs = smtp.Messages()
	if len(msgs) != 2 {
		t.Fatalf("after the interrupted renew: %d mails, want 2", len(msgs))
	}
	if s := subjectOf(msgs[1].Data); !strings.Contains(s, "interrupted") || strings.Contains(s, "nothing to do") {
		t.Fatalf("renew mail subject %q, want interrupted", s)
	}
}

// TestBatchFailureSaidTwice: a failed row is printed once while the run
// goes, with its hint, and once in the table; never three times (issue
// #26 item 10: a warning, an error with a hint, then the table).
func TestBatchFailureSaidTwice(t *testing.T) {
	t.Parallel()
	e := newEnv(t, testenv.PebbleOptions{})
	csv := writeCSV(t, e.work, "rows.csv", fmt.Sprintf("fx.said.example.com,,%d\n", e.pebble.HTTPPort))
	// Pebble's DNS answers 127.0.0.1: the pre-flight refuses the row
	// before the CA hears of it.
	r := e.run(e.batchArgs(csv, "--http-addr", "127.0.0.1:1", "--expect-ip", "192.0.2.10")...)
	if r.code != 1 {
		t.Fatalf("exit %d, want 1", r.code)
	}
	out := r.stdout + r.stderr
	if n := strings.Count(out, "which is not --expect-ip"); n != 2 {
		t.Errorf("the failure is printed %d times, want 2 (once while the run goes, once in the table)", n)
	}
	if n := strings.Count(out, "point fx.said.example.com at this load balancer"); n != 1 {
		t.Errorf("the hint is printed %d times, want 1", n)
	}
	if !strings.Contains(r.stdout, "fx.said.example.com  failed") {
		t.Errorf("the table lacks the row:\n%s", r.stdout)
	}
}

// TestInterruptDuringHook: Ctrl-C while a deploy hook runs finishes the
// deploy but ends the hook after a short grace, instead of waiting the
// hook out; a second Ctrl-C ends it at once. Either way the certificate
// stays owed a deploy, and the next run deploys it (issue #26 item 17).
func TestInterruptDuringHook(t *testing.T) {
	t.Parallel()
	e := newEnv(t, testenv.PebbleOptions{})
	http := fmt.Sprintf("127.0.0.1:%d", e.pebble.HTTPPort)
	slow, started, finished := filepath.Join(e.work, "slow"), filepath.Join(e.work, "started"), filepath.Join(e.work, "finished")
	os.WriteFile(slow, nil, 0o644)
	// While "slow" exists the hook outlasts every deadline of the test.
	hook := fmt.Sprintf("if [ -f %s ]; then touch %s; sleep 600; touch %s; fi", slow, started, finished)
	args := []string{"issue", "-d", "hook.int.example.com", "--standalone", "--http-addr", http, "--agree-tos",
		"--deploy-hook", hook, "--hook-timeout", "15m"}

	// One Ctrl-C: the hook gets its grace (2s here), then is ended.
	run := e.bg([]string{"LBCERT_HOOK_GRACE=2s"}, args...)
	if !poll(time.Minute, func() bool { _, err := os.Stat(started); return err == nil }) {
		t.Fatalf("the hook never started:\n%s", run.cmd.stderr())
	}
	run.proc.Signal(syscall.SIGINT)
	if r := run.wait(t, "issue", 2*time.Minute); r.code != 130 || !strings.Contains(r.stderr, "interrupted") {
		t.Fatalf("issue after Ctrl-C in the hook: exit %d, want 130", r.code)
	}
	if _, err := os.Stat(finished); err == nil {
		t.Fatal("the hook ran to its end")
	}
	if l := e.mustRun("list"); !strings.Contains(l.stdout, "pending deploy") {
		t.Fatalf("the certificate whose hook was cut is not owed a deploy:\n%s", l.stdout)
	}

	// Two: the grace is longer than the test's deadline, so only the
	// second signal can end the run.
	os.Remove(started)
	run = e.bg([]string{"LBCERT_HOOK_GRACE=1h"}, "renew", "--no-random-sleep")
	if !poll(time.Minute, func() bool { _, err := os.Stat(started); return err == nil }) {
		t.Fatalf("the hook never started:\n%s", run.cmd.stderr())
	}
	run.proc.Signal(syscall.SIGINT)
	run.saysSoon(t, "interrupt again to stop at once")
	run.proc.Signal(syscall.SIGINT)
	if r := run.wait(t, "renew", 2*time.Minute); r.code != 130 {
		t.Fatalf("renew after two Ctrl-C: exit %d, want 130", r.code)
	}
	if _, err := os.Stat(finished); err == nil {
		t.Fatal("the hook ran to its end")
	}

	// Consistent: with the hook quick again, the next run deploys it.
	os.Remove(slow)
	if r := e.mustRun("renew", "--no-random-sleep"); !strings.Contains(r.stdout, "deployed") {
		t.Fatalf("the owed deploy was not finished:\n%s", r.stdout)
	}
	if l := e.mustRun("list"); strings.Contains(l.stdout, "pending") {
		t.Fatalf("still pending after the deploy:\n%s", l.stdout)
	}
}

// TestRenewWording: what issue and renew print says what happened
// (issue #26 item 12): "issue --force" renewed, so it says "renewed"
// as its log does; a dry run deployed nothing; the rule that made a
// certificate due is said in words, not "(days)".
func TestRenewWording(t *testing.T) {
	t.Parallel()
	e := newEnv(t, testenv.PebbleOptions{})
	http := fmt.Sprintf("127.0.0.1:%d", e.pebble.HTTPPort)
	issue := []string{"issue", "-d", "words.example.com", "--standalone", "--http-addr", http, "--agree-tos"}
	if r := e.mustRun(issue...); !strings.Contains(r.stdout, "words.example.com: issued certificate") {
		t.Fatalf("first issue:\n%s", r.stdout)
	}
	r := e.mustRun(append(issue, "--force")...)
	if !strings.Contains(r.stdout, "words.example.com: renewed certificate") || strings.Contains(r.stdout, "issued") {
		t.Fatalf("issue --force of an existing lineage:\n%s", r.stdout)
	}
	r = e.mustRun("renew", "--dry-run", "--force", "--no-random-sleep")
	if !strings.Contains(r.stdout, "1 would renew (dry run)") || strings.Contains(r.stdout, "deploy deployed") ||
		!strings.Contains(r.stdout, "deploy none (dry run: nothing saved or deployed)") {
		t.Fatalf("renew --dry-run:\n%s", r.stdout)
	}
	r = e.mustRun("renew", "--days", "1000", "--no-random-sleep")
	if !strings.Contains(r.stdout, "due: fewer days left than --days") || strings.Contains(r.stdout, "(days)") {
		t.Fatalf("renew --days:\n%s", r.stdout)
	}
}
