// Package pace keeps lbcert inside a CA's rate limits on the client side,
// so that a batch of thousands, a cron renew and a hand-typed issue share
// one budget instead of finding the limit by hitting it (seed 003).
//
// The limits are token buckets, the way Let's Encrypt describes its own:
// a bucket holds up to N tokens and refills at N per period, so after a
// burst of N the steady pace is one per period/N. The defaults are Let's
// Encrypt's published ones:
//
//   - new orders per account: 300 per 3 hours;
//   - new certificates per registered domain: 50 per 7 days;
//   - failed authorizations per name per account: 5 per hour.
//
// A rateLimited answer's Retry-After blocks what it is about (the
// account, a registered domain, a set of names, a name) until then, and
// a limit the CA states that is stricter than the configured one
// replaces it for that CA (scope.go). The buckets live in
// <dir>/ratelimit.json; every command that orders holds
// the state directory's lock, so one process writes it at a time.
package pace

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"math"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"golang.org/x/net/publicsuffix"

	"github.com/lbcert/lbcert/internal/store"
)

// Limit is N events per Per; N == 0 turns it off.
type Limit struct {
	N   int           `json:"n"`
	Per time.Duration `json:"per_ns"`
}

func (l Limit) String() string {
	if l.N == 0 {
		return "off"
	}
	return fmt.Sprintf("%d/%s", l.N, shortDuration(l.Per))
}

func shortDuration(d time.Duration) string {
	switch {
	case d%(24*time.Hour) == 0:
		return fmt.Sprintf("%dd", d/(24*time.Hour))
	case d%time.Hour == 0:
		return fmt.Sprintf("%dh", d/time.Hour)
	}
	return d.String()
}

// ParseLimit reads "300/3h", "50/7d" or "off".
func ParseLimit(s string) (Limit, error) {
	s = strings.TrimSpace(s)
	if s == "off" || s == "0" {
		return Limit{}, nil
	}
	n, per, ok := strings.Cut(s, "/")
	count, err := strconv.Atoi(n)
	if !ok || err != nil || count < 1 {
		return Limit{}, fmt.Errorf("%q: want COUNT/PERIOD like 300/3h or 50/7d, or off", s)
	}
	var d time.Duration
	if days, ok := strings.CutSuffix(per, "d"); ok {
		nd, err := strconv.Atoi(days)
		if err != nil || nd < 1 {
			return Limit{}, fmt.Errorf("%q: bad period %q", s, per)
		}
		d = time.Duration(nd) * 24 * time.Hour
	} else if d, err = time.ParseDuration(per); err != nil || d <= 0 {
		return Limit{}, fmt.Errorf("%q: bad period %q", s, per)
	}
	return Limit{N: count, Per: d}, nil
}

// Limits are the budgets.
type Limits struct {
	Orders      Limit // new orders per account
	Domain      Limit // new certificates per registered domain
	ExactSet    Limit // new certificates per exact set of names
	FailedAuthz Limit // failed authorizations per name per account
}

// LetsEncrypt are Let's Encrypt's published limits, the defaults.
var LetsEncrypt = Limits{
	Orders:      Limit{300, 3 * time.Hour},
	Domain:      Limit{50, 7 * 24 * time.Hour},
	ExactSet:    Limit{5, 7 * 24 * time.Hour},
	FailedAuthz: Limit{5, time.Hour},
}

// Order is what an order asks of the budget. Let's Encrypt exempts some
// orders from some limits, and so does the budget, rule by rule
// (README "Rate limits and renewals"):
//
//   - an order that carries ARI "replaces" is exempt from every limit,
//     once per replaced certificate;
//   - a renewal (the same exact set of names as the certificate it
//     replaces) is exempt from the per-registered-domain limit, but
//     still counts as a new order and against its exact set of names.
type Order struct {
	Names    []string
	Renewal  bool   // the same exact set of names as the live certificate
	Replaces string // the ARI CertID this order replaces, if any
}

type bucket struct {
	Tokens float64   `json:"tokens"`
	At     time.Time `json:"at"`
	// Drained is set once the bucket ran out; from then until it is
	// full again a new order waits for a token more (ordersInHand).
	Drained bool `json:"drained,omitempty"`
}

