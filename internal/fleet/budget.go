package fleet

import (
	"cmp"
	"context"
	"fmt"
	"log/slog"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/lbcert/lbcert/internal/engine"
	"github.com/lbcert/lbcert/internal/fleet/rdb"
	"github.com/lbcert/lbcert/internal/hint"
	"github.com/lbcert/lbcert/internal/pace"
)

// DefaultLedgerCap is how many certificates for one exact set of names
// the fleet orders in LedgerWindow: below Let's Encrypt's 5, so a lease
// lost even in a failover that dropped writes costs at most an extra
// order, never the week-long lockout seed 001 hit.
const DefaultLedgerCap = 3

// Budget is the engine's budget in fleet mode: the pace budget, then a
// place in the fleet's issuance ledger for the exact set of names.
type Budget struct {
	Pace *pace.Budget
	N    *Node
	Cap  int
	Now  func() time.Time

	mu    sync.Mutex
	taken map[string][]string // ledger set -> ids this process took, newest last
	seq   atomic.Int64
}

var _ engine.Budget = (*Budget)(nil)

// Reserve spends the pace budget and a ledger place, or neither.
func (b *Budget) Reserve(k pace.Key, o pace.Order) error {
	if err := b.Pace.Reserve(k, o); err != nil {
		return err
	}
	set := LedgerSet(k.Server, o.Names)
	id := b.N.Name + ":" + strconv.FormatInt(time.Now().UnixNano(), 36) + ":" + strconv.FormatInt(b.seq.Add(1), 10)
	// A ledger just rebuilt holds only what the nodes that caught up gave
	// back: the place is taken once they all did (seed 3 of the fault
	// test: a fourth certificate for one set, ordered right after a
	// rebuild), as a publish waits.
	wctx, wcancel := context.WithTimeout(context.Background(), catchUpWait+lookWait+10*time.Second)
	defer wcancel()
	if err := b.N.awaitCatchUp(wctx); err != nil {
		b.Pace.Unreserve(k, o)
		return err
	}
	ctx, cancel := rctx(context.Background())
	defer cancel()
	now := b.Now()
	// What this node knows of the set goes back in first: a Redis that
	// came back from an older snapshot, or lost its last writes in a
	// failover, is not empty, so nothing rebuilt its ledger (seeds 3
	// and 9 of the fault test: five certificates for one set, cap 3).
	ok, free, err := b.N.Shared.LedgerTake(ctx, set, id, b.Cap, LedgerWindow, now, b.N.knownPlaces(set))
	if err != nil {
		b.Pace.Unreserve(k, o) // nothing reached the CA
		return err
	}
	if !ok {
		b.Pace.Unreserve(k, o)
		// A place is a certificate, or an order that may have issued one
		// (its run was killed before it could tell): the CA counts what
		// it issued, which this node cannot know.
		return &pace.Denied{Wait: free.Sub(now), Reason: fmt.Sprintf("the fleet's issuance ledger already holds its cap (--ledger-cap %d) for exactly these names within 7 days: certificates, or orders killed before they could say whether they issued one", b.Cap),
			Hint: ledgerHint(b.Cap)}
	}
	if err := b.N.noteReserved(set, id, now); err != nil {
		// Fail closed: a place not on this node's disk is one a rebuilt
		// Redis would not count, and the CA's limit could be passed.
		// The Redis deadline above may be spent (the edit waited for the
		// node's ledger lock): the place goes back with one of its own.
		gctx, gcancel := rctx(context.Background())
		defer gcancel()
		if gerr := b.N.Shared.LedgerGive(gctx, set, id); gerr != nil {
			slog.Warn("could not give back the ledger place of an order not placed; it counts for 7 days", "set", set, "err", gerr)
		}
		b.Pace.Unreserve(k, o)
		// A hint from below (who holds the lock) says more than this one.
		what := cmp.Or(hint.Of(err), fmt.Sprintf("fix %s (ledger.json and ledger.lock must be writable files), then run again", fleetDir(b.N.Local)))
		return hint.Wrap(fmt.Errorf("not ordering: this node cannot keep its copy of the issuance ledger: %w", err), "%s", what)
	}
	b.mu.Lock()
	if b.taken == nil {
		b.taken = map[string][]string{}
	}
	b.taken[set] = append(b.taken[set], id)
	b.mu.Unlock()
	return nil
}

// ledgerHint is what to do about a full ledger. (It must not say "next
// attempt": issue prints the time of the next one unless the hint has.)
func ledgerHint(cap int) string {
	const frees = "a place frees 7 days after it was taken"
	if cap >= 4 {
		return frees + "; the cap is at its most (the CA locks a set of names out for a week at its 5th certificate)"
	}
	return frees + "; --ledger-cap raises the cap, up to 4 (the CA locks a set of names out for a week at its 5th certificate)"
}

// Refund gives back the certificate tokens and the ledger place of an
// order that issued nothing.
func (b *Budget) Refund(k pace.Key, o pace.Order) error {
	if err := b.giveLedger(k, o); err != nil {
		return err
	}
	return b.Pace.Refund(k, o)
}

// Unreserve gives back all an order that never reached the CA reserved:
// its new-order token too.
func (b *Budget) Unreserve(k pace.Key, o pace.Order) error {
	if err := b.giveLedger(k, o); err != nil {
		return err
	}
	return b.Pace.Unreserve(k, o)
}

// giveLedger gives back the newest ledger place this process took for
// o's set of names.
func (b *Budget) giveLedger(k pace.Key, o pace.Order) error {
	set := LedgerSet(k.Server, o.Names)
	b.mu.Lock()
	ids := b.taken[set]
	var id string
	if len(ids) > 0 {
		id, b.taken[set] = ids[len(ids)-1], ids[:len(ids)-1]
	}
	b.mu.Unlock()
	if id != "" {
		// A Redis that is paused, restarting or failing over comes back
		// in seconds: a place not given back would count an order that
		// issued nothing for 7 days (the fault test: a lineage held at
		// its cap by an order refunded while Redis was paused).
		if err := withRedis(context.Background(), "giving back the ledger place", func(ctx context.Context) error {
			return b.N.Shared.LedgerGive(ctx, set, id)
		}); err != nil {
			return err // the place stays in this node's copy too: it errs on the CA's side
		}
		b.N.dropReserved(set, id)
	}
	return nil
}

func (b *Budget) FailedAuthz(k pace.Key, names []string) error { return b.Pace.FailedAuthz(k, names) }
func (b *Budget) Limited(k pace.Key, o pace.Order, r pace.RateLimit, until time.Time) error {
	return b.Pace.Limited(k, o, r, until)
}
func (b *Budget) Flush() error { return b.Pace.Flush() }

// PaceStore keeps the pace budget in the fleet's Redis.
type PaceStore struct{ Shared *rdb.Shared }

// Update is pace.Shared's.
func (p PaceStore) Update(fields []string, fn func(map[string][]byte) (map[string][]byte, error)) error {
	return p.Shared.PaceUpdate(fields, fn)
}

var _ pace.Shared = PaceStore{}

// Fields lists the budget's fields, for pace.Sweep.
func (p PaceStore) Fields() ([]string, error) { return p.Shared.PaceFields() }

var _ pace.Lister = PaceStore{}
