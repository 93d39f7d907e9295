package pace

import (
	"fmt"
	"math"
	"regexp"
	"strconv"
	"strings"
	"time"
)

// Scope is the part of the budget a CA's rateLimited answer is about.
type Scope string

const (
	ScopeAccount     Scope = "orders"       // new orders per account; also any answer lbcert cannot place
	ScopeDomain      Scope = "domain"       // new certificates per registered domain
	ScopeExactSet    Scope = "exact_set"    // new certificates per exact set of names
	ScopeFailedAuthz Scope = "failed_authz" // failed authorizations per name per account
)

// RateLimit is what a rateLimited answer said: which limit, for which
// domain or name when it names one, and the CA's own figures for that
// limit when the detail gives them.
type RateLimit struct {
	Scope Scope
	Name  string // the registered domain (ScopeDomain) or name (ScopeFailedAuthz)
	// Limit is N per Per as the CA states it, read only when the answer
	// was placed in its scope for sure; zero otherwise, so a limit of
	// another kind (registrations per IP address) is never taken for
	// the orders limit.
	Limit Limit
}

func (r RateLimit) String() string {
	switch r.Scope {
	case ScopeDomain:
		return "certificates for " + r.Name
	case ScopeExactSet:
		return "certificates for this exact set of names"
	case ScopeFailedAuthz:
		return "failed validations of " + r.Name
	}
	return "new orders on this account"
}

var (
	// Let's Encrypt words each limit's answer as "too many X (N) ... in
	// the last D" and links its section of the rate-limit page; the link
	// is the surest sign of the scope, the wording the fallback for CAs
	// that copy the wording but not the links.
	rlCount  = regexp.MustCompile(`\((\d+)\)`)
	rlPeriod = regexp.MustCompile(`in the last ((?:\d+(?:\.\d+)?(?:ns|us|µs|ms|h|m|s))+)`)
	rlQuoted = regexp.MustCompile(`"([^"]+)"`)
)

// ParseRateLimit reads a rateLimited problem's detail. An answer it
// cannot place is taken as the account's: the widest scope, so nothing
// is sent that the CA might refuse again.
func ParseRateLimit(detail string) RateLimit {
	d := strings.ToLower(detail)
	r := RateLimit{Scope: ScopeAccount}
	placed := true
	switch {
	case strings.Contains(d, "#new-orders-per-account"), strings.Contains(d, "new orders"):
	case strings.Contains(d, "#new-certificates-per-registered-domain"),
		strings.Contains(d, "per registered domain"),
		strings.Contains(d, "certificates") && strings.Contains(d, "already issued for \""):
		r.Scope = ScopeDomain
	case strings.Contains(d, "#new-certificates-per-exact-set"),
		strings.Contains(d, "exact set"):
		r.Scope = ScopeExactSet
	case strings.Contains(d, "#authorization-failures-per"),
		strings.Contains(d, "failed authorizations"):
		r.Scope = ScopeFailedAuthz
	default:
		placed = false // the account's, to be safe, but no limit learned from it
	}
	if r.Scope == ScopeDomain || r.Scope == ScopeFailedAuthz {
		m := rlQuoted.FindStringSubmatch(detail)
		if m == nil {
			return RateLimit{Scope: ScopeAccount} // a scope without its name: block the account
		}
		r.Name = strings.ToLower(m[1])
	}
	if m := rlCount.FindStringSubmatch(detail); m != nil && placed {
		n, err := strconv.Atoi(m[1])
		p := rlPeriod.FindStringSubmatch(detail)
		if err == nil && n > 0 && p != nil {
			if per, err := time.ParseDuration(p[1]); err == nil && per > 0 {
				r.Limit = Limit{N: n, Per: per}
			}
		}
	}
	return r
}

// Limited records a rateLimited answer to order o: nothing more goes to
// that scope until until (the CA's Retry-After), in this run or a later
// one; the scope's bucket holds its next token at that moment; and when
// the CA stated its limit, the budget keeps it and paces by the tighter
// of the CA's and the configured one from then on, so that after the
// wait it sends as the CA counts instead of meeting the same answer.
func (b *Budget) Limited(k Key, o Order, r RateLimit, until time.Time) error {
	return b.do(b.fieldsFor(k, o, r.Name), func() error { return b.limited(k, o, r, until) })
}

func (b *Budget) limited(k Key, o Order, r RateLimit, until time.Time) error {
	now := b.Now()
	key, bucketKey, buckets := b.scopeKeys(k, o, r)
	if until.After(b.st.Blocked[key]) {
		b.st.Blocked[key] = until.UTC()
	}
	if r.Limit.N > 0 {
		if b.st.Learned == nil {
			b.st.Learned = map[string]learned{}
		}
		b.st.Learned[k.Server+" "+string(r.Scope)] = learned{Limit: r.Limit, At: now.UTC()}
	}
	// The CA says its bucket for this scope is empty until until: ours
	// gets the level that makes one token at that moment, if it had more.
	if l := b.limit(k.Server, r.Scope); buckets != nil && l.N > 0 {
		rate := float64(l.N) / float64(l.Per)
		level := 1 - float64(until.Sub(now))*rate
		if cur := buckets[bucketKey].get(l, now).level(l, now); level < cur {
			// Not marked drained: the order sent at the Retry-After
			// arrives after it, when the CA's bucket holds its token;
			// taking that token drains ours, and the one after it waits
			// for a token in hand (ordersInHand).
			buckets[bucketKey] = bucket{Tokens: level, At: now}
		}
	}
	return b.save(now)
}