// level is the bucket's tokens at now: what it had, plus the refill since.
func (b bucket) level(l Limit, now time.Time) float64 {
	rate := float64(l.N) / float64(l.Per)
	return math.Min(float64(l.N), b.Tokens+float64(now.Sub(b.At))*rate)
}

// wait is how long until the bucket holds one token.
func (b bucket) wait(l Limit, now time.Time) time.Duration { return b.waitFor(1, l, now) }

// waitFor is how long until the bucket holds need tokens.
func (b bucket) waitFor(need float64, l Limit, now time.Time) time.Duration {
	lv := b.level(l, now)
	if lv >= need {
		return 0
	}
	return time.Duration(math.Ceil((need - lv) * float64(l.Per) / float64(l.N)))
}

// ordersInHand is how many new-order tokens Reserve keeps back once the
// bucket has run out. The CA counts an order when it arrives and lbcert
// when it sends it; two orders sent one token apart can arrive closer
// together (a nonce fetch, a slower TLS write), and at the edge of the
// budget the second finds the CA's bucket a hair short: the bench saw
// one such rateLimited answer in 170 paced orders. A token in hand
// absorbs up to a whole token's interval of such jitter. It costs one
// token's interval once, after the first burst (which stays the full
// N), and nothing of the steady pace. The certificate buckets need
// none: lbcert spends those when it orders, the CA only once it issues.
const ordersInHand = 1

type state struct {
	Orders  map[string]bucket    `json:"orders,omitempty"`
	Domains map[string]bucket    `json:"domains,omitempty"`
	Sets    map[string]bucket    `json:"exact_sets,omitempty"`
	ARIUsed map[string]time.Time `json:"ari_replaced,omitempty"` // CertID -> when its exemption was used
	Failed  map[string]bucket    `json:"failed_authz,omitempty"`
	Blocked map[string]time.Time `json:"blocked_until,omitempty"` // account, or "SCOPE OWNER WHAT" -> the CA's Retry-After
	Learned map[string]learned   `json:"ca_limits,omitempty"`     // "SERVER SCOPE" -> a limit the CA stated, and when
}

// Budget is the saved budget of one state directory.
type Budget struct {
	Limits Limits
	Now    func() time.Time

	path     string
	shared   Shared // fleet mode: the state lives there, not in path
	mu       sync.Mutex
	st       state
	dirty    bool        // spent tokens not yet on disk
	lastSave time.Time   // wall clock of the last write
	hadFile  bool        // the file existed at Open
	later    *time.Timer // writes what is dirty saveEvery after lastSave; nil once written or flushed
	// exempted are the "replaces" values whose order this process
	// reserved under the ARI exemption: a refund gives back what the
	// reservation took, the exemption (kept, the CA saw the order) or
	// the tokens of an order that carried "replaces" once the exemption
	// was already used.
	exempted map[string]bool
}

// saveEvery bounds how often Reserve rewrites the file. A batch of 5,000
// rows touches 5,000 domain buckets; writing the whole file after every
// order would make the run quadratic. What Reserve does not write, a
// timer writes saveEvery after the last write (or the start), so a
// crash loses at most this much of the record, which costs a few orders
// of burst, never a stuck run.
var saveEvery = time.Second

// FileName is the budget's file in the state directory.
const FileName = "ratelimit.json"

// Open reads dir's budget. A missing or unreadable file is a full budget:
// losing it costs at most one burst, never a stuck batch.
func Open(dir string, l Limits, now func() time.Time) (*Budget, error) {
	// The first write comes saveEvery after the start, like every
	// other, not at the first order: a batch's orders all reserve at
	// once, and would wait for it.
	b := &Budget{Limits: l, Now: now, path: filepath.Join(dir, FileName), lastSave: time.Now()}
	data, err := os.ReadFile(b.path)
	switch {
	case errors.Is(err, fs.ErrNotExist):
	case err != nil:
		return nil, err
	default:
		json.Unmarshal(data, &b.st)
		b.hadFile = true
	}
	if b.st.Orders == nil {
		b.st.Orders = map[string]bucket{}
	}
	if b.st.Domains == nil {
		b.st.Domains = map[string]bucket{}
	}
	if b.st.Failed == nil {
		b.st.Failed = map[string]bucket{}
	}
	if b.st.Blocked == nil {
		b.st.Blocked = map[string]time.Time{}
	}
	if b.st.Sets == nil {
		b.st.Sets = map[string]bucket{}
	}
	if b.st.ARIUsed == nil {
		b.st.ARIUsed = map[string]time.Time{}
	}
	return b, nil
}

