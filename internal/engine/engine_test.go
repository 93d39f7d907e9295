package engine

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"math"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"runtime/debug"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
	"unicode/utf8"

	legochallenge "github.com/go-acme/lego/v4/challenge"

	legoacme "github.com/go-acme/lego/v4/acme"
	"github.com/lbcert/lbcert/internal/acme"
	"github.com/lbcert/lbcert/internal/catalog"
	"github.com/lbcert/lbcert/internal/deploy"
	"github.com/lbcert/lbcert/internal/issuer"
	"github.com/lbcert/lbcert/internal/pace"
	"github.com/lbcert/lbcert/internal/renewal"
	"github.com/lbcert/lbcert/internal/store"
)

// clock is a fixed, settable time.
type clock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *clock) Now() time.Time { c.mu.Lock(); defer c.mu.Unlock(); return c.t }
func (c *clock) Add(d time.Duration) {
	c.mu.Lock()
	c.t = c.t.Add(d)
	c.mu.Unlock()
}

// fakeCA issues self-signed certificates of a fixed lifetime, counts
// orders, answers ARI from a table, and can fail or block on cue.
type fakeCA struct {
	now    func() time.Time
	life   time.Duration
	mu     sync.Mutex
	orders []string
	ari    map[string]*acme.RenewalInfo // by serial
	fail   map[string]error             // by lineage name
	block  chan struct{}                // when set, Obtain waits on it (or ctx)
	// finalized: a stop while blocked comes after the order's finalize.
	finalized bool
	started   chan string // when set, Obtain sends the name on entry
	inflight  atomic.Int32
	maxIn     atomic.Int32
	binds     [][]string
	replaces  map[string]string
	resets    int
	down      map[string]error // by server: every order there fails so
	at        []string         // the server of each order, in order
	ariAt     []string         // the server asked for each renewal window
	// refuseReplaces: an order that carries "replaces" is refused, as
	// Pebble does for some serials and any CA for a certificate already
	// replaced.
	refuseReplaces bool
}

func (f *fakeCA) BindAll(addrs []string) map[string]error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.binds = append(f.binds, append([]string(nil), addrs...))
	return map[string]error{}
}

func (f *fakeCA) Responder(store.Challenge) (legochallenge.Provider, error) { return nil, nil }

func (f *fakeCA) Obtain(ctx context.Context, o issuer.Order) (*acme.Result, error) {
	n := f.inflight.Add(1)
	defer f.inflight.Add(-1)
	for {
		m := f.maxIn.Load()
		if n <= m || f.maxIn.CompareAndSwap(m, n) {
			break
		}
	}
	if f.started != nil {
		f.started <- o.Lineage.Name
	}
	if f.block != nil {
		select {
		case <-f.block:
		case <-ctx.Done():
			if f.finalized {
				return nil, acme.AfterFinalize(ctx.Err())
			}
			return nil, ctx.Err()
		}
	}
	f.mu.Lock()
	f.orders = append(f.orders, o.Lineage.Name)
	if f.replaces == nil {
		f.replaces = map[string]string{}
	}
	f.replaces[o.Lineage.Name] = o.Replaces
	f.at = append(f.at, o.Lineage.Server)
	err := f.fail[o.Lineage.Name]
	if down := f.down[o.Lineage.Server]; down != nil {
		err = down
	}
	if f.refuseReplaces && o.Replaces != "" {
		err = fmt.Errorf("obtain: %w", &legoacme.ProblemDetails{Type: "urn:ietf:params:acme:error:alreadyReplaced", HTTPStatus: 409, Detail: "already has a replacement order"})
	}
	f.mu.Unlock()
	if err != nil {
		return nil, err
	}
	return selfSigned(o.Lineage.Domains, f.now(), f.life)
}

func (f *fakeCA) RenewalInfo(ctx context.Context, l *store.Lineage) (*acme.RenewalInfo, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.ariAt = append(f.ariAt, l.Server)
	if ri, ok := f.ari[l.Cert.Serial]; ok {
		return ri, nil
	}
	return nil, acme.ErrNoARI
}

func (f *fakeCA) ResetAccount(server, email string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.resets++
	delete(f.fail, "gone") // the next registration is a new, known account
	for k, v := range f.fail {
		if v == errAccountGone {
			delete(f.fail, k)
		}
	}
	return nil
}

var errAccountGone = errors.New("obtain: urn:ietf:params:acme:error:accountDoesNotExist: unable to find existing account")

func (f *fakeCA) count() int { f.mu.Lock(); defer f.mu.Unlock(); return len(f.orders) }

var serial atomic.Int64

func selfSigned(domains []string, now time.Time, life time.Duration) (*acme.Result, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1000 + serial.Add(1)),
		Subject:      pkix.Name{CommonName: domains[0]},
		DNSNames:     domains,
		NotBefore:    now,
		NotAfter:     now.Add(life),
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return nil, err
	}
	kd, _ := x509.MarshalECPrivateKey(key)
	certPEM := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
	return &acme.Result{
		Files: store.Files{Cert: certPEM, Chain: certPEM, Fullchain: append(append([]byte{}, certPEM...), certPEM...),
			Key: pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kd})},
		Info: store.CertInfo{Serial: fmt.Sprintf("%x", tmpl.SerialNumber), NotBefore: now.UTC(), NotAfter: now.Add(life).UTC(),
			ARICertID: "ari-" + fmt.Sprintf("%x", tmpl.SerialNumber)},
	}, nil
}

// fakeDeployer records every Run and fails the names in fail.
type fakeDeployer struct {
	mu      sync.Mutex
	runs    [][]string
	changes []deploy.Change
	fail    map[string]bool
	ctxOK   []bool // whether each Run's context was still live
	st      *store.Store
	// broken, when set, is the config test's failure: a failed deploy
	// carries it as its Check, and Test returns it.
	broken string
	tests  int
}

func (d *fakeDeployer) Test(context.Context, store.Deploy) string {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.tests++
	return d.broken
}

func (d *fakeDeployer) Run(ctx context.Context, changes []deploy.Change) []deploy.Result {
	d.mu.Lock()
	defer d.mu.Unlock()
	var names []string
	out := make([]deploy.Result, len(changes))
	d.changes = append(d.changes, changes...)
	for i, c := range changes {
		names = append(names, c.Name)
		out[i] = deploy.Result{Name: c.Name, Deployed: true}
		if d.fail[c.Name] {
			d.st.Rollback(c.Name, c.Previous)
			out[i] = deploy.Result{Name: c.Name, RolledBack: true, Err: errors.New("nginx -t: syntax error"), Check: d.broken}
		}
	}
	sort.Strings(names)
	d.runs = append(d.runs, names)
	d.ctxOK = append(d.ctxOK, ctx.Err() == nil)
	return out
}

type fixture struct {
	t     *testing.T
	clock *clock
	st    *store.Store
	ca    *fakeCA
	dep   *fakeDeployer
}

var t0 = time.Date(2026, 12, 1, 2, 17, 0, 0, time.UTC)

func newFixture(t *testing.T) *fixture {
	c := &clock{t: t0}
	st := store.New(t.TempDir())
	return &fixture{t: t, clock: c, st: st,
		ca:  &fakeCA{now: c.Now, life: 90 * 24 * time.Hour, ari: map[string]*acme.RenewalInfo{}, fail: map[string]error{}},
		dep: &fakeDeployer{fail: map[string]bool{}, st: st}}
}

func (f *fixture) engine(o Options) *Engine {
	o.Now = f.clock.Now
	if o.Rand == nil {
		o.Rand = func(n int64) int64 { return 0 }
	}
	o.Sleep = func(ctx context.Context, d time.Duration) bool { f.clock.Add(d); return ctx.Err() == nil }
	return &Engine{Catalog: catalog.NewDir(f.st), Node: &Node{Local: f.st, Deploy: f.dep}, CA: f.ca, Opts: o}
}

func job(name string) Job {
	return Job{Lineage: store.Lineage{Name: name, Domains: []string{name}, Server: "https://ca.test/dir", KeyType: "ec256",
		Challenge: store.Challenge{Mode: "webroot", Webroot: "/var/www"}}}
}

