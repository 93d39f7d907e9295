// Package renewal is lbcert's renewal policy: given what is stored about a
// certificate and the time now, is it due, and why. It is pure: no clock,
// no disk, no network, so every rule is a table test.
package renewal

import (
	"time"

	"github.com/lbcert/lbcert/internal/store"
)

// Reason says which rule made a certificate due, or not due.
type Reason string

const (
	NotDue   Reason = "not due"
	Expired  Reason = "expired"
	Lifetime Reason = "lifetime" // one third left (half for lifetimes of 10 days or less)
)

// shortLived is the lifetime at or below which the half-life rule applies,
// because a third of a 6-day certificate leaves too little slack for one
// failed cron run.
const shortLived = 10 * 24 * time.Hour

// LifetimeDue reports whether c is due by the lifetime rule at now, and
// when it becomes due.
func LifetimeDue(c store.CertInfo, now time.Time) (bool, Reason, time.Time) {
	if !now.Before(c.NotAfter) {
		return true, Expired, c.NotAfter
	}
	life := c.NotAfter.Sub(c.NotBefore)
	left := life / 3
	if life <= shortLived {
		left = life / 2
	}
	at := c.NotAfter.Add(-left)
	if !now.Before(at) {
		return true, Lifetime, at
	}
	return false, NotDue, at
}