// Key names one ACME account at one CA; the per-domain buckets are per
// CA and shared by its accounts, as the CA counts them.
type Key struct{ Server, Email string }

func (k Key) account() string { return k.Server + " " + k.Email }

// RegisteredDomain is the name a per-domain limit counts under: the
// public suffix plus one label (shop.example.co.uk -> example.co.uk).
func RegisteredDomain(name string) string {
	if d, err := publicsuffix.EffectiveTLDPlusOne(name); err == nil {
		return d
	}
	return name
}

// Denied says why an order may not start yet and when it may.
type Denied struct {
	Wait   time.Duration
	Reason string
	// Scope is the limit that denied it, when one did: a name's failed
	// validations (ScopeFailedAuthz) are the name's doing, and another
	// CA would not help.
	Scope Scope
	// Hint is what to do about it, when not the usual (wait, or loosen
	// a --rate-* flag): the fleet's ledger has a flag of its own.
	Hint string
}

func (d *Denied) Error() string {
	return fmt.Sprintf("%s; next possible in %s", d.Reason, d.Wait.Round(time.Second))
}

// Reserve takes the tokens order o needs from account k's buckets, if
// every one of them has a token. Otherwise it takes nothing and returns a
// *Denied with the longest wait. The CA's rateLimited answers (Limited)
// come first: its Retry-After for the account stops every order, exempt
// or not; one for a domain, a set of names or a name stops the orders in
// that scope, as the CA's own exemptions allow.
func (b *Budget) Reserve(k Key, o Order) error {
	return b.do(b.fieldsFor(k, o, ""), func() error { return b.reserve(k, o) })
}

func (b *Budget) reserve(k Key, o Order) error {
	account := k.account()
	now := b.Now()
	var worst *Denied
	deny := func(s Scope, wait time.Duration, reason string) {
		if wait > 0 && (worst == nil || wait > worst.Wait) {
			worst = &Denied{Wait: wait, Reason: reason, Scope: s}
		}
	}
	blocked := func(key string, what RateLimit) {
		if until, ok := b.st.Blocked[key]; ok {
			deny(what.Scope, until.Sub(now), fmt.Sprintf("the CA said rateLimited (%s) and asked to wait until %s", what, until.UTC().Format(time.RFC3339)))
		}
	}
	names := o.Names
	ari := o.Replaces != "" && b.st.ARIUsed[o.Replaces].IsZero()
	domains := registered(names)
	set := exactSet(names)
	blocked(account, RateLimit{Scope: ScopeAccount})
	for _, n := range names {
		blocked(blockKey(ScopeFailedAuthz, account, n), RateLimit{Scope: ScopeFailedAuthz, Name: n})
	}
	if !ari {
		blocked(blockKey(ScopeExactSet, k.Server, set), RateLimit{Scope: ScopeExactSet})
		if !o.Renewal {
			for _, d := range domains {
				blocked(blockKey(ScopeDomain, k.Server, d), RateLimit{Scope: ScopeDomain, Name: d})
			}
		}
	}
	if ari {
		if worst != nil {
			return worst
		}
		b.st.ARIUsed[o.Replaces] = now.UTC()
		if b.exempted == nil {
			b.exempted = map[string]bool{}
		}
		b.exempted[o.Replaces] = true
		b.dirty = true
		return b.maybeSave(now)
	}
	lo, ld, ls, lf := b.limit(k.Server, ScopeAccount), b.limit(k.Server, ScopeDomain), b.limit(k.Server, ScopeExactSet), b.limit(k.Server, ScopeFailedAuthz)
	if lo.N > 0 {
		ob := b.st.Orders[account].get(lo, now)
		need := 1.0
		if ob.Drained {
			need = min(1+ordersInHand, float64(lo.N))
		}
		deny(ScopeAccount, ob.waitFor(need, lo, now),
			fmt.Sprintf("the new-orders budget (%s per account) is spent", lo))
	}
	if ld.N > 0 && !o.Renewal {
		for _, d := range domains {
			deny(ScopeDomain, b.st.Domains[k.Server+" "+d].get(ld, now).wait(ld, now),
				fmt.Sprintf("the certificates budget for %s (%s) is spent", d, ld))
		}
	}
	setKey := k.Server + " " + set
	if ls.N > 0 {
		deny(ScopeExactSet, b.st.Sets[setKey].get(ls, now).wait(ls, now),
			fmt.Sprintf("%d certificates for exactly these names (%s) were issued within %s; the CA would lock them out", ls.N, set, shortDuration(ls.Per)))
	}
	if lf.N > 0 {
		for _, n := range names {
			deny(ScopeFailedAuthz, b.st.Failed[account+" "+n].get(lf, now).wait(lf, now),
				fmt.Sprintf("%s failed validation %d times within %s", n, lf.N, shortDuration(lf.Per)))
		}
	}
	if worst != nil {
		return worst
	}
	b.take(k, o, now)
	return b.maybeSave(now)
}

