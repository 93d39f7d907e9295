package engine

import (
	"context"
	"errors"
	"iter"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/lbcert/lbcert/internal/catalog"
	"github.com/lbcert/lbcert/internal/store"
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

// renew's summary counts what it did: a certificate obtained earlier and
// deployed now is "deployed", a never-issued name's first certificate
// "issued", and only a new certificate of a lineage "renewed".
func TestRenewSummaryCounts(t *testing.T) {
	exp := t0.Add(90 * 24 * time.Hour)
	res := &Result{Items: []*Item{
		{Name: "dep.test", Outcome: Deployed, Serial: "0a", NotAfter: &exp, Deploy: "ok"},
		{Name: "new.test", Outcome: Issued, Serial: "0b", NotAfter: &exp, Deploy: "none"},
		{Name: "ok.test", Outcome: NotDue},
	}}
	res.Count()
	var b strings.Builder
	res.RenewSummary(&b)
	out := b.String()
	for _, want := range []string{"lbcert renew: 0 renewed, 1 issued, 1 deployed, 1 not due, 0 failed, 0 deferred\n",
		"  deployed  dep.test", "  issued    new.test                       0b, expires 2027-03-01, its first certificate"} {
		if !strings.Contains(out, want) {
			t.Errorf("summary lacks %q:\n%s", want, out)
		}
	}
	if strings.Contains(out, "  renewed ") {
		t.Errorf("a deploy or a first certificate is listed as renewed:\n%s", out)
	}
	rep := res.Report()
	if sub := rep.Subject(); !strings.Contains(sub, "lbcert issued 1, deployed 1") || strings.Contains(sub, "renewed") {
		t.Errorf("the mail's subject: %q", sub)
	}
}

// A certificate obtained but not installed on this node makes the run
// partial (exit 2): both summaries say how many, not "0 deferred" alone.
func TestSummariesSayNotInstalled(t *testing.T) {
	exp := t0.Add(90 * 24 * time.Hour)
	res := &Result{File: "rows.csv", Items: []*Item{
		{Name: "a.test", Outcome: Renewed, Serial: "0a", NotAfter: &exp, Deploy: notInstalled},
		{Name: "b.test", Outcome: Renewed, Serial: "0b", NotAfter: &exp, Deploy: "ok"},
	}}
	res.Count()
	var r, b strings.Builder
	res.RenewSummary(&r)
	res.BatchTable(&b)
	if want := "lbcert renew: 2 renewed (1 not installed on this node), 0 not due, 0 failed, 0 deferred\n"; !strings.HasPrefix(r.String(), want) {
		t.Errorf("renew's summary:\n%s\nwant it to begin %q", r.String(), want)
	}
	if want := "lbcert batch rows.csv: 2 rows: 2 renewed (1 not installed on this node)\n"; !strings.HasSuffix(b.String(), want) {
		t.Errorf("batch's summary:\n%s\nwant it to end %q", b.String(), want)
	}
}

// fullDisk is a catalog whose saves fail, as on a full disk.
type fullDisk struct{ catalog.Catalog }

func (fullDisk) Publish(context.Context, catalog.Lease, *store.Lineage, store.Files) (int, error) {
	return 0, errors.New("write chain.pem: no space left on device")
}

// A certificate obtained but not saved is not "issued": issue says it
// was obtained and not saved (a renewal as such), with no live paths.
func TestObtainedNotSaved(t *testing.T) {
	f := newFixture(t)
	f.saved("full.test")
	e := f.engine(Options{Command: "issue"})
	e.Catalog = fullDisk{e.Catalog}
	j := job("full.test")
	j.Force = true
	p, err := e.Plan(context.Background(), []Job{j})
	if err != nil {
		t.Fatal(err)
	}
	it := p.Execute(context.Background()).Items[0]
	var b strings.Builder
	it.IssueText(&b, f.st.LivePaths("full.test"), t0)
	out := b.String()
	if it.Outcome != Failed || !strings.Contains(out, "obtained a renewed certificate for full.test") || strings.Contains(out, "issued") ||
		strings.Contains(out, "fullchain") || !strings.Contains(it.Hint, "obtained but not saved") {
		t.Errorf("outcome %s, hint %q:\n%s", it.Outcome, it.Hint, out)
	}
}

// metaRefused is a catalog that cannot save settings.
type metaRefused struct{ catalog.Catalog }

func (metaRefused) SetMeta(context.Context, *store.Lineage) error {
	return errors.New("write meta.json: no space left on device")
}

// What issue says when nothing was ordered, or a renewal failed: a
// deploy owed that fails again is not "issued certificate"; a forced
// renewal whose deploy fails is "renewed"; new settings that could not
// be saved say so, not that a deploy failed.
func TestIssueTextSaysWhatWasOrdered(t *testing.T) {
	text := func(f *fixture, it *Item) string {
		var b strings.Builder
		it.IssueText(&b, f.st.LivePaths(it.Name), t0)
		return b.String()
	}
	f := newFixture(t)
	f.dep.fail["p.test"] = true
	f.run(context.Background(), Options{Command: "issue"}, job("p.test"))
	orders := f.ca.count()
	it := f.run(context.Background(), Options{Command: "issue"}, job("p.test")).Items[0]
	if out := text(f, it); it.Outcome != Failed || f.ca.count() != orders || !strings.HasPrefix(out, "p.test: could not deploy the certificate obtained earlier for p.test") {
		t.Errorf("a deploy owed, failing again: outcome %s, %d orders:\n%s", it.Outcome, f.ca.count()-orders, out)
	}
	forced := job("p.test")
	forced.Force = true
	it = f.run(context.Background(), Options{Command: "issue"}, forced).Items[0]
	if out := text(f, it); it.Outcome != Failed || !strings.HasPrefix(out, "p.test: renewed certificate for p.test") {
		t.Errorf("a forced renewal whose deploy fails: outcome %s:\n%s", it.Outcome, out)
	}

	g := newFixture(t)
	first := job("m.test")
	first.Lineage.Deploy = store.Deploy{Target: "nginx", ReloadCmd: "systemctl reload nginx"}
	g.run(context.Background(), Options{Command: "issue"}, first)
	again := job("m.test")
	again.Lineage.Deploy = store.Deploy{Target: "nginx", ReloadCmd: "systemctl reload nginx2"}
	e := g.engine(Options{Command: "issue"})
	e.Catalog = metaRefused{e.Catalog}
	p, err := e.Plan(context.Background(), []Job{again})
	if err != nil {
		t.Fatal(err)
	}
	it = p.Execute(context.Background()).Items[0]
	if out := text(g, it); it.Outcome != Failed || !strings.Contains(out, "the new settings could not be saved: ") || strings.Contains(out, "deploying with them failed") {
		t.Errorf("settings that could not be saved: outcome %s:\n%s", it.Outcome, out)
	}
}

// A certificate obtained and saved whose install on this node fails
// (its write lock not had in time, as while a fleet agent installs a
// large join) is said as such: not "dry run: nothing saved or deployed".
func TestObtainedNotInstalledSaysSo(t *testing.T) {
	f := newFixture(t)
	e := f.engine(Options{Command: "issue"})
	e.Node.Lock = func(context.Context) (func(), error) {
		return nil, errors.New("lock lbcert.write.lock: held by another process for 5m0s")
	}
	p, err := e.Plan(context.Background(), []Job{job("n.test")})
	if err != nil {
		t.Fatal(err)
	}
	it := p.Execute(context.Background()).Items[0]
	var b strings.Builder
	it.IssueText(&b, f.st.LivePaths("n.test"), t0)
	out := b.String()
	if it.Outcome != Issued || strings.Contains(out, "dry run") || !strings.Contains(out, "deploy    not installed on this node: ") || !strings.Contains(out, "held by another process") {
		t.Errorf("outcome %s:\n%s", it.Outcome, out)
	}
}
