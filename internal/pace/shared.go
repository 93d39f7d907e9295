package pace

import (
	"encoding/json"
	"strings"
	"time"
)

// Shared holds a budget's state where several hosts see it: a fleet's
// Redis. The budget is then one budget for the whole fleet, as the CA's
// limits are one per account and domain, whichever node orders.
type Shared interface {
	// Update reads fields, lets fn change them, and writes back what fn
	// returns (a nil value deletes the field), atomically: when another
	// writer changed any of the fields meanwhile, Update runs fn again on
	// the new values. fn's error is returned after its writes are made.
	Update(fields []string, fn func(vals map[string][]byte) (map[string][]byte, error)) error
}

// OpenShared is the budget kept in sh. Nothing is cached between
// operations: each reads the fields it needs, so two nodes never
// spend the same token.
func OpenShared(sh Shared, l Limits, now func() time.Time) *Budget {
	b := &Budget{Limits: l, Now: now, shared: sh}
	b.st = emptyState()
	return b
}

func emptyState() state {
	return state{Orders: map[string]bucket{}, Domains: map[string]bucket{}, Sets: map[string]bucket{},
		ARIUsed: map[string]time.Time{}, Failed: map[string]bucket{}, Blocked: map[string]time.Time{}, Learned: map[string]learned{}}
}

// do runs op under the budget's lock; with a shared state, inside one
// atomic update of exactly the fields op may touch.
func (b *Budget) do(fields []string, op func() error) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.shared == nil {
		return op()
	}
	return b.shared.Update(fields, func(vals map[string][]byte) (map[string][]byte, error) {
		b.st = emptyState()
		for f, v := range vals {
			decodeField(&b.st, f, v)
		}
		err := op()
		b.prune(b.Now())
		out := make(map[string][]byte, len(fields))
		for _, f := range fields {
			out[f] = encodeField(&b.st, f)
		}
		return out, err
	})
}

// fieldsFor names every field an operation on order o of account k may
// read or write; name is the registered domain or name a rateLimited
// answer was about, if any.
func (b *Budget) fieldsFor(k Key, o Order, name string) []string {
	account := k.account()
	set := exactSet(o.Names)
	f := []string{"orders|" + account, "sets|" + k.Server + " " + set, "blocked|" + account,
		"blocked|" + blockKey(ScopeExactSet, k.Server, set)}
	for _, s := range []Scope{ScopeAccount, ScopeDomain, ScopeExactSet, ScopeFailedAuthz} {
		f = append(f, "learned|"+k.Server+" "+string(s))
	}
	if o.Replaces != "" {
		f = append(f, "ari|"+o.Replaces)
	}
	domains := registered(o.Names)
	if name != "" {
		domains = append(domains, name)
	}
	for _, d := range domains {
		f = append(f, "domains|"+k.Server+" "+d, "blocked|"+blockKey(ScopeDomain, k.Server, d))
	}
	names := o.Names
	if name != "" {
		names = append(names[:len(names):len(names)], name)
	}
	for _, n := range names {
		f = append(f, "failed|"+account+" "+n, "blocked|"+blockKey(ScopeFailedAuthz, account, n))
	}
	return f
}

func decodeField(st *state, field string, v []byte) {
	m, key, ok := strings.Cut(field, "|")
	if !ok {
		return
	}
	switch m {
	case "orders", "domains", "sets", "failed":
		var bk bucket
		if json.Unmarshal(v, &bk) == nil {
			bucketsOf(st, m)[key] = bk
		}
	case "ari", "blocked":
		var t time.Time
		if json.Unmarshal(v, &t) == nil {
			timesOf(st, m)[key] = t
		}
	case "learned":
		var l learned
		if json.Unmarshal(v, &l) == nil {
			st.Learned[key] = l
		}
	}
}

// encodeField is field's value in st, or nil when st has none.
func encodeField(st *state, field string) []byte {
	m, key, _ := strings.Cut(field, "|")
	var v any
	var ok bool
	switch m {
	case "orders", "domains", "sets", "failed":
		v, ok = bucketsOf(st, m)[key]
	case "ari", "blocked":
		v, ok = timesOf(st, m)[key]
	case "learned":
		v, ok = st.Learned[key]
	}
	if !ok {
		return nil
	}
	data, _ := json.Marshal(v)
	return data
}

func bucketsOf(st *state, m string) map[string]bucket {
	switch m {
	case "orders":
		return st.Orders
	case "domains":
		return st.Domains
	case "sets":
		return st.Sets
	}
	return st.Failed
}

func timesOf(st *state, m string) map[string]time.Time {
	if m == "ari" {
		return st.ARIUsed
	}
	return st.Blocked
}

// Lister is a Shared that can list its fields.
type Lister interface {
	Shared
	Fields() ([]string, error)
}

// Sweep removes the fields of a shared budget that hold nothing any
// more (a bucket refilled, a block or an ARI record past its time): the
// budget keeps a field per account, domain, name and set it has seen,
// and a fleet of 100,000 lineages would otherwise keep them all
// forever. A field that an order touches is pruned there too; this is
// for the ones no order touches again. It returns how many went.
func Sweep(sh Lister, l Limits, now func() time.Time) (int, error) {
	fields, err := sh.Fields()
	if err != nil {
		return 0, err
	}
	b := OpenShared(sh, l, now)
	gone := 0
	for start := 0; start < len(fields); start += 200 {
		chunk := fields[start:min(start+200, len(fields))]
		err := b.do(chunk, func() error { return nil })
		if err != nil {
			return gone, err
		}
		for _, f := range chunk {
			if encodeField(&b.st, f) == nil {
				gone++
			}
		}
	}
	return gone, nil
}
