package engine

import (
	"context"
	"errors"
	"fmt"
	"net"
	"strings"
	"testing"
	"time"

	legoacme "github.com/go-acme/lego/v4/acme"

	"github.com/lbcert/lbcert/internal/acme"
	"github.com/lbcert/lbcert/internal/ca"
	"github.com/lbcert/lbcert/internal/issuer"
	"github.com/lbcert/lbcert/internal/pace"
	"github.com/lbcert/lbcert/internal/store"
)

const (
	primary  = "https://ca.test/dir"
	fallback = "https://fallback.test/dir"
)

// refused is a CA that does not answer, as the issuer reports it.
var refused = acme.Explain(&net.OpError{Op: "dial", Net: "tcp", Err: errors.New("connect: connection refused")})

// withFallback gives the fixture's engine a fallback CA and breakers kept
// in dir.
func (f *fixture) withFallback(o Options, dir string, fallbacks ...ca.CA) *Engine {
	if len(fallbacks) == 0 {
		fallbacks = []ca.CA{{Name: "backup", Server: fallback, Email: "backup@example.com"}}
	}
	e := f.engine(o)
	set, err := ca.NewSet(primary, fallbacks, &ca.Breakers{Store: ca.FileStore{Dir: dir}, Now: f.clock.Now, Backoff: time.Minute})
	if err != nil {
		f.t.Fatal(err)
	}
	e.CAs = set
	return e
}

func (f *fixture) runE(e *Engine, jobs ...Job) *Result {
	f.t.Helper()
	p, err := e.Plan(context.Background(), jobs)
	if err != nil {
		f.t.Fatal(err)
	}
	return p.Execute(context.Background())
}

func (f *fixture) servers() []string {
	f.ca.mu.Lock()
	defer f.ca.mu.Unlock()
	return append([]string(nil), f.ca.at...)
}

// A primary that does not answer: the order goes to the fallback, the
// lineage records the CA that issued it, its account and why, and keeps
// its primary for renewals; the item and the report say so.
func TestFailoverOnCAFault(t *testing.T) {
	f := newFixture(t)
	f.ca.down = map[string]error{primary: refused}
	res := f.runE(f.withFallback(Options{Command: "issue"}, t.TempDir()), job("a.test"))
	it := res.Items[0]
	if it.Outcome != Issued || it.CA != "backup" || it.Server != fallback || !strings.Contains(it.Fallback, "ca.test did not answer") {
		t.Fatalf("item %+v", it)
	}
	if got := f.servers(); len(got) != 2 || got[0] != primary || got[1] != fallback {
		t.Fatalf("orders went to %v, want the primary then the fallback", got)
	}
	l, err := f.st.Load("a.test")
	if err != nil {
		t.Fatal(err)
	}
	if l.Server != fallback || l.Email != "backup@example.com" || l.Fallback.Primary != primary || l.Fallback.CA != "backup" {
		t.Fatalf("saved %+v", l)
	}
	if home, _ := l.Home(); home != primary {
		t.Fatalf("home %s", home)
	}
	rep := res.Report().Items[0]
	if rep.CA != "backup" || rep.Fallback == "" {
		t.Fatalf("report item %+v", rep)
	}
	if st, _ := f.st.ReadStatus("a.test"); st.Failures != 0 {
		t.Fatalf("a CA fault put the lineage in backoff: %+v", st)
	}
}

