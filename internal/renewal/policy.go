// Package renewal is lbcert's renewal policy: given what is stored about a
// certificate and the time now, is it due, and why. It is pure: no clock,
// no disk, no network, so every rule is a table test.
//
// The rules, in order (issue #4):
//   - expired, or less than 1/20 of the lifetime left: due, whatever else
//     says (a safety net under ARI and --days);
//   - --days N: due when fewer than N days remain; overrides the rest;
//   - ARI (RFC 9773), when the CA offers it: due once the random moment
//     picked inside the CA's suggested window is reached;
//   - otherwise the lifetime rule: due at a moment of the lineage's own,
//     between one half and one third of the lifetime left (for lifetimes
//     of 10 days or less, between two thirds and one half), picked from a
//     hash of its name. Certificates bulk-issued on one day then come due
//     over many days instead of on one, and since each lineage keeps its
//     moment, the spread survives every later cycle (seed 003).
package renewal

import (
	"fmt"
	"hash/fnv"
	"math/rand/v2"
	"time"

	"github.com/lbcert/lbcert/internal/store"
)

// Reason says which rule decided.
type Reason string

const (
	NotDue   Reason = "not due"
	Expired  Reason = "expired"
	Critical Reason = "critical" // under 1/20 of the lifetime left
	Days     Reason = "days"     // --days
	ARI      Reason = "ari"      // the CA's renewal window
	// ARIPast is the CA's renewal window moved into the past: the CA
	// asks for renewal now (a mass revocation), whatever the lifetime
	// says.
	ARIPast  Reason = "ari_window_past"
	Lifetime Reason = "lifetime" // one third (or half) of the lifetime left
	Forced   Reason = "forced"   // --force
)

// shortLived is the lifetime at or below which the half-life rule applies,
// because a third of a 6-day certificate leaves too little slack for one
// failed cron run.
const shortLived = 10 * 24 * time.Hour

// Decision is the verdict for one certificate.
type Decision struct {
	Due    bool
	Reason Reason    // why it is due, or which rule set At
	At     time.Time // when it is (or became) due under the deciding rule
	// CheckARI is set when the CA offers ARI and the saved answer is
	// missing, for another certificate, or past its Retry-After.
	CheckARI bool
}

// Options are the run's switches.
type Options struct {
	Days int // --days; 0 means unset
	// ARIOffered says the lineage's CA offers ARI and the certificate has
	// an ARI CertID; without it ARI state is ignored.
	ARIOffered bool
	// Name is the lineage's name, which picks its moment under the
	// lifetime rule (Spread).
	Name string
}

// Decide applies the rules to cert at now.
func Decide(cert store.CertInfo, st store.Status, now time.Time, o Options) Decision {
	life := cert.NotAfter.Sub(cert.NotBefore)
	if !now.Before(cert.NotAfter) {
		return Decision{Due: true, Reason: Expired, At: cert.NotAfter}
	}
	critical := cert.NotAfter.Add(-life / 20)
	if !now.Before(critical) {
		return Decision{Due: true, Reason: Critical, At: critical}
	}
	if o.Days > 0 {
		at := cert.NotAfter.Add(-time.Duration(o.Days) * 24 * time.Hour)
		return Decision{Due: !now.Before(at), Reason: Days, At: at}
	}
	if o.ARIOffered && cert.ARICertID != "" {
		fresh := st.ARISerial == cert.Serial && !st.ARIRenewAt.IsZero()
		checkARI := !fresh || !now.Before(st.ARINextCheck)
		if fresh {
			reason := ARI
			if !st.ARIWindowEnd.IsZero() && !now.Before(st.ARIWindowEnd) {
				reason = ARIPast
			}
			return Decision{Due: !now.Before(st.ARIRenewAt), Reason: reason, At: st.ARIRenewAt, CheckARI: checkARI}
		}
		d := lifetime(cert, now, o.Name)
		d.CheckARI = true
		return d
	}
	return lifetime(cert, now, o.Name)
}

func lifetime(cert store.CertInfo, now time.Time, name string) Decision {
	at := Moment(cert, name)
	return Decision{Due: !now.Before(at), Reason: Lifetime, At: at}
}

// Moment is when the lifetime rule renews lineage name: inside the part
// of the lifetime from one half down to one third left (two thirds to one
// half for short-lived certificates), at the lineage's own phase.
//
// The phase is a point in a cycle as long as that window (15 days for a
// 90-day certificate), picked from a hash of the name and counted from
// the Unix epoch, not from the certificate: the moment is the latest
// instant in the window at that phase. So a thousand certificates
// bulk-issued on one day come due spread evenly over the window, and when
// each is renewed (a little after its moment, at the next run) the next
// moment falls at the same phase again, exactly a whole number of cycles
// later. The spread holds cycle after cycle; an offset from each
// certificate's own start would not, since renewing at the next daily
// run rounds every lineage's period to whole days and regroups them.
// No lineage renews later than the old rule (a third left) and the 1/20
// safety net stays far away.
func Moment(c store.CertInfo, name string) time.Time {
	life := c.NotAfter.Sub(c.NotBefore)
	lo, hi := life/3, life/2
	if life <= shortLived {
		lo, hi = life/2, life*2/3
	}
	end := c.NotAfter.Add(-lo)
	cycle := hi - lo
	if cycle <= 0 {
		return end
	}
	phase := time.Duration(Spread(name) * float64(cycle))
	since := (end.Sub(time.Unix(0, 0)) - phase) % cycle
	if since < 0 {
		since += cycle
	}
	return end.Add(-since).Truncate(time.Second) // whole seconds read better in list
}

