package e2e

import (
	"context"
	"encoding/base64"
	"errors"
	"fmt"
	"net"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/lbcert/lbcert/internal/testenv"
)

const smtpSecret = "s3cret-Pa55word-for-lbcert"

func noSecret(t *testing.T, where string, texts ...string) {
	t.Helper()
	forms := map[string]string{
		"as written":                smtpSecret,
		"in base64":                 base64.StdEncoding.EncodeToString([]byte(smtpSecret)),
		"in base64 as AUTH PLAIN":   base64.StdEncoding.EncodeToString([]byte("\x00lbcert\x00" + smtpSecret)),
		"in base64 without padding": base64.RawStdEncoding.EncodeToString([]byte(smtpSecret)),
	}
	for _, s := range texts {
		for form, secret := range forms {
			if strings.Contains(s, secret) {
				t.Fatalf("the SMTP password appears %s in %s:\n%s", form, where, s)
			}
		}
	}
}

// TestMailReports: reports go through a real SMTP server with STARTTLS and
// AUTH, one mail per recipient with only that recipient's certificates;
// when the server is down, certificates are kept, the report is spooled
// and printed, and the exit code is partial. The password never shows.
func TestMailReports(t *testing.T) {
	t.Parallel()
	e := newEnv(t, testenv.PebbleOptions{})
	http := fmt.Sprintf("127.0.0.1:%d", e.pebble.HTTPPort)
	smtp, err := testenv.StartSMTP(e.work, "lbcert", smtpSecret)
	if err != nil {
		t.Fatal(err)
	}
	defer smtp.Stop()
	mailEnv := []string{
		"LBCERT_SMTP_HOST=" + smtp.Host, fmt.Sprintf("LBCERT_SMTP_PORT=%d", smtp.Port),
		"LBCERT_SMTP_USER=lbcert", "LBCERT_SMTP_PASSWORD=" + smtpSecret,
		"LBCERT_SMTP_CA_BUNDLE=" + smtp.CABundle, "LBCERT_MAIL_FROM=lbcert@lb1.example.com",
		"LBCERT_SMTP_RETRY_DELAY=100ms",
	}
	var outputs []string

	// issue mails the lineage's own recipient, and saves it.
	r := e.runEnv(mailEnv, "issue", "-d", "a.example.com", "--standalone", "--http-addr", http, "--agree-tos", "--mail-to", "a-owner@example.net")
	outputs = append(outputs, r.stdout, r.stderr)
	if r.code != 0 {
		t.Fatalf("issue: %d %s", r.code, r.stderr)
	}
	msgs := smtp.Messages()
	if len(msgs) != 1 || msgs[0].To[0] != "a-owner@example.net" || !msgs[0].TLS || msgs[0].User != "lbcert" {
		t.Fatalf("after issue: %+v", msgs)
	}
	if !strings.Contains(msgs[0].Data, ": lbcert issued 1") || !strings.Contains(msgs[0].Data, "ISSUED a.example.com") {
		t.Fatalf("issue mail:\n%s", msgs[0].Data)
	}
	e.runEnv(mailEnv, "issue", "-d", "b.example.com", "--standalone", "--http-addr", http, "--mail-to", "b-owner@example.net")
	meta := readFile(t, filepath.Join(e.dir, "live", "a.example.com", "lineage.json"))
	if !strings.Contains(meta, `"a-owner@example.net"`) {
		t.Fatalf("lineage recipients not saved:\n%s", meta)
	}
	noSecret(t, "lineage.json", meta)

	// renew: the global recipient gets one mail with both, each owner one
	// mail with only theirs.
	before := len(smtp.Messages())
	r = e.runEnv(append(mailEnv, "LBCERT_MAIL_TO=ops@example.com"), "renew", "--force", "--no-random-sleep")
	outputs = append(outputs, r.stdout, r.stderr)
	if r.code != 0 {
		t.Fatalf("renew: %d %s", r.code, r.stderr)
	}
	got := map[string]string{}
	for _, m := range smtp.Messages()[before:] {
		if len(m.To) != 1 {
			t.Fatalf("one recipient per mail, got %v", m.To)
		}
		if _, dup := got[m.To[0]]; dup {
			t.Fatalf("%s got two mails", m.To[0])
		}
		got[m.To[0]] = m.Data
	}
	if len(got) != 3 {
		t.Fatalf("want mails to ops, a-owner and b-owner, got %v", len(got))
	}
	if ops := got["ops@example.com"]; !strings.Contains(ops, "lbcert renewed 2") || !strings.Contains(ops, "RENEWED a.example.com") || !strings.Contains(ops, "RENEWED b.example.com") {
		t.Fatalf("ops mail:\n%s", ops)
	}
	if a := got["a-owner@example.net"]; !strings.Contains(a, "lbcert renewed 1") || strings.Contains(a, "b.example.com") {
		t.Fatalf("a-owner mail:\n%s", a)
	}
	if b := got["b-owner@example.net"]; strings.Contains(b, "a.example.com") {
		t.Fatalf("b-owner mail:\n%s", b)
	}
	for _, m := range smtp.Messages() {
		noSecret(t, "a mail", m.Data)
	}

	// A wrong password: the error names the server and its SMTP reply.
	bad := append(append([]string{}, mailEnv...), "LBCERT_SMTP_PASSWORD=wrong-password", "LBCERT_MAIL_TO=ops@example.com")
	r = e.runEnv(bad, "mail-test")
	if r.code != 1 || !strings.Contains(r.stderr, "through "+smtp.Addr) || !strings.Contains(r.stderr, "SMTP AUTH failed: 454") {
		t.Fatalf("bad password: exit %d %s", r.code, r.stderr)
	}
	r = e.runEnv(append(mailEnv, "LBCERT_MAIL_TO=ops@example.com"), "mail-test")
	if r.code != 0 || !strings.Contains(r.stdout, "test report sent to ops@example.com") {
		t.Fatalf("mail-test: %d %s %s", r.code, r.stdout, r.stderr)
	}

	// A relay whose refusal quotes the AUTH exchange back: its reply is
	// shown (the operator needs it), the password in it is not, in any
	// form, in the output, the spooled report or the lineage's status.
	smtp.SetEchoAuth(true)
	r = e.runEnv(append(mailEnv, "LBCERT_MAIL_TO=ops@example.com"), "mail-test")
	if r.code != 1 || !strings.Contains(r.stderr, "535") || !strings.Contains(r.stderr, "Authentication failed for AUTH PLAIN") {
		t.Fatalf("echoing relay, mail-test: exit %d\n%s", r.code, r.stderr)
	}
	outputs = append(outputs, r.stdout, r.stderr)
	r = e.runEnv(append(mailEnv, "LBCERT_MAIL_TO=ops@example.com"), "renew", "--force", "--no-random-sleep", "--name", "b.example.com")
	if r.code != 2 || !strings.Contains(r.stderr, "535") {
		t.Fatalf("echoing relay, renew: exit %d, want 2 (renewed, not mailed)\n%s", r.code, r.stderr)
	}
	outputs = append(outputs, r.stdout, r.stderr)
	noSecret(t, "renewal/b.example.com.json", readFile(t, filepath.Join(e.dir, "renewal", "b.example.com.json")))
	smtp.SetEchoAuth(false)

	// The server is down: certificates are still renewed and kept, the
	// report goes to stderr and reports/, the exit code is partial.
	serial := e.serial("a.example.com")
	down := append(append([]string{}, mailEnv...), "LBCERT_SMTP_PORT="+strings.Split(freeAddr(t), ":")[1], "LBCERT_MAIL_TO=ops@example.com")
	r = e.runEnv(down, "renew", "--force", "--no-random-sleep", "--name", "a.example.com")
	outputs = append(outputs, r.stdout, r.stderr)
	if r.code != 2 {
		t.Fatalf("server down: exit %d, want 2 (partial)\n%s", r.code, r.stderr)
	}
	if e.serial("a.example.com") == serial {
		t.Fatal("certificate not renewed when mail failed")
	}
	if !strings.Contains(r.stderr, "failed after 3 tries") || !strings.Contains(r.stderr, "RENEWED a.example.com") {
		t.Fatalf("stderr lacks the error or the report:\n%s", r.stderr)
	}
	spooled, _ := filepath.Glob(filepath.Join(e.dir, "reports", "*-renew-*.txt"))
	if len(spooled) == 0 {
		t.Fatal("report not spooled under reports/")
	}
	for _, p := range spooled {
		noSecret(t, p, readFile(t, p))
	}
	noSecret(t, "lbcert's output", outputs...)
}

// TestSilentSMTPServer: a relay that accepts and never greets does not
// hang lbcert: SIGTERM ends the run at once with exit 130.
func TestSilentSMTPServer(t *testing.T) {
	e := newEnv(t, testenv.PebbleOptions{})
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			defer c.Close() // accept, and say nothing
		}
	}()
	port := ln.Addr().(*net.TCPAddr).Port
	ctx, cancel := context.WithTimeout(context.Background(), runDeadline)
	defer cancel()
	cmd := e.command(ctx, "mail-test", "--smtp-host", "127.0.0.1", "--smtp-port", strconv.Itoa(port), "--smtp-tls", "none", "--mail-to", "ops@example.com")
	var out strings.Builder
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	time.Sleep(time.Second)
	cmd.Process.Signal(syscall.SIGTERM)
	err = cmd.Wait()
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.ExitCode() != 130 || ctx.Err() != nil {
		t.Fatalf("SIGTERM during a silent SMTP greeting: %v (ctx %v)\n%s", err, ctx.Err(), out.String())
	}
}
