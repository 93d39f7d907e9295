// Package schedule owns when renew runs on its own: how often the
// certificates of a state directory need it, the cron entry (a cron.d
// file or a line in a user's crontab) and the systemd service and timer,
// rendered and installed.
//
// It promises: one entry per state directory, never shared, replaced or
// deleted by another directory's; install is idempotent (it keeps the
// time it picked); times avoid the round minutes everyone types; argv is
// quoted for the shell and cron (a bare % is a newline there) and for
// systemd (which knows neither shell quoting nor a bare % or $); and no
// secret ever goes into a line or a unit. The caller says which command
// line to run; this package never reads flags.
package schedule

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"hash/fnv"
	"math/rand/v2"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/lbcert/lbcert/internal/renewal"
	"github.com/lbcert/lbcert/internal/store"
)

// CronFile is where "cron install" writes the system-wide entry for the
// default state directory.
const CronFile = "/etc/cron.d/lbcert"

// CronFileFor is the cron.d file of state directory dir: /etc/cron.d/lbcert
// for the default one, lbcert-<hash of its path> for any other, so that
// two state directories never share, replace or delete each other's
// entry. (cron.d names may not contain dots: no path in the name.)
func CronFileFor(cronDir, dir string) string {
	abs := absPath(dir)
	if abs == "/etc/lbcert" {
		return filepath.Join(cronDir, "lbcert")
	}
	sum := sha256.Sum256([]byte(abs))
	return filepath.Join(cronDir, "lbcert-"+hex.EncodeToString(sum[:4]))
}

// Marker tags the crontab line of state directory dir.
func Marker(dir string) string { return cronMarker + " dir=" + absPath(dir) }

// cronMarker tags the line lbcert owns in a user's crontab.
const cronMarker = "# lbcert renew (managed by 'lbcert cron')"

func absPath(p string) string {
	if abs, err := filepath.Abs(p); err == nil {
		return abs
	}
	return p
}

// randomTime returns a minute and hour for the first run of the day.
// Minutes 0, 15, 30 and 45 are what people type, so they are the CA's
// busiest; avoid them.
func randomTime() (minute, hour int) {
	for {
		minute = 1 + rand.IntN(58)
		if minute%15 != 0 {
			return minute, rand.IntN(24)
		}
	}
}

// HostMinute is the timer's minute for a host and state directory: the
// same every time it is printed or installed there (so the printed unit
// is the installed one), different across hosts, and never a quarter
// hour.
func HostMinute(host, dir string) int {
	h := fnv.New32a()
	h.Write([]byte(host + "\x00" + absPath(dir)))
	m := 1 + int(h.Sum32()%58)
	if m%15 == 0 {
		m++
	}
	return m
}

// shortLivedAt is the lifetime at or below which the schedule runs every
// 6 hours. A 6-day certificate renews 3 to 4 days before expiry, so twice
// a day already gives it 6 runs in that window; every 6 hours keeps that
// true when a run or two fails, and when a CA shortens lifetimes further.
const shortLivedAt = 10 * 24 * time.Hour

// RunsPerDay is how often renew should run for the lineages in st: twice
// a day, as certbot's timer runs (one failed run still leaves another
// the same day), four times with any certificate of 10 days or less, and
// more for the shortest (PerDayFor).
func RunsPerDay(st *store.Store) int {
	names, _ := st.Names()
	var shortest time.Duration
	for _, n := range names {
		if l, err := st.Load(n); err == nil {
			if life := l.Cert.NotAfter.Sub(l.Cert.NotBefore); shortest == 0 || life < shortest {
				shortest = life
			}
		}
	}
	return PerDayFor(shortest)
}

// PerDayFor is the runs per day for a shortest lifetime (0: none). A
// short-lived certificate may come due with only half its life left
// (renewal.Moment), and that half must hold renewal.MinChances runs, or
// list warns about lbcert's own schedule: step-ca's 24-hour default
// needs a run every 4 hours, not 6. Runs divide the day evenly, at most
// hourly (cron's grain for one line).
func PerDayFor(shortest time.Duration) int {
	if shortest <= 0 || shortest > shortLivedAt {
		return 2
	}
	for _, n := range []int{4, 6, 8, 12} {
		if time.Duration(renewal.MinChances)*24*time.Hour/time.Duration(n) <= shortest/2 {
			return n
		}
	}
	return 24
}

// hours spreads perDay runs evenly over the day from first, as a list
// of hours in format ("%d" for cron, "%02d" for systemd).
func hours(first, perDay int, format string) string {
	var hs []int
	for i := range perDay {
		hs = append(hs, (first+i*24/perDay)%24)
	}
	slices.Sort(hs)
	out := make([]string, len(hs))
	for i, h := range hs {
		out[i] = fmt.Sprintf(format, h)
	}
	return strings.Join(out, ",")
}

// ShellQuote quotes s for /bin/sh when it needs it.
func ShellQuote(s string) string {
	if s != "" && strings.Trim(s, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_./=:@") == "" {
		return s
	}
	return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'"
}

// CronCommand is argv as a cron line runs it: each word shell-quoted,
// and % escaped, since cron turns a bare % into a newline, even inside
// quotes.
func CronCommand(argv []string) string {
	words := make([]string, len(argv))
	for i, w := range argv {
		words[i] = strings.ReplaceAll(ShellQuote(w), "%", `\%`)
	}
	return strings.Join(words, " ")
}

// Entry is what cron install, show and remove work on: the cron entry
// (Cron), or with --systemd the timer (Timer).
type Entry interface {
	Install() (string, error)
	Show() (string, error)
	Remove() (string, error)
}
