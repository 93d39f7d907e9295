package store

import (
	"os"
	"strconv"
	"strings"
	"sync"
)

// A pending deploy names the process that journalled it, so another
// process of the node leaves it alone while that one deploys it. A PID
// alone proves nothing: after a kill -9 the PID is reused (by the next
// boot's processes, or a busy host's), and a killed run whose parent
// never reaps it stays a zombie that kill(pid, 0) still finds. Either
// way the deploy would stay owed for good, every later run taking it for
// "in progress". So the journal also keeps when that process started
// (since which boot), and only the same process, still running, counts.

// Self is this process as a pending deploy names it: its PID and its
// start (see Pending.Running).
func Self() (pid int, start string) {
	selfOnce.Do(func() { selfStart = procStart(os.Getpid()) })
	return os.Getpid(), selfStart
}

var (
	selfOnce  sync.Once
	selfStart string
)

// Running reports whether the process that journalled p still runs: the
// same PID, started at the same moment of the same boot, and not a
// zombie. An entry journalled by a release that kept no start is
// trusted on its PID, unless that process is a zombie.
func (p *Pending) Running() bool {
	if p == nil || p.PID <= 0 {
		return false
	}
	now := procStart(p.PID)
	if now == "" {
		return false // gone, or a zombie
	}
	return p.Start == "" || p.Start == now
}

// procStart is process pid's start, "<boot id>/<clock ticks since
// boot>" from /proc (proc(5), /proc/pid/stat field 22), or "" when the
// process does not exist or is a zombie (or dead, state X).
func procStart(pid int) string {
	data, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return ""
	}
	// The command name (field 2) is in parentheses and may hold spaces
	// or parentheses itself: the fields that follow start after the last
	// ')'.
	s := string(data)
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return ""
	}
	f := strings.Fields(s[i+1:])
	if len(f) < 20 || f[0] == "Z" || f[0] == "X" {
		return ""
	}
	boot, _ := os.ReadFile("/proc/sys/kernel/random/boot_id")
	return strings.TrimSpace(string(boot)) + "/" + f[19]
}
