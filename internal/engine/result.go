package engine

import (
	"fmt"
	"strings"
	"time"

	"github.com/lbcert/lbcert/internal/notify"
	"github.com/lbcert/lbcert/internal/store"
)

// SchemaVersion is the "version" of the run report's JSON (issue, batch
// and renew --json). It changes only when a key changes meaning or goes
// away; new keys may be added within a version.
const SchemaVersion = 1

// Outcome is where one job ended up. The values are the JSON values and
// never contain spaces.
type Outcome string

const (
	Issued       Outcome = "issued"       // a new lineage, or new names for one
	Renewed      Outcome = "renewed"      // a new certificate for the same names
	Deployed     Outcome = "deployed"     // a pending certificate, obtained earlier, now deployed
	NotDue       Outcome = "not_due"      // valid and not due: nothing to do
	Reconfigured Outcome = "reconfigured" // not due; new settings saved (and deployed) without ordering
	Deferred     Outcome = "deferred"     // due, but left for a later run (backoff, budget, the CA's Retry-After, a lease)
	Failed       Outcome = "failed"       // tried and failed, or its deploy failed
	Invalid      Outcome = "invalid"      // bad input (a batch row); never sent to the CA
	NotStarted   Outcome = "not_started"  // interrupted before it started
	Aborted      Outcome = "interrupted"  // interrupted while ordering; nothing of it was saved
)

// Outcomes lists every outcome, in the order reports show them.
var Outcomes = []Outcome{Issued, Renewed, Deployed, Reconfigured, NotDue, Deferred, Failed, Invalid, NotStarted, Aborted}

// Done reports whether o means the job's certificate is in place.
func (o Outcome) Done() bool {
	return o == Issued || o == Renewed || o == Deployed || o == Reconfigured || o == NotDue
}

// Item is one job's outcome: a lineage, or a batch row.
type Item struct {
	Name        string     `json:"name,omitempty"`
	Line        int        `json:"line,omitempty"` // batch: the CSV line
	Domains     []string   `json:"domains,omitempty"`
	Outcome     Outcome    `json:"outcome"`
	Reason      string     `json:"reason,omitempty"` // the rule that made it due (renewal.Reason), or why it was deferred
	DueAt       *time.Time `json:"due_at,omitempty"` // when it is (or was) due
	OldSerial   string     `json:"old_serial,omitempty"`
	OldNotAfter *time.Time `json:"old_not_after,omitempty"`
	Serial      string     `json:"serial,omitempty"`
	NotAfter    *time.Time `json:"not_after,omitempty"`
	Version     int        `json:"cert_version,omitempty"` // the catalog's version of the certificate in place
	Deploy      string     `json:"deploy,omitempty"`       // "ok", "none", "rolled_back", "pending", "not_installed"
	Verify      string     `json:"verify,omitempty"`
	Hook        string     `json:"hook,omitempty"`
	Pending     string     `json:"pending,omitempty"` // a certificate waiting to be deployed, and why
	Error       string     `json:"error,omitempty"`
	Hint        string     `json:"hint,omitempty"`
	NextAttempt *time.Time `json:"next_attempt,omitempty"`
	// Cadence warns that renew runs too seldom for this certificate
	// (Options.RunGap).
	Cadence string `json:"cadence_warning,omitempty"`
	// CA and Server name the CA that issued the new certificate, when
	// fallbacks are configured; Fallback says why the CAs before it
	// were passed over, when it is a fallback.
	CA       string `json:"ca,omitempty"`
	Server   string `json:"server,omitempty"`
	Fallback string `json:"fallback,omitempty"`
	// Held says why this node serves an older version than the
	// catalog's newest: a staged rollout has not reached it (a fleet).
	Held string `json:"held,omitempty"`
	// Override is a staged rollout overridden on this node because the
	// version it held is about to expire.
	Override string `json:"expiry_override,omitempty"`

	err    error         // what Error says, for callers that ask what kind it was
	mail   *store.Mail   // nil when the lineage has no recipients or relay of its own
	life   time.Duration // of the certificate it holds, for warnings
	dueNow bool          // past its renewal moment
	// unsaved: obtained from the CA, but saving it failed (live/ and
	// the load balancer unchanged).
	unsaved bool
	warn    bool // the report warns about it (at most once a day)
}

