package ca

import (
	"context"
	"testing"
	"time"
)

// TestHostile27StaleFaultClosesSharedBreaker: in a fleet every node's
// Breakers share one store (the fleet's Redis), and each keeps a copy it
// re-reads only every Refresh (10 s). Node n2 reads the breakers while
// the primary is still closed; node n1 then finds the primary down three
// times and opens its breaker for the fleet; n2's own order at the
// primary fails a moment later, and n2 saves its stale copy plus one
// fault: {failures: 1}, no open_until. The primary is closed again for
// every node, which then each wait out the primary's timeouts anew: the
// package promises "one node finding the primary down is every node's
// reason to pass it over" (README, "The breaker"), and
// fleet.BreakerStore's "a lost update costs at most one more try" does
// not hold. Repro (twice, go test -run TestHostile27StaleFault ./internal/ca/):
// n3.Allow(primary) is true right after n1 opened the breaker.
func TestHostile27StaleFaultClosesSharedBreaker(t *testing.T) {
	const primary = "https://ca.example/dir"
	now := time.Date(2026, 5, 8, 12, 0, 0, 0, time.UTC)
	clock := func() time.Time { return now }
	shared := FileStore{Dir: t.TempDir()} // one store, as the fleet's Redis hash is
	n1 := &Breakers{Store: shared, Now: clock, Backoff: 5 * time.Minute, Node: "n1"}
	n2 := &Breakers{Store: shared, Now: clock, Backoff: 5 * time.Minute, Node: "n2"}
	n3 := &Breakers{Store: shared, Now: clock, Backoff: 5 * time.Minute, Node: "n3"}

	if ok, _ := n2.Allow(primary); !ok { // n2 starts an order: reads the breakers (closed)
		t.Fatal("a fresh primary is passed over")
	}
	now = now.Add(time.Second)
	for range 3 {
		n1.Fault(primary, "did not answer (connection refused)")
	}
	if ok, _ := n1.Allow(primary); ok {
		t.Fatal("n1 did not open the primary's breaker after three faults")
	}
	now = now.Add(2 * time.Second) // n2's order fails, within its Refresh
	n2.Fault(primary, "did not answer (connection refused)")

	all, err := shared.Load(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if all[primary].OpenUntil.IsZero() {
		t.Errorf("n2's fault closed the breaker n1 opened: saved %+v", all[primary])
	}
	if ok, _ := n3.Allow(primary); ok {
		t.Errorf("n3 orders at the primary 3 s after n1 found it down three times")
	}
}

// TestHostile27SameCASpelledDifferently: the README refuses "the
// primary's own directory" as a fallback, and NewSet says a trailing
// slash or a capital makes no other CA. The default port and a fully
// qualified host (trailing dot) do not either, yet they pass: the same
// CA is then both primary and fallback, each failed order is sent to it
// twice and its breaker is split in two. Repro, with the binary:
//
//	lbcert --dir /tmp/x --fallback-ca 'le https://acme-v02.api.letsencrypt.org:443/directory' issue -d a.example.com --webroot /tmp --agree-tos
//
// is not refused: it goes to the network, tries "letsencrypt" and then
// "le" (the same CA), and writes ratelimit.json and ca-breakers.json.
func TestHostile27SameCASpelledDifferently(t *testing.T) {
	const primary = "https://acme-v02.api.letsencrypt.org/directory"
	for _, fb := range []string{
		"https://acme-v02.api.letsencrypt.org:443/directory",
		"https://acme-v02.api.letsencrypt.org./directory",
		"https://ACME-v02.api.letsencrypt.org.:443/directory/",
	} {
		if _, err := NewSet(primary, []CA{{Name: "le", Server: fb}}, nil); err == nil {
			t.Errorf("fallback %s accepted beside the primary %s: the same CA", fb, primary)
		}
		if _, err := NewSet("", []CA{{Name: "a", Server: primary}, {Name: "b", Server: fb}}, nil); err == nil {
			t.Errorf("fallbacks %s and %s accepted: the same CA twice", primary, fb)
		}
	}
}
