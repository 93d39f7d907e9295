package engine

import (
	"strings"
	"testing"
	"time"
)

// A batch's mail says what the command line said: a row deferred to a
// later run is DEFERRED with the time it goes, not FAILED (a cron'd
// batch mailed a false failure every day); a bad row is there, with its
// FILE:LINE and the reason (issue #26 items 7 and 8).
func TestReportDeferredAndInvalidRows(t *testing.T) {
	next := t0.Add(3 * time.Hour)
	res := &Result{Command: "batch", File: "rows.csv", Started: t0, Finished: t0, Items: []*Item{
		{Name: "a.test", Line: 2, Domains: []string{"a.test"}, Outcome: Deferred,
			Error: "not ordered: the new-orders budget (300/3h per account) is spent", NextAttempt: &next},
		{Line: 3, Outcome: Invalid, Error: `domain "a b.test": a space is not allowed in a name`},
		{Name: "c.test", Line: 4, Domains: []string{"c.test"}, Outcome: Issued, Serial: "0c"},
	}}
	res.Count()
	rep := res.Report()
	rep.Host = "lb1"
	subject, body := rep.Subject(), rep.Body()
	if strings.Contains(strings.ToLower(subject), "fail") || !strings.Contains(subject, "deferred 1") || !strings.Contains(subject, "invalid 1") {
		t.Errorf("subject %q: want deferred 1 and invalid 1, no failure", subject)
	}
	for _, want := range []string{"DEFERRED a.test", next.Format(time.RFC3339), "INVALID rows.csv:3", "a space is not allowed in a name", "ISSUED c.test"} {
		if !strings.Contains(body, want) {
			t.Errorf("body lacks %q:\n%s", want, body)
		}
	}
	if strings.Contains(body, "FAILED") {
		t.Errorf("body calls a deferred row failed:\n%s", body)
	}
}

// An interrupted run's mail says so in its subject, even when nothing
// else happened (it used to say "nothing to do"), and is sent.
func TestReportInterrupted(t *testing.T) {
	res := &Result{Command: "renew", Started: t0, Finished: t0, Interrupted: true, Items: []*Item{
		{Name: "a.test", Outcome: NotStarted, Error: "interrupted before it started"},
	}}
	res.Count()
	rep := res.Report()
	rep.Host = "lb1"
	if s := rep.Subject(); !strings.Contains(s, "interrupted") || strings.Contains(s, "nothing to do") {
		t.Errorf("subject %q", s)
	}
	if !rep.Changed() {
		t.Error("an interrupted run is not mailed under --report changes")
	}
}
