package main

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/lbcert/lbcert/internal/fleet"
	"github.com/lbcert/lbcert/internal/hint"
	"github.com/lbcert/lbcert/internal/renewal"
	"github.com/lbcert/lbcert/internal/store"
)

// cronFile is where "cron install" writes the system-wide entry for the
// default state directory.
const cronFile = "/etc/cron.d/lbcert"

// cronFileFor is the cron.d file of state directory dir: /etc/cron.d/lbcert
// for the default one, lbcert-<hash of its path> for any other, so that
// two state directories never share, replace or delete each other's
// entry. (cron.d names may not contain dots: no path in the name.)
func cronFileFor(cronDir, dir string) string {
	abs := absPath(dir)
	if abs == "/etc/lbcert" {
		return filepath.Join(cronDir, "lbcert")
	}
	sum := sha256.Sum256([]byte(abs))
	return filepath.Join(cronDir, "lbcert-"+hex.EncodeToString(sum[:4]))
}

// markerFor tags the crontab line of state directory dir.
func markerFor(dir string) string { return cronMarker + " dir=" + absPath(dir) }

// cronMarker tags the line lbcert owns in a user's crontab.
const cronMarker = "# lbcert renew (managed by 'lbcert cron')"

type cronOptions struct {
	User    bool
	File    string
	Systemd bool
	UnitDir string
}

func (a *app) newCronCmd() *cobra.Command {
	o := &cronOptions{}
	cmd := &cobra.Command{
		Use:   "cron",
		Short: "Install, show or remove the renew cron entry",
		Long: `Manage the cron entry that runs "lbcert renew -q": twice a day, every
6 hours when any certificate lives 10 days or less, and more often for
shorter ones (every 4 hours for 24-hour certificates): each certificate
should get at least 3 runs between its renewal time and expiry; renew and
list warn when the schedule as it really ran leaves fewer.

The time is picked at random when the entry is first installed, never on a
round minute, so that hosts do not all hit the CA at 00:00. The
entry goes to /etc/cron.d/lbcert, or with --user into the invoking user's
crontab. "cron install" is idempotent: run again, it keeps the time it
picked.

With --systemd it writes lbcert-renew.service and lbcert-renew.timer
instead (for hosts without cron, as Debian's certbot does): at the same
cadence at a random minute, RandomizedDelaySec=1h and Persistent=true, so a run missed
while the host was off happens at boot. Enable it with
"systemctl daemon-reload && systemctl enable --now lbcert-renew.timer".`,
		Args: cobra.NoArgs,
	}
	cmd.PersistentFlags().BoolVar(&o.User, "user", false, "use the invoking user's crontab instead of "+cronFile)
	cmd.PersistentFlags().StringVar(&o.File, "file", "", "cron.d file to manage (default /etc/cron.d/lbcert for --dir /etc/lbcert, /etc/cron.d/lbcert-HASH for another --dir)")
	cmd.PersistentFlags().BoolVar(&o.Systemd, "systemd", false, "a systemd timer (lbcert-renew.timer and .service in --unit-dir) instead of cron")
	cmd.PersistentFlags().StringVar(&o.UnitDir, "unit-dir", "/etc/systemd/system", "where --systemd writes its units")
	cmd.AddCommand(
		&cobra.Command{
			Use: "install", Short: "Install the daily renew entry", Args: cobra.NoArgs,
			RunE: func(cmd *cobra.Command, args []string) error {
				if o.Systemd {
					return a.timerInstall(o)
				}
				return a.cronInstall(o)
			},
		},
		&cobra.Command{
			Use: "show", Short: "Print the renew entry, if installed", Args: cobra.NoArgs,
			RunE: func(cmd *cobra.Command, args []string) error {
				if o.Systemd {
					return a.timerShow(o)
				}
				return a.cronShow(o)
			},
		},
		&cobra.Command{
			Use: "remove", Short: "Remove the renew entry", Args: cobra.NoArgs,
			RunE: func(cmd *cobra.Command, args []string) error {
				if o.Systemd {
					return a.timerRemove(o)
				}
				return a.cronRemove(o)
			},
		},
	)
	return cmd
}

