package pace

import (
	"errors"
	"strings"
	"testing"
	"time"
)

// Let's Encrypt's own wording of each limit's answer (its rate-limit
// page and Boulder's messages), and what a CA that says less gets.
func TestParseRateLimit(t *testing.T) {
	week := 168 * time.Hour
	for _, tc := range []struct {
		detail string
		want   RateLimit
	}{
		{`too many new orders (300) from this account in the last 3h0m0s, retry after 2026-12-01 12:00:00 UTC: see https://letsencrypt.org/docs/rate-limits/#new-orders-per-account`,
			RateLimit{Scope: ScopeAccount, Limit: Limit{300, 3 * time.Hour}}},
		{`too many certificates (50) already issued for "Example.com" in the last 168h0m0s, retry after 2026-12-01 12:00:00 UTC: see https://letsencrypt.org/docs/rate-limits/#new-certificates-per-registered-domain`,
			RateLimit{Scope: ScopeDomain, Name: "example.com", Limit: Limit{50, week}}},
		{`too many certificates (5) already issued for this exact set of identifiers in the last 168h0m0s, retry after 2026-12-01 12:00:00 UTC: see https://letsencrypt.org/docs/rate-limits/#new-certificates-per-exact-set-of-identifiers`,
			RateLimit{Scope: ScopeExactSet, Limit: Limit{5, week}}},
		{`too many failed authorizations (5) for "a.example.com" in the last 1h0m0s, retry after 2026-12-01 12:00:00 UTC: see https://letsencrypt.org/docs/rate-limits/#authorization-failures-per-identifier-per-account`,
			RateLimit{Scope: ScopeFailedAuthz, Name: "a.example.com", Limit: Limit{5, time.Hour}}},
		{`too many orders in the last 1.5s`, RateLimit{Scope: ScopeAccount}},        // no count: no limit learned
		{`slow down`, RateLimit{Scope: ScopeAccount}},                               // unknown: the account
		{`too many failed authorizations recently`, RateLimit{Scope: ScopeAccount}}, // a scope without its name
	} {
		if got := ParseRateLimit(tc.detail); got != tc.want {
			t.Errorf("%.60s…: got %+v, want %+v", tc.detail, got, tc.want)
		}
	}
}

// A rateLimited answer stops its own scope only: a domain's stops new
// certificates in that domain, not its renewals or other domains; a
// name's stops that name; the account's stops everything.
func TestLimitedScopes(t *testing.T) {
	c := &clock{time.Date(2026, 11, 22, 10, 0, 0, 0, time.UTC)}
	b, _ := Open(t.TempDir(), LetsEncrypt, c.now)
	until := c.t.Add(20 * time.Minute)
	b.Limited(acct, Order{Names: []string{"a.shop.example"}}, RateLimit{Scope: ScopeDomain, Name: "shop.example"}, until)
	b.Limited(acct, Order{Names: []string{"x.example.net", "y.example.net"}}, RateLimit{Scope: ScopeExactSet}, until)
	b.Limited(acct, Order{Names: []string{"bad.example.org"}}, RateLimit{Scope: ScopeFailedAuthz, Name: "bad.example.org"}, until)
	for _, tc := range []struct {
		o       Order
		blocked bool
	}{
		{Order{Names: []string{"b.shop.example"}}, true},
		{Order{Names: []string{"b.shop.example"}, Renewal: true}, false}, // renewals are exempt from the domain limit
		{Order{Names: []string{"other.example"}}, false},
		{Order{Names: []string{"y.example.net", "x.example.net"}}, true},
		{Order{Names: []string{"x.example.net"}}, false},
		{Order{Names: []string{"x.example.net", "y.example.net"}, Replaces: "ari-1"}, false}, // ARI: exempt
		{Order{Names: []string{"bad.example.org", "www.bad.example.org"}}, true},
	} {
		err := b.Reserve(acct, tc.o)
		var d *Denied
		if blocked := errors.As(err, &d); blocked != tc.blocked || (blocked && d.Wait != 20*time.Minute) {
			t.Errorf("%+v: %v, want blocked=%v for 20m", tc.o, err, tc.blocked)
		}
	}
	c.t = until
	if err := b.Reserve(acct, Order{Names: []string{"c.shop.example"}}); err != nil {
		t.Fatalf("after the CA's Retry-After: %v", err)
	}
	b.Limited(acct, Order{}, RateLimit{Scope: ScopeAccount}, c.t.Add(time.Minute))
	if err := b.Reserve(acct, Order{Names: []string{"z.example"}, Replaces: "ari-2"}); err == nil || !strings.Contains(err.Error(), "rateLimited") {
		t.Fatalf("an account block stops even an ARI order: %v", err)
	}
}

