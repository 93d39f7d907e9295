package renewal

import (
	"time"

	"github.com/lbcert/lbcert/internal/store"
)

// ARIRecheck is how long a lineage trusts that its CA offers no ARI
// before it reads the CA's directory again (a CA may add it).
const ARIRecheck = 7 * 24 * time.Hour

// NoARI records in st that the CA's directory has no renewalInfo.
func NoARI(st store.Status, now time.Time) store.Status {
	st.ARIUnsupported = now.Add(ARIRecheck).UTC()
	return st
}

// Rule says in words which rule decided d, for list and renew -v. For
// the lifetime rule it says why ARI did not decide: the CA has none (as
// step-ca; issue #26 item 11) or lbcert has not asked it yet.
func Rule(d Decision, cert store.CertInfo, st store.Status, now time.Time) string {
	if d.Reason != Lifetime {
		return string(d.Reason)
	}
	switch {
	case now.Before(st.ARIUnsupported):
		return "lifetime (the CA has no ARI)"
	case cert.ARICertID != "" && st.ARISerial != cert.Serial:
		return "lifetime (ARI not asked yet)"
	}
	return string(Lifetime)
}