// Err is the error behind Error, when the item failed.
func (it *Item) Err() error { return it.err }

// warnWorthy reports whether it holds a certificate that is past its
// renewal time, or has under a third of its lifetime left, and was not
// renewed by this run.
func (it *Item) warnWorthy(now time.Time) bool {
	switch it.Outcome {
	case Issued, Renewed, Deployed, Reconfigured, Invalid:
		return false
	}
	if it.OldNotAfter == nil || it.life <= 0 {
		return false
	}
	return it.dueNow || it.OldNotAfter.Sub(now) < it.life/3
}

// Result is one run: every job's outcome, in job order.
type Result struct {
	Version     int       `json:"version"`
	Command     string    `json:"command"`
	DryRun      bool      `json:"dry_run,omitempty"`
	File        string    `json:"file,omitempty"`   // batch
	Format      string    `json:"format,omitempty"` // batch
	Started     time.Time `json:"started"`
	Finished    time.Time `json:"finished"`
	Interrupted bool      `json:"interrupted,omitempty"`
	// Unreachable lists the CAs that did not answer several orders in a
	// row; the run started no more orders from them.
	Unreachable []string        `json:"unreachable,omitempty"`
	Counts      map[Outcome]int `json:"counts"`
	Items       []*Item         `json:"items"`
	// CAs, when fallbacks are configured, says what each CA issued in
	// this run and which are passed over now (their breaker), until
	// when and why.
	CAs []CAStatus `json:"cas,omitempty"`
	// Rollouts are the fleet's staged rollouts that need an operator:
	// held by a failed check, aborted, or overridden near expiry
	// (whichever lineages the run touched).
	Rollouts []Note `json:"rollouts,omitempty"`
}

// CAStatus is one CA in a run's report.
type CAStatus struct {
	Name            string     `json:"name"`
	Server          string     `json:"server"`
	Issued          int        `json:"issued"`
	PassedOverUntil *time.Time `json:"passed_over_until,omitempty"`
	Reason          string     `json:"reason,omitempty"`
}

// RolloutHint is what to do about a staged rollout held, aborted or
// overridden.
const RolloutHint = "'lbcert fleet status' shows where; fix the node's load balancer or the probe's target, then 'lbcert fleet rollout resume NAME' moves it on, or 'abort NAME' keeps the previous version everywhere (README \"Staged rollouts\")"

// Note is a staged rollout's state as the report says it.
type Note struct {
	Name string `json:"name"`
	// State is "held", "aborted" or "expiry_override"; "rolling" (on
	// its way, needing no one) is never in a Result.
	State string `json:"state"`
	Text  string `json:"text"`
}

// Interruption says what an interrupted run kept: certificates it
// obtained (issued, renewed, reconfigured) or deployed are saved; when
// there are none, saying so would contradict each item's "interrupted
// while ordering; nothing was saved".
func (r *Result) Interruption() string {
	if r.Counts[Issued]+r.Counts[Renewed]+r.Counts[Reconfigured]+r.Counts[Deployed] == 0 {
		return "interrupted before any certificate was obtained"
	}
	return "interrupted; certificates already obtained are saved and deployed"
}

// Count recomputes Counts from Items.
func (r *Result) Count() {
	if r.Items == nil {
		r.Items = []*Item{} // "items": [], never null
	}
	r.Counts = map[Outcome]int{}
	for _, it := range r.Items {
		r.Counts[it.Outcome]++
	}
}

