package main

import (
	"fmt"
	"maps"
	"slices"

	"github.com/lbcert/lbcert/internal/ca"
	"github.com/lbcert/lbcert/internal/engine"
	"github.com/lbcert/lbcert/internal/store"
)

// caEntry is what list and show say of the CA that issued a lineage's
// certificate, beside its "server": the CA's name when fallbacks are
// configured, and the fallback that was used and why.
type caEntry struct {
	CA       string         `json:"ca,omitempty"`
	Fallback *fallbackEntry `json:"fallback,omitempty"`
}

// fallbackEntry is a certificate from a fallback CA.
type fallbackEntry struct {
	Primary string `json:"primary"` // where renewals go first
	Reason  string `json:"reason"`  // why the CAs before it were passed over
}

func (a *app) caEntryOf(l *store.Lineage) caEntry {
	var e caEntry
	if l.Fallback.Primary != "" {
		e.CA = l.Fallback.CA
		e.Fallback = &fallbackEntry{Primary: l.Fallback.Primary, Reason: l.Fallback.Reason}
	} else if len(a.caOpts.list) > 0 {
		set, _ := ca.NewSet("", a.caOpts.list, nil)
		e.CA = set.Label(l.Server)
	}
	return e
}

// words is the end of list's STATUS for a fallback's certificate.
func (e caEntry) words() string {
	if e.Fallback == nil {
		return ""
	}
	return fmt.Sprintf("; from fallback %s: %s", e.CA, e.Fallback.Reason)
}

// issuer is show's "issued by" row.
func (e caEntry) issuer() string {
	if e.CA == "" {
		return ""
	}
	if e.Fallback != nil {
		return e.CA + " (a fallback)"
	}
	return e.CA
}

// printIssuer says which CA issued issue's certificate, when several
// are configured.
func (a *app) printIssuer(it *engine.Item) {
	if it.CA == "" {
		return
	}
	if it.Fallback != "" {
		a.printf("  issuer    %s (fallback: %s)\n", it.CA, it.Fallback)
		return
	}
	a.printf("  issuer    %s\n", it.CA)
}

// fromFallback is the words for a certificate a fallback issued.
func fromFallback(it *engine.Item) string {
	if it.Fallback == "" {
		return ""
	}
	return fmt.Sprintf(", from fallback %s (%s)", it.CA, it.Fallback)
}

// sayFallbacks warns, once per run, which certificates came from a
// fallback CA and which CAs are passed over now: a primary that is down
// must not go unnoticed because everything still renews.
func (a *app) sayFallbacks(res *engine.Result) {
	byCA := map[string][]*engine.Item{}
	for _, it := range res.Items {
		if it.Fallback != "" && (it.Outcome == engine.Issued || it.Outcome == engine.Renewed) {
			byCA[it.CA] = append(byCA[it.CA], it)
		}
	}
	for _, name := range slices.Sorted(maps.Keys(byCA)) {
		items := byCA[name]
		fmt.Fprintf(a.err, "lbcert: warning: %d certificate(s) came from fallback %s: %s\n", len(items), name, items[0].Fallback)
	}
	for _, c := range res.CAs {
		if c.PassedOverUntil != nil {
			fmt.Fprintf(a.err, "lbcert: warning: the CA %s (%s) is passed over until %s: %s\n", c.Name, c.Server, c.PassedOverUntil.Format("2006-01-02T15:04:05Z07:00"), c.Reason)
		}
	}
}
