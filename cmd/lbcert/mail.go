package main

import (
	"context"
	"fmt"
	"log/slog"
	"net/mail"
	"os"
	"strings"
	"time"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"

	"github.com/lbcert/lbcert/internal/notify"
	"github.com/lbcert/lbcert/internal/secret"
	"github.com/lbcert/lbcert/internal/store"
)

// mailOptions are the global report settings. The password is not a flag:
// argv is visible to every user through ps.
type mailOptions struct {
	Host         string
	Port         int
	From         string
	To           []string
	User         string
	PasswordFile string
	TLS          string
	CABundle     string
	Report       string
}

func (m *mailOptions) register(pf *pflag.FlagSet) {
	pf.StringVar(&m.Host, "smtp-host", "localhost", "SMTP server for reports")
	pf.IntVar(&m.Port, "smtp-port", 25, "SMTP port")
	pf.StringVar(&m.From, "mail-from", "", "sender address of reports (default lbcert@<hostname>)")
	pf.StringArrayVar(&m.To, "mail-to", nil, "report recipient (repeatable); no recipient, no mail")
	pf.StringVar(&m.User, "smtp-user", "", "SMTP user; the password comes from LBCERT_SMTP_PASSWORD or --smtp-password-file")
	pf.StringVar(&m.PasswordFile, "smtp-password-file", "", "file holding the SMTP password")
	pf.StringVar(&m.TLS, "smtp-tls", "starttls", "starttls (required, certificate verified), tls, opportunistic or none")
	pf.StringVar(&m.CABundle, "smtp-ca-bundle", "", "PEM roots to trust for the SMTP server's certificate")
	pf.StringVar(&m.Report, "report", "changes", "when to mail: changes (something issued, renewed, deleted or failed), always, never")
}