// Block stops every new order on account k until until: a rateLimited
// answer that names no scope.
func (b *Budget) Block(k Key, until time.Time) error {
	return b.Limited(k, Order{}, RateLimit{Scope: ScopeAccount}, until)
}

// scopeKeys names the block and the bucket a rateLimited answer is about.
func (b *Budget) scopeKeys(k Key, o Order, r RateLimit) (block, bucketKey string, buckets map[string]bucket) {
	switch r.Scope {
	case ScopeDomain:
		return blockKey(ScopeDomain, k.Server, r.Name), k.Server + " " + r.Name, b.st.Domains
	case ScopeExactSet:
		set := exactSet(o.Names)
		return blockKey(ScopeExactSet, k.Server, set), k.Server + " " + set, b.st.Sets
	case ScopeFailedAuthz:
		return blockKey(ScopeFailedAuthz, k.account(), r.Name), k.account() + " " + r.Name, b.st.Failed
	}
	return k.account(), k.account(), b.st.Orders
}

// blockKey is a scoped block's key in blocked_until; an account's own
// block is keyed by the account alone, as before scopes existed.
func blockKey(s Scope, owner, what string) string {
	return fmt.Sprintf("%s %s %s", s, owner, what)
}

// limit is the limit in force for scope s at server: the configured
// one, tightened by what the CA said of its own (the smaller burst and
// the slower rate of the two). A limit turned off stays off: that is the
// operator's word about this CA.
func (b *Budget) limit(server string, s Scope) Limit {
	var l Limit
	switch s {
	case ScopeAccount:
		l = b.Limits.Orders
	case ScopeDomain:
		l = b.Limits.Domain
	case ScopeExactSet:
		l = b.Limits.ExactSet
	case ScopeFailedAuthz:
		l = b.Limits.FailedAuthz
	}
	ca, ok := b.st.Learned[server+" "+string(s)]
	if l.N == 0 || !ok || ca.N <= 0 || ca.Per <= 0 || b.Now().Sub(ca.At) > learnedFor {
		return l
	}
	return tighter(l, ca.Limit)
}

// tighter is the limit that allows no more than either a or b: the
// smaller burst, refilling at the slower rate.
func tighter(a, b Limit) Limit {
	n := min(a.N, b.N)
	rate := min(float64(a.N)/float64(a.Per), float64(b.N)/float64(b.Per))
	return Limit{N: n, Per: time.Duration(math.Round(float64(n) / rate))}
}

// Refund gives back the certificate tokens order o took, after the CA
// refused it or its validation failed: no certificate was issued, and
// the CA counts certificates, not attempts. Its new-order token stays
// spent, as the CA counts every order it created.
func (b *Budget) Refund(k Key, o Order) error {
	if b.wasExempt(o, false) {
		return nil // an exempt ARI order took only its once-per-certificate exemption, kept
	}
	return b.do(b.fieldsFor(k, o, ""), func() error { return b.refund(k, o) })
}

// wasExempt reports whether this process reserved order o under its ARI
// exemption, and forgets it when done (the reservation is settled).
func (b *Budget) wasExempt(o Order, done bool) bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	ok := o.Replaces != "" && b.exempted[o.Replaces]
	if ok || done {
		delete(b.exempted, o.Replaces)
	}
	return ok
}

// Unreserve undoes a Reserve whose order never reached the CA (a
// fleet's issuance ledger refused it after the budget granted it): the
// new-orders token goes back too, and an ARI order its exemption, since
// the CA saw nothing.
func (b *Budget) Unreserve(k Key, o Order) error {
	exempt := b.wasExempt(o, true)
	return b.do(b.fieldsFor(k, o, ""), func() error {
		if exempt {
			delete(b.st.ARIUsed, o.Replaces)
			b.dirty = true
			return b.maybeSave(b.Now())
		}
		if l := b.limit(k.Server, ScopeAccount); l.N > 0 {
			if bk, ok := b.st.Orders[k.account()]; ok {
				now := b.Now()
				b.st.Orders[k.account()] = bucket{Tokens: min(bk.level(l, now)+1, float64(l.N)), At: now, Drained: bk.Drained}
			}
		}
		return b.refund(k, o)
	})
}

func (b *Budget) refund(k Key, o Order) error {
	now := b.Now()
	give := func(m map[string]bucket, key string, l Limit) {
		if l.N == 0 {
			return
		}
		if bk, ok := m[key]; ok {
			m[key] = bucket{Tokens: min(bk.level(l, now)+1, float64(l.N)), At: now}
		}
	}
	if !o.Renewal {
		for _, d := range registered(o.Names) {
			give(b.st.Domains, k.Server+" "+d, b.limit(k.Server, ScopeDomain))
		}
	}
	give(b.st.Sets, k.Server+" "+exactSet(o.Names), b.limit(k.Server, ScopeExactSet))
	b.dirty = true
	return b.maybeSave(now)
}

// learned is a limit a CA stated, and when.
type learned struct {
	Limit
	At time.Time `json:"at"`
}

// learnedFor is how long a stated limit is kept without the CA saying it
// again: a CA that raises an account's limits is believed within a month,
// and one that keeps them low says so again at its first refusal.
const learnedFor = 30 * 24 * time.Hour
