package pace

import (
	"context"
	"errors"
	"testing"
	"time"
)

// Two new orders go at once and the third waits for an answer; after
// the CA's first refusal, one at a time: the second waits for the
// first's answer.
func TestGateTwoInFlightUntilARefusal(t *testing.T) {
	g := &Gate{MaxWait: time.Minute}
	first, err := g.Acquire(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Second) // well before the first is overdue
	defer cancel()
	second, err := g.Acquire(ctx)
	if err != nil {
		t.Fatalf("the second order waited for the first: %v", err)
	}
	third := goesAfter(t, g, "the third order", first, &Answer{})
	second(&Answer{})
	// A refusal with a short Retry-After, stating a rate that spaces
	// orders by about a millisecond: after it, one at a time.
	third(&Answer{Limited: true, RetryAfter: 100 * time.Millisecond, Detail: "too many new orders (1000) from this account in the last 1s"})
	one, err := g.Acquire(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	time.Sleep(10 * time.Millisecond) // past the spacing: only the window holds the next back
	two := goesAfter(t, g, "the second order after the refusal", one, &Answer{})
	two(&Answer{})
}

// goesAfter starts an Acquire and checks that it waits until answer is
// given to prev, then goes; it returns its done.
func goesAfter(t *testing.T, g *Gate, what string, prev func(*Answer), answer *Answer) func(*Answer) {
	t.Helper()
	got := make(chan func(*Answer), 1)
	go func() {
		d, err := g.Acquire(context.Background())
		if err != nil {
			t.Error(err)
			d = func(*Answer) {}
		}
		got <- d
	}()
	select {
	case <-got:
		t.Fatalf("%s went out before the one before it was answered", what)
	case <-time.After(50 * time.Millisecond):
	}
	prev(answer)
	select {
	case d := <-got:
		return d
	case <-time.After(5 * time.Second):
		t.Fatalf("%s never went out after the answer", what)
	}
	return nil
}

// A refusal in any wording (no count, no link) blocks new orders until
// its Retry-After; then they go one at a time, spaced by that
// Retry-After; a wait past MaxWait is refused at once, with the reason.
func TestGateLearnsFromARefusal(t *testing.T) {
	const ra = 300 * time.Millisecond
	g := &Gate{MaxWait: 10 * time.Second}
	done, _ := g.Acquire(context.Background())
	refused := time.Now()
	done(&Answer{Limited: true, RetryAfter: ra, Detail: "Rate limit exceeded. Try again later."})
	var sent []time.Time
	for range 2 {
		d, err := g.Acquire(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		sent = append(sent, time.Now())
		d(&Answer{})
	}
	if sent[0].Sub(refused) < ra {
		t.Fatalf("an order went out %v after a Retry-After of %v", sent[0].Sub(refused), ra)
	}
	if sent[1].Sub(sent[0]) < ra {
		t.Fatalf("the order after it went out %v later, inside the spacing of %v", sent[1].Sub(sent[0]), ra)
	}
	// The next one waits for the spacing: past a MaxWait of 1 ms, it is
	// refused at once, with the reason.
	g.MaxWait = time.Millisecond
	_, err := g.Acquire(context.Background())
	var d *Denied
	if !errors.As(err, &d) || d.Wait <= time.Millisecond || d.Reason == "" {
		t.Fatalf("want a *Denied past MaxWait, got %v", err)
	}
}

// A refusal about a domain or a name (Let's Encrypt names its scope)
// blocks that scope in the budget, not every order of the account.
func TestGateScopedRefusalDoesNotBlockTheAccount(t *testing.T) {
	g := &Gate{MaxWait: 0}
	done, _ := g.Acquire(context.Background())
	done(&Answer{Limited: true, RetryAfter: time.Hour, Detail: `too many certificates (50) already issued for "example.com" in the last 168h0m0s`})
	d, err := g.Acquire(context.Background())
	if err != nil {
		t.Fatalf("another domain's order held back: %v", err)
	}
	d(nil)
}

// A new order the CA does not answer holds the next back only until it
// is overdue, not until its timeout.
func TestGateStuckOrder(t *testing.T) {
	g := &Gate{MaxWait: time.Minute}
	for range 2 { // two in flight, never answered
		if _, err := g.Acquire(context.Background()); err != nil {
			t.Fatal(err)
		}
	}
	start := time.Now()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	done, err := g.Acquire(ctx)
	if err != nil {
		t.Fatalf("the order after a stuck one never went: %v", err)
	}
	done(nil)
	if waited := time.Since(start); waited < stuckAfter {
		t.Fatalf("went after %v, while the one before was in flight for less than %v", waited, stuckAfter)
	}
}

// A refusal that states the CA's limit spaces the orders after it by
// that rate and a tenth, not by the Retry-After (whole seconds, as
// HTTP rounds it); one that states none, by its Retry-After.
func TestGateStatedRate(t *testing.T) {
	for detail, want := range map[string]time.Duration{
		"too many new orders (10) from this account in the last 1s, retry after 2026-12-03 12:00:00 UTC": 110 * time.Millisecond,
		"Request rejected: this account is over its limit. Please retry later.":                          1100 * time.Millisecond,
	} {
		g := &Gate{MaxWait: time.Minute}
		done, _ := g.Acquire(context.Background())
		done(&Answer{Limited: true, RetryAfter: time.Second, Detail: detail})
		if g.gap != want {
			t.Errorf("%q: spacing %v, want %v", detail, g.gap, want)
		}
	}
}

// Orders waiting at the gate go first come, first served, and each
// answer wakes one of them, not all: 100 waiting orders look at the
// gate about twice each, not about 50 times each as when every answer
// woke every waiter.
func TestGateWakesOneWaiterAtATime(t *testing.T) {
	defer func(d time.Duration) { firstLate = d }(firstLate)
	firstLate = time.Hour // only wake-ups move the queue
	g := &Gate{MaxWait: time.Minute}
	first, _ := g.Acquire(context.Background())
	g.Acquire(context.Background()) // never answered: the rest go one at a time, in an order a channel can show
	const n = 100
	order := make(chan int, n)
	queueUp(g, n, func(i int) {
		d, err := g.Acquire(context.Background())
		if err != nil {
			t.Error(err)
			return
		}
		order <- i
		time.Sleep(2 * time.Millisecond) // the CA's answer takes a while
		d(&Answer{})
	})
	g.mu.Lock()
	g.checks = 0
	g.mu.Unlock()
	first(&Answer{})
	for want := range n {
		select {
		case got := <-order:
			if got != want {
				t.Fatalf("order %d went out as number %d", got, want)
			}
		case <-time.After(10 * time.Second):
			t.Fatalf("order %d never went out", want)
		}
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.checks > 3*n {
		t.Fatalf("%d waiting orders looked at the gate %d times for %d answers", n, g.checks, n)
	}
}

// A refusal whose wait is past MaxWait denies every waiting order, each
// woken by the one before it gave up.
func TestGateRefusalDeniesEveryWaiter(t *testing.T) {
	defer func(d time.Duration) { firstLate = d }(firstLate)
	firstLate = time.Hour
	g := &Gate{MaxWait: time.Minute}
	first, _ := g.Acquire(context.Background())
	g.Acquire(context.Background())
	const n = 20
	denied := make(chan error, n)
	queueUp(g, n, func(int) {
		_, err := g.Acquire(context.Background())
		denied <- err
	})
	first(&Answer{Limited: true, RetryAfter: time.Hour, Detail: "Rate limit exceeded"})
	for range n {
		select {
		case err := <-denied:
			var d *Denied
			if !errors.As(err, &d) {
				t.Fatalf("want *Denied, got %v", err)
			}
		case <-time.After(10 * time.Second):
			t.Fatal("a waiting order was never told it is denied")
		}
	}
}

// queueUp starts n Acquires at g, running acquire(0) to acquire(n-1),
// each queued before the next starts (g's window is full).
func queueUp(g *Gate, n int, acquire func(i int)) {
	for i := range n {
		go acquire(i)
		for g.waiting() < i+1 {
			time.Sleep(time.Millisecond)
		}
	}
}

// The order on its way beside a refused one is refused too; that second
// refusal does not double the spacing, a refusal of an order sent after
// the first was read does.
func TestGateRefusalBesideDoesNotDouble(t *testing.T) {
	g := &Gate{MaxWait: time.Minute}
	refuse := &Answer{Limited: true, RetryAfter: 100 * time.Millisecond, Detail: "Rate limit exceeded"}
	first, _ := g.Acquire(context.Background())
	beside, _ := g.Acquire(context.Background())
	first(refuse)
	beside(refuse)
	if g.gap != 110*time.Millisecond {
		t.Fatalf("spacing %v after a refusal and the one beside it, want 110ms", g.gap)
	}
	next, err := g.Acquire(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	next(refuse)
	if g.gap != 220*time.Millisecond {
		t.Fatalf("spacing %v after a refusal of an order sent after the first, want 220ms", g.gap)
	}
}
