package notify

import (
	"context"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/lbcert/lbcert/internal/hint"
	"github.com/lbcert/lbcert/internal/store"
	"github.com/lbcert/lbcert/internal/testenv"
)

// The configured SMTP login goes only to the configured relay. A relay a
// lineage or CSV row names gets the report without any AUTH, over TLS.
func TestCredentialsStayWithTheirRelay(t *testing.T) {
	dir := t.TempDir()
	global, err := testenv.StartSMTP(dir, "lbcert", "s3cret-pass")
	if err != nil {
		t.Fatal(err)
	}
	defer global.Stop()
	row, err := testenv.StartSMTP(dir, "", "")
	if err != nil {
		t.Fatal(err)
	}
	defer row.Stop()
	for _, mode := range []string{"starttls"} { // the test servers speak STARTTLS
		s := &Sender{Now: time.Now, Settings: Settings{Host: global.Host, Port: global.Port, From: "lbcert@example.com",
			User: "lbcert", Password: "s3cret-pass", TLS: mode, CABundle: global.CABundle, Tries: 1}}
		rep := &Report{Host: "lb1", Command: "batch", Time: time.Now(), Items: []Item{{Name: "a.example.com", Outcome: "issued"}}}
		// The row's relay: no login, the mail arrives, no AUTH was sent.
		err := s.Send(context.Background(), Envelope{To: "row@example.com", Relay: Relay{Host: row.Host, Port: row.Port}, Report: rep})
		if err != nil {
			t.Fatalf("%s: mail to the row's relay: %v", mode, err)
		}
		if n := len(row.Messages()); n != 1 || !row.Messages()[0].TLS {
			t.Fatalf("%s: the row's relay got %d messages (TLS %v)", mode, n, n == 1 && row.Messages()[0].TLS)
		}
		if row.AuthAttempts != 0 {
			t.Fatalf("%s: the row's relay was sent AUTH %d times: the global password went to it", mode, row.AuthAttempts)
		}
		// The configured relay still gets its login.
		if err := s.Send(context.Background(), Envelope{To: "ops@example.com", Report: rep}); err != nil {
			t.Fatalf("%s: mail to the configured relay: %v", mode, err)
		}
		if global.Auths != 1 || !strings.Contains(global.Messages()[0].User, "lbcert") {
			t.Fatalf("%s: configured relay: %d logins", mode, global.Auths)
		}
	}
}

// A login goes only over a connection that is TLS for certain: the
// configured relay reached with a lineage's saved "none" or
// "opportunistic" gets no password; the error says why, before any
// connection (the relay counts no AUTH and no message).
func TestNoLoginWithoutTLS(t *testing.T) {
	relay, err := testenv.StartSMTP(t.TempDir(), "lbcert", "s3cret-pass")
	if err != nil {
		t.Fatal(err)
	}
	defer relay.Stop()
	for _, mode := range []string{"none", "opportunistic"} {
		s := &Sender{Now: time.Now, Settings: Settings{Host: relay.Host, Port: relay.Port, From: "lbcert@example.com",
			User: "lbcert", Password: "s3cret-pass", TLS: "starttls", CABundle: relay.CABundle, Tries: 1}}
		rep := &Report{Host: "lb1", Command: "renew", Time: time.Now(), Items: []Item{{Name: "a.example.com", Outcome: "renewed"}}}
		err := s.Send(context.Background(), Envelope{To: "ops@example.com", Relay: Relay{Host: relay.Host, Port: relay.Port, TLS: mode}, Report: rep})
		if err == nil || !strings.Contains(err.Error(), "refusing to log in with --smtp-tls "+mode) || strings.Contains(err.Error(), "s3cret-pass") {
			t.Fatalf("%s: %v", mode, err)
		}
		if relay.AuthAttempts != 0 || len(relay.Messages()) != 0 {
			t.Fatalf("%s: the relay saw %d AUTH and %d messages", mode, relay.AuthAttempts, len(relay.Messages()))
		}
	}
}

// A lineage's relay is used with its own saved TLS mode, not the global
// one: here the global mode verifies STARTTLS against roots that do not
// sign the relay's certificate, and the relay's own "none" must win.
func TestRelayKeepsItsTLSMode(t *testing.T) {
	relay, err := testenv.StartSMTP(t.TempDir(), "", "")
	if err != nil {
		t.Fatal(err)
	}
	defer relay.Stop()
	s := &Sender{Now: time.Now, Settings: Settings{Host: "localhost", Port: 25, From: "lbcert@example.com", TLS: "starttls", Tries: 1}}
	rep := &Report{Host: "lb1", Command: "renew", Time: time.Now(), Items: []Item{{Name: "a.example.com", Outcome: "renewed"}}}
	err = s.Send(context.Background(), Envelope{To: "ops@example.com", Relay: Relay{Host: relay.Host, Port: relay.Port, TLS: "none"}, Report: rep})
	if err != nil {
		t.Fatalf("the relay's own TLS mode was not used: %v", err)
	}
	if m := relay.Messages(); len(m) != 1 || m[0].TLS {
		t.Fatalf("messages %+v", m)
	}
}

