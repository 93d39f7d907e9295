package main

import (
	"cmp"
	"fmt"
	"os"

	"github.com/spf13/cobra"

	"github.com/lbcert/lbcert/internal/config"
	"github.com/lbcert/lbcert/internal/schedule"
)

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
	cmd.PersistentFlags().BoolVar(&o.User, "user", false, "use the invoking user's crontab instead of "+schedule.CronFile)
	cmd.PersistentFlags().StringVar(&o.File, "file", "", "cron.d file to manage (default /etc/cron.d/lbcert for --dir /etc/lbcert, /etc/cron.d/lbcert-HASH for another --dir)")
	cmd.PersistentFlags().BoolVar(&o.Systemd, "systemd", false, "a systemd timer (lbcert-renew.timer and .service in --unit-dir) instead of cron")
	cmd.PersistentFlags().StringVar(&o.UnitDir, "unit-dir", "/etc/systemd/system", "where --systemd writes its units")
	cmd.AddCommand(
		&cobra.Command{
			Use: "install", Short: "Install the renew entry (2 or more runs a day, as the certificates need)", Args: cobra.NoArgs,
			RunE: func(cmd *cobra.Command, args []string) error {
				if err := a.schedulable(); err != nil {
					return err
				}
				say, err := o.entry(a).Install()
				if err == nil {
					a.printf("%s\n", say)
				}
				return err
			},
		},
		&cobra.Command{
			Use: "show", Short: "Print the renew entry, if installed", Args: cobra.NoArgs,
			RunE: func(cmd *cobra.Command, args []string) error {
				line, err := o.entry(a).Show()
				if err == nil {
					fmt.Fprintln(a.out, line)
				}
				return err
			},
		},
		&cobra.Command{
			Use: "remove", Short: "Remove the renew entry", Args: cobra.NoArgs,
			RunE: func(cmd *cobra.Command, args []string) error {
				say, err := o.entry(a).Remove()
				if err == nil && say != "" {
					a.printf("%s\n", say)
				}
				return err
			},
		},
	)
	return cmd
}

func (o *cronOptions) entry(a *app) schedule.Entry {
	if o.Systemd {
		host, _ := os.Hostname()
		return &schedule.Timer{Dir: a.global.Dir, UnitDir: o.UnitDir, Command: append(a.renewArgv(), "--no-random-sleep"), Host: host}
	}
	return &schedule.Cron{Dir: a.global.Dir, File: o.File, User: o.User, Command: a.renewArgv()}
}

// renewArgv is renew's argv as cron and the timer run it.
func (a *app) renewArgv() []string {
	bin, err := os.Executable()
	if err != nil {
		bin = "lbcert"
	}
	argv := append(append([]string{bin}, a.carriedArgs()...), "renew", "-q")
	return append(argv, config.CarriedArgs(a.flags, config.AbsPath, "rate-orders", "rate-domain", "rate-names", "rate-failed-authz")...)
}

// carriedArgs are the global settings a cron line or a unit must repeat
// for its run to be the same as the command that printed it: the state
// directory and the config file, however they were given (flag,
// LBCERT_DIR/LBCERT_CONFIG, config file), as absolute paths since cron
// starts in another directory; the settings given by flag or environment
// that change what a run keeps or writes, and the CAs' that the lineages
// do not keep (config.CarriedArgs); and the fleet's flags. Never a secret.
func (a *app) carriedArgs() []string {
	var args []string
	if a.global.Dir != "/etc/lbcert" {
		args = append(args, "--dir", config.AbsPath(a.global.Dir))
	}
	if p := a.configPath(); p != defaultConfig {
		args = append(args, "--config", config.AbsPath(p))
	}
	args = append(args, config.CarriedArgs(a.flags, config.AbsPath, "keep-versions", "hook-concurrency", "metrics-file",
		"server", "staging", "agree-tos", "email", "eab-kid", "eab-hmac-key-file", "ca-bundle", "ca-backoff", "smtp-host", "smtp-port",
		"mail-from", "mail-to", "smtp-user", "smtp-password-file", "smtp-tls", "smtp-ca-bundle", "report")...)
	if config.Carried(a.flags, "fallback-ca") {
		args = append(args, a.global.cas.Args(config.AbsPath)...)
	}
	return append(args, a.fleetOpts.Args(config.AbsPath)...)
}

// schedulable refuses settings a scheduled renew could not run with:
// the CAs' as renew checks them, and a secret only the environment
// holds, which the line cannot carry and cron does not pass.
func (a *app) schedulable() error {
	_, server := a.account().ServerURL()
	return cmp.Or(server, a.account().Check(a.ctx), a.global.cas.Schedulable(), config.Schedulable(a.flags, a.getenv))
}

// printedUnit is what renew --print-systemd-unit and --print-systemd-timer
// print: the unit cron install --systemd writes, with its own first line.
func (a *app) printedUnit(timer bool) string {
	if timer {
		host, _ := os.Hostname()
		return schedule.RenewTimer(a.global.Dir, schedule.HostMinute(host, a.global.Dir), schedule.PrintedBy(schedule.TimerUnit, "renew --print-systemd-timer"))
	}
	return schedule.RenewService(append(a.renewArgv(), "--no-random-sleep"), schedule.PrintedBy(schedule.ServiceUnit, "renew --print-systemd-unit"))
}
