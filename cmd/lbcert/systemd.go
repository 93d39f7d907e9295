package main

import (
	"fmt"
	"hash/fnv"
	"os"
	"strings"

	"github.com/lbcert/lbcert/internal/store"
)

// One convention for lbcert's systemd units: the command that runs
// under the unit prints it (`renew --print-systemd-unit` and
// `--print-systemd-timer`, `agent --print-systemd-unit`), with the flags
// it was given, to be redirected into /etc/systemd/system. `cron install
// --systemd` writes the renew pair itself, from the same text.

// execStart is argv as an ExecStart= line: each word quoted for systemd
// (which knows neither shell quoting nor a bare % or $).
func execStart(argv []string) string {
	quoted := make([]string, len(argv))
	for i, w := range argv {
		quoted[i] = systemdQuote(w)
	}
	return strings.Join(quoted, " ")
}

// printedBy is the first line of a printed unit.
func printedBy(unit, command string) string {
	return fmt.Sprintf("# %s: printed by 'lbcert %s', with the global settings it was given (--dir, --config, --keep-versions, --metrics-file, fleet flags).", unit, command)
}

// cronManaged is the first line of the units cron install writes.
const cronManaged = "# Managed by 'lbcert cron install --systemd'; 'lbcert cron remove --systemd' deletes it."

// renewService is lbcert-renew.service: one renew run (the timer
// starts it, already at a random minute, so no extra sleep).
func (a *app) renewService(header string) string {
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
`, header, execStart(append(a.renewArgv(), "--no-random-sleep")))
}

// renewTimer is lbcert-renew.timer at minute past the hours of the
// schedule (twice a day, more often with short-lived certificates),
// RandomizedDelaySec=1h and Persistent=true so a run missed while the
// host was off happens at boot.
func (a *app) renewTimer(minute int, header string) string {
	perDay := runsPerDay(store.New(a.global.Dir))
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

// hostMinute is the timer's minute when printed: fixed for a host and
// state directory (printing twice gives the same unit), different across
// hosts, and never a quarter hour (what people type, so the CA's
// busiest minutes).
func (a *app) hostMinute() int {
	host, _ := os.Hostname()
	h := fnv.New32a()
	h.Write([]byte(host + "\x00" + absPath(a.global.Dir)))
	m := 1 + int(h.Sum32()%58)
	if m%15 == 0 {
		m++
	}
	return m
}