// renewCommand is the command line cron runs: this binary, and the state
// directory and config when they are not the defaults. Each word is
// shell-quoted, and % escaped: cron turns a bare % into a newline, even
// inside quotes.
func (a *app) renewCommand() string {
	words := a.renewArgv()
	for i, w := range words {
		words[i] = strings.ReplaceAll(shellQuote(w), "%", `\%`)
	}
	return strings.Join(words, " ")
}

// renewArgv is renew's argv as cron and the timer run it.
func (a *app) renewArgv() []string {
	bin, err := os.Executable()
	if err != nil {
		bin = "lbcert"
	}
	return append(append([]string{bin}, a.carriedArgs()...), "renew", "-q")
}

// carriedArgs are the global settings a cron line or a unit must repeat
// for its run to be the same as the command that printed it: the state
// directory and the config file, however they were given (flag,
// LBCERT_DIR/LBCERT_CONFIG, config file), as absolute paths since cron
// starts in another directory; the settings given as flags that change
// what a run keeps or writes; and the fleet's flags. Never a secret.
func (a *app) carriedArgs() []string {
	var args []string
	if a.global.Dir != "/etc/lbcert" {
		args = append(args, "--dir", absPath(a.global.Dir))
	}
	if p := a.configPath(); p != defaultConfig {
		args = append(args, "--config", absPath(p))
	}
	if a.global.Keep != 3 {
		args = append(args, "--keep-versions", strconv.Itoa(a.global.Keep))
	}
	if a.global.HookConc != 1 {
		args = append(args, "--hook-concurrency", strconv.Itoa(a.global.HookConc))
	}
	if a.global.MetricsFile != "" {
		args = append(args, "--metrics-file", absPath(a.global.MetricsFile))
	}
	return append(args, a.fleetArgs()...)
}

// fleetArgs are the fleet flags a unit or cron line must repeat for its
// run to be in the same fleet: never a password (the run reads it from
// --redis-password-file, LBCERT_REDIS_PASSWORD or the config file).
func (a *app) fleetArgs() []string {
	var args []string
	f := a.fleetOpts
	if f.Redis != "" {
		args = append(args, "--redis", f.Redis)
	}
	if f.CA != "" {
		args = append(args, "--redis-ca", absPath(f.CA))
	}
	if f.PasswordFile != "" {
		args = append(args, "--redis-password-file", absPath(f.PasswordFile))
	}
	if f.Redis == "" {
		return args
	}
	// The node's part in the fleet goes with it: a node set never to
	// order must not start ordering from cron.
	if f.NoOrder {
		args = append(args, "--no-order")
	}
	if f.LedgerCap != fleet.DefaultLedgerCap {
		args = append(args, "--ledger-cap", strconv.Itoa(f.LedgerCap))
	}
	if f.LeaseTTL != defaultLeaseTTL {
		args = append(args, "--lease-ttl", f.LeaseTTL.String())
	}
	return args
}

func absPath(p string) string {
	if abs, err := filepath.Abs(p); err == nil {
		return abs
	}
	return p
}

// randomTime returns a minute and hour for the daily run. Minutes 0, 15,
// 30 and 45 are what people type, so they are the CA's busiest; avoid them.
func randomTime() (minute, hour int) {
	for {
		minute = 1 + rand.IntN(58)
		if minute%15 != 0 {
			return minute, rand.IntN(24)
		}
	}
}

var cronTimeRE = regexp.MustCompile(`^(\d+) (\d+)[\d,]* \* \* \* `)

// entryTime keeps an installed entry's minute and first hour, so install
// is idempotent; the hours that follow are the schedule's (schedule).
func entryTime(existing string) (minute, hour int, ok bool) {
	for _, line := range strings.Split(existing, "\n") {
		if m := cronTimeRE.FindStringSubmatch(line); m != nil && strings.Contains(line, " renew -q") {
			minute, _ = strconv.Atoi(m[1])
			hour, _ = strconv.Atoi(m[2])
			return minute, hour % 24, true
		}
	}
	return 0, 0, false
}

