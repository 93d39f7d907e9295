package pace

import (
	"context"
	"fmt"
	"slices"
	"sync"
	"time"
)

// Gate paces the new orders of one account at one CA by what the CA
// answers, in any CA's wording, and whether the client budget is on or
// off (issue #27 item 8):
//
//   - At most two new orders are in flight until the CA first refuses
//     one in this run, then one: the next is sent once the CA has
//     answered one before it (the orders' validation and issuance still
//     run in parallel), first come, first served. A batch's workers
//     therefore never arrive at once, and a refusal reaches the gate
//     before any order sent after it: the CA answers "rateLimited" to
//     the order it refused and at most the one already on its way beside
//     it, not to a whole herd, and from then on orders go one at a time.
//     Why two, not one: with 200 names, one at a time made the new
//     orders a chain (each waited for the answer to the one before, a
//     few milliseconds on a loaded CA) that set the batch's wall time,
//     and lbcert finished behind certmagic, which sends them all at
//     once; with two it finishes ahead (internal/bench/README.md,
//     "Where lbcert's wall goes at 200 in flight"). An answer that takes
//     longer than stuckAfter lets the next order go: a CA that hangs
//     must not hold every worker behind one request until its timeout.
//   - A rateLimited answer about the account (or one whose scope
//     cannot be read, as any CA words it) stops new orders until its
//     Retry-After, an hour when it gives none.
//   - After that answer, orders are spaced by the time the CA needs
//     for one more: its stated rate when the answer states one (Let's
//     Encrypt's "(300) ... in the last 3h0m0s"), else the Retry-After
//     it gave; and a tenth more (an order's time on the wire varies,
//     and the CA counts it on arrival). When the wait ends, one order
//     goes first, the next waits for its answer and for the spacing, so
//     the herd never repeats. A refusal of an order sent after
//     the last refusal was read doubles the spacing (not one of the
//     order that was on its way beside it).
//
// A wait longer than MaxWait is not started: Acquire returns a *Denied,
// and the engine defers the order (or tries a fallback CA). A Gate lives
// for one run; the Retry-After itself is also saved in the budget
// (Budget.Limited), which later runs honour.
type Gate struct {
	Now     func() time.Time
	MaxWait time.Duration

	mu       sync.Mutex
	inflight int           // new orders sent and not answered yet
	queue    []*waiter     // Acquires waiting, first come first
	checks   int           // times an Acquire looked at the gate (tests count them)
	until    time.Time     // no order before this (the CA's Retry-After)
	gap      time.Duration // spacing learnt from refusals
	last     time.Time     // when the last order was sent
	refused  time.Time     // when the last refusal about the account was read
	why      string
}

// Answer is the CA's answer to one new order, as the gate reads it.
type Answer struct {
	Limited    bool
	RetryAfter time.Duration
	Detail     string
}

func (a *Answer) detail() string {
	if a == nil {
		return ""
	}
	return a.Detail
}

// maxGap bounds the spacing a run learns.
const maxGap = time.Hour

// stuckAfter is how long an unanswered new order holds the next back.
const stuckAfter = 3 * time.Second

func (g *Gate) now() time.Time {
	if g.Now != nil {
		return g.Now()
	}
	return time.Now()
}