// take takes order o's tokens: a new order from the account, a
// certificate from each registered domain (unless a renewal) and one
// from the exact set of names.
func (b *Budget) take(k Key, o Order, now time.Time) {
	lo, ld, ls := b.limit(k.Server, ScopeAccount), b.limit(k.Server, ScopeDomain), b.limit(k.Server, ScopeExactSet)
	if lo.N > 0 {
		b.st.Orders[k.account()] = b.st.Orders[k.account()].take(lo, now)
	}
	if ld.N > 0 && !o.Renewal {
		for _, d := range registered(o.Names) {
			b.st.Domains[k.Server+" "+d] = b.st.Domains[k.Server+" "+d].take(ld, now)
		}
	}
	if setKey := k.Server + " " + exactSet(o.Names); ls.N > 0 {
		b.st.Sets[setKey] = b.st.Sets[setKey].take(ls, now)
	}
	b.dirty = true
}

func (b *Budget) maybeSave(now time.Time) error {
	if b.shared != nil {
		return b.save(now)
	}
	if wait := saveEvery - time.Since(b.lastSave); wait > 0 {
		if b.later == nil {
			b.later = time.AfterFunc(wait, b.saveLater)
		}
		return nil
	}
	return b.save(now)
}

// saveLater is the timer's write. Flush stops it before the command
// lets go of the state directory's lock, which guards the file.
func (b *Budget) saveLater() {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.later == nil {
		return // flushed meanwhile
	}
	b.later = nil
	if !b.dirty {
		return
	}
	if err := b.save(b.Now()); err != nil {
		slog.Warn("could not save the rate budget; the next write tries again", "err", err)
	}
}

// exactSet names a set of names independently of their order.
func exactSet(names []string) string {
	s := slices.Clone(names)
	slices.Sort(s)
	return strings.Join(slices.Compact(s), ",")
}

// OrdersLeft is how many new orders each account with a recent order
// may place now, for the metrics file. An account not listed has its
// whole budget.
func (b *Budget) OrdersLeft() map[string]float64 {
	b.mu.Lock()
	defer b.mu.Unlock()
	out := map[string]float64{}
	if b.Limits.Orders.N == 0 {
		return out
	}
	now := b.Now()
	for acct, bk := range b.st.Orders {
		server, _, _ := strings.Cut(acct, " ")
		out[acct] = math.Floor(bk.level(b.limit(server, ScopeAccount), now))
	}
	return out
}

// Flush writes what Reserve has not written yet. Commands call it before
// they exit.
func (b *Budget) Flush() error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.later != nil {
		b.later.Stop()
		b.later = nil
	}
	if !b.dirty {
		return nil
	}
	return b.save(b.Now())
}

// get returns the bucket, a missing one being full.
func (b bucket) get(l Limit, now time.Time) bucket {
	if b.At.IsZero() {
		return bucket{Tokens: float64(l.N), At: now}
	}
	return b
}

func (b bucket) take(l Limit, now time.Time) bucket {
	b = b.get(l, now)
	lv := b.level(l, now)
	drained := b.Drained && lv < float64(l.N) // full again: a fresh burst
	return bucket{Tokens: lv - 1, At: now, Drained: drained || lv-1 < 1}
}

func registered(names []string) []string {
	seen := map[string]bool{}
	var out []string
	for _, n := range names {
		d := RegisteredDomain(n)
		if !seen[d] {
			seen[d] = true
			out = append(out, d)
		}
	}
	return out
}