// The names' own faults never fail over: one order, at the primary, a
// failure with backoff.
func TestNoFailoverForTheNamesFault(t *testing.T) {
	for name, err := range map[string]error{
		"validation": acme.Explain(&legoacme.ProblemDetails{Type: "urn:ietf:params:acme:error:incorrectResponse", Detail: "wrong token", HTTPStatus: 403}),
		"caa":        acme.Explain(&legoacme.ProblemDetails{Type: "urn:ietf:params:acme:error:caa", Detail: "CAA forbids", HTTPStatus: 403}),
		"rejected":   acme.Explain(&legoacme.ProblemDetails{Type: "urn:ietf:params:acme:error:rejectedIdentifier", Detail: "blocked", HTTPStatus: 400}),
		"badCSR":     acme.Explain(&legoacme.ProblemDetails{Type: "urn:ietf:params:acme:error:badCSR", Detail: "bad key", HTTPStatus: 400}),
	} {
		t.Run(name, func(t *testing.T) {
			f := newFixture(t)
			f.ca.down = map[string]error{primary: err}
			res := f.runE(f.withFallback(Options{Command: "issue"}, t.TempDir()), job("n.test"))
			if res.Items[0].Outcome != Failed {
				t.Fatalf("%+v", res.Items[0])
			}
			if got := f.servers(); len(got) != 1 || got[0] != primary {
				t.Fatalf("orders went to %v, want the primary only", got)
			}
		})
	}
}

// After three CA faults in a row the breaker opens: the lineages after
// that go straight to the fallback, and a second run, reading the saved
// breaker, does not try the primary either until the backoff has passed;
// then one order tries it, finds it back, and later orders use it again.
func TestBreakerPassesOverThenReturns(t *testing.T) {
	f := newFixture(t)
	dir := t.TempDir()
	f.ca.down = map[string]error{primary: refused}
	var jobs []Job
	for _, n := range []string{"b1.test", "b2.test", "b3.test", "b4.test", "b5.test"} {
		jobs = append(jobs, job(n))
	}
	res := f.runE(f.withFallback(Options{Command: "batch", Concurrency: 1}, dir), jobs...)
	atPrimary := 0
	for _, s := range f.servers() {
		if s == primary {
			atPrimary++
		}
	}
	if res.Counts[Issued] != 5 || atPrimary != 3 {
		t.Fatalf("%v issued, %d orders at the primary (want 5 and 3)", res.Counts, atPrimary)
	}
	open := false
	for _, c := range res.CAs {
		open = open || c.Server == primary && c.PassedOverUntil != nil
	}
	if !open {
		t.Fatalf("the primary's breaker is not reported open: %+v", res.CAs)
	}

	before := len(f.servers())
	f.clock.Add(30 * time.Second)
	f.runE(f.withFallback(Options{Command: "issue"}, dir), job("b6.test"))
	if got := f.servers()[before:]; len(got) != 1 || got[0] != fallback {
		t.Fatalf("a run inside the backoff ordered at %v", got)
	}

	f.ca.down = nil
	f.clock.Add(time.Minute)
	before = len(f.servers())
	res = f.runE(f.withFallback(Options{Command: "issue"}, dir), job("b7.test"))
	if got := f.servers()[before:]; len(got) != 1 || got[0] != primary || res.Items[0].Fallback != "" {
		t.Fatalf("after the backoff the order went to %v (%+v)", got, res.Items[0])
	}
	if all, _ := (ca.FileStore{Dir: dir}).Load(context.Background()); len(all) != 0 {
		t.Fatalf("breaker still saved after the primary answered: %+v", all)
	}
}

