package inventory

import (
	"fmt"
	"io"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/lbcert/lbcert/internal/renewal"
)

// Clock says times as list and show print them: relative to Now on a
// terminal ("in 59d"), RFC 3339 in a pipe, for scripts.
type Clock struct {
	Now      time.Time
	Terminal bool
}

// When formats t for a person on a terminal, or as RFC 3339 for a pipe.
func (c Clock) When(t time.Time) string {
	if !c.Terminal {
		return t.UTC().Format(time.RFC3339)
	}
	d := t.Sub(c.Now)
	switch {
	case d < 0:
		return relative(-d) + " ago"
	default:
		return "in " + relative(d)
	}
}

// RenewWhen is When for the next renewal: a moment already passed means
// the next renew run renews it.
func (c Clock) RenewWhen(t time.Time) string {
	if c.Terminal && !t.After(c.Now) {
		return "due now"
	}
	return c.When(t)
}

func relative(d time.Duration) string {
	switch {
	case d >= 48*time.Hour:
		return fmt.Sprintf("%dd", int(d.Hours()/24))
	case d >= 2*time.Hour:
		return fmt.Sprintf("%dh", int(d.Hours()))
	default:
		return fmt.Sprintf("%dm", int(d.Minutes()))
	}
}

// Table writes list's table: one row per lineage, a name never issued
// and one that could not be read included.
func Table(w io.Writer, entries []Entry, c Clock) {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "NAME\tDOMAINS\tEXPIRES\tDAYS\tRENEWS\tRULE\tCHALLENGE\tDEPLOY\tSTATUS")
	for _, e := range entries {
		switch {
		case e.Error != "":
			fmt.Fprintf(tw, "%s\t-\t-\t-\t-\t-\t-\t-\terror: %s\n", e.Name, e.Error)
		case e.NeverIssued:
			fmt.Fprintf(tw, "%s\t-\t-\t-\t-\t-\t-\t-\tnever issued: %s\n", e.Name, e.failuresText(c))
		default:
			fmt.Fprintf(tw, "%s\t%s\t%s\t%d\t%s\t%s\t%s\t%s\t%s\n", e.Name, strings.Join(e.Domains, ","), c.When(e.NotAfter), e.DaysLeft,
				c.RenewWhen(e.RenewAt), e.RenewReason, e.Challenge, e.Deploy, e.status(c))
		}
	}
	tw.Flush()
}

// status is a lineage's STATUS column: ok, what is owed, its failures,
// and a schedule too slow for it.
func (e *Entry) status(c Clock) string {
	status := "ok"
	if e.Pending != "" {
		status = e.Pending
	} else if e.Failures > 0 {
		status = e.failuresText(c)
	}
	if e.Cadence != "" {
		status = strings.TrimPrefix(status+"; ", "ok; ") + "warning: " + e.Cadence
	}
	if e.Fallback != nil {
		status += fmt.Sprintf("; from fallback %s: %s", e.CA, e.Fallback.Reason)
	}
	if e.Rollout != "" {
		status = strings.TrimPrefix(status+"; ", "ok; ") + e.Rollout
	}
	return status
}

// failuresText is "2 failures, retry in 58m: <last error>".
func (e *Entry) failuresText(c Clock) string {
	n := fmt.Sprintf("%d failures", e.Failures)
	if e.Failures == 1 {
		n = "1 failure"
	}
	if e.BackoffTill != nil {
		return fmt.Sprintf("%s, retry %s: %s", n, c.When(*e.BackoffTill), e.LastError)
	}
	return fmt.Sprintf("%s: %s", n, e.LastError)
}

// Show writes show's rows about one lineage.
func Show(w io.Writer, e *Entry, c Clock) {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	row := func(k, v string) {
		if v != "" {
			fmt.Fprintf(tw, "%s:\t%s\n", k, v)
		}
	}
	row("name", e.Name)
	if e.NeverIssued {
		row("status", "never issued: its first order failed")
	} else {
		e.showCertificate(row, c)
	}
	if e.Failures > 0 {
		row("failures", fmt.Sprint(e.Failures))
		row("last error", e.LastError)
		if e.BackoffTill != nil {
			row("next attempt", c.When(*e.BackoffTill))
		}
	}
	for _, n := range e.Nodes {
		what := fmt.Sprintf("version %d, serial %s", n.Version, n.Serial)
		if !n.OK {
			what = fmt.Sprintf("version %d; %s", n.Version, n.Error)
		}
		if n.Held != "" {
			what += "; " + n.Held
		}
		row("node "+n.Node, what)
	}
	switch {
	case e.NeverIssued:
	case e.Paths.Fullchain == "":
		row("fullchain", "none live on this host yet")
	default:
		row("fullchain", e.Paths.Fullchain)
		row("key", e.Paths.Key)
	}
	tw.Flush()
}

// showCertificate is show's rows about the certificate and its saved
// settings, the report's recipients and relay among them.
func (e *Entry) showCertificate(row func(k, v string), c Clock) {
	row("domains", strings.Join(e.Domains, ", "))
	row("serial", e.Serial)
	row("valid from", c.When(e.NotBefore))
	row("expires", fmt.Sprintf("%s (%s)", c.When(e.NotAfter), renewal.TimeLeft(e.NotAfter.Sub(c.Now))))
	row("renews", fmt.Sprintf("%s (%s)", c.RenewWhen(e.RenewAt), e.RenewReason))
	row("challenge", e.Challenge+" "+e.Webroot+e.HTTPAddr)
	row("deploy", e.Deploy)
	row("verify", e.VerifyAddr)
	row("key type", e.KeyType)
	row("profile", e.Profile)
	row("server", e.Server)
	row("account", e.Email)
	switch {
	case e.Fallback != nil:
		row("issued by", e.CA+" (a fallback)")
		row("fallback", e.Fallback.Reason+"; renewals try "+e.Fallback.Primary+" first")
	default:
		row("issued by", e.CA)
	}
	row("version", fmt.Sprint(e.Version))
	row("pending", e.Pending)
	row("rollout", e.Rollout)
	if m := e.Mail; m != nil {
		row("mail to", strings.Join(m.To, ", "))
		row("mail from", m.From)
		if m.Host != "" || m.Port != 0 {
			relay := fmt.Sprintf("%s:%d", m.Host, m.Port)
			if m.TLS != "" {
				relay += " (--smtp-tls " + m.TLS + ")"
			}
			row("mail relay", relay)
		}
	}
}
