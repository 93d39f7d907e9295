package engine

import (
	"context"
	"errors"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/lbcert/lbcert/internal/pace"
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

// A progress bar counts a row when its certificate is obtained, not when
// the run's one deploy at the end is done (issue #26 item 9: the bar
// stayed at 0, then jumped to the end): every item is observed before
// the deploy runs.
func TestObservedWhenObtained(t *testing.T) {
	f := newFixture(t)
	var mu sync.Mutex
	deploysSeen := map[string]int{}
	observe := func(it *Item) {
		mu.Lock()
		defer mu.Unlock()
		f.dep.mu.Lock()
		deploysSeen[it.Name] = len(f.dep.runs)
		f.dep.mu.Unlock()
	}
	res := f.run(context.Background(), Options{Command: "batch", Observe: observe}, job("o1.test"), job("o2.test"), job("o3.test"))
	if res.Counts[Issued] != 3 || len(f.dep.runs) != 1 {
		t.Fatalf("counts %v, deploy runs %v", res.Counts, f.dep.runs)
	}
	if len(deploysSeen) != 3 {
		t.Fatalf("observed %v, want each of the 3 once", deploysSeen)
	}
	for name, n := range deploysSeen {
		if n != 0 {
			t.Errorf("%s observed after the deploy, not when obtained", name)
		}
	}
}

// A lineage in failure backoff says when its next attempt is, and that
// once the cause is fixed --force tries now (issue #26 item 15).
func TestBackoffHintSaysForceTriesNow(t *testing.T) {
	f := newFixture(t)
	f.saved("h.test")
	f.clock.Add(70 * 24 * time.Hour)
	f.ca.fail["h.test"] = errors.New("obtain h.test: connection: refused")
	first := f.run(context.Background(), Options{Command: "renew"}, job("h.test")).Items[0]
	if first.Outcome != Failed || first.NextAttempt == nil {
		t.Fatalf("first: %+v", first)
	}
	delete(f.ca.fail, "h.test") // fixed
	f.clock.Add(10 * time.Minute)
	it := f.run(context.Background(), Options{Command: "renew"}, job("h.test")).Items[0]
	if it.Outcome != Deferred || !strings.Contains(it.Hint, "--force tries now") ||
		!strings.Contains(it.Hint, first.NextAttempt.Format(time.RFC3339)) {
		t.Fatalf("deferred by backoff: %+v, hint %q", it.Outcome, it.Hint)
	}
}

// An order the CA refuses (rejectedIdentifier: its policy forbids the
// name) or that Ctrl-C stops gives back the registered domain's token it
// took: no certificate was issued (issue #26 item 19: 46 issued, the
// budget at 50).
func TestRefusedOrderGivesTokensBack(t *testing.T) {
	limits := pace.Limits{Domain: pace.Limit{N: 2, Per: 7 * 24 * time.Hour}}
	rejected := errors.New(`obtain x0.example.org: acme: error: 400 :: POST :: https://ca.test/new-order :: urn:ietf:params:acme:error:rejectedIdentifier :: Cannot issue for "x0.example.org": forbidden by policy`)
	for _, interrupt := range []bool{false, true} {
		f := newFixture(t)
		b, err := pace.Open(t.TempDir(), limits, f.clock.Now)
		if err != nil {
			t.Fatal(err)
		}
		e := f.engine(Options{Command: "issue", MaxWait: time.Minute})
		e.Budget = b
		if interrupt {
			f.ca.block, f.ca.started = make(chan struct{}), make(chan string, 1)
			ctx, cancel := context.WithCancel(context.Background())
			go func() { <-f.ca.started; cancel() }()
			p, _ := e.Plan(ctx, []Job{job("x0.example.org")})
			if it := p.Execute(ctx).Items[0]; it.Outcome != Aborted {
				t.Fatalf("interrupted order: %+v", it)
			}
			f.ca.block, f.ca.started = nil, nil
		} else {
			f.ca.fail["x0.example.org"] = rejected
			p, _ := e.Plan(context.Background(), []Job{job("x0.example.org")})
			if it := p.Execute(context.Background()).Items[0]; it.Outcome != Failed {
				t.Fatalf("refused order: %+v", it)
			}
		}
		// Both of the registered domain's tokens are there for two more.
		p, _ := e.Plan(context.Background(), []Job{job("x1.example.org"), job("x2.example.org")})
		if res := p.Execute(context.Background()); res.Counts[Issued] != 2 {
			t.Fatalf("interrupt %v: after the order that got nothing, %v", interrupt, outcomes(res))
		}
	}
}