// shortLivedAt is the lifetime at or below which the schedule runs every
// 6 hours. A 6-day certificate renews 3 to 4 days before expiry, so twice
// a day already gives it 6 runs in that window; every 6 hours keeps that
// true when a run or two fails, and when a CA shortens lifetimes further.
const shortLivedAt = 10 * 24 * time.Hour

// runsPerDay is how often renew should run for the lineages in st: twice
// a day, as certbot's timer runs (one failed run still leaves another
// the same day), four times with any certificate of 10 days or less, and
// more for the shortest (perDayFor).
func runsPerDay(st *store.Store) int {
	names, _ := st.Names()
	var shortest time.Duration
	for _, n := range names {
		if l, err := st.Load(n); err == nil {
			if life := l.Cert.NotAfter.Sub(l.Cert.NotBefore); shortest == 0 || life < shortest {
				shortest = life
			}
		}
	}
	return perDayFor(shortest)
}

// perDayFor is the runs per day for a shortest lifetime (0: none). A
// short-lived certificate may come due with only half its life left
// (renewal.Moment), and that half must hold renewal.MinChances runs, or
// list warns about lbcert's own schedule: step-ca's 24-hour default
// needs a run every 4 hours, not 6. Runs divide the day evenly, at most
// hourly (cron's grain for one line).
func perDayFor(shortest time.Duration) int {
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

// cronFileOf resolves --file for the state directory in use.
func (a *app) cronFileOf(o *cronOptions) {
	if o.File == "" {
		o.File = cronFileFor("/etc/cron.d", a.global.Dir)
	}
}

func (a *app) cronInstall(o *cronOptions) error {
	a.cronFileOf(o)
	existing, err := a.readCron(o)
	if err != nil {
		return err
	}
	m, h, ok := entryTime(existing)
	if !ok {
		m, h = randomTime()
	}
	perDay := runsPerDay(store.New(a.global.Dir))
	when := fmt.Sprintf("%d %s", m, hours(h, perDay, "%d"))
	line := when + " * * * "
	if o.User {
		line += a.renewCommand()
		var kept []string
		for _, l := range strings.Split(strings.TrimRight(existing, "\n"), "\n") {
			if l != "" && !strings.HasSuffix(l, markerFor(a.global.Dir)) {
				kept = append(kept, l)
			}
		}
		kept = append(kept, line+" "+markerFor(a.global.Dir))
		if err := writeCrontab(strings.Join(kept, "\n") + "\n"); err != nil {
			return err
		}
	} else {
		content := fmt.Sprintf("# lbcert: renew certificates %d times a day at a random minute.\n", perDay) +
			"# Managed by 'lbcert cron install'; 'lbcert cron remove' deletes it.\n" +
			"SHELL=/bin/sh\nPATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n" +
			line + "root " + a.renewCommand() + "\n"
		if existing == content {
			a.printf("cron entry already installed in %s: %s\n", o.File, when)
			return nil
		}
		// cron.d files must be root-owned, 0644, and not group/other
		// writable, or cron ignores them.
		if err := store.WriteFile(o.File, []byte(content), 0o644); err != nil {
			return fmt.Errorf("write %s: %w", o.File, unwrapPath(err))
		}
	}
	a.printf("installed renew %d times a day at %s (minute hour): %s\n", perDay, when, a.renewCommand())
	return nil
}

func (a *app) cronShow(o *cronOptions) error {
	a.cronFileOf(o)
	existing, err := a.readCron(o)
	if err != nil {
		return err
	}
	for _, l := range strings.Split(existing, "\n") {
		if cronTimeRE.MatchString(l) && strings.Contains(l, " renew -q") {
			fmt.Fprintln(a.out, l)
			return nil
		}
	}
	return hint.Wrap(fmt.Errorf("no lbcert cron entry installed"), "'lbcert cron install' adds one")
}

func (a *app) cronRemove(o *cronOptions) error {
	a.cronFileOf(o)
	if o.User {
		existing, err := a.readCron(o)
		if err != nil {
			return err
		}
		var kept []string
		for _, l := range strings.Split(strings.TrimRight(existing, "\n"), "\n") {
			if l != "" && !strings.HasSuffix(l, markerFor(a.global.Dir)) {
				kept = append(kept, l)
			}
		}
		return writeCrontab(strings.Join(kept, "\n") + "\n")
	}
	return removeCronFile(o.File)
}

func removeCronFile(path string) error {
	err := os.Remove(path)
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("remove %s: %w", path, unwrapPath(err))
	}
	return nil
}

