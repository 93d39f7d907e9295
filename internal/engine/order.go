package engine

import (
	"cmp"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"github.com/lbcert/lbcert/internal/acme"
	"github.com/lbcert/lbcert/internal/hint"
	"github.com/lbcert/lbcert/internal/issuer"
	"github.com/lbcert/lbcert/internal/pace"
	"github.com/lbcert/lbcert/internal/renewal"
	"github.com/lbcert/lbcert/internal/secret"
)

// attempt is what one CA made of an order (obtain).
type attempt struct {
	got *acme.Result
	// next says why the next CA should take the order: this one did
	// not answer or failed itself (a breaker fault), or it asked for a
	// wait past MaxWait (its rateLimited, the budget). Empty when the
	// step is settled here.
	next string
	// broken is a fault of the CA's own (acme.CAFault), for its
	// breaker, and why what it says.
	broken bool
	why    string
	// answered says the CA answered: up, whatever it said.
	answered bool
}

// obtain places the order at o.Lineage.Server, inside the pace budget,
// retrying once after a lost account, once without "replaces" when the
// CA refuses it, and after each Retry-After while the waits stay within
// MaxWait. With another CA to try (more), a fault of this CA's own or a
// wait past MaxWait returns attempt.next instead of settling the step.
func (r *run) obtain(s *step, o issuer.Order, more bool) attempt {
	e, ctx, it := r.e, r.ctx, s.item
	l := o.Lineage
	key := pace.Key{Server: l.Server, Email: l.Email}
	reserved := false // one token per order the CA sees: a retry after an account reset is the same order, one without "replaces" is not
	reset, dropped := false, false
	faults := 0 // orders the CA failed itself before their finalize
	var waited time.Duration
	for {
		if !reserved && !e.Opts.DryRun && e.Budget != nil {
			if next, ok := r.reserve(s, key, r.paceOrder(s, o), more); !ok {
				return attempt{next: next}
			}
			reserved = true
		}
		if e.Opts.DryRun {
			o.Replaces = ""
		}
		slog.Debug("ordering", "name", l.Name, "server", l.Server, "reason", it.Reason)
		got, err := e.CA.Obtain(ctx, o)
		r.caResult(l.Server, err)
		if err == nil {
			return attempt{got: got, answered: true}
		}
		if ctx.Err() != nil {
			// Stopped before a certificate came back: its tokens go
			// back, as a refused order's do (issue #26 item 19), unless
			// the finalize was sent and the CA may have issued.
			it.Outcome, it.Error = Aborted, "interrupted while ordering; nothing was saved; run the same command again to finish"
			if acme.MayHaveIssued(err) {
				it.Error = "interrupted after the order's finalize was sent: the CA may have issued a certificate lbcert did not get (its limits count it); nothing was saved; run the same command again to finish"
			} else {
				r.settle(key, r.paceOrder(s, o), err, &reserved)
			}
			return attempt{}
		}
		if r.orderAgain(s, key, &o, err, &reserved, &reset, &dropped) || r.serverFaultAgain(s, key, o, err, &reserved, &faults) {
			continue
		}
		if ctx.Err() != nil { // stopped in the pause before ordering again, the last order settled
			it.Outcome, it.Error = Aborted, "interrupted while ordering; nothing was saved; run the same command again to finish"
			return attempt{}
		}
		if d := (*pace.Denied)(nil); errors.As(err, &d) {
			// The account's gate held the order back: a Retry-After this
			// run was already given runs past MaxWait. Nothing reached
			// the CA.
			r.settle(key, r.paceOrder(s, o), err, &reserved)
			return r.held(s, "not ordered: "+d.Reason, e.now().Add(d.Wait), err, more)
		}
		if notTheNamesFault(err) {
			// Stopped before the CA validated (a fleet agent that did not
			// answer, Redis away, the CA's own 5xx): no certificate,
			// nothing to count.
			r.settle(key, r.paceOrder(s, o), err, &reserved)
		}
		wait, scope, limited := r.spend(key, r.paceOrder(s, o), err, &reserved)
		if limited && waited+wait <= e.Opts.MaxWait {
			slog.Warn("the CA said rateLimited; waiting as it asked", "name", l.Name, "scope", scope.String(), "retry_after", wait)
			if !e.sleep(ctx, wait) {
				it.Outcome, it.Error = Aborted, "interrupted while waiting for the CA's Retry-After"
				return attempt{}
			}
			waited += wait
			reserved = false // a new order after the CA's Retry-After
			continue
		}
		if limited && more {
			return attempt{answered: true, next: fmt.Sprintf("answered rateLimited (%s) with a Retry-After of %s, past --max-wait %s",
				scope, wait.Round(time.Second), e.Opts.MaxWait)}
		}
		if limited {
			r.defer_(s, "the CA rate-limited "+scope.String()+": "+oneLine(err), e.now().Add(wait), err)
			return attempt{answered: true}
		}
		return r.failed(s, key, o, err, &reserved, more)
	}
}

