package main

import (
	"bytes"
	"errors"
	"fmt"
	"io/fs"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"

	"github.com/spf13/cobra"

	"github.com/lbcert/lbcert/internal/exit"
	"github.com/lbcert/lbcert/internal/store"
)

// cronFile is where "cron install" writes the system-wide entry.
const cronFile = "/etc/cron.d/lbcert"

// cronMarker tags the line lbcert owns in a user's crontab.
const cronMarker = "# lbcert renew (managed by 'lbcert cron')"

type cronOptions struct {
	User bool
	File string
}

func (a *app) newCronCmd() *cobra.Command {
	o := &cronOptions{}
	cmd := &cobra.Command{
		Use:   "cron",
		Short: "Install, show or remove the daily renew cron entry",
		Long: `Manage the cron entry that runs "lbcert renew -q" once a day.

The time is picked at random when the entry is first installed, never on a
round minute, so that hosts do not all hit the CA at 00:00. The
entry goes to /etc/cron.d/lbcert, or with --user into the invoking user's
crontab. "cron install" is idempotent: run again, it keeps the time it
picked.`,
		Args: cobra.NoArgs,
	}
	cmd.PersistentFlags().BoolVar(&o.User, "user", false, "use the invoking user's crontab instead of "+cronFile)
	cmd.PersistentFlags().StringVar(&o.File, "file", cronFile, "cron.d file to manage")
	cmd.AddCommand(
		&cobra.Command{
			Use: "install", Short: "Install the daily renew entry", Args: cobra.NoArgs,
			RunE: func(cmd *cobra.Command, args []string) error { return a.cronInstall(o) },
		},
		&cobra.Command{
			Use: "show", Short: "Print the renew entry, if installed", Args: cobra.NoArgs,
			RunE: func(cmd *cobra.Command, args []string) error { return a.cronShow(o) },
		},
		&cobra.Command{
			Use: "remove", Short: "Remove the renew entry", Args: cobra.NoArgs,
			RunE: func(cmd *cobra.Command, args []string) error { return a.cronRemove(o) },
		},
	)
	return cmd
}

// renewCommand is the command line cron runs: this binary, and the state
// directory and config when they are not the defaults.
func (a *app) renewCommand() string {
	bin, err := os.Executable()
	if err != nil {
		bin = "lbcert"
	}
	// The cron run must read the same settings as the command that
	// installed it: the state directory and the config file, however
	// they were given (flag, LBCERT_DIR/LBCERT_CONFIG, config file),
	// as absolute paths since cron starts in another directory.
	parts := []string{bin}
	if a.global.Dir != "/etc/lbcert" {
		parts = append(parts, "--dir", shellQuote(absPath(a.global.Dir)))
	}
	if p := a.configPath(); p != defaultConfig {
		parts = append(parts, "--config", shellQuote(absPath(p)))
	}
	return strings.Join(append(parts, "renew", "-q"), " ")
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

var cronTimeRE = regexp.MustCompile(`^(\d+) (\d+) \* \* \* `)

// entryTime keeps an installed entry's time, so install is idempotent.
func entryTime(existing string) (string, bool) {
	for _, line := range strings.Split(existing, "\n") {
		if m := cronTimeRE.FindStringSubmatch(line); m != nil && strings.Contains(line, " renew -q") {
			return m[1] + " " + m[2], true
		}
	}
	return "", false
}

func (a *app) cronInstall(o *cronOptions) error {
	existing, err := a.readCron(o)
	if err != nil {
		return err
	}
	when, ok := entryTime(existing)
	if !ok {
		m, h := randomTime()
		when = fmt.Sprintf("%d %d", m, h)
	}
	line := when + " * * * "
	if o.User {
		line += a.renewCommand()
		var kept []string
		for _, l := range strings.Split(strings.TrimRight(existing, "\n"), "\n") {
			if l != "" && !strings.Contains(l, cronMarker) {
				kept = append(kept, l)
			}
		}
		kept = append(kept, line+" "+cronMarker)
		if err := writeCrontab(strings.Join(kept, "\n") + "\n"); err != nil {
			return err
		}
	} else {
		content := "# lbcert: renew certificates once a day at a random time.\n" +
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
			return exit.Errorf("write %s: %v", o.File, unwrapPath(err))
		}
	}
	a.printf("installed daily renew at %s (minute hour): %s\n", when, a.renewCommand())
	return nil
}

func (a *app) cronShow(o *cronOptions) error {
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
	return exit.Errorf("no lbcert cron entry installed").WithHint("'lbcert cron install' adds one")
}

func (a *app) cronRemove(o *cronOptions) error {
	if o.User {
		existing, err := a.readCron(o)
		if err != nil {
			return err
		}
		var kept []string
		for _, l := range strings.Split(strings.TrimRight(existing, "\n"), "\n") {
			if l != "" && !strings.Contains(l, cronMarker) {
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
		return exit.Errorf("remove %s: %v", path, unwrapPath(err))
	}
	return nil
}

func (a *app) readCron(o *cronOptions) (string, error) {
	if o.User {
		out, err := exec.Command("crontab", "-l").Output()
		if err != nil {
			if _, lerr := exec.LookPath("crontab"); lerr != nil {
				return "", exit.Errorf("crontab not found: install cron, or use %s", cronFile)
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
		return "", exit.Errorf("read %s: %v", o.File, unwrapPath(err))
	}
	return string(data), nil
}

func writeCrontab(content string) error {
	cmd := exec.Command("crontab", "-")
	cmd.Stdin = strings.NewReader(content)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Run(); err != nil {
		return exit.Errorf("crontab -: %v: %s", err, strings.TrimSpace(stderr.String()))
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