// check validates the mail settings offline; it never reads the password
// unless a user is set, and never prints it.
func (m *mailOptions) check() error {
	switch m.Report {
	case "changes", "always", "never":
	default:
		return fmt.Errorf("--report %q: want changes, always or never", m.Report)
	}
	switch m.TLS {
	case "starttls", "tls", "opportunistic", "none":
	default:
		return fmt.Errorf("--smtp-tls %q: want one of %s", m.TLS, strings.Join(notify.TLSModes, ", "))
	}
	if m.Port < 1 || m.Port > 65535 {
		return fmt.Errorf("--smtp-port %d: want 1-65535", m.Port)
	}
	// Refused now, before any connection: a login over a connection
	// without TLS would send the password in the clear.
	if m.User != "" && !notify.TLSAlways(m.TLS) {
		return fmt.Errorf("--smtp-user is set for relay %s:%d, but --smtp-tls %s could send its password in the clear: use starttls or tls, or drop --smtp-user", m.Host, m.Port, m.TLS)
	}
	for _, to := range m.To {
		if err := checkAddress("--mail-to", to); err != nil {
			return err
		}
	}
	if m.From != "" {
		if err := checkAddress("--mail-from", m.From); err != nil {
			return err
		}
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

// lineageMail is what issue saves with a lineage: the mail settings given
// on its command line, so renew mails the same people through the same
// relay.
func (a *app) lineageMail(fs *pflag.FlagSet, prev *store.Mail) store.Mail {
	var out store.Mail
	if prev != nil {
		out = *prev
	}
	m := a.mail
	if fs.Changed("mail-to") {
		out.To = m.To
	}
	if fs.Changed("mail-from") {
		out.From = m.From
	}
	if fs.Changed("smtp-host") {
		out.Host = m.Host
	}
	if fs.Changed("smtp-port") {
		out.Port = m.Port
	}
	// A relay is saved whole: its TLS mode and roots with its address,
	// or a cron renew would try the global mode against it.
	if fs.Changed("smtp-host") || fs.Changed("smtp-port") || fs.Changed("smtp-tls") {
		out.TLS = m.TLS
	}
	if fs.Changed("smtp-host") || fs.Changed("smtp-port") || fs.Changed("smtp-ca-bundle") {
		out.CABundle = absPath(m.CABundle)
		if m.CABundle == "" {
			out.CABundle = ""
		}
	}
	return out
}

func (a *app) settings() (notify.Settings, error) {
	m := a.mail
	s := notify.Settings{Host: m.Host, Port: m.Port, From: m.From, User: m.User, TLS: m.TLS, CABundle: m.CABundle}
	if s.From == "" {
		host, _ := os.Hostname()
		s.From = "lbcert@" + host
	}
	if m.User != "" {
		s.Password = a.getenv("LBCERT_SMTP_PASSWORD")
		if m.PasswordFile != "" {
			data, err := os.ReadFile(m.PasswordFile)
			if err != nil {
				return s, fmt.Errorf("--smtp-password-file %s: %w", m.PasswordFile, unwrapPath(err))
			}
			s.Password = strings.TrimRight(string(data), "\r\n")
		}
		secret.Add(s.Password)
	}
	if d := a.getenv("LBCERT_SMTP_RETRY_DELAY"); d != "" { // for tests of the retry path
		if v, err := time.ParseDuration(d); err == nil {
			s.Backoff = v
		}
	}
	return s, nil
}

func hostname() string {
	h, err := os.Hostname()
	if err != nil {
		return "localhost"
	}
	return strings.SplitN(h, ".", 2)[0]
}

// mailStepTimeout bounds all the mail of one run.
const mailStepTimeout = 5 * time.Minute

// mailReport sends the run's report, one mail per recipient, when the
// --report mode says so. A mail failure never undoes the run: it prints
// the report to stderr, spools it under <dir>/reports/, and returns an
// error with the partial-failure code.
func (a *app) mailReport(ctx context.Context, st *store.Store, rep *notify.Report) error {
	switch a.mail.Report {
	case "never":
		return nil
	case "changes":
		if !rep.Changed() {
			return nil
		}
	}
	rep.Host = hostname()
	if rep.Time.IsZero() {
		rep.Time = a.now()
	}
	envs := notify.Group(rep, a.mail.To, notify.Relay{})
	if len(envs) == 0 {
		return nil // mail is not configured
	}
	set, err := a.settings()
	if err != nil {
		return err
	}
	sender := &notify.Sender{Settings: set, Now: a.now}
	// The whole mail step is bounded: every report still gets spooled
	// when a relay is slow, and the run ends.
	ctx, cancel := context.WithTimeout(ctx, mailStepTimeout)
	defer cancel()
	failed := 0
	for _, env := range envs {
		if err := sender.Send(ctx, env); err != nil {
			failed++
			path, serr := notify.Spool(st.Dir, env)
			a.say.errorWithHint(err)
			if serr == nil {
				a.say.hintf("the report is saved in %s; it follows here too", path)
			}
			fmt.Fprintf(a.err, "Subject: %s\n\n%s\n", env.Report.Subject(), env.Report.Body())
			continue
		}
		slog.Info("report mailed", "to", env.To, "subject", env.Report.Subject())
	}
	if failed > 0 {
		return mark(errReported, errPartial)
	}
	return nil
}

func (a *app) newMailTestCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "mail-test",
		Short: "Send a test report with the configured mail settings",
		Long: `Send a test report to every --mail-to recipient with the configured SMTP
settings, so you can check them before relying on them. Exits non-zero,
with the server's reply, when the mail cannot be sent.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			if len(a.mail.To) == 0 {
				return fmt.Errorf("mail-test: no recipient: pass --mail-to ADDR")
			}
			set, err := a.settings()
			if err != nil {
				return err
			}
			rep := &notify.Report{Host: hostname(), Command: "mail-test", Time: a.now(), Items: []notify.Item{{
				Name: "test", Outcome: "test", Error: "", Hint: "this is a test report from 'lbcert mail-test'; nothing was issued",
			}}}
			sender := &notify.Sender{Settings: set, Now: a.now}
			sender.Settings.Tries = 1
			for _, env := range notify.Group(rep, a.mail.To, notify.Relay{}) {
				if err := sender.Send(cmd.Context(), env); err != nil {
					return err
				}
				a.printf("test report sent to %s through %s:%d\n", env.To, set.Host, set.Port)
			}
			return nil
		},
	}
}