// orderAgain reports whether the names go to the CA again at once
// (again), having settled what the failed order reserved: kept when the
// CA may have issued, given back when it refused "replaces".
func (r *run) orderAgain(s *step, key pace.Key, o *issuer.Order, err error, reserved, reset, dropped *bool) bool {
	switch {
	case acme.MayHaveIssued(err):
		// The CA may have issued: its tokens and ledger place stay
		// spent, whatever else the error says (a 5xx is the CA's fault,
		// not the names', yet counts).
		*reserved = false
	case errors.As(err, new(*issuer.AccountError)):
		r.settle(key, r.paceOrder(s, *o), err, reserved) // no account, no order
	}
	refused := *o
	if !r.again(err, o, reset, dropped) {
		return false
	}
	if refused.Replaces != "" && o.Replaces == "" {
		// The CA refused the order: what it took goes back (a fleet's
		// ledger place), and the same names without "replaces" are an
		// order the budget counts, which the exempt reservation does not
		// cover.
		r.refund(key, r.paceOrder(s, refused), reserved)
	}
	return true
}

// failed settles an order the CA did not grant, for a reason other than
// its rate limit: with another CA to try (more), a fault of this CA's
// own passes the order on to it.
func (r *run) failed(s *step, key pace.Key, o issuer.Order, err error, reserved *bool, more bool) attempt {
	why, down := caFault(err)
	if down && more {
		if acme.MayHaveIssued(err) {
			// A certificate at a failing CA helps no one; one from the
			// next does. The failing CA's limits may count one.
			slog.Warn("the CA failed after the order's finalize was sent and may have issued a certificate lbcert did not get; the next CA orders these names too", "name", o.Lineage.Name, "ca", o.Lineage.Server)
		}
		r.refund(key, r.paceOrder(s, o), reserved) // no certificate from this CA (kept spent when it may have issued)
		return attempt{next: why, broken: true, why: why}
	}
	// An account that cannot be set up, or a CA that does not answer,
	// is not this lineage's fault: no backoff, so the next run after
	// the fix goes ahead.
	r.fail(s, err, !r.e.Opts.DryRun && !errors.As(err, new(*issuer.AccountError)) && !acme.Unreachable(err) && !notTheNamesFault(err))
	return attempt{answered: !down, broken: down, why: why}
}

// again reports whether the same order goes to the CA again at once:
// after it lost the account (registered again, once; several workers
// may find it at once, and one resets it and says so), or without
// "replaces" when it refused that (once).
func (r *run) again(err error, o *issuer.Order, reset, dropped *bool) bool {
	l := o.Lineage
	switch {
	case acme.AccountGone(err) && !*reset && !acme.MayHaveIssued(err):
		// A restarted or rebuilt CA: register again instead of failing
		// every lineage until someone deletes accounts/ by hand.
		*reset = true
		r.resetOnce(l.Server, l.Email)
		return true
	case o.Replaces != "" && !*dropped && acme.ReplacesRefused(err):
		slog.Warn("the CA refused to record this order as the replacement of the old certificate; ordering without it", "name", l.Name, "err", oneLine(err))
		*dropped, o.Replaces = true, ""
		return true
	}
	return false
}

// held settles s as deferred until next for why, or, with another CA to
// try (more), passes why on to it.
func (r *run) held(s *step, why string, next time.Time, err error, more bool) attempt {
	if more {
		return attempt{next: why}
	}
	r.defer_(s, why, next, err)
	return attempt{}
}