// A certificate from the fallback renews at the primary when it answers:
// ARI is asked of the fallback that issued it, no "replaces" is sent to
// the primary (it names the fallback's certificate), and
// the lineage no longer records a fallback. A renewal at the same CA
// sends "replaces".
func TestRenewalGoesBackToThePrimary(t *testing.T) {
	f := newFixture(t)
	dir := t.TempDir()
	f.ca.down = map[string]error{primary: refused}
	f.runE(f.withFallback(Options{Command: "issue"}, dir), job("r.test"))
	l, _ := f.st.Load("r.test")
	f.ca.down = nil
	f.clock.Add(10 * 24 * time.Hour)
	f.ca.ari[l.Cert.Serial] = &acme.RenewalInfo{Start: f.clock.Now().Add(-2 * time.Hour), End: f.clock.Now().Add(-time.Minute)}
	f.clock.Add(2 * time.Minute) // past the breaker, which never opened for one fault
	res := f.runE(f.withFallback(Options{Command: "renew"}, dir), Job{Lineage: store.Lineage{Name: "r.test"}, Stored: true})
	if res.Items[0].Outcome != Renewed {
		t.Fatalf("%+v", res.Items[0])
	}
	if f.ca.ariAt[len(f.ca.ariAt)-1] != fallback {
		t.Fatalf("the renewal window was asked of %s, not of the CA that issued the certificate", f.ca.ariAt[len(f.ca.ariAt)-1])
	}
	got := f.servers()
	if got[len(got)-1] != primary || f.ca.replaces["r.test"] != "" {
		t.Fatalf("renewal at %s with replaces %q", got[len(got)-1], f.ca.replaces["r.test"])
	}
	l2, _ := f.st.Load("r.test")
	if l2.Server != primary || l2.Fallback != (store.Fallback{}) {
		t.Fatalf("after the renewal at the primary: %+v", l2)
	}
	f.clock.Add(10 * 24 * time.Hour)
	f.ca.ari[l2.Cert.Serial] = &acme.RenewalInfo{Start: f.clock.Now().Add(-2 * time.Hour), End: f.clock.Now().Add(-time.Minute)}
	f.runE(f.withFallback(Options{Command: "renew"}, dir), Job{Lineage: store.Lineage{Name: "r.test"}, Stored: true})
	if f.ca.replaces["r.test"] != l2.Cert.ARICertID {
		t.Fatalf("a renewal at the issuing CA sent replaces %q, want %q", f.ca.replaces["r.test"], l2.Cert.ARICertID)
	}
}

// rateLimited with a Retry-After past MaxWait moves on to the fallback;
// within MaxWait it is waited out at the primary.
func TestRateLimitedPastMaxWaitFailsOver(t *testing.T) {
	limited := func(ra string) error {
		return acme.Explain(&legoacme.RateLimitedError{RetryAfter: ra, ProblemDetails: &legoacme.ProblemDetails{
			Type: "urn:ietf:params:acme:error:rateLimited", Detail: "slow down", HTTPStatus: 429}})
	}
	f := newFixture(t)
	f.ca.down = map[string]error{primary: limited("3600")}
	budget, err := pace.Open(t.TempDir(), pace.Limits{}, f.clock.Now)
	if err != nil {
		t.Fatal(err)
	}
	e := f.withFallback(Options{Command: "issue", MaxWait: time.Minute}, t.TempDir())
	e.Budget = budget
	res := f.runE(e, job("l.test"))
	if it := res.Items[0]; it.Outcome != Issued || it.CA != "backup" || !strings.Contains(it.Fallback, "rateLimited") {
		t.Fatalf("%+v", it)
	}
	// The primary's Retry-After is in the budget: the next order does
	// not ask it again, and goes to the fallback.
	before := len(f.servers())
	res = f.runE(e, job("l2.test"))
	if got := f.servers()[before:]; len(got) != 1 || got[0] != fallback || res.Items[0].Outcome != Issued {
		t.Fatalf("second order at %v: %+v", got, res.Items[0])
	}
}

// A name that failed validation too often is held back by the budget and
// never sent to the fallback: it would fail there as well.
func TestFailedValidationBudgetDoesNotFailOver(t *testing.T) {
	f := newFixture(t)
	budget, _ := pace.Open(t.TempDir(), pace.Limits{FailedAuthz: pace.Limit{N: 1, Per: time.Hour}}, f.clock.Now)
	if err := budget.FailedAuthz(pace.Key{Server: primary}, []string{"v.test"}); err != nil {
		t.Fatal(err)
	}
	e := f.withFallback(Options{Command: "issue"}, t.TempDir())
	e.Budget = budget
	res := f.runE(e, job("v.test"))
	if res.Items[0].Outcome != Deferred || len(f.servers()) != 0 {
		t.Fatalf("%+v, orders at %v", res.Items[0], f.servers())
	}
}