// A link planted at the report's name is replaced, never followed: the
// file it points to is left alone.
func TestSpoolDoesNotFollowLinks(t *testing.T) {
	dir := t.TempDir()
	victim := filepath.Join(t.TempDir(), "victim")
	os.WriteFile(victim, []byte("precious"), 0o644)
	env := Envelope{To: "ops@example.com", Report: &Report{Host: "lb1", Command: "renew", Time: time.Date(2026, 12, 1, 2, 17, 0, 0, time.UTC)}}
	os.MkdirAll(filepath.Join(dir, "reports"), 0o700)
	planted := filepath.Join(dir, "reports", "20261201T021700Z-renew-ops@example.com.txt")
	if err := os.Symlink(victim, planted); err != nil {
		t.Fatal(err)
	}
	p, err := Spool(dir, env)
	if err != nil || p != planted {
		t.Fatalf("Spool = %s, %v (planted %s)", p, err, planted)
	}
	if data, _ := os.ReadFile(victim); string(data) != "precious" {
		t.Fatalf("the link was followed: victim now %q", data)
	}
	if fi, _ := os.Lstat(p); fi.Mode()&os.ModeSymlink != 0 {
		t.Fatal("the report is still a link")
	}
}

// A relay that accepts and never greets, or drips its greeting, cannot
// hold the run: the session has one deadline, and cancelling (SIGTERM)
// ends it at once.
func TestSilentRelayIsBounded(t *testing.T) {
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
			go func() { // drip "220" one byte every 400 ms, never a full line
				defer c.Close()
				for _, b := range []byte("220 slowly") {
					c.Write([]byte{b})
					time.Sleep(400 * time.Millisecond)
				}
			}()
		}
	}()
	port := ln.Addr().(*net.TCPAddr).Port
	rep := &Report{Host: "lb1", Command: "renew", Time: time.Now(), Items: []Item{{Name: "a", Outcome: "renewed"}}}
	s := &Sender{Now: time.Now, Settings: Settings{Host: "127.0.0.1", Port: port, From: "lbcert@example.com", TLS: "none", Tries: 1, Timeout: time.Second}}
	done := make(chan error, 1)
	go func() { done <- s.Send(context.Background(), Envelope{To: "ops@example.com", Report: rep}) }()
	select {
	case err := <-done:
		if err == nil {
			t.Fatal("a silent relay accepted the mail")
		}
	case <-time.After(20 * time.Second):
		t.Fatal("a dripping greeting held the send past its deadline")
	}
	// Cancelled (SIGTERM), a send with a long deadline ends at once.
	s.Settings.Timeout = time.Hour
	ctx, cancel := context.WithCancel(context.Background())
	go func() { done <- s.Send(ctx, Envelope{To: "ops@example.com", Report: rep}) }()
	time.Sleep(300 * time.Millisecond)
	cancel()
	select {
	case err := <-done:
		if err == nil {
			t.Fatal("a cancelled send succeeded")
		}
	case <-time.After(20 * time.Second):
		t.Fatal("cancelling did not end the SMTP session")
	}
}

