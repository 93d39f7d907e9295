package main

import (
	"context"
	"fmt"
	"time"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"

	"github.com/lbcert/lbcert/internal/notify"
	"github.com/lbcert/lbcert/internal/store"
)

// mailOptions are the global report settings. The password is not a flag:
// argv is visible to every user through ps.
type mailOptions struct{ notify.Options }

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

// lineageMail is what issue saves with a lineage: the mail settings
// given on its command line (notify.Options.Saved).
func (a *app) lineageMail(fs *pflag.FlagSet, prev *store.Mail) store.Mail {
	return a.mail.Saved(fs.Changed, prev)
}

// mailReport sends the run's report, one mail per recipient, when the
// --report mode says so, even after an interrupt (under a short
// deadline of its own). A mail failure never undoes the run: the report
// is printed to stderr and spooled under <dir>/reports/, and the run is
// partial.
func (a *app) mailReport(ctx context.Context, st *store.Store, rep *notify.Report) error {
	m := &notify.Mailer{Options: a.mail.Options, Password: a.getenv("LBCERT_SMTP_PASSWORD"), Dir: st.Dir, Now: a.now, Stop: a.hardStop,
		Failed: func(env notify.Envelope, err error, spooled string) {
			a.say.errorWithHint(err)
			if spooled != "" {
				a.say.hintf("the report is saved in %s; it follows here too", spooled)
			}
			fmt.Fprintf(a.err, "Subject: %s\n\n%s\n", env.Report.Subject(), env.Report.Body())
		}}
	if d := a.getenv("LBCERT_SMTP_RETRY_DELAY"); d != "" { // for tests of the retry path
		m.RetryDelay, _ = time.ParseDuration(d)
	}
	failed, err := m.Deliver(ctx, rep)
	if err == nil && failed > 0 {
		err = mark(errReported, errPartial)
	}
	return err
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
			return a.mail.Test(cmd.Context(), a.getenv("LBCERT_SMTP_PASSWORD"), a.now(), func(to, relay string) {
				a.printf("test report sent to %s through %s\n", to, relay)
			})
		},
	}
}
