package pace

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

type clock struct{ t time.Time }

func (c *clock) now() time.Time { return c.t }

var acct = Key{Server: "https://ca.example/dir", Email: "ops@example.com"}

func TestParseLimit(t *testing.T) {
	for in, want := range map[string]Limit{
		"300/3h": {300, 3 * time.Hour}, "50/7d": {50, 7 * 24 * time.Hour}, "5/1h": {5, time.Hour},
		"off": {}, "0": {},
	} {
		got, err := ParseLimit(in)
		if err != nil || got != want {
			t.Errorf("%s: %v %v", in, got, err)
		}
	}
	for _, bad := range []string{"", "300", "x/3h", "300/", "300/3x", "-1/3h", "3/0d"} {
		if _, err := ParseLimit(bad); err == nil {
			t.Errorf("%q accepted", bad)
		}
	}
	if s := (Limit{50, 7 * 24 * time.Hour}).String(); s != "50/7d" {
		t.Errorf("String: %s", s)
	}
}

// TestOrdersBucket: a burst of N; once drained, one token in hand, so
// the next order waits two tokens' time and then one per Per/N; the
// state survives a new process.
func TestOrdersBucket(t *testing.T) {
	dir := t.TempDir()
	c := &clock{time.Date(2026, 11, 22, 10, 0, 0, 0, time.UTC)}
	l := Limits{Orders: Limit{3, 3 * time.Hour}}
	b, _ := Open(dir, l, c.now)
	for i := range 3 {
		if err := b.Reserve(acct, Order{Names: []string{"a.example.com"}}); err != nil {
			t.Fatalf("order %d: %v", i, err)
		}
	}
	err := b.Reserve(acct, Order{Names: []string{"a.example.com"}})
	var d *Denied
	if !errors.As(err, &d) || d.Wait != 2*time.Hour || !strings.Contains(d.Reason, "new-orders budget (3/3h per account)") {
		t.Fatalf("4th order: %v", err)
	}
	// Another account on the same CA has its own bucket.
	if err := b.Reserve(Key{acct.Server, "other@example.com"}, Order{Names: []string{"b.example.com"}}); err != nil {
		t.Fatal(err)
	}
	// A new process sees the spent budget once it is flushed; two hours
	// later the order goes, and the one after waits an hour, not two.
	if err := b.Flush(); err != nil {
		t.Fatal(err)
	}
	c.t = c.t.Add(119 * time.Minute)
	b2, _ := Open(dir, l, c.now)
	if err := b2.Reserve(acct, Order{Names: []string{"a.example.com"}}); err == nil {
		t.Fatal("budget not persisted")
	}
	c.t = c.t.Add(time.Minute)
	if err := b2.Reserve(acct, Order{Names: []string{"a.example.com"}}); err != nil {
		t.Fatalf("after refill: %v", err)
	}
	if err := b2.Reserve(acct, Order{Names: []string{"a.example.com"}}); !errors.As(err, &d) || d.Wait != time.Hour {
		t.Fatalf("steady pace: %v, want one per hour", err)
	}
	// Full again: a fresh burst of 3.
	c.t = c.t.Add(4 * time.Hour)
	for i := range 3 {
		if err := b2.Reserve(acct, Order{Names: []string{"a.example.com"}}); err != nil {
			t.Fatalf("second burst, order %d: %v", i, err)
		}
	}
}

func TestDomainBucketAndPrune(t *testing.T) {
	dir := t.TempDir()
	c := &clock{time.Date(2026, 11, 22, 10, 0, 0, 0, time.UTC)}
	l := Limits{Domain: Limit{2, 7 * 24 * time.Hour}}
	b, _ := Open(dir, l, c.now)
	// Both names count once under example.co.uk, the registered domain.
	if err := b.Reserve(acct, Order{Names: []string{"a.example.co.uk", "www.a.example.co.uk"}}); err != nil {
		t.Fatal(err)
	}
	if err := b.Reserve(acct, Order{Names: []string{"b.example.co.uk"}}); err != nil {
		t.Fatal(err)
	}
	if err := b.Reserve(acct, Order{Names: []string{"c.example.co.uk"}}); err == nil || !strings.Contains(err.Error(), "example.co.uk (2/7d)") {
		t.Fatalf("third cert: %v", err)
	}
	if err := b.Reserve(acct, Order{Names: []string{"other.example.org"}}); err != nil {
		t.Fatalf("another domain: %v", err)
	}
	// Once every bucket has refilled the file holds nothing.
	c.t = c.t.Add(8 * 24 * time.Hour)
	if err := b.Block(acct, c.t.Add(-time.Second)); err != nil {
		t.Fatal(err)
	}
	// (No file at all when none was written before: nothing to keep.)
	data, _ := os.ReadFile(filepath.Join(dir, FileName))
	if s := strings.TrimSpace(string(data)); s != "{}" && s != "" {
		t.Fatalf("not pruned: %s", data)
	}
}

