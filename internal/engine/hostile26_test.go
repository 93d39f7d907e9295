package engine

import (
	"context"
	"errors"
	"iter"
	"slices"
	"testing"
	"time"

	"github.com/lbcert/lbcert/internal/catalog"
)

// renewSelect runs RenewJobs over the fixture's lineages and never-issued
// names, as renew does.
func (f *fixture) renewSelect(r Renewal) []Job {
	f.t.Helper()
	all, _ := f.st.Lineages()
	failed, _ := f.st.FailedNames()
	seq, _, err := RenewJobs(context.Background(), catalog.NewDir(f.st), all, failed, r)
	if err != nil {
		f.t.Fatal(err)
	}
	return slices.Collect(iter.Seq[Job](seq))
}

// A name whose first order failed is listed as never issued, with a
// retry time: renew (cron) retries it with that order's settings once
// the backoff ends, and --force now; an issued name's retry settings are
// gone with its failures.
func TestNeverIssuedIsRetriedByRenew(t *testing.T) {
	f := newFixture(t)
	first := job("never.test")
	first.Lineage.Deploy.Hook = "systemctl reload nginx"
	f.ca.fail["never.test"] = errors.New("obtain never.test: connection: refused")
	if res := f.run(context.Background(), Options{Command: "issue"}, first); res.Items[0].Outcome != Failed {
		t.Fatalf("the first order was meant to fail: %+v", res.Items[0])
	}
	jobs := f.renewSelect(Renewal{})
	if len(jobs) != 1 || jobs[0].Stored || jobs[0].Lineage.Deploy.Hook != first.Lineage.Deploy.Hook ||
		!slices.Equal(jobs[0].Lineage.Domains, first.Lineage.Domains) {
		t.Fatalf("renew's jobs for a never-issued name: %+v", jobs)
	}
	delete(f.ca.fail, "never.test")
	n := f.ca.count()
	f.clock.Add(10 * time.Minute)
	res := f.run(context.Background(), Options{Command: "renew"}, jobs...)
	if res.Items[0].Outcome != Deferred || f.ca.count() != n {
		t.Fatalf("in backoff: %s, %d orders", res.Items[0].Outcome, f.ca.count()-n)
	}
	f.clock.Add(2 * time.Hour)
	res = f.run(context.Background(), Options{Command: "renew"}, f.renewSelect(Renewal{})...)
	if res.Items[0].Outcome != Issued || f.ca.count() != n+1 {
		t.Fatalf("after the backoff: %+v", res.Items[0])
	}
	if l, err := f.st.Load("never.test"); err != nil || l.Deploy.Hook != first.Lineage.Deploy.Hook {
		t.Fatalf("the retried lineage lost its settings: %+v %v", l, err)
	}
	if st, _ := f.st.ReadStatus("never.test"); st.Request != nil || st.Failures != 0 {
		t.Errorf("the status still holds the failed order: %+v", st)
	}
	if jobs := f.renewSelect(Renewal{}); len(jobs) != 1 || !jobs[0].Stored {
		t.Errorf("once issued, renew's job is the lineage's: %+v", jobs)
	}
}

// --name selects a never-issued name too; an unknown name is still
// refused; a dry run sends a retry to staging.
func TestRenewJobsSelect(t *testing.T) {
	f := newFixture(t)
	f.saved("have.test")
	f.ca.fail["never.test"] = errors.New("obtain never.test: connection: refused")
	f.run(context.Background(), Options{Command: "issue"}, job("never.test"))
	if jobs := f.renewSelect(Renewal{Names: []string{"never.test"}, Force: true}); len(jobs) != 1 || jobs[0].Lineage.Name != "never.test" || !jobs[0].Force {
		t.Errorf("--name never.test --force: %+v", jobs)
	}
	if jobs := f.renewSelect(Renewal{Names: []string{"have.test"}}); len(jobs) != 1 || jobs[0].Lineage.Name != "have.test" {
		t.Errorf("--name have.test: %+v", jobs)
	}
	all, _ := f.st.Lineages()
	if _, _, err := RenewJobs(context.Background(), catalog.NewDir(f.st), all, nil, Renewal{Names: []string{"nope.test"}, Where: "st"}); err == nil {
		t.Error("--name of an unknown name was accepted")
	}
}