func (a *app) readCron(o *cronOptions) (string, error) {
	if o.User {
		out, err := exec.Command("crontab", "-l").Output()
		if err != nil {
			if _, lerr := exec.LookPath("crontab"); lerr != nil {
				return "", fmt.Errorf("crontab not found: install cron, or use %s", cronFile)
			}
			return "", nil // "no crontab for user"
		}
		return string(out), nil
	}
	data, err := os.ReadFile(o.File)
	if errors.Is(err, fs.ErrNotExist) {
		return "", nil
	}
	if err != nil {
		return "", fmt.Errorf("read %s: %w", o.File, unwrapPath(err))
	}
	return string(data), nil
}

func writeCrontab(content string) error {
	cmd := exec.Command("crontab", "-")
	cmd.Stdin = strings.NewReader(content)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("crontab -: %w: %s", err, strings.TrimSpace(stderr.String()))
	}
	return nil
}

// shellQuote quotes s for /bin/sh when it needs it.
func shellQuote(s string) string {
	if s != "" && strings.Trim(s, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_./=:@") == "" {
		return s
	}
	return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'"
}

const (
	timerUnit   = "lbcert-renew.timer"
	serviceUnit = "lbcert-renew.service"
)

var onCalendarRE = regexp.MustCompile(`(?m)^OnCalendar=\*-\*-\* [\d,]+:(\d+):00$`)

// timerInstall writes the systemd service and timer. Twice a day, as
// certbot's timer runs: one failed run still leaves another the same day.
func (a *app) timerInstall(o *cronOptions) error {
	timerPath := filepath.Join(o.UnitDir, timerUnit)
	minute := 0
	if old, err := os.ReadFile(timerPath); err == nil {
		if m := onCalendarRE.FindSubmatch(old); m != nil {
			minute, _ = strconv.Atoi(string(m[1]))
		}
	}
	if minute == 0 {
		minute, _ = randomTime()
	}
	service, timer, timerHours := a.renewService(cronManaged), a.renewTimer(minute, cronManaged), hours(0, runsPerDay(store.New(a.global.Dir)), "%02d")
	if err := os.MkdirAll(o.UnitDir, 0o755); err != nil {
		return fmt.Errorf("%s: %w", o.UnitDir, unwrapPath(err))
	}
	for _, f := range []struct{ path, data string }{{filepath.Join(o.UnitDir, serviceUnit), service}, {timerPath, timer}} {
		if err := store.WriteFile(f.path, []byte(f.data), 0o644); err != nil {
			return fmt.Errorf("write %s: %w", f.path, unwrapPath(err))
		}
	}
	a.printf("installed %s (at minute %02d of hours %s, up to 1h later at random); enable it with: systemctl daemon-reload && systemctl enable --now %s\n",
		timerPath, minute, timerHours, timerUnit)
	return nil
}

func (a *app) timerShow(o *cronOptions) error {
	data, err := os.ReadFile(filepath.Join(o.UnitDir, timerUnit))
	if err != nil {
		return hint.Wrap(fmt.Errorf("no lbcert systemd timer installed in %s", o.UnitDir), "'lbcert cron install --systemd' adds one")
	}
	if m := onCalendarRE.Find(data); m != nil {
		fmt.Fprintln(a.out, string(m))
	}
	return nil
}

func (a *app) timerRemove(o *cronOptions) error {
	for _, u := range []string{timerUnit, serviceUnit} {
		if err := os.Remove(filepath.Join(o.UnitDir, u)); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return fmt.Errorf("remove %s: %w", u, unwrapPath(err))
		}
	}
	a.printf("removed %s and %s from %s; run: systemctl daemon-reload\n", timerUnit, serviceUnit, o.UnitDir)
	return nil
}