func TestFailedAuthzAndBlock(t *testing.T) {
	c := &clock{time.Date(2026, 11, 22, 10, 0, 0, 0, time.UTC)}
	b, _ := Open(t.TempDir(), LetsEncrypt, c.now)
	for range 5 {
		b.FailedAuthz(acct, []string{"broken.example.com"})
	}
	err := b.Reserve(acct, Order{Names: []string{"ok.example.com", "broken.example.com"}})
	if err == nil || !strings.Contains(err.Error(), "broken.example.com failed validation 5 times within 1h") {
		t.Fatalf("after 5 failures: %v", err)
	}
	if err := b.Reserve(acct, Order{Names: []string{"ok.example.com"}}); err != nil {
		t.Fatalf("another name: %v", err)
	}
	b.Block(acct, c.t.Add(30*time.Minute))
	var d *Denied
	if err := b.Reserve(acct, Order{Names: []string{"ok2.example.com"}}); !errors.As(err, &d) || d.Wait != 30*time.Minute || !strings.Contains(d.Reason, "rateLimited") {
		t.Fatalf("blocked: %v", err)
	}
	c.t = c.t.Add(30 * time.Minute)
	if err := b.Reserve(acct, Order{Names: []string{"ok2.example.com"}}); err != nil {
		t.Fatalf("after Retry-After: %v", err)
	}
}

func TestOffAndCorruptFile(t *testing.T) {
	dir := t.TempDir()
	os.WriteFile(filepath.Join(dir, FileName), []byte("{not json"), 0o600)
	c := &clock{time.Now()}
	b, err := Open(dir, Limits{}, c.now)
	if err != nil {
		t.Fatal(err)
	}
	for range 1000 {
		if err := b.Reserve(acct, Order{Names: []string{"a.example.com"}}); err != nil {
			t.Fatal(err)
		}
	}
}