// Done is the number of items whose certificate is in place.
func (r *Result) Done() int {
	n := 0
	for _, it := range r.Items {
		if it.Outcome.Done() {
			n++
		}
	}
	return n
}

// Report is the mail report of the run: what changed or failed, and a
// warning for every certificate that is past its renewal time or has
// less than a third of its lifetime left and was not renewed. The rule
// follows the lifetime, so it is right for 90-, 45- and 6-day
// certificates alike (a fixed 14 days would flag every 6-day one).
func (r *Result) Report() *notify.Report {
	out := &notify.Report{Command: r.Command, Time: r.Finished, Interrupted: r.Interrupted}
	for _, it := range r.Items {
		ni := notify.Item{Name: it.Name, Domains: it.Domains, Serial: it.Serial, Deploy: it.Deploy,
			Verify: it.Verify, Error: it.Error, Hint: it.Hint, CA: it.CA, Fallback: it.Fallback}
		if m := it.mail; m != nil {
			ni.MailTo = m.To
			ni.Relay = notify.RelayOf(*m)
		}
		if it.Pending != "" {
			ni.Deploy = strings.TrimSpace(strings.ReplaceAll(ni.Deploy, "_", " ") + "; pending deploy: " + it.Pending)
			ni.Deploy = strings.TrimPrefix(ni.Deploy, "; ")
		}
		if it.Held != "" && it.Deploy == "held" {
			ni.Deploy = "held on this node: " + it.Held
		}
		if it.OldNotAfter != nil {
			ni.OldNotAfter = *it.OldNotAfter
		}
		if it.NotAfter != nil {
			ni.NewNotAfter = *it.NotAfter
		}
		if it.NextAttempt != nil {
			ni.NextAttempt = *it.NextAttempt
		}
		switch it.Outcome {
		case Issued, Renewed, Deployed:
			ni.Outcome = string(it.Outcome) // a deploy of a certificate obtained earlier is no renewal
			out.Items = append(out.Items, ni)
			continue
		case Failed, Aborted:
			ni.Outcome = "failed"
			out.Items = append(out.Items, ni)
		case Deferred:
			if r.Command == "batch" {
				// A row asked for and not done yet is news, but not a
				// failure: it goes at the time it says (issue #26 item 7).
				ni.Outcome = "deferred"
				out.Items = append(out.Items, ni)
			}
		case Invalid:
			// Bad input is never sent to the CA: the file and line say
			// which row to fix (issue #26 item 8).
			ni.Outcome = "invalid"
			if r.File != "" {
				ni.Name = r.File
				if it.Line > 0 {
					ni.Name = fmt.Sprintf("%s:%d", r.File, it.Line)
				}
			}
			out.Items = append(out.Items, ni)
			continue
		}
		if it.warn {
			ni.Outcome = "expiring"
			out.Warnings = append(out.Warnings, ni)
		}
		if it.Cadence != "" {
			out.Cadence = append(out.Cadence, notify.Note{Name: it.Name, Text: it.Cadence})
		}
	}
	seen := map[string]bool{}
	for _, n := range r.Rollouts {
		seen[n.Name] = true
		out.Rollouts = append(out.Rollouts, notify.Note{Name: n.Name, Text: n.Text})
	}
	for _, it := range r.Items {
		if it.Override != "" && !seen[it.Name] {
			seen[it.Name] = true
			out.Rollouts = append(out.Rollouts, notify.Note{Name: it.Name, Text: it.Override})
		}
	}
	return out
}

func timePtr(t time.Time) *time.Time {
	if t.IsZero() {
		return nil
	}
	t = t.UTC()
	return &t
}

// mailOf keeps a lineage's own mail settings, if it has any: most have
// none, and 100,000 items should not carry 100,000 empty copies.
func mailOf(m store.Mail) *store.Mail {
	if m.Host == "" && m.From == "" && len(m.To) == 0 && m.Port == 0 && m.User == "" {
		return nil
	}
	return &m
}