// serverFaultAgain reports whether the names go to the CA again after it
// failed the order itself before its finalize (a 5xx: step-ca answers
// concurrent orders of one account with "changed since last read" now
// and then), after a random pause that grows with each try, so the
// retries of a burst spread out; up to acme.OrderTries orders in all.
// Each is an order the CA may count, so the next takes a reservation of
// its own (settling this one's): --rate-orders sees every order sent.
func (r *run) serverFaultAgain(s *step, key pace.Key, o issuer.Order, err error, reserved *bool, faults *int) bool {
	if !acme.ServerFault(err) || acme.MayHaveIssued(err) || acme.FinalizeRefused(err) || *faults+1 >= acme.OrderTries ||
		errors.As(err, new(*issuer.AccountError)) { // no order: the account's setup failed, and is not tried again per order
		return false
	}
	*faults++
	r.settle(key, r.paceOrder(s, o), err, reserved)
	slog.Info("the CA answered the order with an internal error; ordering again", "name", o.Lineage.Name, "err", oneLine(err))
	return r.e.sleep(r.ctx, acme.RetryPause(*faults))
}

// settle gives back what a failed order reserved (giveBack): all of it
// when the order never reached the CA (the account could not be set up,
// the CA refused the new order or was not reached, the gate held it
// back), else its certificate tokens only (refund).
func (r *run) settle(k pace.Key, o pace.Order, err error, reserved *bool) {
	notPlaced := acme.OrderNotPlaced(err) || errors.As(err, new(*issuer.AccountError)) || errors.As(err, new(*pace.Denied))
	r.giveBack(k, o, reserved, notPlaced)
}

// refund gives an order's certificate tokens back (giveBack).
func (r *run) refund(k pace.Key, o pace.Order, reserved *bool) { r.giveBack(k, o, reserved, false) }

// giveBack gives an order's certificate tokens back, and its new-order
// token too when all, while its reservation still holds them
// (*reserved), once: the paths that settle a failed order may each find
// a reason to refund it (a CA's 5xx is not the names' fault and a
// refusal too), and a second refund would give back tokens of another
// order, letting the budget pass the CA's limit.
func (r *run) giveBack(k pace.Key, o pace.Order, reserved *bool, all bool) {
	if !*reserved {
		return
	}
	*reserved = false
	if r.e.Budget == nil || r.e.Opts.DryRun {
		return
	}
	give := r.e.Budget.Refund
	if all {
		give = r.e.Budget.Unreserve
	}
	if err := give(k, o); err != nil {
		slog.Warn("could not save the rate budget", "err", err)
	}
}

// caFault is acme.CAFault, less the errors that say from this side that
// the names are not at fault (a fleet agent that did not answer, Redis
// away): those say nothing about the CA, even when they read
// "connection refused".
func caFault(err error) (string, bool) {
	why, ok := acme.CAFault(err)
	if ok && notTheNamesFault(err) && !acme.ServerFault(err) {
		return "", false
	}
	return secret.Scrub(why), ok
}

// caDownAfter is how many orders in a row may find a CA unreachable
// before the run starts no more orders from it: a dead CA costs a few
// timeouts, not rows ÷ concurrency × 2 minutes, and puts no lineage into
// backoff as if its domain were broken.
const caDownAfter = 3

// caResult counts consecutive unreachable answers per CA.
func (r *run) caResult(server string, err error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.caFails == nil {
		r.caFails = map[string]int{}
	}
	// An error that says the names are not at fault and comes from this
	// side (a fleet agent that did not answer the orderer's check) says
	// nothing about the CA, even when it reads "connection refused".
	if acme.Unreachable(err) && !notTheNamesFault(err) {
		r.caFails[server]++
		if r.caFails[server] == caDownAfter && r.e.CAs.Len() > 1 {
			slog.Warn("the CA did not answer several orders in a row; the orders after it go to the next CA in this run", "server", server)
		} else if r.caFails[server] == caDownAfter {
			slog.Error("the CA did not answer several orders in a row; starting no more orders from it in this run", "server", server)
			r.res.Unreachable = append(r.res.Unreachable, server)
		}
		return
	}
	r.caFails[server] = 0
}

func (r *run) caDown(server string) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.caFails[server] >= caDownAfter
}

