package e2e

import (
	"bytes"
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

// TestNothingDueReadsNoSecret: a renew with nothing due, the cron case
// on almost every day, opens no secret. The account key, the account's
// registration, the EAB HMAC key file and the SMTP password file are
// FIFOs with no writer here: opening any of them for reading blocks, so
// a run that reads one never ends, and the test names the FIFO it
// opened. The run still asks the CA's ARI (an unauthenticated GET) and
// finds the certificate not due.
func TestNothingDueReadsNoSecret(t *testing.T) {
	t.Parallel()
	e := newEnv(t, testenv.PebbleOptions{})
	http := fmt.Sprintf("127.0.0.1:%d", e.pebble.HTTPPort)
	e.mustRun("issue", "-d", "quiet.example.com", "--standalone", "--http-addr", http, "--agree-tos")

	keys, _ := filepath.Glob(filepath.Join(e.dir, "accounts", "*", "*", "account.key"))
	if len(keys) != 1 {
		t.Fatalf("account keys: %v", keys)
	}
	fifos := []string{keys[0], filepath.Join(filepath.Dir(keys[0]), "account.json"),
		filepath.Join(e.work, "eab.key"), filepath.Join(e.work, "smtp.password")}
	for _, f := range fifos {
		os.Remove(f)
		if err := syscall.Mkfifo(f, 0o600); err != nil {
			t.Fatal(err)
		}
	}

	before := len(e.pebble.FullLog())
	ctx, cancel := context.WithTimeout(context.Background(), 40*time.Second)
	defer cancel()
	cmd := e.command(ctx, "renew", "--no-random-sleep", "--json",
		"--eab-kid", "kid-1", "--eab-hmac-key-file", fifos[2],
		"--smtp-host", "127.0.0.1", "--smtp-port", "1", "--smtp-tls", "tls", "--smtp-user", "reports",
		"--smtp-password-file", fifos[3], "--mail-to", "ops@example.com")
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	done := make(chan error, 1)
	go func() { done <- cmd.Run() }()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("renew: %v\n%s%s", err, out.String(), errb.String())
		}
	case <-time.After(30 * time.Second):
		// Whichever FIFO has a reader is the secret the run opened; a
		// non-blocking open for writing succeeds only then.
		var opened []string
		for _, f := range fifos {
			if w, err := os.OpenFile(f, os.O_WRONLY|syscall.O_NONBLOCK, 0); err == nil {
				opened = append(opened, f)
				w.Close()
			}
		}
		<-done
		t.Fatalf("a renew with nothing due blocked on reading %v\n%s%s", opened, out.String(), errb.String())
	}
	if !strings.Contains(out.String(), `"not_due": 1`) || strings.Contains(out.String(), `"renewed"`) {
		t.Fatalf("renew: want the certificate not due:\n%s%s", out.String(), errb.String())
	}
	if !strings.Contains(e.pebble.FullLog()[before:], "GET /draft-ietf-acme-ari-03/renewalInfo/") {
		t.Fatalf("the run did not ask ARI; Pebble's log since:\n%s", e.pebble.FullLog()[before:])
	}
}