func (f *fixture) run(ctx context.Context, o Options, jobs ...Job) *Result {
	f.t.Helper()
	p, err := f.engine(o).Plan(ctx, jobs)
	if err != nil {
		f.t.Fatal(err)
	}
	return p.Execute(ctx)
}

// saved issues name through the engine and returns its lineage.
func (f *fixture) saved(name string) *store.Lineage {
	f.t.Helper()
	res := f.run(context.Background(), Options{Command: "issue"}, job(name))
	if res.Items[0].Outcome != Issued {
		f.t.Fatalf("issue %s: %+v", name, res.Items[0])
	}
	l, err := f.st.Load(name)
	if err != nil {
		f.t.Fatal(err)
	}
	return l
}

func outcomes(res *Result) map[string]Outcome {
	m := map[string]Outcome{}
	for _, it := range res.Items {
		m[it.Name] = it.Outcome
	}
	return m
}

// The rows below are the differences the three commands used to have;
// each one fails if a command-specific rule comes back.

// ARI says due: batch (and issue) renew it, not "up to date".
func TestARIDueInEveryCommand(t *testing.T) {
	for _, cmd := range []string{"issue", "batch", "renew"} {
		t.Run(cmd, func(t *testing.T) {
			f := newFixture(t)
			l := f.saved("a.test")
			f.clock.Add(10 * 24 * time.Hour) // far from the lifetime rule's 60 days
			f.ca.ari[l.Cert.Serial] = &acme.RenewalInfo{Start: f.clock.Now().Add(-2 * time.Hour), End: f.clock.Now().Add(-time.Minute), RetryAfter: time.Hour}
			res := f.run(context.Background(), Options{Command: cmd}, job("a.test"))
			it := res.Items[0]
			// A window that has ended is the CA asking for renewal now.
			if it.Outcome != Renewed || it.Reason != string(renewal.ARIPast) {
				t.Fatalf("%s: outcome %s reason %s, want renewed by ari", cmd, it.Outcome, it.Reason)
			}
			if got := f.ca.replaces["a.test"]; got != l.Cert.ARICertID {
				t.Fatalf("%s: replaces %q, want %q", cmd, got, l.Cert.ARICertID)
			}
		})
	}
}

// Backoff is honoured by every command, issue included; Force overrides.
func TestBackoffInEveryCommand(t *testing.T) {
	for _, cmd := range []string{"issue", "batch", "renew"} {
		t.Run(cmd, func(t *testing.T) {
			f := newFixture(t)
			f.saved("b.test")
			f.clock.Add(70 * 24 * time.Hour) // due by lifetime
			f.ca.fail["b.test"] = errors.New("obtain b.test: connection: refused")
			res := f.run(context.Background(), Options{Command: cmd}, job("b.test"))
			if res.Items[0].Outcome != Failed || res.Items[0].NextAttempt == nil {
				t.Fatalf("first: %+v", res.Items[0])
			}
			n := f.ca.count()
			f.clock.Add(10 * time.Minute)
			res = f.run(context.Background(), Options{Command: cmd}, job("b.test"))
			if res.Items[0].Outcome != Deferred || f.ca.count() != n {
				t.Fatalf("%s in backoff: %s, %d orders", cmd, res.Items[0].Outcome, f.ca.count()-n)
			}
			forced := job("b.test")
			forced.Force = true
			f.run(context.Background(), Options{Command: cmd}, forced)
			if f.ca.count() != n+1 {
				t.Fatalf("%s --force did not order through the backoff", cmd)
			}
		})
	}
}

// Ctrl-C after some renewals: those are saved and deployed (with a live
// context), the rest are not started, and the run says interrupted.
func TestInterruptDeploysWhatWasObtained(t *testing.T) {
	f := newFixture(t)
	for _, n := range []string{"i1.test", "i2.test", "i3.test", "i4.test"} {
		f.saved(n)
	}
	f.dep.runs, f.dep.ctxOK = nil, nil
	f.clock.Add(70 * 24 * time.Hour)
	ctx, cancel := context.WithCancel(context.Background())
	f.ca.started = make(chan string, 10)
	f.ca.block = make(chan struct{})
	var jobs []Job
	for _, n := range []string{"i1.test", "i2.test", "i3.test", "i4.test"} {
		jobs = append(jobs, job(n))
	}
	p, _ := f.engine(Options{Command: "renew", Concurrency: 1}).Plan(ctx, jobs)
	done := make(chan *Result)
	go func() { done <- p.Execute(ctx) }()
	<-f.ca.started // i1 in flight
	f.ca.block <- struct{}{}
	<-f.ca.started // i2 in flight
	cancel()
	res := <-done
	got := outcomes(res)
	if got["i1.test"] != Renewed || got["i2.test"] != Aborted || got["i3.test"] != NotStarted || got["i4.test"] != NotStarted {
		t.Fatalf("outcomes: %v", got)
	}
	if !res.Interrupted || len(f.dep.runs) != 1 || len(f.dep.runs[0]) != 1 || f.dep.runs[0][0] != "i1.test" || !f.dep.ctxOK[0] {
		t.Fatalf("deploy after interrupt: runs %v live ctx %v interrupted %v", f.dep.runs, f.dep.ctxOK, res.Interrupted)
	}
	if j, _ := f.st.Journal("i1.test"); j.Pending != nil {
		t.Fatalf("journal %+v", j)
	}
	if st, _ := f.st.ReadStatus("i1.test"); st.Failures != 0 {
		t.Fatalf("i1 deployed but status %+v", st)
	}
}

// renew works in parallel through the same pool as batch, and deploys once.
func TestRenewRunsInParallel(t *testing.T) {
	f := newFixture(t)
	var jobs []Job
	for i := range 12 {
		n := fmt.Sprintf("p%02d.test", i)
		f.saved(n)
		jobs = append(jobs, job(n))
	}
	f.dep.runs = nil
	f.clock.Add(70 * 24 * time.Hour)
	f.ca.maxIn.Store(0)
	f.ca.started = make(chan string, 100)
	f.ca.block = make(chan struct{})
	p, _ := f.engine(Options{Command: "renew", Concurrency: 4}).Plan(context.Background(), jobs)
	done := make(chan *Result)
	go func() { done <- p.Execute(context.Background()) }()
	for range 4 {
		<-f.ca.started // four orders in flight at once
	}
	close(f.ca.block)
	res := <-done
	if res.Counts[Renewed] != 12 || f.ca.maxIn.Load() != 4 || len(f.dep.runs) != 1 || len(f.dep.runs[0]) != 12 {
		t.Fatalf("renewed %d, max in flight %d, deploy runs %v", res.Counts[Renewed], f.ca.maxIn.Load(), f.dep.runs)
	}
}

// A deploy owed because the load balancer's config test failed is not
// swapped in again while the config, tested as it is, still fails the
// same way: one config test per run, no deploy, the old certificate
// live. A config that fails otherwise, or passes, gets the deploy.
func TestBrokenConfigIsNotSwappedAgain(t *testing.T) {
	f := newFixture(t)
	old := f.saved("d.test")
	f.clock.Add(70 * 24 * time.Hour)
	f.dep.fail["d.test"], f.dep.broken = true, "c0ffee"
	res := f.run(context.Background(), Options{Command: "renew"}, job("d.test"))
	if it := res.Items[0]; it.Outcome != Failed || it.Deploy != "rolled_back" {
		t.Fatalf("first deploy: %+v", it)
	}
	if j, _ := f.st.Journal("d.test"); j.Pending == nil || j.Pending.Check != "c0ffee" {
		t.Fatalf("the failed config test is not journalled: %+v", j.Pending)
	}
	runs, tests := len(f.dep.runs), f.dep.tests
	for range 2 {
		f.clock.Add(time.Hour)
		res = f.run(context.Background(), Options{Command: "renew"}, job("d.test"))
		it := res.Items[0]
		if it.Outcome != Failed || !strings.Contains(it.Error, "config test fails without this certificate too") || !strings.Contains(it.Error, "nginx -t: syntax error") {
			t.Fatalf("with the config still broken: %+v", it)
		}
	}
	if len(f.dep.runs) != runs || f.dep.tests != tests+2 {
		t.Fatalf("with the config still broken: %d more deploys, %d config tests; want none, 2", len(f.dep.runs)-runs, f.dep.tests-tests)
	}
	if l, _ := f.st.Load("d.test"); l.Cert.Serial != old.Cert.Serial {
		t.Fatal("the new certificate was made live again")
	}
	// Broken another way (the test's output differs): tried again.
	f.dep.broken = "beef"
	f.run(context.Background(), Options{Command: "renew"}, job("d.test"))
	if len(f.dep.runs) != runs+1 {
		t.Fatalf("a config broken otherwise: %d deploys, want 1", len(f.dep.runs)-runs)
	}
	f.dep.fail["d.test"], f.dep.broken = false, ""
	res = f.run(context.Background(), Options{Command: "renew"}, job("d.test"))
	if res.Items[0].Outcome != Deployed {
		t.Fatalf("after the fix: %+v", res.Items[0])
	}
	if l, _ := f.st.Load("d.test"); l.Cert.Serial == old.Cert.Serial {
		t.Fatal("the renewed certificate is not live after the fix")
	}
}