// resetOnce resets an account once per run, however many workers meet
// its loss at the same time.
func (r *run) resetOnce(server, email string) {
	r.mu.Lock()
	if r.reset == nil {
		r.reset = map[string]*sync.Once{}
	}
	o := r.reset[server+" "+email]
	if o == nil {
		o = &sync.Once{}
		r.reset[server+" "+email] = o
	}
	r.mu.Unlock()
	o.Do(func() {
		slog.Warn("the CA no longer knows the saved account; registering a new one", "server", server, "email", email)
		if err := r.e.CA.ResetAccount(server, email); err != nil {
			slog.Warn("could not forget the lost account", "server", server, "err", err)
		}
	})
}

// paceOrder is the step's order as the budget counts it: a renewal (the
// same names again) only at the lineage's primary or the CA that issued
// its certificate, where the CA has seen these names before.
func (r *run) paceOrder(s *step, o issuer.Order) pace.Order {
	home, _ := s.job.Lineage.Home()
	// The CA exempts a renewal that carries "replaces" only inside the
	// renewal window it suggested: a forced one, or one due by the
	// lifetime rule, counts (issue --force in a loop is what the
	// exact-set limit is there to stop).
	exempt := o.Replaces
	if why := renewal.Reason(s.item.Reason); why != renewal.ARI && why != renewal.ARIPast {
		exempt = ""
	}
	return pace.Order{Names: s.job.Lineage.Domains, Replaces: exempt,
		Renewal: s.prev != nil && sameNames(s.prev.Domains, s.job.Lineage.Domains) &&
			(o.Lineage.Server == home || o.Lineage.Server == s.prev.Server)}
}

// reserve takes the job's tokens from the budget, waiting up to MaxWait.
// With another CA to try (more), a wait past MaxWait returns why, for
// that CA, instead of deferring; a name's failed validations never do.
func (r *run) reserve(s *step, key pace.Key, o pace.Order, more bool) (string, bool) {
	e := r.e
	for {
		err := e.Budget.Reserve(key, o)
		if err == nil {
			return "", true
		}
		var d *pace.Denied
		if !errors.As(err, &d) {
			r.fail(s, err, false)
			return "", false
		}
		if d.Wait > e.Opts.MaxWait && more && d.Scope != pace.ScopeFailedAuthz {
			return "not ordered: " + d.Reason, false
		}
		if d.Wait > e.Opts.MaxWait {
			r.defer_(s, "not ordered: "+d.Reason, e.now().Add(d.Wait),
				hint.Wrap(err, "%s", cmp.Or(d.Hint, "run again after next_attempt, or loosen --rate-orders/--rate-domain/--rate-names/--rate-failed-authz if your CA allows more")))
			return "", false
		}
		slog.Debug("waiting for the rate budget", "name", s.job.Lineage.Name, "for", d.Wait.Round(time.Second), "why", d.Reason)
		if !e.sleep(r.ctx, d.Wait) {
			s.item.Outcome, s.item.Error = NotStarted, "interrupted while waiting for the rate budget"
			return "", false
		}
	}
}

// spend records a failed order in the budget: a failed validation counts
// against each name; a rateLimited answer blocks what it is about (the
// account, a domain, the set of names, a name) for its Retry-After, an
// hour when the CA gives none, and teaches the budget the CA's limit
// when it states a stricter one.
func (r *run) spend(k pace.Key, o pace.Order, err error, reserved *bool) (time.Duration, pace.RateLimit, bool) {
	e := r.e
	wait, limited := acme.RateLimited(err)
	budget := e.Budget != nil && !e.Opts.DryRun
	if limited || acme.FailedValidation(err) || acme.Refused(err) {
		// Refused or failed before issuance (a rejectedIdentifier, say):
		// no certificate to count.
		r.refund(k, o, reserved)
	}
	if !limited {
		if budget && acme.FailedValidation(err) {
			if berr := e.Budget.FailedAuthz(k, o.Names); berr != nil {
				slog.Warn("could not save the rate budget", "err", berr)
			}
		}
		return 0, pace.RateLimit{}, false
	}
	if wait <= 0 {
		wait = time.Hour
	}
	scope := pace.ParseRateLimit(acme.ProblemDetail(err))
	if e.Budget != nil && !e.Opts.DryRun {
		if berr := e.Budget.Limited(k, o, scope, e.now().Add(wait)); berr != nil {
			slog.Warn("could not save the rate budget", "err", berr)
		}
	}
	return wait, scope, true
}