// Acquire waits until a new order may be sent and returns done, which
// the caller must call once with the CA's answer (nil when there was
// none). Orders wait their turn first come, first served, and an answer
// wakes only the first of them: with 200 waiting, waking them all at
// every answer was 20,000 wake-ups for 200 orders, a twentieth of a
// batch's CPU (internal/bench/README.md).
func (g *Gate) Acquire(ctx context.Context) (done func(*Answer), err error) {
	g.mu.Lock()
	me := &waiter{}
	g.queue = append(g.queue, me)
	for {
		g.checks++
		now := g.now()
		ready := g.until
		if !g.last.IsZero() && g.gap > 0 && g.last.Add(g.gap).After(ready) {
			ready = g.last.Add(g.gap)
		}
		wait := ready.Sub(now)
		if wait > g.MaxWait {
			why := g.why
			g.leave(me)
			g.mu.Unlock()
			return nil, &Denied{Wait: wait, Reason: why}
		}
		stuck := g.last.Add(stuckAfter).Sub(now)
		if g.queue[0] == me && wait <= 0 && (g.inflight < g.window() || stuck <= 0) {
			g.leave(me)
			g.inflight++
			g.last = now
			g.mu.Unlock()
			sent := now
			return func(a *Answer) { g.release(a, sent) }, nil
		}
		if g.inflight > 0 {
			wait = max(wait, stuck) // woken by the answer, or when it is overdue
		}
		if g.queue[0] != me {
			wait = max(wait, firstLate) // the first is woken; this one checks now and then
		}
		me.ch = make(chan struct{})
		ch := me.ch
		g.mu.Unlock()
		t := time.NewTimer(wait)
		select {
		case <-ch:
		case <-t.C:
		case <-ctx.Done():
			t.Stop()
			g.mu.Lock()
			g.leave(me)
			g.mu.Unlock()
			return nil, ctx.Err()
		}
		t.Stop()
		g.mu.Lock()
	}
}

// window is how many new orders may be in flight at once (g.mu held):
// two until the CA first refuses one about the account in this run,
// then one.
func (g *Gate) window() int {
	if !g.refused.IsZero() {
		return 1
	}
	return 2
}

// firstLate is how often an order behind the first checks the gate
// itself, beside being woken when it becomes the first. Tests raise it.
var firstLate = time.Second

// waiting is how many Acquires wait (tests watch it).
func (g *Gate) waiting() int {
	g.mu.Lock()
	defer g.mu.Unlock()
	return len(g.queue)
}

// waiter is one Acquire waiting its turn; ch is closed to wake it.
type waiter struct{ ch chan struct{} }

// leave takes w out of the queue (g.mu held). The first waiter leaving,
// for the order in flight or because it gave up, wakes the next, which
// may go at once (a stuck order) or must learn it is denied as well.
func (g *Gate) leave(w *waiter) {
	i := slices.Index(g.queue, w)
	if i < 0 {
		return
	}
	g.queue = slices.Delete(g.queue, i, i+1)
	if i == 0 {
		g.wakeFirst()
	}
}

// wakeFirst wakes the first waiter, if it sleeps (g.mu held).
func (g *Gate) wakeFirst() {
	if len(g.queue) > 0 && g.queue[0].ch != nil {
		close(g.queue[0].ch)
		g.queue[0].ch = nil
	}
}

// release ends the order sent at sent and learns from the CA's answer.
// A refusal doubles the spacing only for an order sent after the last
// refusal was read: the order on its way beside a refused one is
// refused for the same reason, and says nothing new about the CA.
func (g *Gate) release(a *Answer, sent time.Time) {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.inflight--
	if rl := ParseRateLimit(a.detail()); a != nil && a.Limited && rl.Scope == ScopeAccount {
		ra := a.RetryAfter
		if ra <= 0 {
			ra = time.Hour
		}
		step := ra
		if rl.Limit.N > 0 {
			step = rl.Limit.Per / time.Duration(rl.Limit.N)
		}
		now := g.now()
		if until := now.Add(ra); until.After(g.until) {
			g.until = until
			g.why = fmt.Sprintf("the CA said rateLimited and asked to wait until %s", until.UTC().Format(time.RFC3339))
		}
		kept := g.gap
		if sent.After(g.refused) {
			kept *= 2
		}
		g.gap = min(max(step+step/10, kept), maxGap)
		g.refused = now
	}
	g.wakeFirst()
}

// Gates holds one Gate per account for a run.
type Gates struct {
	Now     func() time.Time
	MaxWait time.Duration

	mu sync.Mutex
	m  map[Key]*Gate
}

// For returns the gate of account k.
func (gs *Gates) For(k Key) *Gate {
	gs.mu.Lock()
	defer gs.mu.Unlock()
	if gs.m == nil {
		gs.m = map[Key]*Gate{}
	}
	g := gs.m[k]
	if g == nil {
		g = &Gate{Now: gs.Now, MaxWait: gs.MaxWait}
		gs.m[k] = g
	}
	return g
}