// A failed deploy keeps the certificate pending: later runs deploy it and
// never order the same names again; once the deploy works it is live.
func TestPendingDeployNeverOrdersAgain(t *testing.T) {
	f := newFixture(t)
	old := f.saved("d.test")
	f.clock.Add(70 * 24 * time.Hour)
	f.dep.fail["d.test"] = true
	res := f.run(context.Background(), Options{Command: "renew"}, job("d.test"))
	it := res.Items[0]
	if it.Outcome != Failed || it.Deploy != "rolled_back" || it.Pending == "" || it.NextAttempt != nil {
		t.Fatalf("failed deploy (retried by every run, so no next attempt): %+v", it)
	}
	if rep := res.Report(); len(rep.Items) != 1 || !strings.Contains(rep.Items[0].Deploy, "rolled back; pending deploy: nginx -t: syntax error") {
		t.Fatalf("the report does not say the deploy is pending: %+v", rep.Items)
	}
	if l, _ := f.st.Load("d.test"); l.Cert.Serial != old.Cert.Serial {
		t.Fatal("rolled-back certificate still live")
	}
	orders := f.ca.count()
	for i := range 3 { // three more runs with the config still broken, an hour apart
		f.clock.Add(time.Hour)
		res = f.run(context.Background(), Options{Command: []string{"renew", "batch", "issue"}[i]}, job("d.test"))
		if f.ca.count() != orders || res.Items[0].Outcome != Failed {
			t.Fatalf("run %d: %d new orders, outcome %s", i, f.ca.count()-orders, res.Items[0].Outcome)
		}
	}
	f.dep.fail["d.test"] = false
	res = f.run(context.Background(), Options{Command: "renew"}, job("d.test"))
	if res.Items[0].Outcome != Deployed || f.ca.count() != orders {
		t.Fatalf("after the fix: %s, %d orders", res.Items[0].Outcome, f.ca.count()-orders)
	}
	l, _ := f.st.Load("d.test")
	if l.Cert.Serial != res.Items[0].Serial || l.Cert.Serial == old.Cert.Serial {
		t.Fatalf("live serial %s after deploying pending %s", l.Cert.Serial, res.Items[0].Serial)
	}
	if j, _ := f.st.Journal("d.test"); j.Pending != nil {
		t.Fatalf("pending not cleared: %+v", j.Pending)
	}
	// And now nothing is due: a plain run leaves it alone.
	res = f.run(context.Background(), Options{Command: "renew"}, job("d.test"))
	if res.Items[0].Outcome != NotDue {
		t.Fatalf("after deploy: %s", res.Items[0].Outcome)
	}
}

// kill -9 after live/ was switched but before the deploy: the journal
// entry makes the next nothing-due run deploy it.
func TestKillBeforeDeployIsFinished(t *testing.T) {
	f := newFixture(t)
	f.saved("k.test")
	got, _ := selfSigned([]string{"k.test"}, f.clock.Now(), 90*24*time.Hour)
	l, _ := f.st.Load("k.test")
	l.Cert = got.Info
	prev, _ := f.st.LiveVersion("k.test")
	v, _ := f.st.SaveVersion(l, got.Files)
	f.st.SetJournal("k.test", store.Journal{Pending: &store.Pending{Version: v, Previous: prev}})
	f.st.Activate("k.test", v) // ... and the process died here
	f.dep.runs = nil
	res := f.run(context.Background(), Options{Command: "renew"}, job("k.test"))
	if res.Items[0].Outcome != Deployed || len(f.dep.runs) != 1 || f.ca.count() != 1 {
		t.Fatalf("%s, deploy runs %v, orders %d", res.Items[0].Outcome, f.dep.runs, f.ca.count())
	}
}

// One listener per port, whatever host part each lineage's address has.
func TestOneListenerPerPort(t *testing.T) {
	f := newFixture(t)
	a, b := job("x.test"), job("y.test")
	a.Lineage.Challenge = store.Challenge{Mode: "standalone", HTTPAddr: ":5002"}
	b.Lineage.Challenge = store.Challenge{Mode: "standalone", HTTPAddr: "127.0.0.1:5002"}
	res := f.run(context.Background(), Options{Command: "renew"}, a, b)
	if res.Counts[Issued] != 2 || len(f.ca.binds) != 1 || len(f.ca.binds[0]) != 2 {
		t.Fatalf("issued %d, binds %v", res.Counts[Issued], f.ca.binds)
	}
}

// The budget defers with the same MaxWait everywhere, and a deferred job
// is not a failure.
func TestBudgetDefersEverywhere(t *testing.T) {
	for _, cmd := range []string{"issue", "batch", "renew"} {
		t.Run(cmd, func(t *testing.T) {
			f := newFixture(t)
			b, err := pace.Open(t.TempDir(), pace.Limits{Orders: pace.Limit{N: 1, Per: time.Hour}}, f.clock.Now)
			if err != nil {
				t.Fatal(err)
			}
			e := f.engine(Options{Command: cmd, MaxWait: time.Minute})
			e.Budget = b
			p, _ := e.Plan(context.Background(), []Job{job("q1.test"), job("q2.test")})
			res := p.Execute(context.Background())
			if res.Counts[Issued] != 1 || res.Counts[Deferred] != 1 {
				t.Fatalf("%v", res.Counts)
			}
			for _, it := range res.Items {
				if it.Outcome == Deferred {
					if st, _ := f.st.ReadStatus(it.Name); st.Failures != 0 || it.NextAttempt == nil {
						t.Fatalf("deferred item put into backoff or without next attempt: %+v %+v", st, it)
					}
				}
			}
			// With a longer MaxWait the second one waits (the clock is
			// advanced by the fake sleep) and is issued.
			f2 := newFixture(t)
			b2, _ := pace.Open(t.TempDir(), pace.Limits{Orders: pace.Limit{N: 1, Per: time.Hour}}, f2.clock.Now)
			e2 := f2.engine(Options{Command: cmd, MaxWait: 2 * time.Hour, Concurrency: 1})
			e2.Budget = b2
			p2, _ := e2.Plan(context.Background(), []Job{job("q1.test"), job("q2.test")})
			if res := p2.Execute(context.Background()); res.Counts[Issued] != 2 {
				t.Fatalf("with max-wait: %v", res.Counts)
			}
		})
	}
}

