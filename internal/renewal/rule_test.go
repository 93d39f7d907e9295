package renewal

import (
	"testing"
	"time"

	"github.com/lbcert/lbcert/internal/store"
)

// The rule in words: a CA known to have no ARI is said as such until the
// recheck, never "not asked yet"; other rules are their reason.
func TestRule(t *testing.T) {
	now := time.Date(2026, 12, 3, 12, 0, 0, 0, time.UTC)
	cert := store.CertInfo{Serial: "ab", ARICertID: "x.y", NotBefore: now.Add(-time.Hour), NotAfter: now.Add(23 * time.Hour)}
	noARI := NoARI(store.Status{}, now)
	if !noARI.ARIUnsupported.Equal(now.Add(ARIRecheck)) {
		t.Fatalf("NoARI: %v", noARI.ARIUnsupported)
	}
	for _, tc := range []struct {
		name string
		d    Decision
		cert store.CertInfo
		st   store.Status
		at   time.Time
		want string
	}{
		{"no ARI at the CA", Decision{Reason: Lifetime}, cert, noARI, now, "lifetime (the CA has no ARI)"},
		{"no ARI, a day later", Decision{Reason: Lifetime}, cert, noARI, now.Add(24 * time.Hour), "lifetime (the CA has no ARI)"},
		{"no ARI, recheck due", Decision{Reason: Lifetime}, cert, noARI, now.Add(ARIRecheck), "lifetime (ARI not asked yet)"},
		{"never asked", Decision{Reason: Lifetime}, cert, store.Status{}, now, "lifetime (ARI not asked yet)"},
		{"asked about another certificate", Decision{Reason: Lifetime}, cert, store.Status{ARISerial: "cd"}, now, "lifetime (ARI not asked yet)"},
		{"no ARI identifier", Decision{Reason: Lifetime}, store.CertInfo{Serial: "ab"}, store.Status{}, now, "lifetime"},
		{"asked", Decision{Reason: Lifetime}, cert, store.Status{ARISerial: "ab"}, now, "lifetime"},
		{"ARI", Decision{Reason: ARI}, cert, store.Status{ARISerial: "ab"}, now, "ari"},
		{"days", Decision{Reason: Days}, cert, noARI, now, "days"},
	} {
		if got := Rule(tc.d, tc.cert, tc.st, tc.at); got != tc.want {
			t.Errorf("%s: %q, want %q", tc.name, got, tc.want)
		}
	}
}

// With no ARI recorded, Decide takes the lifetime rule and asks nothing
// (the engine and list pass ARIOffered from the same record).
func TestDecideWithoutARI(t *testing.T) {
	now := time.Date(2026, 12, 3, 12, 0, 0, 0, time.UTC)
	cert := store.CertInfo{Serial: "ab", ARICertID: "x.y", NotBefore: now.Add(-time.Hour), NotAfter: now.Add(23 * time.Hour)}
	st := NoARI(store.Status{}, now)
	d := Decide(cert, st, now, Options{ARIOffered: !now.Before(st.ARIUnsupported), Name: "a.example"})
	if d.Due || d.CheckARI || d.Reason != Lifetime {
		t.Fatalf("%+v", d)
	}
	// A 24-hour certificate (step-ca's default) is short-lived: due
	// between two thirds and one half of its life left.
	if left := cert.NotAfter.Sub(d.At); left < 12*time.Hour || left > 16*time.Hour {
		t.Fatalf("due with %v left, want 12h-16h", left)
	}
}
