package notify

import (
	"context"
	"fmt"
	"log/slog"
	"net/mail"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/lbcert/lbcert/internal/argfile"
	"github.com/lbcert/lbcert/internal/store"
)

// Options are the report settings as a command was given them: the
// relay, the recipients and when to mail. The password is not among
// them: it comes from the environment or a file, never from argv.
type Options struct {
	Host         string
	Port         int
	From         string
	To           []string
	User         string
	PasswordFile string
	TLS          string
	CABundle     string
	Report       string // changes, always, never
}

// Check validates the settings offline; it reads no password.
func (o Options) Check() error {
	switch o.Report {
	case "changes", "always", "never":
	default:
		return fmt.Errorf("--report %q: want changes, always or never", o.Report)
	}
	switch o.TLS {
	case "starttls", "tls", "opportunistic", "none":
	default:
		return fmt.Errorf("--smtp-tls %q: want one of %s", o.TLS, strings.Join(TLSModes, ", "))
	}
	if o.Port < 1 || o.Port > 65535 {
		return fmt.Errorf("--smtp-port %d: want 1-65535", o.Port)
	}
	// Refused now, before any connection: a login over a connection
	// without TLS would send the password in the clear.
	if o.User != "" && !tlsAlways(o.TLS) {
		return fmt.Errorf("--smtp-user is set for relay %s:%d, but --smtp-tls %s could send its password in the clear: use starttls or tls, or drop --smtp-user", o.Host, o.Port, o.TLS)
	}
	for _, to := range o.To {
		if err := checkAddress("--mail-to", to); err != nil {
			return err
		}
	}
	if o.From != "" {
		return checkAddress("--mail-from", o.From)
	}
	return nil
}

func checkAddress(flag, addr string) error {
	a, err := mail.ParseAddress(addr)
	if err != nil || a.Address != addr {
		return fmt.Errorf("%s %q is not an email address", flag, addr)
	}
	return nil
}

// Settings are the sender's settings: password is LBCERT_SMTP_PASSWORD's
// value, replaced by --smtp-password-file's content when one is named;
// either is read only when a user is set.
func (o Options) Settings(password string) (Settings, error) {
	return o.settings(password, o.User != "")
}

// settings is Settings, reading the password when login says a relay
// wants it: --smtp-user's, or a login a lineage saved with its relay.
func (o Options) settings(password string, login bool) (Settings, error) {
	s := Settings{Host: o.Host, Port: o.Port, From: o.From, User: o.User, TLS: o.TLS, CABundle: o.CABundle}
	if s.From == "" {
		host, _ := os.Hostname()
		s.From = "lbcert@" + host
	}
	if !login {
		return s, nil
	}
	s.Password = password
	if o.PasswordFile != "" {
		data, err := argfile.Read(o.PasswordFile, argfile.Secret)
		if err != nil {
			return s, fmt.Errorf("--smtp-password-file %s: %w", o.PasswordFile, err)
		}
		s.Password = strings.TrimRight(string(data), "\r\n")
	}
	scrub("", s.Password) // registered: never printed from here on
	return s, nil
}

// CheckLogin refuses --smtp-user without a password before a run orders
// anything: the relay would refuse the login only after the run, with a
// reply that does not say the password is missing. It does not read a
// password file, only looks at it: a run with nothing to mail reads no
// secret (the file may be a pipe a secret manager writes once).
func (o Options) CheckLogin(password string) error {
	if o.User == "" {
		return nil
	}
	if o.PasswordFile != "" {
		fi, err := os.Stat(o.PasswordFile)
		switch {
		case err != nil:
			return fmt.Errorf("--smtp-password-file %s: %w", o.PasswordFile, unwrapPath(err))
		case fi.IsDir():
			return fmt.Errorf("--smtp-password-file %s is a directory: want the file holding the password of --smtp-user %s", o.PasswordFile, o.User)
		case fi.Mode().IsRegular() && fi.Size() <= 2 && blank(o.PasswordFile):
			return fmt.Errorf("--smtp-password-file %s is empty: write the password of --smtp-user %s in it", o.PasswordFile, o.User)
		}
		return nil
	}
	if password == "" {
		return fmt.Errorf("--smtp-user %s has no password: set LBCERT_SMTP_PASSWORD, or pass --smtp-password-file FILE", o.User)
	}
	return nil
}

// blank reports whether a file of at most two bytes holds only a line
// end (an empty password).
func blank(file string) bool {
	data, err := os.ReadFile(file)
	return err == nil && strings.TrimRight(string(data), "\r\n") == ""
}

// stepTimeout bounds all the mail of one run; afterInterrupt bounds it
// when a signal already ended the run: the report still goes out (cron
// must hear what was renewed before the stop), but quickly.
const (
	stepTimeout    = 5 * time.Minute
	afterInterrupt = 30 * time.Second
)

