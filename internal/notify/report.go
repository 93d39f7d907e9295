// Package notify turns a run's outcome into one plain-text report per
// recipient and mails it with go-mail. Let's Encrypt no longer sends
// expiry mail, so these reports are the safety net (seeds 002 and 004).
//
// The promise: a mail problem never loses the run. Certificates are saved
// and deployed before anything is mailed; a report that cannot be sent
// after a few tries is written to stderr and to <dir>/reports/, and the
// caller reports a partial failure. Passwords never appear in a report,
// a log line or an error.
package notify

import (
	"fmt"
	"sort"
	"strings"
	"time"

	"github.com/lbcert/lbcert/internal/store"
)

// Item is one certificate the run touched, or one it warns about.
type Item struct {
	Name        string
	Domains     []string
	Outcome     string // "issued", "renewed", "deleted", "failed", "deferred", "invalid", or "expiring" for warnings
	Serial      string
	OldNotAfter time.Time
	NewNotAfter time.Time
	Deploy      string // "ok", "rolled back", ...
	Verify      string
	Error       string
	Hint        string
	// NextAttempt is when a deferred or failed one is tried again.
	NextAttempt time.Time
	// MailTo are this lineage's own recipients (batch rows carry them);
	// the global recipients get every item regardless.
	MailTo []string
	// Relay is this lineage's own SMTP server, when it has one.
	Relay Relay
}

// Report is one run's outcome.
type Report struct {
	Host     string // the machine, for the subject line
	Command  string // issue, renew, batch, delete
	Items    []Item
	Warnings []Item // certificates past their renewal time, or with under a third of their lifetime left, not renewed
	Cadence  []Note // certificates the renew schedule runs too seldom for
	Time     time.Time
	// Interrupted says a signal stopped the run: what it did is in the
	// report, and the rest is left for the next run.
	Interrupted bool
}

// Note is a warning about one lineage that is not about this run's
// outcome. Notes go to the global recipients only: the schedule is the
// host's matter, not a customer's.
type Note struct {
	Name string
	Text string
}

// Changed reports whether the run did or failed anything, or has a
// warning, which is when --report changes sends mail. Let's Encrypt no
// longer mails expiry warnings, so a certificate heading for expiry is
// news even on a run that changed nothing.
func (r *Report) Changed() bool {
	return len(r.Items) > 0 || len(r.Warnings) > 0 || len(r.Cadence) > 0 || r.Interrupted
}

func (r *Report) counts() map[string]int {
	c := map[string]int{}
	for _, it := range r.Items {
		c[it.Outcome]++
	}
	return c
}

// Subject leads with the host and the outcome, so a person can triage
// from the inbox list: "web1: lbcert renewed 3, failed 1".
func (r *Report) Subject() string {
	c := r.counts()
	var parts []string
	if r.Interrupted {
		parts = append(parts, "interrupted")
	}
	for _, k := range []string{"issued", "renewed", "deleted", "failed", "deferred", "invalid"} {
		if c[k] > 0 {
			parts = append(parts, fmt.Sprintf("%s %d", k, c[k]))
		}
	}
	if len(parts) == 0 {
		parts = append(parts, "nothing to do")
	}
	s := fmt.Sprintf("%s: lbcert %s", r.Host, strings.Join(parts, ", "))
	if len(r.Warnings) > 0 {
		s += fmt.Sprintf(", %d expiring soon", len(r.Warnings))
	}
	if c["failed"] > 0 {
		s = "FAILED " + s
	}
	return s
}