// A relay that offers no STARTTLS, with --smtp-tls's default: the error
// says so and the hint names --smtp-tls's other modes (issue #26 item
// 16); "1 try" is singular.
func TestNoSTARTTLSHintsSMTPTLS(t *testing.T) {
	relay, err := testenv.StartSMTPWithoutTLS(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	defer relay.Stop()
	s := &Sender{Now: time.Now, Settings: Settings{Host: relay.Host, Port: relay.Port, From: "lbcert@example.com", TLS: "starttls", Tries: 1}}
	rep := &Report{Host: "lb1", Command: "renew", Time: time.Now()}
	err = s.Send(context.Background(), Envelope{To: "ops@example.com", Report: rep})
	if err == nil || !strings.Contains(err.Error(), "STARTTLS") || !strings.Contains(err.Error(), "after 1 try:") {
		t.Fatalf("err = %v", err)
	}
	if h := hint.Of(err); !strings.Contains(h, "--smtp-tls tls") || !strings.Contains(h, "opportunistic") {
		t.Fatalf("hint = %q", h)
	}
	// The same relay with --smtp-tls opportunistic takes the mail.
	s.Settings.TLS = "opportunistic"
	if err := s.Send(context.Background(), Envelope{To: "ops@example.com", Report: rep}); err != nil || len(relay.Messages()) != 1 {
		t.Fatalf("opportunistic: %v, %d messages", err, len(relay.Messages()))
	}
}

// A relay saved with its login (issue --smtp-host H --smtp-user U) logs
// in with the run's password, as issue did: cron's renew names no relay
// of its own, and the report must not be lost to "530 authentication
// required". A run that logs in to another relay itself sends that
// password nowhere else, and a login without a password says so.
func TestSavedRelayLogsIn(t *testing.T) {
	relay, err := testenv.StartSMTP(t.TempDir(), "mailer", "s3cret-pass")
	if err != nil {
		t.Fatal(err)
	}
	defer relay.Stop()
	saved := Relay{Host: relay.Host, Port: relay.Port, CABundle: relay.CABundle, User: "mailer"}
	rep := &Report{Host: "lb1", Command: "renew", Time: time.Now(), Items: []Item{{Name: "a.example.com", Outcome: "renewed"}}}
	send := func(set Settings) error {
		set.From, set.TLS, set.Tries = "lbcert@example.com", "starttls", 1
		s := &Sender{Now: time.Now, Settings: set}
		return s.Send(context.Background(), Envelope{To: "ops@example.com", Relay: saved, Report: rep})
	}
	if err := send(Settings{Host: "localhost", Port: 25, Password: "s3cret-pass"}); err != nil {
		t.Fatalf("the saved relay with its login: %v", err)
	}
	if m := relay.Messages(); relay.Auths != 1 || len(m) != 1 || m[0].User != "mailer" {
		t.Fatalf("the saved relay: %d logins, messages %+v", relay.Auths, m)
	}
	err = send(Settings{Host: "localhost", Port: 25, User: "other", Password: "s3cret-pass"})
	if err == nil || !strings.Contains(err.Error(), "this run's password is --smtp-user other's") {
		t.Errorf("a run with its own login on another relay: %v", err)
	}
	err = send(Settings{Host: "localhost", Port: 25})
	if err == nil || !strings.Contains(err.Error(), "no password") || !strings.Contains(hint.Of(err), "LBCERT_SMTP_PASSWORD") {
		t.Errorf("a saved login and no password: %v (hint %q)", err, hint.Of(err))
	}
	if relay.AuthAttempts != 1 || len(relay.Messages()) != 1 {
		t.Errorf("the refused sends reached the relay: %d AUTH, %d messages", relay.AuthAttempts, len(relay.Messages()))
	}
}

// --smtp-user without a password is refused before the run (and mail-test)
// sends anything; so is an empty password file.
func TestCheckLogin(t *testing.T) {
	empty := filepath.Join(t.TempDir(), "pw")
	os.WriteFile(empty, []byte("\n"), 0o600)
	for _, c := range []struct {
		o        Options
		password string
		want     string
	}{
		{Options{}, "", ""},
		{Options{User: "mailer"}, "pw", ""},
		{Options{User: "mailer"}, "", "--smtp-user mailer has no password: set LBCERT_SMTP_PASSWORD, or pass --smtp-password-file FILE"},
		{Options{User: "mailer", PasswordFile: empty}, "pw", "--smtp-password-file " + empty + " is empty"},
		{Options{User: "mailer", PasswordFile: empty + ".missing"}, "", "--smtp-password-file " + empty + ".missing: no such file"},
	} {
		err := c.o.CheckLogin(c.password)
		if (c.want == "") != (err == nil) || err != nil && !strings.Contains(err.Error(), c.want) {
			t.Errorf("%+v, password %q: %v, want %q", c.o, c.password, err, c.want)
		}
	}
	err := Options{User: "mailer", To: []string{"ops@example.com"}}.Test(context.Background(), "", time.Now(), func(string, string) {})
	if err == nil || !strings.Contains(err.Error(), "has no password") {
		t.Errorf("mail-test with a user and no password: %v", err)
	}
}

// A relay is saved with its login user, never its password; a login
// given alone is saved too (for the configured relay).
func TestSavedKeepsTheLogin(t *testing.T) {
	o := Options{Host: "mx.example.com", Port: 587, User: "mailer", PasswordFile: "/etc/pw", TLS: "starttls"}
	changed := func(set ...string) func(string) bool {
		return func(f string) bool { return slices.Contains(set, f) }
	}
	if m := o.Saved(changed("smtp-host", "smtp-user"), nil); m.User != "mailer" || m.Host != "mx.example.com" {
		t.Errorf("relay and user: %+v", m)
	}
	if m := o.Saved(changed("smtp-host"), &store.Mail{User: "old"}); m.User != "mailer" {
		t.Errorf("a new relay keeps an old login: %+v", m)
	}
	if m := o.Saved(changed("mail-to"), &store.Mail{Host: "h", User: "kept"}); m.User != "kept" {
		t.Errorf("a change of recipients drops the relay's login: %+v", m)
	}
}

// An --smtp-ca-bundle that is not a regular file is refused at once: a
// FIFO hung the run, and its report, past every signal (a review's
// finding).
func TestSMTPCABundleNotARegularFile(t *testing.T) {
	fifo := filepath.Join(t.TempDir(), "bundle.pem")
	if err := syscall.Mkfifo(fifo, 0o600); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() {
		_, err := newClient(context.Background(), Settings{Host: "127.0.0.1", Port: 1, CABundle: fifo}, &lastVerb{})
		done <- err
	}()
	select {
	case err := <-done:
		if err == nil || !strings.Contains(err.Error(), "--smtp-ca-bundle "+fifo+": a pipe with nothing written to it") {
			t.Errorf("%v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("still reading the bundle after 5 s")
	}
}