// Let's Encrypt's exemptions, rule by rule (README "Rate limits and
// renewals").
func TestExemptions(t *testing.T) {
	now := time.Date(2026, 12, 1, 0, 0, 0, 0, time.UTC)
	clock := func() time.Time { return now }
	acct := Key{"https://ca.test/dir", "ops@example.com"}
	open := func(l Limits) *Budget {
		b, err := Open(t.TempDir(), l, clock)
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	names := []string{"shop.example.com"}

	t.Run("a renewal is exempt from the registered-domain limit", func(t *testing.T) {
		b := open(Limits{Domain: Limit{1, 7 * 24 * time.Hour}})
		if err := b.Reserve(acct, Order{Names: names}); err != nil {
			t.Fatal(err)
		}
		if err := b.Reserve(acct, Order{Names: []string{"blog.example.com"}}); err == nil {
			t.Fatal("a new certificate for the same registered domain was allowed past 1/7d")
		}
		for range 3 {
			if err := b.Reserve(acct, Order{Names: names, Renewal: true}); err != nil {
				t.Fatalf("a renewal was charged to the registered domain: %v", err)
			}
		}
	})
	t.Run("a renewal still counts as a new order", func(t *testing.T) {
		b := open(Limits{Orders: Limit{1, time.Hour}})
		b.Reserve(acct, Order{Names: names, Renewal: true})
		if err := b.Reserve(acct, Order{Names: names, Renewal: true}); err == nil {
			t.Fatal("a plain renewal was exempt from new orders per account")
		}
	})
	t.Run("five certificates per exact set of names, renewals included", func(t *testing.T) {
		b := open(LetsEncrypt)
		for i := range 5 {
			if err := b.Reserve(acct, Order{Names: []string{"www.shop.example.com", "shop.example.com"}, Renewal: i > 0}); err != nil {
				t.Fatalf("certificate %d: %v", i+1, err)
			}
		}
		var d *Denied
		err := b.Reserve(acct, Order{Names: []string{"shop.example.com", "www.shop.example.com"}, Renewal: true})
		if !errors.As(err, &d) || !strings.Contains(d.Reason, "exactly these names") || d.Wait < 24*time.Hour {
			t.Fatalf("the sixth certificate for the same names: %v", err)
		}
		if err := b.Reserve(acct, Order{Names: []string{"shop.example.com"}}); err != nil {
			t.Fatalf("another set of names was held up: %v", err)
		}
	})
	t.Run("an ARI renewal is exempt from every limit, once per certificate", func(t *testing.T) {
		b := open(Limits{Orders: Limit{1, time.Hour}, Domain: Limit{1, 7 * 24 * time.Hour}, ExactSet: Limit{1, 7 * 24 * time.Hour}, FailedAuthz: Limit{1, time.Hour}})
		b.Reserve(acct, Order{Names: names})
		b.FailedAuthz(acct, names)
		if err := b.Reserve(acct, Order{Names: names, Renewal: true, Replaces: "aki.serial1"}); err != nil {
			t.Fatalf("an ARI renewal was charged: %v", err)
		}
		if err := b.Reserve(acct, Order{Names: names, Renewal: true, Replaces: "aki.serial1"}); err == nil {
			t.Fatal("the same certificate's ARI exemption was used twice")
		}
		if err := b.Block(acct, now.Add(time.Hour)); err != nil {
			t.Fatal(err)
		}
		if err := b.Reserve(acct, Order{Names: names, Renewal: true, Replaces: "aki.serial2"}); err == nil {
			t.Fatal("an ARI renewal went past the CA's own Retry-After")
		}
	})
}

func TestCheckProfileNames(t *testing.T) {
	le := "https://acme-v02.api.letsencrypt.org/directory"
	for _, tc := range []struct {
		server, profile string
		n               int
		ok              bool
	}{
		{le, "", 100, true}, {le, "classic", 100, true}, {le, "shortlived", 25, true},
		{le, "shortlived", 26, false}, {le, "tlsserver", 26, false},
		{"https://acme-staging-v02.api.letsencrypt.org/directory/", "tlsserver", 30, false},
		{"https://ca.example/dir", "shortlived", 60, true}, // another CA's limits are its own
	} {
		if err := CheckProfileNames(tc.server, tc.profile, tc.n); (err == nil) != tc.ok {
			t.Errorf("%s %q %d names: %v", tc.server, tc.profile, tc.n, err)
		}
	}
}

// An order the budget granted but that never reached the CA (a fleet's
// ledger refused it) gives everything back: its new-orders token, and
// an ARI renewal its once-per-certificate exemption.
func TestUnreserveGivesEverythingBack(t *testing.T) {
	c := &clock{time.Date(2026, 11, 22, 10, 0, 0, 0, time.UTC)}
	l := LetsEncrypt
	l.Orders = Limit{N: 2, Per: time.Hour}
	b, _ := Open(t.TempDir(), l, c.now)
	o := Order{Names: []string{"a.example.com"}}
	for range 5 {
		if err := b.Reserve(acct, o); err != nil {
			t.Fatalf("reserve after unreserves: %v", err)
		}
		if err := b.Unreserve(acct, o); err != nil {
			t.Fatal(err)
		}
	}
	ari := Order{Names: []string{"b.example.com"}, Replaces: "aki.serial", Renewal: true}
	if err := b.Reserve(acct, ari); err != nil {
		t.Fatal(err)
	}
	b.Unreserve(acct, ari)
	b.Reserve(acct, Order{Names: []string{"c.example.com"}})
	b.Reserve(acct, Order{Names: []string{"d.example.com"}}) // the new-orders budget is spent now
	if err := b.Reserve(acct, ari); err != nil {
		t.Fatalf("the ARI exemption was not given back: %v", err)
	}
}

// An order that carries "replaces" after its certificate's exemption
// was used takes the ordinary tokens, and a refund gives them back: the
// refund of an exempt order keeps only the exemption, which the CA saw
// used. (Refund used to skip every order with "replaces", so each failed
// retry of such a renewal kept a certificate of the set's budget.)
func TestRefundOfAReplacesOrderPastItsExemption(t *testing.T) {
	c := &clock{time.Date(2026, 11, 22, 10, 0, 0, 0, time.UTC)}
	l := LetsEncrypt
	l.ExactSet = Limit{N: 1, Per: 7 * 24 * time.Hour}
	b, _ := Open(t.TempDir(), l, c.now)
	ari := Order{Names: []string{"b.example.com"}, Replaces: "aki.serial", Renewal: true}
	for i := range 4 {
		// The first takes the exemption; the others the set's one token,
		// which each refund must give back for the next.
		if err := b.Reserve(acct, ari); err != nil {
			t.Fatalf("order %d replacing the same certificate after refunds: %v", i+1, err)
		}
		if err := b.Refund(acct, ari); err != nil {
			t.Fatal(err)
		}
	}
	if err := b.Reserve(acct, ari); err != nil {
		t.Fatal(err)
	}
	// Not refunded: the set's token is spent now.
	if err := b.Reserve(acct, ari); err == nil {
		t.Fatal("a second certificate for the set within the week, its token not refunded, was allowed")
	}
}

// An order reserved is on disk within saveEvery without a Flush (a run
// killed with SIGKILL loses at most that much), even when no other
// order follows it (a review killed an issue seconds after its order,
// and found no record of it).
func TestReservedOrdersReachTheFileWithoutAFlush(t *testing.T) {
	defer func(d time.Duration) { saveEvery = d }(saveEvery)
	saveEvery = 50 * time.Millisecond
	dir := t.TempDir()
	c := &clock{time.Date(2026, 12, 6, 10, 0, 0, 0, time.UTC)}
	l := Limits{Orders: Limit{300, 3 * time.Hour}}
	b, _ := Open(dir, l, c.now)
	if err := b.Reserve(acct, Order{Names: []string{"a.example.com"}}); err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(dir, FileName)
	deadline := time.Now().Add(5 * time.Second)
	for {
		data, _ := os.ReadFile(path)
		if strings.Contains(string(data), `"tokens": 299`) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the reserved order is not in %s 5 s later: %q", FileName, data)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// An order reserved and given back (the CA could not be reached) leaves
// no file: a run that spent nothing keeps no state directory for it. A
// file already there is still written, empty or not.
func TestNothingSpentWritesNoFile(t *testing.T) {
	dir := t.TempDir()
	c := &clock{time.Date(2026, 12, 6, 10, 0, 0, 0, time.UTC)}
	l := LetsEncrypt
	o := Order{Names: []string{"a.example.com"}}
	b, _ := Open(dir, l, c.now)
	if err := b.Reserve(acct, o); err != nil {
		t.Fatal(err)
	}
	if err := b.Unreserve(acct, o); err != nil {
		t.Fatal(err)
	}
	if err := b.Flush(); err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(dir, FileName)
	if _, err := os.Stat(path); !os.IsNotExist(err) {
		t.Fatalf("nothing was spent, yet %s: %v", FileName, err)
	}
	// The reservation written (by the timer, a slow CA later) and then
	// given back: the file goes again.
	b.Reserve(acct, o)
	b.Flush()
	if _, err := os.Stat(path); err != nil {
		t.Fatalf("the reservation was not written: %v", err)
	}
	b.Unreserve(acct, o)
	b.Flush()
	if _, err := os.Stat(path); !os.IsNotExist(err) {
		t.Fatalf("nothing spent in the end, yet %s: %v", FileName, err)
	}
	// A file there before this run is kept, whatever it holds.
	os.WriteFile(path, []byte("{}\n"), 0o600)
	b, _ = Open(dir, l, c.now)
	b.Reserve(acct, o)
	b.Unreserve(acct, o)
	b.Flush()
	if data, err := os.ReadFile(path); err != nil || strings.Contains(string(data), "tokens") {
		t.Fatalf("a file from before: %q, %v", data, err)
	}
}