// Body is the plain-text report: every certificate touched, then the
// warning section.
func (r *Report) Body() string {
	var b strings.Builder
	fmt.Fprintf(&b, "lbcert %s on %s at %s\n", r.Command, r.Host, r.Time.UTC().Format(time.RFC3339))
	fmt.Fprintf(&b, "%s\n", strings.TrimPrefix(r.Subject(), "FAILED "))
	if r.Interrupted {
		b.WriteString("\nINTERRUPTED by SIGINT or SIGTERM: what was obtained before the stop is saved and deployed; the rest is left for the next run\n")
	}
	items := append([]Item(nil), r.Items...)
	// What the reader has to act on first: failures, bad input, then
	// what waits for a later run.
	sort.SliceStable(items, func(i, j int) bool { return rank(items[i].Outcome) < rank(items[j].Outcome) })
	for _, it := range items {
		fmt.Fprintf(&b, "\n%s %s\n", strings.ToUpper(it.Outcome), it.Name)
		row := func(k, v string) {
			if v != "" {
				fmt.Fprintf(&b, "  %-11s %s\n", k+":", v)
			}
		}
		row("names", strings.Join(it.Domains, ", "))
		if !it.OldNotAfter.IsZero() {
			row("old expiry", it.OldNotAfter.UTC().Format(time.RFC3339))
		}
		if !it.NewNotAfter.IsZero() {
			row("new expiry", it.NewNotAfter.UTC().Format(time.RFC3339))
		}
		row("serial", it.Serial)
		row("deploy", it.Deploy)
		row("verify", it.Verify)
		if !it.NextAttempt.IsZero() {
			row("next try", it.NextAttempt.UTC().Format(time.RFC3339))
		}
		row("error", it.Error)
		row("hint", it.Hint)
	}
	if len(r.Warnings) > 0 {
		b.WriteString("\nWARNING: past the renewal time, or under a third of the lifetime left, and not renewed by this run\n")
		for _, it := range r.Warnings {
			left := int(it.OldNotAfter.Sub(r.Time).Hours() / 24)
			fmt.Fprintf(&b, "  %s (%s): expires %s, %d days left", it.Name, strings.Join(it.Domains, ", "), it.OldNotAfter.UTC().Format(time.RFC3339), left)
			if it.Error != "" {
				fmt.Fprintf(&b, "; last error: %s", it.Error)
			}
			b.WriteString("\n")
		}
	}
	if len(r.Cadence) > 0 {
		b.WriteString("\nWARNING: renew runs too seldom for these certificates (each should get at least 3 runs between its renewal time and expiry)\n")
		for _, n := range r.Cadence {
			fmt.Fprintf(&b, "  %s: %s\n", n.Name, n.Text)
		}
	}
	b.WriteString("\n-- \nlbcert: 'lbcert list' shows every certificate and when it renews.\n")
	return b.String()
}

// rank orders a report's items for the reader.
func rank(outcome string) int {
	switch outcome {
	case "failed":
		return 0
	case "invalid":
		return 1
	case "deferred":
		return 2
	}
	return 3
}

// Relay is an SMTP server and sender; empty fields fall back to the
// global settings.
type Relay struct {
	Host     string
	Port     int
	From     string
	TLS      string // this relay's --smtp-tls, when it has its own
	CABundle string
}

// Envelope is one mail to send: where to, through which relay, and the
// part of the report that recipient may see.
type Envelope struct {
	To     string
	Relay  Relay
	Report *Report
}

// Group splits a report into one envelope per recipient: the global
// recipients get everything; a lineage's own recipients get only their
// lineages, through that lineage's relay. Never one mail per certificate.
func Group(r *Report, global []string, relay Relay) []Envelope {
	var out []Envelope
	seen := map[string]bool{}
	for _, to := range global {
		if !seen[to] {
			seen[to] = true
			out = append(out, Envelope{To: to, Relay: relay, Report: r})
		}
	}
	type key struct {
		to    string
		relay Relay
	}
	parts := map[key]*Report{}
	var order []key
	add := func(it Item, warning bool) {
		for _, to := range it.MailTo {
			if seen[to] {
				continue // a global recipient already gets everything
			}
			rl := it.Relay
			if rl.Host == "" {
				rl.Host = relay.Host
			}
			if rl.Port == 0 {
				rl.Port = relay.Port
			}
			if rl.From == "" {
				rl.From = relay.From
			}
			k := key{to, rl}
			p := parts[k]
			if p == nil {
				p = &Report{Host: r.Host, Command: r.Command, Time: r.Time}
				parts[k] = p
				order = append(order, k)
			}
			if warning {
				p.Warnings = append(p.Warnings, it)
			} else {
				p.Items = append(p.Items, it)
			}
		}
	}
	for _, it := range r.Items {
		add(it, false)
	}
	for _, it := range r.Warnings {
		add(it, true)
	}
	for _, k := range order {
		out = append(out, Envelope{To: k.to, Relay: k.relay, Report: parts[k]})
	}
	return out
}

// Deleted is the report of a delete: the lineage, its last certificate,
// and whether it was revoked.
func Deleted(l *store.Lineage, revokedFor string) *Report {
	item := Item{Name: l.Name, Domains: l.Domains, Outcome: "deleted", Serial: l.Cert.Serial, OldNotAfter: l.Cert.NotAfter,
		MailTo: l.Mail.To, Relay: Relay{Host: l.Mail.Host, Port: l.Mail.Port, From: l.Mail.From}}
	if revokedFor != "" {
		item.Hint = "revoked at the CA (" + revokedFor + ")"
	}
	return &Report{Command: "delete", Items: []Item{item}}
}