// Mailer delivers a run's report to every recipient, one mail each.
type Mailer struct {
	Options  Options
	Password string // LBCERT_SMTP_PASSWORD's value
	Dir      string // the state directory: reports that cannot be mailed go to Dir/reports/
	Now      func() time.Time
	// Stop, when set, ends the mail step at once: the second Ctrl-C.
	Stop context.Context
	// RetryDelay overrides the first retry's pause (tests).
	RetryDelay time.Duration
	// Failed is told of every report that could not be mailed, with
	// where it was spooled ("" when that failed too).
	Failed func(env Envelope, err error, spooled string)
}

// Deliver mails rep when the --report mode says so, and returns how many
// mails failed. A mail failure never undoes the run: the report is
// spooled and handed to Failed. After an interrupt (ctx done) the
// report says so and is sent under its own short deadline.
func (m *Mailer) Deliver(ctx context.Context, rep *Report) (int, error) {
	interrupted := ctx.Err() != nil
	rep.Interrupted = rep.Interrupted || interrupted
	switch m.Options.Report {
	case "never":
		return 0, nil
	case "changes":
		if !rep.Changed() {
			return 0, nil
		}
	}
	rep.Host = ShortHostname()
	if rep.Time.IsZero() {
		rep.Time = m.Now()
	}
	envs := Group(rep, m.Options.To, Relay{})
	if len(envs) == 0 {
		return 0, nil // mail is not configured
	}
	set, err := m.Options.settings(m.Password, m.Options.User != "" || slices.ContainsFunc(envs, func(e Envelope) bool { return e.Relay.User != "" }))
	if err != nil {
		return 0, err
	}
	set.Backoff = m.RetryDelay
	timeout := stepTimeout
	if interrupted {
		timeout, set.Tries = afterInterrupt, 1
	}
	// The whole step is bounded: every report still gets spooled when a
	// relay is slow, and the run ends.
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), timeout)
	defer cancel()
	if m.Stop != nil {
		defer context.AfterFunc(m.Stop, cancel)()
	}
	sender := &Sender{Settings: set, Now: m.Now}
	failed := 0
	for _, env := range envs {
		if err := sender.Send(ctx, env); err != nil {
			failed++
			path, serr := Spool(m.Dir, env)
			if serr != nil {
				path = ""
			}
			m.Failed(env, err, path)
			continue
		}
		slog.Info("report mailed", "to", env.To, "subject", env.Report.Subject())
	}
	return failed, nil
}

// ShortHostname is the machine's name without its domain, for subjects.
func ShortHostname() string {
	h, err := os.Hostname()
	if err != nil {
		return "localhost"
	}
	return strings.SplitN(h, ".", 2)[0]
}

func unwrapPath(err error) error {
	if pe, ok := err.(*os.PathError); ok {
		return pe.Err
	}
	return err
}

// Saved is what a lineage saves of these settings: those changed says
// were given on its command line, over prev, so that renew mails the
// same people through the same relay. A relay is saved whole, its TLS
// mode, roots and login user with its address, or a cron renew would try
// the global mode against it, or no login. Never the password.
func (o Options) Saved(changed func(flag string) bool, prev *store.Mail) store.Mail {
	var out store.Mail
	if prev != nil {
		out = *prev
	}
	if changed("mail-to") {
		out.To = o.To
	}
	if changed("mail-from") {
		out.From = o.From
	}
	if changed("smtp-host") {
		out.Host = o.Host
	}
	if changed("smtp-port") {
		out.Port = o.Port
	}
	relay := changed("smtp-host") || changed("smtp-port")
	if relay || changed("smtp-user") {
		out.User = o.User // its login, whose password cron must give again
	}
	if relay || changed("smtp-tls") {
		out.TLS = o.TLS
	}
	if relay || changed("smtp-ca-bundle") {
		out.CABundle = ""
		if o.CABundle != "" {
			out.CABundle, _ = filepath.Abs(o.CABundle)
		}
	}
	return out
}

// Test sends a test report to every recipient, one try each, and says
// each one sent (lbcert mail-test); the error is the relay's reply.
func (o Options) Test(ctx context.Context, password string, now time.Time, sent func(to, relay string)) error {
	if len(o.To) == 0 {
		return fmt.Errorf("mail-test: no recipient: pass --mail-to ADDR")
	}
	if err := o.CheckLogin(password); err != nil {
		return err
	}
	set, err := o.Settings(password)
	if err != nil {
		return err
	}
	set.Tries = 1
	rep := &Report{Host: ShortHostname(), Command: "mail-test", Time: now, Items: []Item{{
		Name: "test", Outcome: "test", Hint: "this is a test report from 'lbcert mail-test'; nothing was issued",
	}}}
	sender := &Sender{Settings: set, Now: func() time.Time { return now }}
	for _, env := range Group(rep, o.To, Relay{}) {
		if err := sender.Send(ctx, env); err != nil {
			return err
		}
		sent(env.To, fmt.Sprintf("%s:%d", set.Host, set.Port))
	}
	return nil
}
