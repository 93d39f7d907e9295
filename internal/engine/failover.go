package engine

import (
	"log/slog"
	"maps"
	"slices"
	"strings"
	"time"

	"github.com/lbcert/lbcert/internal/ca"
	"github.com/lbcert/lbcert/internal/catalog"
	"github.com/lbcert/lbcert/internal/issuer"
	"github.com/lbcert/lbcert/internal/store"
)

// orderFrom orders s from the lineage's CAs in turn (issue #27): its
// primary, then each fallback, moving on only when a CA failed itself
// (it did not answer, a 5xx, its directory) or asked for a wait past
// MaxWait, never for a fault of the names, which would fail at any CA
// and spend its limits too. A CA whose breaker is open is passed over
// unless it is the last one left. With one CA it is the one order it
// always was.
func (r *run) orderFrom(s *step, lease catalog.Lease, reuse []byte, keyType string) {
	e := r.e
	cands := e.CAs.For(&s.job.Lineage)
	var passed []string
	for i, c := range cands {
		last := i == len(cands)-1
		if r.caDown(c.Server) {
			if last {
				r.defer_(s, "CA unreachable: "+c.Server+" did not answer the orders before this one; not ordering until the next run", time.Time{}, nil)
				return
			}
			passed = append(passed, c.Name+" did not answer the orders before this one")
			continue
		}
		if !last {
			if ok, why := e.CAs.Breakers().Allow(c.Server); !ok {
				passed = append(passed, c.Name+" "+why)
				continue
			}
		}
		o := r.orderAt(s, c, reuse, keyType)
		a := r.obtain(s, o, !last)
		r.verdict(c.Server, a)
		if a.got != nil {
			r.obtained(s, r.issuedBy(s, o, c, passed), a.got, lease)
			return
		}
		if a.next == "" {
			if len(passed) > 0 && s.item.Error != "" {
				// Settled at a later CA: the CAs before it failed too.
				s.item.Error += " (at " + c.Name + ", after " + strings.Join(passed, "; ") + ")"
			}
			if !c.Primary && (strings.Contains(s.item.Hint, "--ca-bundle") || strings.Contains(s.item.Hint, "--server")) {
				// The primary's flags do not set a fallback's directory.
				s.item.Hint = "check --fallback-ca " + c.Name + ": its directory URL, and ca-bundle= with the root of its HTTPS certificate for a private CA"
			}
			return // settled: failed, deferred or interrupted here
		}
		passed = append(passed, c.Name+" "+a.next)
		slog.Warn("the CA could not take the order; trying the next", "name", s.job.Lineage.Name, "ca", c.Name, "why", a.next)
	}
}

// verdict tells the CA's breaker what became of an order.
func (r *run) verdict(server string, a attempt) {
	b := r.e.CAs.Breakers()
	switch {
	case a.broken:
		b.Fault(server, a.why)
	case a.answered:
		b.Success(server)
	default:
		b.Untried(server)
	}
}

// orderAt is s's order at candidate c: the lineage's names, key and
// challenge, with c's account, chain and profile.
func (r *run) orderAt(s *step, c ca.Candidate, reuse []byte, keyType string) issuer.Order {
	l := s.job.Lineage
	l.Server, l.Email, l.Profile, l.PreferredChain, l.KeyType = c.Server, c.Email, c.Profile, c.PreferredChain, keyType
	o := issuer.Order{Lineage: l, ReuseKey: reuse, ProfileOptional: c.ProfileOptional}
	// "replaces" names a certificate of the CA that issued it, and only
	// that CA is told (RFC 9773 section 5): another would refuse it, or
	// count the order as an exempt renewal of a certificate it never saw.
	if s.replace && s.prev != nil && c.Server == s.prev.Server {
		o.Replaces = s.prev.Cert.ARICertID
	}
	return o
}

// issuedBy is the lineage to publish for a certificate from candidate c:
// the lineage's own settings (its primary's profile and chain), with the
// CA and account that issued it, and, from a fallback, where its
// renewals go first and why this one was used.
func (r *run) issuedBy(s *step, o issuer.Order, c ca.Candidate, passed []string) store.Lineage {
	l := s.job.Lineage
	l.KeyType = o.Lineage.KeyType
	l.Server, l.Email = c.Server, c.Email
	l.Fallback = store.Fallback{}
	if !c.Primary {
		home, email := s.job.Lineage.Home()
		l.Fallback = store.Fallback{Primary: home, Email: email, CA: c.Name, Reason: strings.Join(passed, "; ")}
	}
	if r.e.CAs.Len() > 1 {
		s.item.CA, s.item.Server, s.item.Fallback = c.Name, c.Server, l.Fallback.Reason
	}
	return l
}

// caStatus is the run's report of its CAs, when there are several.
func (r *run) caStatus(items []*Item) []CAStatus {
	set := r.e.CAs
	if set.Len() < 2 {
		return nil
	}
	var out []CAStatus
	at := map[string]int{}
	add := func(server string) int {
		if i, ok := at[server]; ok {
			return i
		}
		at[server] = len(out)
		out = append(out, CAStatus{Name: set.Label(server), Server: server})
		return len(out) - 1
	}
	for _, it := range items {
		if it.Server != "" && (it.Outcome == Issued || it.Outcome == Renewed) {
			out[add(it.Server)].Issued++
		}
	}
	for _, c := range set.Fallbacks {
		add(c.Server)
	}
	open := set.Breakers().Open()
	servers := slices.Sorted(maps.Keys(open))
	for _, server := range servers {
		i := add(server)
		out[i].PassedOverUntil, out[i].Reason = timePtr(open[server].OpenUntil), open[server].Reason
	}
	return out
}