// FailedAuthz spends one failed-authorization token for each name.
func (b *Budget) FailedAuthz(k Key, names []string) error {
	return b.do(b.fieldsFor(k, Order{Names: names}, ""), func() error { return b.failedAuthz(k, names) })
}

func (b *Budget) failedAuthz(k Key, names []string) error {
	account := k.account()
	l := b.limit(k.Server, ScopeFailedAuthz)
	if l.N == 0 {
		return nil
	}
	now := b.Now()
	for _, n := range names {
		k := account + " " + n
		b.st.Failed[k] = b.st.Failed[k].take(l, now)
	}
	return b.save(now)
}

// save writes the budget, dropping buckets that have refilled: a full
// bucket is the same as none, and this keeps the file the size of the
// recent activity, not of every domain ever seen.
func (b *Budget) save(now time.Time) error {
	b.prune(now)
	if b.shared != nil {
		return nil // Budget.do writes the fields back
	}
	if !b.hadFile && b.st.empty() {
		// Nothing spent (an order reserved and given back, as when the
		// CA could not be reached): no file, and no state directory
		// kept for it, even if the timer wrote the reservation first.
		if err := os.Remove(b.path); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return fmt.Errorf("save rate budget: %w", err)
		}
		b.dirty, b.lastSave = false, time.Now()
		return nil
	}
	data, err := json.MarshalIndent(b.st, "", "  ")
	if err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Dir(b.path), 0o700); err != nil {
		return err
	}
	if err := store.WriteFile(b.path, append(data, '\n'), 0o600); err != nil {
		return fmt.Errorf("save rate budget: %w", err)
	}
	b.dirty, b.lastSave = false, time.Now()
	return nil
}

// empty reports whether the state records nothing.
func (s *state) empty() bool {
	return len(s.Orders)+len(s.Domains)+len(s.Sets)+len(s.ARIUsed)+len(s.Failed)+len(s.Blocked)+len(s.Learned) == 0
}

// prune drops buckets that have refilled and blocks that have passed.
func (b *Budget) prune(now time.Time) {
	// Every bucket key starts with the CA's URL, which holds no space:
	// that CA's limit (its own, where it stated a stricter one) decides.
	prune := func(m map[string]bucket, s Scope) {
		for k, v := range m {
			server, _, _ := strings.Cut(k, " ")
			if l := b.limit(server, s); l.N == 0 || v.level(l, now) >= float64(l.N) {
				delete(m, k)
			}
		}
	}
	prune(b.st.Orders, ScopeAccount)
	prune(b.st.Domains, ScopeDomain)
	prune(b.st.Failed, ScopeFailedAuthz)
	prune(b.st.Sets, ScopeExactSet)
	for k, t := range b.st.ARIUsed {
		if now.Sub(t) > 90*24*time.Hour { // long after the certificate it replaced expired
			delete(b.st.ARIUsed, k)
		}
	}
	for k, t := range b.st.Blocked {
		if !now.Before(t) {
			delete(b.st.Blocked, k)
		}
	}
}

// letsEncryptProfileNames is the most names one certificate may carry
// under each of Let's Encrypt's profiles (its profiles page): the
// classic one allows 100, the 45-day and 6-day ones 25.
var letsEncryptProfileNames = map[string]int{"classic": 100, "tlsserver": 25, "shortlived": 25}

// letsEncryptServers are the directories the table applies to.
var letsEncryptServers = []string{"https://acme-v02.api.letsencrypt.org/directory", "https://acme-staging-v02.api.letsencrypt.org/directory"}

// CheckProfileNames refuses, before any request, a certificate with more
// names than the profile allows at Let's Encrypt. Other CAs' limits are
// not known here; they answer for themselves.
func CheckProfileNames(server, profile string, n int) error {
	if !slices.Contains(letsEncryptServers, strings.TrimRight(server, "/")) {
		return nil
	}
	if profile == "" {
		profile = "classic"
	}
	if limit, ok := letsEncryptProfileNames[profile]; ok && n > limit {
		return fmt.Errorf("%d names in one certificate: Let's Encrypt's %s profile allows at most %d", n, profile, limit)
	}
	return nil
}