// An ARI renewal is exempt from the budget, but only while it carries
// "replaces": when the CA refuses the hint, the order without it counts,
// and with the budget spent it is deferred, not sent. With tokens left it
// goes ahead and spends one.
func TestRefusedReplacesIsCounted(t *testing.T) {
	for _, spent := range []bool{true, false} {
		f := newFixture(t)
		l := f.saved("a.test")
		f.clock.Add(10 * 24 * time.Hour)
		f.ca.ari[l.Cert.Serial] = &acme.RenewalInfo{Start: f.clock.Now().Add(-2 * time.Hour), End: f.clock.Now().Add(-time.Minute), RetryAfter: time.Hour}
		f.ca.refuseReplaces = true
		b, err := pace.Open(t.TempDir(), pace.Limits{Orders: pace.Limit{N: 1, Per: time.Hour}}, f.clock.Now)
		if err != nil {
			t.Fatal(err)
		}
		key := pace.Key{Server: l.Server}
		if spent {
			if err := b.Reserve(key, pace.Order{Names: []string{"other.test"}}); err != nil {
				t.Fatal(err)
			}
		}
		e := f.engine(Options{Command: "renew", MaxWait: time.Minute})
		counted := &refundCounter{Budget: b}
		e.Budget = counted
		before := f.ca.count()
		p, _ := e.Plan(context.Background(), []Job{job("a.test")})
		it := p.Execute(context.Background()).Items[0]
		orders := f.ca.count() - before
		if spent && (orders != 1 || it.Outcome != Deferred || !strings.Contains(it.Error, "new-orders budget")) {
			t.Fatalf("budget spent: %d orders, %s %q; want the order with replaces only, then deferred on the budget", orders, it.Outcome, it.Error)
		}
		if !spent && (orders != 2 || it.Outcome != Renewed || f.ca.replaces["a.test"] != "") {
			t.Fatalf("budget left: %d orders, %s %q, last replaces %q; want renewed by a second order without replaces", orders, it.Outcome, it.Error, f.ca.replaces["a.test"])
		}
		if !spent {
			if err := b.Reserve(key, pace.Order{Names: []string{"other.test"}}); err == nil {
				t.Fatal("the order without replaces took no token from the budget")
			}
		}
		// The refused order issued nothing: what it reserved (in a
		// fleet, a place in the issuance ledger) was given back.
		if len(counted.refunds) != 1 || counted.refunds[0].Replaces == "" {
			t.Fatalf("refunds %+v: want one, of the refused order with replaces", counted.refunds)
		}
	}
}

// refundCounter is a budget that records what it refunds and
// unreserves (an order never placed).
type refundCounter struct {
	*pace.Budget
	refunds, unreserves []pace.Order
}

func (c *refundCounter) Refund(k pace.Key, o pace.Order) error {
	c.refunds = append(c.refunds, o)
	return c.Budget.Refund(k, o)
}

func (c *refundCounter) Unreserve(k pace.Key, o pace.Order) error {
	c.unreserves = append(c.unreserves, o)
	return c.Budget.Unreserve(k, o)
}

// A daily cron with a random start delay retries a failing lineage on
// every one of seven days, not on alternate days.
func TestDailyCronRetriesEveryDay(t *testing.T) {
	f := newFixture(t)
	f.saved("c.test")
	f.clock.Add(70 * 24 * time.Hour)
	f.ca.fail["c.test"] = errors.New("obtain c.test: connection: refused")
	// The random delay comes out longest on the failing day and shortest
	// on the next, the worst case for an exact 24 h cap.
	delays := []int64{0, int64(8 * time.Minute)}
	day := 0
	start := f.clock.Now()
	for day = range 7 {
		f.clock.t = start.Add(time.Duration(day) * 24 * time.Hour)
		d := delays[day%2]
		o := Options{Command: "renew", RandomDelay: 8 * time.Minute, Rand: func(int64) int64 { return d }}
		before := f.ca.count()
		res := f.run(context.Background(), o, job("c.test"))
		if f.ca.count() != before+1 {
			t.Fatalf("day %d: not retried (%s: %s)", day+1, res.Items[0].Outcome, res.Items[0].Error)
		}
	}
	if st, _ := f.st.ReadStatus("c.test"); st.Failures != 7 {
		t.Fatalf("failures %d after 7 days", st.Failures)
	}
}

// The archive keeps the live version and the two before it.
func TestArchiveKeepsThreeVersions(t *testing.T) {
	f := newFixture(t)
	f.saved("v.test")
	forced := job("v.test")
	forced.Force = true
	for range 5 {
		f.run(context.Background(), Options{Command: "renew"}, forced)
	}
	entries, _ := os.ReadDir(f.st.ArchiveDir("v.test"))
	if len(entries) != 3 {
		t.Fatalf("archive holds %d versions, want 3", len(entries))
	}
	live, _ := f.st.LiveVersion("v.test")
	if _, err := os.Stat(filepath.Join(f.st.ArchiveDir("v.test"), fmt.Sprint(live), store.KeyFile)); err != nil || live != 6 {
		t.Fatalf("live version %d: %v", live, err)
	}
}

// A nothing-due run asks the CA nothing once ARI is fresh, and reads no
// account: the CA fake would count any order or look-up.
func TestNothingDueTouchesNothing(t *testing.T) {
	f := newFixture(t)
	l := f.saved("n.test")
	f.ca.ari[l.Cert.Serial] = &acme.RenewalInfo{Start: t0.Add(50 * 24 * time.Hour), End: t0.Add(55 * 24 * time.Hour), RetryAfter: 6 * time.Hour}
	res := f.run(context.Background(), Options{Command: "renew"}, job("n.test"))
	if res.Items[0].Outcome != NotDue {
		t.Fatalf("%+v", res.Items[0])
	}
	// The ARI answer is saved: within its Retry-After nothing is asked.
	delete(f.ca.ari, l.Cert.Serial)
	f.clock.Add(time.Hour)
	res = f.run(context.Background(), Options{Command: "renew"}, job("n.test"))
	if res.Items[0].Outcome != NotDue || res.Items[0].Reason != string(renewal.ARI) {
		t.Fatalf("second: %+v", res.Items[0])
	}
}

// The expiry warning follows the lifetime: a fresh 6-day certificate is
// not flagged (a fixed 14 days would flag it from the day it is issued);
// one that keeps failing past its renewal time is, on 6-, 45- and 90-day
// lifetimes alike; and a run an hour later does not warn again.
func TestExpiryWarningFollowsLifetime(t *testing.T) {
	for _, days := range []int{6, 45, 90} {
		t.Run(fmt.Sprint(days), func(t *testing.T) {
			f := newFixture(t)
			f.ca.life = time.Duration(days) * 24 * time.Hour
			f.saved("w.test")
			res := f.run(context.Background(), Options{Command: "renew"}, job("w.test"))
			if rep := res.Report(); len(rep.Warnings) != 0 || rep.Changed() {
				t.Fatalf("fresh %d-day certificate warned about: %+v", days, rep.Warnings)
			}
			// Past its renewal time (2/3 of the lifetime, or 1/2 for
			// short ones) and the CA keeps failing.
			f.clock.Add(f.ca.life * 7 / 10)
			f.ca.fail["w.test"] = errors.New("obtain w.test: connection: refused")
			res = f.run(context.Background(), Options{Command: "renew"}, job("w.test"))
			rep := res.Report()
			if len(rep.Warnings) != 1 || !rep.Changed() {
				t.Fatalf("%d-day certificate past its renewal time: warnings %+v", days, rep.Warnings)
			}
			// An hour later it is in backoff: deferred, and not warned
			// about again so soon.
			f.clock.Add(time.Hour / 2)
			res = f.run(context.Background(), Options{Command: "renew"}, job("w.test"))
			if rep := res.Report(); len(rep.Warnings) != 0 || res.Items[0].Outcome != Deferred {
				t.Fatalf("warned again within the day: %s %+v", res.Items[0].Outcome, rep.Warnings)
			}
			// A day later the warning comes back, even with nothing else
			// to report: --report changes mails it.
			f.clock.Add(24 * time.Hour)
			delete(f.ca.fail, "w.test")
			f.ca.fail["w.test"] = errors.New("obtain w.test: connection: refused")
			res = f.run(context.Background(), Options{Command: "renew"}, job("w.test"))
			if rep := res.Report(); len(rep.Warnings) != 1 {
				t.Fatalf("no warning a day later: %+v", rep)
			}
		})
	}
}

