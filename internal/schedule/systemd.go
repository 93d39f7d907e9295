package schedule

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"

	"github.com/lbcert/lbcert/internal/hint"
	"github.com/lbcert/lbcert/internal/store"
)

// One convention for lbcert's systemd units: the command that runs
// under the unit prints it (`renew --print-systemd-unit` and
// `--print-systemd-timer`, `agent --print-systemd-unit`), with the flags
// it was given, to be redirected into /etc/systemd/system. `cron install
// --systemd` writes the renew pair itself, from the same text.
const (
	TimerUnit   = "lbcert-renew.timer"
	ServiceUnit = "lbcert-renew.service"
)

// ExecStart is argv as an ExecStart= line: each word quoted for systemd.
func ExecStart(argv []string) string {
	quoted := make([]string, len(argv))
	for i, w := range argv {
		quoted[i] = systemdQuote(w)
	}
	return strings.Join(quoted, " ")
}

// systemdQuote quotes one ExecStart word when it needs it.
func systemdQuote(s string) string {
	if s != "" && !strings.ContainsAny(s, " \t\"'\\$%;") {
		return s
	}
	r := strings.NewReplacer(`\`, `\\`, `"`, `\"`, "$", "$$", "%", "%%")
	return `"` + r.Replace(s) + `"`
}

// PrintedBy is the first line of a printed unit.
func PrintedBy(unit, command string) string {
	return fmt.Sprintf("# %s: printed by 'lbcert %s', with the settings it was given that its runs need (--dir, --config, --keep-versions, --metrics-file, CA bundle, fallbacks, rates, fleet flags).", unit, command)
}

// cronManaged is the first line of the units cron install writes.
const cronManaged = "# Managed by 'lbcert cron install --systemd'; 'lbcert cron remove --systemd' deletes it."

// RenewService is lbcert-renew.service, running argv (renew's, which
// the timer starts already at a random minute, so with no extra sleep).
func RenewService(argv []string, header string) string {
	return fmt.Sprintf(`%s
# Install with its timer ('lbcert renew --print-systemd-timer'), or let
# 'lbcert cron install --systemd' write both; then
#   systemctl daemon-reload && systemctl enable --now lbcert-renew.timer
[Unit]
Description=Renew lbcert certificates that are due
Documentation=man:lbcert-renew(1)
Wants=network-online.target
After=network-online.target

[Service]
Type=oneshot
ExecStart=%s
`, header, ExecStart(argv))
}

// RenewTimer is lbcert-renew.timer at minute past the hours of the
// schedule of state directory dir (twice a day, more often with
// short-lived certificates), RandomizedDelaySec=1h and Persistent=true
// so a run missed while the host was off happens at boot.
func RenewTimer(dir string, minute int, header string) string {
	perDay := RunsPerDay(store.New(dir))
	return fmt.Sprintf(`%s
[Unit]
Description=Renew lbcert certificates that are due, %d times a day

[Timer]
OnCalendar=*-*-* %s:%02d:00
RandomizedDelaySec=1h
Persistent=true

[Install]
WantedBy=timers.target
`, header, perDay, hours(0, perDay, "%02d"), minute)
}

// AgentUnit is the systemd unit of a fleet agent running argv: the
// password from an environment file (never in argv), a restart on
// failure.
func AgentUnit(argv []string) string {
	return fmt.Sprintf(`%s
# Install: put it in /etc/systemd/system/lbcert-agent.service, put
# LBCERT_REDIS_PASSWORD=... in /etc/lbcert/agent.env (mode 0600) unless
# --redis-password-file is used, then:
#   systemctl daemon-reload && systemctl enable --now lbcert-agent
[Unit]
Description=lbcert fleet agent (HTTP-01 answers, certificate sync and deploy)
Wants=network-online.target
After=network-online.target

[Service]
Type=simple
EnvironmentFile=-/etc/lbcert/agent.env
ExecStart=%s
Restart=on-failure
RestartSec=5s
KillSignal=SIGTERM
TimeoutStopSec=30s
NoNewPrivileges=yes
PrivateTmp=yes

[Install]
WantedBy=multi-user.target
`, PrintedBy("lbcert-agent.service", "agent --print-systemd-unit"), ExecStart(argv))
}

// Timer is the renew pair of state directory Dir in UnitDir, running
// Command.
type Timer struct {
	Dir     string
	UnitDir string
	Command []string
	Host    string // for HostMinute
}

var onCalendarRE = regexp.MustCompile(`(?m)^OnCalendar=\*-\*-\* [\d,]+:(\d+):00$`)

// Install writes the service and the timer, at the minute of a timer
// already there, else the host's minute (the one renew
// --print-systemd-timer prints). It says what it did, in one line.
func (t *Timer) Install() (string, error) {
	timerPath := filepath.Join(t.UnitDir, TimerUnit)
	minute := HostMinute(t.Host, t.Dir)
	if old, err := os.ReadFile(timerPath); err == nil {
		if m := onCalendarRE.FindSubmatch(old); m != nil {
			minute, _ = strconv.Atoi(string(m[1]))
		}
	}
	service, timer := RenewService(t.Command, cronManaged), RenewTimer(t.Dir, minute, cronManaged)
	if err := os.MkdirAll(t.UnitDir, 0o755); err != nil {
		return "", fmt.Errorf("%s: %w", t.UnitDir, unwrapPath(err))
	}
	for _, f := range []struct{ path, data string }{{filepath.Join(t.UnitDir, ServiceUnit), service}, {timerPath, timer}} {
		if err := store.WriteFile(f.path, []byte(f.data), 0o644); err != nil {
			return "", fmt.Errorf("write %s: %w", f.path, unwrapPath(err))
		}
	}
	return fmt.Sprintf("installed %s (at minute %02d of hours %s, up to 1h later at random); enable it with: systemctl daemon-reload && systemctl enable --now %s",
		timerPath, minute, hours(0, RunsPerDay(store.New(t.Dir)), "%02d"), TimerUnit), nil
}

// Show returns the installed timer's OnCalendar line.
func (t *Timer) Show() (string, error) {
	data, err := os.ReadFile(filepath.Join(t.UnitDir, TimerUnit))
	if err != nil {
		return "", hint.Errorf("'lbcert cron install --systemd' adds one", "no lbcert systemd timer installed in %s", t.UnitDir)
	}
	return string(onCalendarRE.Find(data)), nil
}

// Remove deletes both units; none installed is not an error.
func (t *Timer) Remove() (string, error) {
	for _, u := range []string{TimerUnit, ServiceUnit} {
		if err := os.Remove(filepath.Join(t.UnitDir, u)); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return "", fmt.Errorf("remove %s: %w", u, unwrapPath(err))
		}
	}
	return fmt.Sprintf("removed %s and %s from %s; run: systemctl daemon-reload", TimerUnit, ServiceUnit, t.UnitDir), nil
}