// Spread maps a lineage name to [0, 1), evenly and the same on every
// host and run: FNV-1a, whose low bits are well mixed for short keys.
func Spread(name string) float64 {
	h := fnv.New64a()
	h.Write([]byte(name))
	return float64(h.Sum64()>>11) / (1 << 53)
}

// ApplyARI records a fresh ARI answer in st. The moment to renew is
// picked uniformly inside the window once (RFC 9773 section 4.2) and kept
// while the CA keeps the same window, so that a daily poll does not
// re-roll the dice until the earliest moment comes up; a new window (the
// CA moved it, say after a revocation) gets a new pick. rnd returns a
// value in [0, n); tests pass a fixed one.
func ApplyARI(st store.Status, serial string, start, end time.Time, retryAfter time.Duration, now time.Time, rnd func(n int64) int64) store.Status {
	sameWindow := st.ARISerial == serial && st.ARIWindowStart.Equal(start) && st.ARIWindowEnd.Equal(end) && !st.ARIRenewAt.IsZero()
	st.ARISerial = serial
	st.ARIWindowStart, st.ARIWindowEnd = start, end
	if !sameWindow {
		at := start
		if w := end.Sub(start); w > 0 {
			at = start.Add(time.Duration(rnd(int64(w))))
		}
		st.ARIRenewAt = at.UTC()
	}
	// RFC 9773 section 4.3: honour Retry-After, but poll at least daily-ish
	// and not more than every minute whatever the CA says.
	switch {
	case retryAfter <= 0:
		retryAfter = 6 * time.Hour
	case retryAfter < time.Minute:
		retryAfter = time.Minute
	case retryAfter > 24*time.Hour:
		retryAfter = 24 * time.Hour
	}
	st.ARINextCheck = now.Add(retryAfter).UTC()
	st.ARIUnsupported = time.Time{}
	return st
}

// RandInt64N is the production source for ApplyARI.
func RandInt64N(n int64) int64 { return rand.Int64N(n) }

// MaxBackoff is the longest wait after failures. It ends a little before
// the next daily run: the engine counts the backoff from the start of the
// failed run and checks it when the next run's work starts (after its
// random delay), so a daily cron retries a failing lineage every day,
// not every other day as a cap of exactly 24 hours would.
const MaxBackoff = 24*time.Hour - 10*time.Minute

// Backoff after consecutive failures: 1h, 2h, 4h, ... capped at
// MaxBackoff, so a broken domain cannot burn the CA's failed-validation
// limit from cron.
func Backoff(failures int) time.Duration {
	if failures <= 0 {
		return 0
	}
	d := time.Hour
	for i := 1; i < failures && d < MaxBackoff; i++ {
		d *= 2
	}
	return min(d, MaxBackoff)
}

// Failed records a failed attempt at now.
func Failed(st store.Status, err string, now time.Time) store.Status {
	st.Failures++
	st.LastError = err
	st.LastAttempt = now.UTC()
	st.NextAttempt = now.Add(Backoff(st.Failures)).UTC()
	return st
}

// InBackoff reports whether a failed lineage must wait at now.
func InBackoff(st store.Status, now time.Time) bool {
	return st.Failures > 0 && now.Before(st.NextAttempt)
}

// Words says which rule made a certificate due, for a person.
func (r Reason) Words() string {
	switch r {
	case ARI:
		return "the CA's renewal window (ARI)"
	case ARIPast:
		return "the CA's renewal window had passed"
	case Lifetime:
		return "the lifetime rule"
	case Days:
		return "fewer days left than --days"
	case Critical:
		return "under a twentieth of its lifetime left"
	case Forced:
		return "--force"
	}
	return string(r) // expired, new, names changed, ...
}

// TimeLeft is a certificate's remaining life in words: days, or hours
// and minutes for the short ones (step-ca's 24-hour default read "0
// days" when just issued).
func TimeLeft(d time.Duration) string {
	switch {
	case d >= 48*time.Hour:
		return fmt.Sprintf("%d days", int(d.Hours()/24))
	case d >= 2*time.Hour:
		return fmt.Sprintf("%d hours", int(d.Hours()))
	case d >= 2*time.Minute:
		return fmt.Sprintf("%d minutes", int(d.Minutes()))
	case d > 0:
		return "under 2 minutes"
	}
	return "expired"
}

// CheckDays checks --days, the one override of the due rule that issue,
// batch and renew share.
func CheckDays(days int) error {
	if days < 0 {
		return fmt.Errorf("--days %d: must be positive", days)
	}
	return nil
}