// New deploy settings for a certificate that is not due are saved and
// deployed without an order; a failed deploy keeps the old settings; a
// job that names no profile keeps the lineage's.
func TestReconfigureWithoutOrdering(t *testing.T) {
	f := newFixture(t)
	j := job("r.test")
	j.Lineage.Profile = "shortlived"
	f.run(context.Background(), Options{Command: "issue"}, j)
	orders := f.ca.count()
	f.dep.runs = nil
	j2 := job("r.test") // names no profile
	j2.Lineage.Deploy = store.Deploy{Target: "nginx", NginxBin: "/usr/sbin/nginx", NginxConf: "/etc/nginx/nginx.conf"}
	res := f.run(context.Background(), Options{Command: "issue"}, j2)
	if res.Items[0].Outcome != Reconfigured || f.ca.count() != orders || len(f.dep.runs) != 1 {
		t.Fatalf("outcome %s, %d orders, deploy runs %v", res.Items[0].Outcome, f.ca.count()-orders, f.dep.runs)
	}
	l, _ := f.st.Load("r.test")
	if l.Deploy.Target != "nginx" || l.Profile != "shortlived" {
		t.Fatalf("saved deploy %q profile %q", l.Deploy.Target, l.Profile)
	}
	// The same again: nothing to do.
	if res := f.run(context.Background(), Options{Command: "issue"}, j2); res.Items[0].Outcome != NotDue {
		t.Fatalf("second: %s", res.Items[0].Outcome)
	}
	// A change whose deploy fails keeps the old settings.
	j3 := job("r.test")
	j3.Lineage.Deploy = store.Deploy{Target: "haproxy", HAProxyBin: "/usr/sbin/haproxy"}
	f.dep.fail["r.test"] = true
	res = f.run(context.Background(), Options{Command: "batch"}, j3)
	if res.Items[0].Outcome != Failed || f.ca.count() != orders {
		t.Fatalf("failed reconfigure: %s, %d orders", res.Items[0].Outcome, f.ca.count()-orders)
	}
	if l, _ := f.st.Load("r.test"); l.Deploy.Target != "nginx" {
		t.Fatalf("a failed reconfiguration left deploy %q", l.Deploy.Target)
	}
}

// The CA lost the account: the engine forgets it, registers a new one
// once for the whole run, and the orders go through.
func TestAccountLostIsRegisteredAgain(t *testing.T) {
	f := newFixture(t)
	f.ca.fail["l1.test"] = errAccountGone
	f.ca.fail["l2.test"] = errAccountGone
	res := f.run(context.Background(), Options{Command: "batch", Concurrency: 1}, job("l1.test"), job("l2.test"))
	if res.Counts[Issued] != 2 || f.ca.resets != 1 {
		t.Fatalf("issued %d, account resets %d: %+v", res.Counts[Issued], f.ca.resets, res.Items[0])
	}
}

// A CA that does not answer: after a few orders in a row the run starts
// no more from it, defers the rest as "CA unreachable", and puts no
// lineage into failure backoff.
func TestDeadCABreaker(t *testing.T) {
	f := newFixture(t)
	down := &net.OpError{Op: "dial", Net: "tcp", Err: errors.New("connect: connection refused")}
	var jobs []Job
	for i := range 10 {
		n := fmt.Sprintf("d%d.test", i)
		f.ca.fail[n] = fmt.Errorf("obtain %s: %w", n, down)
		jobs = append(jobs, job(n))
	}
	res := f.run(context.Background(), Options{Command: "batch", Concurrency: 1}, jobs...)
	if res.Counts[Failed] != caDownAfter || res.Counts[Deferred] != 10-caDownAfter || f.ca.count() != caDownAfter {
		t.Fatalf("counts %v, %d orders", res.Counts, f.ca.count())
	}
	if len(res.Unreachable) != 1 || res.Unreachable[0] != "https://ca.test/dir" {
		t.Fatalf("unreachable %v", res.Unreachable)
	}
	for _, it := range res.Items {
		if st, _ := f.st.ReadStatus(it.Name); st.Failures != 0 {
			t.Fatalf("%s put into backoff for the CA's failure: %+v", it.Name, st)
		}
		if it.Outcome == Deferred && !strings.Contains(it.Error, "CA unreachable") {
			t.Fatalf("%s deferred with %q", it.Name, it.Error)
		}
	}
}

// More names than the Let's Encrypt profile allows: invalid, with one
// line, and nothing sent to the CA.
func TestProfileNameLimitBeforeTheCA(t *testing.T) {
	f := newFixture(t)
	j := job("many.test")
	j.Lineage.Server, j.Lineage.Profile = "https://acme-v02.api.letsencrypt.org/directory", "shortlived"
	for i := range 25 {
		j.Lineage.Domains = append(j.Lineage.Domains, fmt.Sprintf("n%d.many.test", i))
	}
	res := f.run(context.Background(), Options{Command: "issue"}, j)
	if res.Counts[Invalid] != 1 || f.ca.count() != 0 || !strings.Contains(res.Items[0].Error, "26 names in one certificate: Let's Encrypt's shortlived profile allows at most 25") {
		t.Fatalf("counts %v, %d orders, %q", res.Counts, f.ca.count(), res.Items[0].Error)
	}
}

// A stored lineage whose metadata is gone is one failed item, never an
// order for no names.
func TestStoredWithoutMetadata(t *testing.T) {
	f := newFixture(t)
	res := f.run(context.Background(), Options{Command: "renew"}, Job{Lineage: store.Lineage{Name: "gone.test"}, Stored: true})
	if res.Counts[Failed] != 1 || f.ca.count() != 0 || !strings.Contains(res.Items[0].Error, "not a lineage lbcert can renew") {
		t.Fatalf("counts %v, %d orders, %q", res.Counts, f.ca.count(), res.Items[0].Error)
	}
}

// An address with no profile gets shortlived at Let's Encrypt, so the
// name limit checked is shortlived's 25, not classic's 100.
func TestAddressProfileNameLimit(t *testing.T) {
	f := newFixture(t)
	j := job("addr.test")
	j.Lineage.Server = "https://acme-v02.api.letsencrypt.org/directory"
	j.Lineage.Domains = []string{"192.0.2.1"}
	for i := range 25 {
		j.Lineage.Domains = append(j.Lineage.Domains, fmt.Sprintf("n%d.addr.test", i))
	}
	res := f.run(context.Background(), Options{Command: "issue"}, j)
	if res.Counts[Invalid] != 1 || f.ca.count() != 0 || !strings.Contains(res.Items[0].Error, "shortlived profile allows at most 25") {
		t.Fatalf("counts %v, %d orders, %q", res.Counts, f.ca.count(), res.Items[0].Error)
	}
}

// renewJobs are the jobs renew makes: every lineage of the catalog.
func (f *fixture) renewJobs() []Job {
	f.t.Helper()
	names, err := catalog.NewDir(f.st).Names(context.Background())
	if err != nil {
		f.t.Fatal(err)
	}
	var jobs []Job
	for _, n := range names {
		jobs = append(jobs, Job{Lineage: store.Lineage{Name: n}, Stored: true})
	}
	return jobs
}

// A new lineage whose first deploy failed is still a lineage: renew (as
// cron runs it, over the catalog's names) deploys it once the config is
// fixed, and orders nothing.
func TestFirstDeployFailedIsDeployedLater(t *testing.T) {
	f := newFixture(t)
	f.dep.fail["n1.test"] = true
	res := f.run(context.Background(), Options{Command: "issue"}, job("n1.test"))
	if it := res.Items[0]; it.Outcome != Failed || it.Deploy != "rolled_back" {
		t.Fatalf("first deploy: %+v", it)
	}
	if _, err := f.st.LiveVersion("n1.test"); err == nil {
		t.Fatal("a new lineage whose deploy failed is live")
	}
	jobs := f.renewJobs()
	if len(jobs) != 1 || jobs[0].Lineage.Name != "n1.test" {
		t.Fatalf("renew's jobs %+v: the lineage is invisible", jobs)
	}
	f.dep.fail["n1.test"] = false
	orders := f.ca.count()
	res = f.run(context.Background(), Options{Command: "renew"}, jobs...)
	if it := res.Items[0]; it.Outcome != Deployed || f.ca.count() != orders {
		t.Fatalf("renew after the fix: %+v, %d orders", it, f.ca.count()-orders)
	}
	if v, err := f.st.LiveVersion("n1.test"); err != nil || v != 1 {
		t.Fatalf("live version %d, %v", v, err)
	}
}

