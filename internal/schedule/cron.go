package schedule

import (
	"bytes"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"regexp"
	"strconv"
	"strings"

	"github.com/lbcert/lbcert/internal/hint"
	"github.com/lbcert/lbcert/internal/store"
)

// Cron is the renew entry of one state directory: a cron.d File, or
// with User the invoking user's crontab, running Command.
type Cron struct {
	Dir     string // the state directory
	File    string // cron.d file (default CronFileFor("/etc/cron.d", Dir))
	User    bool
	Command []string // renew's argv
}

func (c *Cron) file() string {
	if c.File == "" {
		return CronFileFor("/etc/cron.d", c.Dir)
	}
	return c.File
}

var cronTimeRE = regexp.MustCompile(`^(\d+) (\d+)[\d,]* \* \* \* `)

// entryTime keeps an installed entry's minute and first hour, so install
// is idempotent; the hours that follow are the schedule's.
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

// Install writes the entry, keeping the time of one already there. It
// says what it did, in one line.
func (c *Cron) Install() (string, error) {
	existing, err := c.read()
	if err != nil {
		return "", err
	}
	m, h, ok := entryTime(existing)
	if !ok {
		m, h = randomTime()
	}
	perDay := RunsPerDay(store.New(c.Dir))
	when := fmt.Sprintf("%d %s", m, hours(h, perDay, "%d"))
	line := when + " * * * "
	command := CronCommand(c.Command)
	if c.User {
		kept := c.others(existing)
		kept = append(kept, line+command+" "+Marker(c.Dir))
		if err := writeCrontab(strings.Join(kept, "\n") + "\n"); err != nil {
			return "", err
		}
	} else {
		content := fmt.Sprintf("# lbcert: renew certificates %d times a day at a random minute.\n", perDay) +
			"# Managed by 'lbcert cron install'; 'lbcert cron remove' deletes it.\n" +
			"SHELL=/bin/sh\nPATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n" +
			line + "root " + command + "\n"
		if existing == content {
			return fmt.Sprintf("cron entry already installed in %s: %s", c.file(), when), nil
		}
		// cron.d files must be root-owned, 0644, and not group/other
		// writable, or cron ignores them.
		if err := store.WriteFile(c.file(), []byte(content), 0o644); err != nil {
			return "", fmt.Errorf("write %s: %w", c.file(), unwrapPath(err))
		}
	}
	return fmt.Sprintf("installed renew %d times a day at %s (minute hour): %s", perDay, when, command), nil
}

// others are the lines of a crontab that are not this directory's entry.
func (c *Cron) others(existing string) []string {
	var kept []string
	for _, l := range strings.Split(strings.TrimRight(existing, "\n"), "\n") {
		if l != "" && !strings.HasSuffix(l, Marker(c.Dir)) {
			kept = append(kept, l)
		}
	}
	return kept
}

// Show returns the installed entry's line.
func (c *Cron) Show() (string, error) {
	existing, err := c.read()
	if err != nil {
		return "", err
	}
	for _, l := range strings.Split(existing, "\n") {
		if cronTimeRE.MatchString(l) && strings.Contains(l, " renew -q") {
			return l, nil
		}
	}
	return "", errNotInstalled
}

var errNotInstalled = hint.Errorf("'lbcert cron install' adds one", "no lbcert cron entry installed")

// Remove deletes the entry; none installed is not an error. It says
// nothing (the string is for the timer's message).
func (c *Cron) Remove() (string, error) {
	if !c.User {
		_, err := RemoveFile(c.file())
		return "", err
	}
	existing, err := c.read()
	if err != nil {
		return "", err
	}
	return "", writeCrontab(strings.Join(c.others(existing), "\n") + "\n")
}

// RemoveFile removes a cron.d file, if there is one, and says whether
// there was.
func RemoveFile(path string) (removed bool, err error) {
	err = os.Remove(path)
	if errors.Is(err, fs.ErrNotExist) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("remove %s: %w", path, unwrapPath(err))
	}
	return true, nil
}

func (c *Cron) read() (string, error) {
	if c.User {
		out, err := exec.Command("crontab", "-l").Output()
		if err != nil {
			if _, lerr := exec.LookPath("crontab"); lerr != nil {
				return "", fmt.Errorf("crontab not found: install cron, or use %s", CronFile)
			}
			return "", nil // "no crontab for user"
		}
		return string(out), nil
	}
	data, err := os.ReadFile(c.file())
	if errors.Is(err, fs.ErrNotExist) {
		return "", nil
	}
	if err != nil {
		return "", fmt.Errorf("read %s: %w", c.file(), unwrapPath(err))
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

func unwrapPath(err error) error {
	if pe, ok := err.(*os.PathError); ok {
		return pe.Err
	}
	return err
}
