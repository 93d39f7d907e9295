package renewal

import (
	"fmt"
	"log/slog"
	"slices"
	"time"

	"github.com/lbcert/lbcert/internal/store"
)

// MinChances is how many scheduled runs a lineage should get between
// its renewal moment and its expiry: one failed run (a CA outage, a
// broken deploy) must still leave two more.
const MinChances = 3

// RunGap is the longest gap between the renew runs recorded (and now,
// when given), the schedule as it really ran: a cron line that says
// daily but skipped a weekend counts as every three days. Zero when
// fewer than two moments are known.
func RunGap(runs []time.Time, now time.Time) time.Duration {
	ts := slices.Clone(runs)
	if !now.IsZero() {
		ts = append(ts, now)
	}
	slices.SortFunc(ts, func(a, b time.Time) int { return a.Compare(b) })
	var gap time.Duration
	for i := 1; i < len(ts); i++ {
		gap = max(gap, ts[i].Sub(ts[i-1]))
	}
	return gap
}

// CadenceWarning says, when runs gap apart leave a certificate fewer
// than MinChances runs between its renewal moment at and its expiry,
// which gap it would need; "" when the schedule fits.
func CadenceWarning(c store.CertInfo, at time.Time, gap time.Duration) string {
	window := c.NotAfter.Sub(at)
	if gap <= 0 || window <= 0 || window >= MinChances*gap {
		return ""
	}
	return fmt.Sprintf("renew runs every %s (the longest gap seen), which leaves %.0f of the %d runs it needs between its renewal time and expiry; run renew at least every %s",
		roundGap(gap), float64(window)/float64(gap), MinChances, roundGap(window/MinChances))
}

// roundGap prints a gap the way a crontab would be written.
func roundGap(d time.Duration) string {
	switch {
	case d >= 48*time.Hour:
		return fmt.Sprintf("%.1f days", d.Hours()/24)
	case d >= time.Hour:
		return fmt.Sprintf("%.0fh", d.Hours())
	}
	return d.Round(time.Minute).String()
}

// RunLog is where a host keeps its renew runs: the state directory.
type RunLog interface {
	Runs() []time.Time
	RecordRun(at time.Time) error
	CadenceWarnedAt() time.Time
	MarkCadenceWarned(at time.Time) error
}

// Cadence is the schedule as it really runs, for a renew run at now: the
// longest gap between the recorded runs and this one (0 when warned in
// the last day, since cron mails every run that prints). A scheduled
// run (cron's renew over every lineage) is recorded; a hand-typed
// renew --name would hide the real gaps between cron's.
func Cadence(log RunLog, now time.Time, scheduled bool) time.Duration {
	var gap time.Duration
	if now.Sub(log.CadenceWarnedAt()) >= 23*time.Hour {
		gap = RunGap(log.Runs(), now)
	}
	if scheduled {
		if err := log.RecordRun(now); err != nil {
			slog.Warn("could not record this renew run", "err", err)
		}
	}
	return gap
}

// Warned records that the run warned about the schedule at now.
func Warned(log RunLog, now time.Time) {
	if err := log.MarkCadenceWarned(now); err != nil {
		slog.Warn("could not record the schedule warning", "err", err)
	}
}