// Deploy settings given again for a certificate whose deploy is owed
// apply to that deploy: the corrected command runs, not the failed one,
// and the outcome says deployed.
func TestCorrectedSettingsApplyToThePendingDeploy(t *testing.T) {
	f := newFixture(t)
	bad := job("p.test")
	bad.Lineage.Deploy = store.Deploy{Target: "nginx", ReloadCmd: "systemctl reload nginxx"}
	f.dep.fail["p.test"] = true
	f.run(context.Background(), Options{Command: "issue"}, bad)
	f.dep.fail["p.test"] = false
	f.dep.runs, f.dep.changes = nil, nil
	good := job("p.test")
	good.Lineage.Deploy = store.Deploy{Target: "nginx", ReloadCmd: "systemctl reload nginx"}
	orders := f.ca.count()
	res := f.run(context.Background(), Options{Command: "issue"}, good)
	if it := res.Items[0]; it.Outcome != Deployed || f.ca.count() != orders {
		t.Fatalf("re-run with corrected settings: %+v, %d orders", it, f.ca.count()-orders)
	}
	if len(f.dep.changes) != 1 || f.dep.changes[0].Deploy.ReloadCmd != "systemctl reload nginx" {
		t.Fatalf("deployed with %+v, want the corrected reload command", f.dep.changes)
	}
}

// A node deploys with its own settings, whatever the lineage saved (the
// fleet: the agent's settings, whoever ordered), and new settings of its
// own redeploy what it already serves.
func TestNodeDeploysWithItsOwnSettings(t *testing.T) {
	f := newFixture(t)
	mine := store.Deploy{Target: "haproxy", HAProxyCerts: "/tmp/hc1"}
	e := f.engine(Options{Command: "renew"})
	e.Node.Settings = func(*store.Lineage) store.Deploy { return mine }
	plan, _ := e.Plan(context.Background(), []Job{job("o.test")})
	plan.Execute(context.Background())
	if len(f.dep.changes) != 1 || f.dep.changes[0].Deploy != mine {
		t.Fatalf("the ordering node deployed with %+v, want its own %+v", f.dep.changes, mine)
	}
	f.dep.changes = nil
	orders := f.ca.count()
	mine = store.Deploy{Target: "haproxy", HAProxyCerts: "/tmp/hc1-new"}
	e = f.engine(Options{Command: "agent", InstallOnly: true})
	e.Node.Settings = func(*store.Lineage) store.Deploy { return mine }
	plan, _ = e.Plan(context.Background(), f.renewJobs())
	res := plan.Execute(context.Background())
	if res.Items[0].Outcome != Deployed || len(f.dep.changes) != 1 || f.dep.changes[0].Deploy != mine || f.ca.count() != orders {
		t.Fatalf("new settings on the node: %+v, changes %+v", res.Items[0], f.dep.changes)
	}
	f.dep.changes = nil
	plan, _ = e.Plan(context.Background(), f.renewJobs())
	if res := plan.Execute(context.Background()); res.Items[0].Outcome != NotDue || len(f.dep.changes) != 0 {
		t.Fatalf("the same settings again: %+v, changes %+v", res.Items[0], f.dep.changes)
	}
}

// countingCatalog counts the status writes of a directory catalog.
type countingCatalog struct {
	*catalog.Dir
	setStatus atomic.Int32
}

func (c *countingCatalog) SetStatus(ctx context.Context, name string, st store.Status) error {
	c.setStatus.Add(1)
	return c.Dir.SetStatus(ctx, name, st)
}

// A new lineage has no renewal status to reset, and its order writes
// none (a fleet's Redis round trip per order); a renewal resets the
// status it had (here a failure backoff) to none.
func TestOrderResetsOnlyAStatusThatWasThere(t *testing.T) {
	f := newFixture(t)
	cat := &countingCatalog{Dir: catalog.NewDir(f.st)}
	e := f.engine(Options{Command: "issue"})
	e.Catalog = cat
	p, _ := e.Plan(context.Background(), []Job{job("new.example")})
	if res := p.Execute(context.Background()); res.Items[0].Outcome != Issued || cat.setStatus.Load() != 0 {
		t.Fatalf("new lineage: %+v, %d status writes, want issued and none", res.Items[0], cat.setStatus.Load())
	}
	f.st.WriteStatus("new.example", store.Status{Failures: 2, LastError: "earlier"})
	j := job("new.example")
	j.Force = true
	p, _ = e.Plan(context.Background(), []Job{j})
	res := p.Execute(context.Background())
	if st, _ := f.st.ReadStatus("new.example"); res.Items[0].Outcome != Renewed || cat.setStatus.Load() != 1 || st != (store.Status{}) {
		t.Fatalf("renewal: %+v, %d status writes, status %+v; want renewed, one write, none left", res.Items[0], cat.setStatus.Load(), st)
	}
}

// A certificate issued before its name was deleted is not installed by
// a plan made before the delete (seed 8 of the fleet fault test: an
// agent's install ran just after a delete on its node and put the
// certificate back on HAProxy); one issued after it is.
func TestPrepareSkipsADeletedName(t *testing.T) {
	st := store.New(t.TempDir())
	n := &Node{Local: st}
	at := time.Now().UTC()
	if err := st.WriteTombstone("gone.example", store.Tombstone{At: at}); err != nil {
		t.Fatal(err)
	}
	files := func() (store.Files, error) {
		return store.Files{Cert: []byte("C"), Chain: []byte("CH"), Fullchain: []byte("F"), Key: []byte("K")}, nil
	}
	old := &store.Lineage{Name: "gone.example", Domains: []string{"gone.example"}, Version: 1, IssuedAt: at.Add(-time.Minute), Cert: store.CertInfo{Serial: "01"}}
	if w, err := n.prepare(context.Background(), old, files); err != nil || w != nil {
		t.Fatalf("a certificate from before the delete: want nothing to deploy, got %v, %v", w, err)
	}
	if st.Exists("gone.example") {
		t.Fatal("it was made live")
	}
	again := &store.Lineage{Name: "gone.example", Domains: []string{"gone.example"}, Version: 2, IssuedAt: at.Add(time.Minute), Cert: store.CertInfo{Serial: "02"}}
	if w, err := n.prepare(context.Background(), again, files); err != nil || w == nil {
		t.Fatalf("issued again after the delete: %v, %v", w, err)
	}
}

// A renewal's certificate is published without the previous version's
// ledger place: its own order's place is the catalog's to give (a fleet
// counted every renewal under the first certificate's place).
func TestRenewalDoesNotInheritTheLedgerPlace(t *testing.T) {
	f := newFixture(t)
	l := f.saved("p.test")
	l.LedgerID = "lb1:first-order"
	if err := f.st.UpdateMeta(l); err != nil {
		t.Fatal(err)
	}
	res := f.run(context.Background(), Options{Command: "renew"}, Job{Lineage: store.Lineage{Name: "p.test"}, Stored: true, Force: true})
	if res.Items[0].Outcome != Renewed {
		t.Fatalf("renew: %+v", res.Items[0])
	}
	got, err := f.st.Load("p.test")
	if err != nil || got.Version != l.Version+1 || got.LedgerID != "" {
		t.Fatalf("the renewal's record: version %d, ledger place %q, %v; want version %d and no place of its own here", got.Version, got.LedgerID, err, l.Version+1)
	}
}