// A fallback orders with its own account, chain and mapped profile, and
// may take a profile it does not offer; the lineage keeps its own.
func TestFallbackSettings(t *testing.T) {
	f := newFixture(t)
	f.ca.down = map[string]error{primary: refused}
	var seen []string
	e := f.withFallback(Options{Command: "issue"}, t.TempDir(), ca.CA{Name: "backup", Server: fallback, PreferredChain: "Backup Root",
		Profiles: map[string]string{"shortlived": "short"}})
	e.CA = orderSpy{f.ca, &seen}
	j := job("p.test")
	j.Lineage.Profile, j.Lineage.PreferredChain, j.Lineage.Email = "shortlived", "Primary Root", "ops@example.com"
	f.runE(e, j)
	if len(seen) != 2 || seen[1] != fallback+" ops@example.com short Backup Root true" || seen[0] != primary+" ops@example.com shortlived Primary Root false" {
		t.Fatalf("orders %q", seen)
	}
	l, _ := f.st.Load("p.test")
	if l.Profile != "shortlived" || l.PreferredChain != "Primary Root" {
		t.Fatalf("the lineage's own settings changed: %+v", l)
	}
}

// orderSpy records each order's CA and settings.
type orderSpy struct {
	*fakeCA
	seen *[]string
}

func (s orderSpy) Obtain(ctx context.Context, o issuer.Order) (*acme.Result, error) {
	l := o.Lineage
	*s.seen = append(*s.seen, strings.Join([]string{l.Server, l.Email, l.Profile, l.PreferredChain, fmt.Sprint(o.ProfileOptional)}, " "))
	return s.fakeCA.Obtain(ctx, o)
}

// New settings for a certificate a fallback issued keep it the
// fallback's: the CA and account that issued it, and why.
func TestReconfigureKeepsTheIssuingCA(t *testing.T) {
	f := newFixture(t)
	f.ca.down = map[string]error{primary: refused}
	f.runE(f.withFallback(Options{Command: "issue"}, t.TempDir()), job("k.test"))
	f.ca.down = nil
	j := job("k.test")
	j.Lineage.Challenge.Webroot = "/srv/acme"
	res := f.runE(f.withFallback(Options{Command: "issue"}, t.TempDir()), j)
	if res.Items[0].Outcome != Reconfigured {
		t.Fatalf("%+v", res.Items[0])
	}
	l, _ := f.st.Load("k.test")
	if l.Server != fallback || l.Fallback.CA != "backup" || l.Fallback.Primary != primary || l.Challenge.Webroot != "/srv/acme" {
		t.Fatalf("%+v", l)
	}
}

// Every CA down: the lineage fails at the last one, without backoff (no
// fault of its names), and its error names what each CA did.
func TestEveryCADown(t *testing.T) {
	f := newFixture(t)
	f.ca.down = map[string]error{primary: refused, fallback: refused}
	res := f.runE(f.withFallback(Options{Command: "issue"}, t.TempDir()), job("d.test"))
	it := res.Items[0]
	if it.Outcome != Failed || it.NextAttempt != nil || !strings.Contains(it.Error, "(at backup, after ca.test did not answer (connection refused))") {
		t.Fatalf("%+v", it)
	}
}

// A fallback whose directory cannot be trusted is pointed at its own
// setting, not at the primary's --ca-bundle.
func TestFallbackHintNamesItsSetting(t *testing.T) {
	f := newFixture(t)
	f.ca.down = map[string]error{primary: refused,
		fallback: acme.Explain(errors.New("ACME server https://fallback.test/dir: get directory at 'https://fallback.test/dir': x509: certificate signed by unknown authority"))}
	res := f.runE(f.withFallback(Options{Command: "issue"}, t.TempDir()), job("h.test"))
	if it := res.Items[0]; it.Outcome != Failed || !strings.HasPrefix(it.Hint, "check --fallback-ca backup: ") {
		t.Fatalf("%+v", it)
	}
}