// A CA stricter than the configured budget: after its one answer, the
// budget paces at the CA's stated limit, in this process and the next,
// so the CA never needs to answer rateLimited again.
func TestLearnedLimit(t *testing.T) {
	if got := tighter(Limit{300, 3 * time.Hour}, Limit{3, 30 * time.Second}); got != (Limit{3, 108 * time.Second}) {
		t.Fatalf("tighter: %v, want a burst of 3 at one per 36 s", got)
	}
	dir := t.TempDir()
	c := &clock{time.Date(2026, 11, 22, 10, 0, 0, 0, time.UTC)}
	b, _ := Open(dir, LetsEncrypt, c.now)
	for range 3 {
		if err := b.Reserve(acct, Order{Names: []string{"n.example"}}); err != nil {
			t.Fatal(err)
		}
	}
	// The CA allows 3 per 3 minutes; its 4th answer is rateLimited,
	// retry in a minute.
	if err := b.Limited(acct, Order{}, RateLimit{Scope: ScopeAccount, Limit: Limit{3, 3 * time.Minute}}, c.t.Add(time.Minute)); err != nil {
		t.Fatal(err)
	}
	b.Flush()
	b, _ = Open(dir, LetsEncrypt, c.now) // a later run
	var d *Denied
	if err := b.Reserve(acct, Order{Names: []string{"m.example"}}); !errors.As(err, &d) || d.Wait != time.Minute {
		t.Fatalf("before the Retry-After: %v", err)
	}
	c.t = c.t.Add(time.Minute)
	if err := b.Reserve(acct, Order{Names: []string{"m.example"}}); err != nil {
		t.Fatalf("at the Retry-After: %v", err)
	}
	// The next one waits the CA's pace (a minute, and one more for the
	// token in hand), not the default's (36 s).
	if err := b.Reserve(acct, Order{Names: []string{"k.example"}}); !errors.As(err, &d) || d.Wait != 2*time.Minute || !strings.Contains(d.Reason, "3/3m0s") {
		t.Fatalf("after: %v", err)
	}
	// A limit the operator turned off stays off.
	off := LetsEncrypt
	off.Orders = Limit{}
	b2, _ := Open(dir, off, c.now)
	if err := b2.Reserve(acct, Order{Names: []string{"k.example"}}); err != nil {
		t.Fatalf("--rate-orders off: %v", err)
	}
}

// An order that failed validation or was refused gets its certificate
// tokens back (no certificate was issued), not its new-order token.
func TestRefund(t *testing.T) {
	c := &clock{time.Date(2026, 11, 22, 10, 0, 0, 0, time.UTC)}
	l := LetsEncrypt
	l.Orders = Limit{10, time.Hour}
	b, _ := Open(t.TempDir(), l, c.now)
	o := Order{Names: []string{"flaky.example.com"}}
	for i := range 8 {
		if err := b.Reserve(acct, o); err != nil {
			t.Fatalf("attempt %d: %v", i+1, err) // without refunds the 6th would hit the exact-set limit
		}
		b.Refund(acct, o)
	}
	var d *Denied
	for range 2 {
		b.Reserve(acct, Order{Names: []string{"other.example.com"}})
	}
	if err := b.Reserve(acct, o); !errors.As(err, &d) || !strings.Contains(d.Reason, "new-orders budget") {
		t.Fatalf("refunds gave back the new-order tokens too: %v", err)
	}
}

// A limit of another kind, or an answer lbcert cannot place, blocks the
// account for its Retry-After but teaches nothing: registrations per IP
// address are not the orders limit. A stated limit is kept for a month.
func TestLearnOnlyWhatIsPlaced(t *testing.T) {
	for _, d := range []string{
		`too many new registrations (10) from this IP address in the last 3h0m0s, retry after 2026-12-01 12:00:00 UTC: see https://letsencrypt.org/docs/rate-limits/#new-registrations-per-ip-address`,
		`slow down (3) in the last 1h0m0s`,
	} {
		if r := ParseRateLimit(d); r.Scope != ScopeAccount || r.Limit != (Limit{}) {
			t.Errorf("%.50s…: %+v, want the account and no limit", d, r)
		}
	}
	if r := ParseRateLimit(`too many new orders (30) from this account in the last 500ms`); r.Limit != (Limit{30, 500 * time.Millisecond}) {
		t.Errorf("500ms: %+v", r.Limit)
	}
	c := &clock{time.Date(2026, 11, 22, 10, 0, 0, 0, time.UTC)}
	b, _ := Open(t.TempDir(), LetsEncrypt, c.now)
	b.Limited(acct, Order{}, RateLimit{Scope: ScopeAccount, Limit: Limit{3, 3 * time.Hour}}, c.t.Add(time.Hour))
	if l := b.limit(acct.Server, ScopeAccount); l.N != 3 {
		t.Fatalf("learned limit not used: %v", l)
	}
	c.t = c.t.Add(31 * 24 * time.Hour)
	if l := b.limit(acct.Server, ScopeAccount); l != LetsEncrypt.Orders {
		t.Fatalf("a month later: %v, want the configured %v", l, LetsEncrypt.Orders)
	}
}