// A renewal keeps the lineage's birth, so a delete it missed still
// beats it; a certificate asked for by name (issue, a batch row) is
// born when it is issued, so a delete made before the request does not
// take it away (the fault test: a batch re-issuing a just-deleted name
// through a Redis that had lost the delete renewed the old lineage, and
// the delete then removed the name the operator had asked for).
func TestBornKeptByRenewalsNotByRequests(t *testing.T) {
	f := newFixture(t)
	first := f.saved("b.test")
	f.clock.Add(time.Hour)
	res := f.run(context.Background(), Options{Command: "renew"}, Job{Lineage: store.Lineage{Name: "b.test"}, Stored: true, Force: true})
	if res.Items[0].Outcome != Renewed {
		t.Fatalf("renew: %+v", res.Items[0])
	}
	if l, _ := f.st.Load("b.test"); !l.BornAt().Equal(first.BornAt()) {
		t.Fatalf("a renewal's birth %v, want the lineage's %v", l.BornAt(), first.BornAt())
	}
	f.clock.Add(time.Hour)
	forced := job("b.test")
	forced.Force = true
	res = f.run(context.Background(), Options{Command: "issue"}, forced)
	if res.Items[0].Outcome != Renewed {
		t.Fatalf("issue --force: %+v", res.Items[0])
	}
	if l, _ := f.st.Load("b.test"); !l.BornAt().Equal(l.IssuedAt) || !l.BornAt().After(first.BornAt()) {
		t.Fatalf("a requested certificate's birth %v, want its issue time %v", l.BornAt(), l.IssuedAt)
	}
}

// serverRefusal is a CA's 5xx that carries a refusal's problem type: it
// is both not the names' fault and a refusal, and each path refunds.
type serverRefusal struct{}

func (serverRefusal) Error() string {
	return "obtain a.test: 500 :: POST :: urn:ietf:params:acme:error:rejectedIdentifier :: the CA failed"
}
func (serverRefusal) NoBackoff() bool { return true }

// An order the CA fails is refunded once, however many reasons to refund
// it the paths that settle it find: a second refund gives back tokens of
// another order (a hostile review got 4 certificates for one set under
// --rate-names 3/7d, one more per such failure).
func TestFailedOrderIsRefundedOnce(t *testing.T) {
	// A 5xx is ordered again (acme.OrderTries orders in all): each
	// order's reservation is settled once.
	f, counted := failedIssue(t, serverRefusal{})
	if n, orders := len(counted.refunds)+len(counted.unreserves), f.ca.count(); n != orders || orders != acme.OrderTries {
		t.Fatalf("%d refunds of %d failed orders, want one each, of %d", n, orders, acme.OrderTries)
	}
}

// refundsOfAFailedIssue is how many refunds one issue of a.test made,
// which the CA failed with err.
func refundsOfAFailedIssue(t *testing.T, err error) int {
	_, counted := failedIssue(t, err)
	return len(counted.refunds)
}

// failedIssue runs one issue of a.test, which the CA fails with err.
func failedIssue(t *testing.T, err error) (*fixture, *refundCounter) {
	f := newFixture(t)
	f.ca.fail["a.test"] = err
	e, counted := f.countedIssue(t)
	p, _ := e.Plan(context.Background(), []Job{job("a.test")})
	if it := p.Execute(context.Background()).Items[0]; it.Outcome != Failed {
		t.Fatalf("outcome %s %q, want failed", it.Outcome, it.Error)
	}
	return f, counted
}

// Every order the CA sees takes a token of --rate-orders: the CA's 5xx
// before finalize is ordered again by the engine, each order reserved,
// so a CA failing every order gets no more than the budget (helper-31
// finding 3: lbcert ordered again inside the ACME client, five orders
// per token).
func TestOrdersAgainAfterA5xxAreBudgeted(t *testing.T) {
	f := newFixture(t)
	f.ca.fail["a.test"] = serverRefusal{}
	b, err := pace.Open(t.TempDir(), pace.Limits{Orders: pace.Limit{N: 3, Per: 3 * time.Hour}}, f.clock.Now)
	if err != nil {
		t.Fatal(err)
	}
	e := f.engine(Options{Command: "issue"})
	e.Budget = b
	p, _ := e.Plan(context.Background(), []Job{job("a.test")})
	it := p.Execute(context.Background()).Items[0]
	if n := f.ca.count(); n != 3 {
		t.Fatalf("%d orders reached the CA under --rate-orders 3/3h, want 3 (outcome %s %q)", n, it.Outcome, it.Error)
	}
}

// An order the CA never created (it refused the new order, or was not
// reached) gives back all it reserved, its new-order token too
// (helper-31 finding 6: a CA down drained --rate-orders with no request
// reaching it).
func TestOrderNeverPlacedSpendsNoOrderToken(t *testing.T) {
	f := newFixture(t)
	// The directory answered a proxy's 503: the CA's fault, yet no
	// order, so not ordered again per lineage either.
	f.ca.fail["a.test"] = &issuer.AccountError{Server: "https://ca.test/dir", Err: errors.New("get directory at 'https://ca.test/dir': 503 :: GET :: https://ca.test/dir :: Service Unavailable")}
	b, err := pace.Open(t.TempDir(), pace.Limits{Orders: pace.Limit{N: 1, Per: 3 * time.Hour}}, f.clock.Now)
	if err != nil {
		t.Fatal(err)
	}
	e := f.engine(Options{Command: "issue"})
	e.Budget = b
	for range 3 {
		p, _ := e.Plan(context.Background(), []Job{job("a.test")})
		p.Execute(context.Background())
		f.clock.Add(time.Minute)
	}
	if n := f.ca.count(); n != 3 {
		t.Fatalf("%d account setups in three runs, want one each: an account's failure is not an order to try again", n)
	}
	if err := b.Reserve(pace.Key{Server: job("a.test").Lineage.Server, Email: job("a.test").Lineage.Email}, pace.Order{Names: []string{"b.test"}}); err != nil {
		t.Fatalf("after three orders never placed, the one new-order token is gone: %v", err)
	}
}

// countedIssue is an issue engine on f whose budget (3 certificates per
// set a week) records its refunds.
func (f *fixture) countedIssue(t *testing.T) (*Engine, *refundCounter) {
	b, err := pace.Open(t.TempDir(), pace.Limits{ExactSet: pace.Limit{N: 3, Per: 7 * 24 * time.Hour}}, f.clock.Now)
	if err != nil {
		t.Fatal(err)
	}
	e := f.engine(Options{Command: "issue"})
	counted := &refundCounter{Budget: b}
	e.Budget = counted
	return e, counted
}

// finalizeFault is a CA's 5xx to the finalize request, passed through
// the client's explanation (which makes it not the names' fault).
type finalizeFault struct{ error }

func (finalizeFault) NoBackoff() bool { return true }
func (e finalizeFault) Unwrap() error { return e.error }

// An order that failed at finalize may have issued: what it reserved
// stays spent, as for a run killed there (a hostile review's CA answered
// 500 after issuing, and each refund bought another certificate).
func TestFinalizeFaultKeepsItsTokens(t *testing.T) {
	err := finalizeFault{fmt.Errorf("obtain a.test: %w", acme.AfterFinalize(&legoacme.ProblemDetails{
		Type: "urn:ietf:params:acme:error:serverInternal", HTTPStatus: 500, Detail: "the CA failed", URL: "https://ca.test/order/1"}))}
	if n := refundsOfAFailedIssue(t, err); n != 0 {
		t.Fatalf("%d refunds of an order that may have issued, want none", n)
	}
}

// A stop (SIGTERM, Ctrl-C) gives an order's tokens back only before its
// finalize was sent: after it the CA may have issued (a hostile review
// stopped runs mid-finalize and got a certificate per run past the
// budget).
func TestStopAfterFinalizeKeepsItsTokens(t *testing.T) {
	for _, finalized := range []bool{false, true} {
		f := newFixture(t)
		f.ca.block, f.ca.started, f.ca.finalized = make(chan struct{}), make(chan string, 1), finalized
		e, counted := f.countedIssue(t)
		ctx, cancel := context.WithCancel(context.Background())
		p, _ := e.Plan(ctx, []Job{job("a.test")})
		go func() { <-f.ca.started; cancel() }()
		it := p.Execute(ctx).Items[0]
		if it.Outcome != Aborted {
			t.Fatalf("outcome %s %q, want interrupted", it.Outcome, it.Error)
		}
		if strings.Contains(it.Error, "may have issued") != finalized {
			t.Errorf("stopped with the finalize sent %v: %q, want it to say the CA may have issued exactly then", finalized, it.Error)
		}
		if want := map[bool]int{false: 1, true: 0}[finalized]; len(counted.refunds)+len(counted.unreserves) != want {
			t.Fatalf("stopped with the finalize sent %v: %d refunds, want %d", finalized, len(counted.refunds), want)
		}
	}
}

