package engine

import (
	"errors"
	"log/slog"
	"sync"
	"time"

	"github.com/lbcert/lbcert/internal/acme"
	"github.com/lbcert/lbcert/internal/hint"
	"github.com/lbcert/lbcert/internal/issuer"
	"github.com/lbcert/lbcert/internal/pace"
)

// obtain places the order, inside the pace budget, retrying once after
// a lost account, once without "replaces" when the CA refuses it, and
// after a Retry-After within MaxWait. It returns nil when s is settled
// otherwise (failed, deferred, interrupted).
func (r *run) obtain(s *step, o issuer.Order) *acme.Result {
	e, ctx, it := r.e, r.ctx, s.item
	l := o.Lineage
	key := pace.Key{Server: l.Server, Email: l.Email}
	reserved := false // one token per order the CA sees: a retry after an account reset is the same order
	reset, dropped := false, false
	for attempt := 0; ; attempt++ {
		if !reserved && !e.Opts.DryRun && e.Budget != nil {
			if !r.reserve(s, key, o.Replaces) {
				return nil
			}
			reserved = true
		}
		if e.Opts.DryRun {
			o.Replaces = ""
		}
		slog.Debug("ordering", "name", l.Name, "reason", it.Reason)
		got, err := e.CA.Obtain(ctx, o)
		r.caResult(l.Server, err)
		if err == nil {
			return got
		}
		if ctx.Err() != nil {
			// Stopped before a certificate came back: its tokens go
			// back, as a refused order's do (issue #26 item 19).
			if reserved && !e.Opts.DryRun && e.Budget != nil {
				if berr := e.Budget.Refund(key, r.paceOrder(s, o.Replaces)); berr != nil {
					slog.Warn("could not save the rate budget", "err", berr)
				}
			}
			it.Outcome, it.Error = Aborted, "interrupted while ordering; nothing was saved; run the same command again to finish"
			return nil
		}
		if acme.AccountGone(err) && !reset {
			// The CA lost the account (a restarted or rebuilt CA): register
			// again, once, and say so, instead of failing every lineage
			// until someone deletes accounts/ by hand. Several workers
			// may find it at once; one resets it and says so.
			reset = true
			r.resetOnce(l.Server, l.Email)
			continue
		}
		if o.Replaces != "" && !dropped && acme.ReplacesRefused(err) {
			slog.Warn("the CA refused to record this order as the replacement of the old certificate; ordering without it", "name", l.Name, "err", oneLine(err))
			dropped, o.Replaces = true, ""
			continue
		}
		if notTheNamesFault(err) && reserved && e.Budget != nil {
			// Stopped before the CA validated (a fleet agent that did not
			// answer, Redis away): no certificate, nothing to count.
			if berr := e.Budget.Refund(key, r.paceOrder(s, o.Replaces)); berr != nil {
				slog.Warn("could not save the rate budget", "err", berr)
			}
		}
		wait, scope, limited := r.spend(key, r.paceOrder(s, o.Replaces), err)
		if limited && attempt == 0 && wait <= e.Opts.MaxWait {
			slog.Warn("the CA said rateLimited; waiting as it asked", "name", l.Name, "scope", scope.String(), "retry_after", wait)
			if !e.sleep(ctx, wait) {
				it.Outcome, it.Error = Aborted, "interrupted while waiting for the CA's Retry-After"
				return nil
			}
			reserved = false // a new order after the CA's Retry-After
			continue
		}
		if limited {
			r.defer_(s, "the CA rate-limited "+scope.String()+": "+oneLine(err), e.now().Add(wait), err)
			return nil
		}
		// An account that cannot be set up, or a CA that does not answer,
		// is not this lineage's fault: no backoff, so the next run after
		// the fix goes ahead.
		r.fail(s, err, !e.Opts.DryRun && !errors.As(err, new(*issuer.AccountError)) && !acme.Unreachable(err) && !notTheNamesFault(err))
		return nil
	}
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
		if r.caFails[server] == caDownAfter {
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

// paceOrder is the step's order as the budget counts it.
func (r *run) paceOrder(s *step, replaces string) pace.Order {
	return pace.Order{Names: s.job.Lineage.Domains, Replaces: replaces,
		Renewal: s.prev != nil && sameNames(s.prev.Domains, s.job.Lineage.Domains)}
}

// reserve takes the job's tokens from the budget, waiting up to MaxWait.
func (r *run) reserve(s *step, key pace.Key, replaces string) bool {
	e := r.e
	o := r.paceOrder(s, replaces)
	for {
		err := e.Budget.Reserve(key, o)
		if err == nil {
			return true
		}
		var d *pace.Denied
		if !errors.As(err, &d) {
			r.fail(s, err, false)
			return false
		}
		if d.Wait > e.Opts.MaxWait {
			r.defer_(s, "not ordered: "+d.Reason, e.now().Add(d.Wait),
				hint.Wrap(err, "run again after next_attempt, or loosen --rate-orders/--rate-domain/--rate-names/--rate-failed-authz if your CA allows more"))
			return false
		}
		slog.Debug("waiting for the rate budget", "name", s.job.Lineage.Name, "for", d.Wait.Round(time.Second), "why", d.Reason)
		if !e.sleep(r.ctx, d.Wait) {
			s.item.Outcome, s.item.Error = NotStarted, "interrupted while waiting for the rate budget"
			return false
		}
	}
}

// spend records a failed order in the budget: a failed validation counts
// against each name; a rateLimited answer blocks what it is about (the
// account, a domain, the set of names, a name) for its Retry-After, an
// hour when the CA gives none, and teaches the budget the CA's limit
// when it states a stricter one.
func (r *run) spend(k pace.Key, o pace.Order, err error) (time.Duration, pace.RateLimit, bool) {
	e := r.e
	wait, limited := acme.RateLimited(err)
	budget := e.Budget != nil && !e.Opts.DryRun
	if budget && (limited || acme.FailedValidation(err) || acme.Refused(err)) {
		// Refused or failed before issuance (a rejectedIdentifier, say):
		// no certificate to count.
		if berr := e.Budget.Refund(k, o); berr != nil {
			slog.Warn("could not save the rate budget", "err", berr)
		}
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