// An account that could not be registered placed no order: what the
// order reserved goes back (a hostile review's bad registrations spent
// the set's budget, one certificate each).
func TestAccountErrorGivesItsTokensBack(t *testing.T) {
	err := &issuer.AccountError{Server: "https://ca.test/dir", Err: errors.New("register account (no email): malformed: bad contact")}
	if _, counted := failedIssue(t, err); len(counted.unreserves) != 1 || len(counted.refunds) != 0 {
		t.Fatalf("%d unreserves, %d refunds of an order never placed (no account), want all it reserved given back once", len(counted.unreserves), len(counted.refunds))
	}
}

// A stop in the pause before ordering again after the CA's 5xx is an
// interruption, not a failure of the names (helper-32 finding C), and
// the order that failed is settled once.
func TestStopBetweenOrdersIsAborted(t *testing.T) {
	f := newFixture(t)
	f.ca.fail["a.test"] = serverRefusal{}
	e, counted := f.countedIssue(t)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	e.Opts.Sleep = func(context.Context, time.Duration) bool { cancel(); return false }
	p, _ := e.Plan(ctx, []Job{job("a.test")})
	it := p.Execute(ctx).Items[0]
	if it.Outcome != Aborted || f.ca.count() != 1 || len(counted.refunds)+len(counted.unreserves) != 1 {
		t.Fatalf("outcome %s %q, %d orders, %d refunds: want interrupted after one order, settled once", it.Outcome, it.Error, f.ca.count(), len(counted.refunds)+len(counted.unreserves))
	}
}

// An error saved per lineage is cut in its middle, at a character's
// start: its start says what failed, and its end holds the tool's last
// lines and the clauses appended to it (a failed rollback, what to do).
// Text that is not UTF-8 is cut where it is, not shortened.
func TestSavedErrorTextIsCut(t *testing.T) {
	long := errors.New("HEAD " + strings.Repeat("é", 3000) + " [emerg] missing.conf; and rollback failed: disk full")
	got := oneLine(long)
	if len(got) > maxErrorText+40 || !strings.Contains(got, "bytes cut") || !strings.HasPrefix(got, "HEAD ") || !strings.HasSuffix(got, "[emerg] missing.conf; and rollback failed: disk full") || !utf8.ValidString(got) {
		t.Fatalf("cut error: %d bytes, valid UTF-8 %v: %q ... %q", len(got), utf8.ValidString(got), got[:40], got[len(got)-80:])
	}
	raw := oneLine(errors.New("exit status 1: " + strings.Repeat("\x80", 3000) + " END"))
	if len(raw) < maxErrorText || !strings.HasSuffix(raw, " END") {
		t.Fatalf("non-UTF-8 error cut to %d bytes", len(raw))
	}
	if short := oneLine(errors.New("a\n  b")); short != "a b" {
		t.Fatalf("short error: %q", short)
	}
}

// A certificate renewed while a deploy is still owed to a load balancer
// whose config test fails the same way is not deployed either: the run
// says so as a failed deploy (exit non-zero under cron), not as
// renewed. It was reported renewed, exit 0 (hostile review: nginx broken
// by hand, short-lived certificates due again at the next run).
func TestRenewedBehindABrokenConfigIsNotReportedRenewed(t *testing.T) {
	f := newFixture(t)
	f.saved("b.test")
	f.clock.Add(70 * 24 * time.Hour)
	f.dep.fail["b.test"], f.dep.broken = true, "c0ffee"
	if it := f.run(context.Background(), Options{Command: "renew"}, job("b.test")).Items[0]; it.Outcome != Failed {
		t.Fatalf("first deploy: %+v", it)
	}
	// The owed certificate is due itself by now: a new order.
	f.clock.Add(80 * 24 * time.Hour)
	res := f.run(context.Background(), Options{Command: "renew"}, job("b.test"))
	it := res.Items[0]
	if it.Outcome != Failed || it.Pending == "" || !strings.Contains(it.Error, "config test fails without this certificate too") {
		t.Fatalf("renewed behind a config that still fails: outcome %s, pending %q, error %q", it.Outcome, it.Pending, it.Error)
	}
}

// New settings whose deploy fails are given back up, and issue says
// so: no "issued certificate" (nothing was ordered), and the deploy
// line names why it was rolled back.
func TestFailedReconfigureSaysNothingWasOrdered(t *testing.T) {
	f := newFixture(t)
	first := job("r.test")
	first.Lineage.Deploy = store.Deploy{Target: "nginx", ReloadCmd: "systemctl reload nginx"}
	f.run(context.Background(), Options{Command: "issue"}, first)
	f.dep.fail["r.test"] = true
	again := job("r.test")
	again.Lineage.Deploy = store.Deploy{Target: "nginx", ReloadCmd: "systemctl reload nginx2"}
	orders := f.ca.count()
	it := f.run(context.Background(), Options{Command: "issue"}, again).Items[0]
	var b strings.Builder
	it.IssueText(&b, f.st.LivePaths("r.test"), t0)
	out := b.String()
	if it.Outcome != Failed || f.ca.count() != orders || strings.Contains(out, "issued") ||
		!strings.Contains(out, "the new settings were not saved") || !strings.Contains(out, "deploy    rolled back: ") || strings.HasSuffix(out, "rolled back: \n") {
		t.Fatalf("outcome %s, %d orders:\n%s", it.Outcome, f.ca.count()-orders, out)
	}
}

// TestBigHeapSetsAndUndoesTheLimit checks the memory limit a big plan
// runs under: at least 760 MiB, 800 bytes a job past that, GOGC 100
// meanwhile, both put back by undo; and an operator's lower limit kept.
func TestBigHeapSetsAndUndoesTheLimit(t *testing.T) {
	prevLimit := debug.SetMemoryLimit(-1)
	prevGC := debug.SetGCPercent(-1)
	debug.SetGCPercent(prevGC)
	t.Cleanup(func() { debug.SetMemoryLimit(prevLimit); debug.SetGCPercent(prevGC) })

	debug.SetMemoryLimit(math.MaxInt64)
	debug.SetGCPercent(37)
	for _, c := range []struct {
		jobs int
		want int64
	}{
		{300_000, 760 << 20},
		{1_000_000, 800_000_000},
		{2_000_000, 1_600_000_000},
	} {
		undo := bigHeap(c.jobs)
		if got := debug.SetMemoryLimit(-1); got != c.want {
			t.Errorf("%d jobs: memory limit %d, want %d", c.jobs, got, c.want)
		}
		if got := debug.SetGCPercent(100); got != 100 {
			t.Errorf("%d jobs: GOGC %d during the plan, want 100", c.jobs, got)
		}
		undo()
		if got := debug.SetMemoryLimit(-1); got != math.MaxInt64 {
			t.Errorf("%d jobs: memory limit %d after undo, want none", c.jobs, got)
		}
		if got := debug.SetGCPercent(37); got != 37 {
			t.Errorf("%d jobs: GOGC %d after undo, want 37", c.jobs, got)
		}
	}

	// An operator's GOMEMLIMIT under the plan's limit is theirs to keep.
	debug.SetMemoryLimit(512 << 20)
	undo := bigHeap(1_000_000)
	if got := debug.SetMemoryLimit(-1); got != 512<<20 {
		t.Errorf("operator's 512 MiB limit became %d", got)
	}
	if got := debug.SetGCPercent(37); got != 37 {
		t.Errorf("GOGC %d beside an operator's limit, want 37 untouched", got)
	}
	undo()
	if got := debug.SetMemoryLimit(-1); got != 512<<20 {
		t.Errorf("operator's limit after undo %d, want 512 MiB", got)
	}
}
