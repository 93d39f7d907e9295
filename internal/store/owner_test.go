package store

import (
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"
)

// A pending deploy is "in progress" only while the very process that
// journalled it runs: not another process that took its PID, not the
// zombie a killed run leaves under a parent that does not reap it.
func TestPendingRunning(t *testing.T) {
	pid, start := Self()
	if start == "" {
		t.Fatal("Self has no start: /proc unreadable?")
	}
	if !(&Pending{PID: pid, Start: start}).Running() {
		t.Error("this process, journalled with its own start, is not running")
	}
	if !(&Pending{PID: pid}).Running() {
		t.Error("an entry of an earlier release (PID only) of a live process is not running")
	}
	other := exec.Command("sleep", "600")
	if err := other.Start(); err != nil {
		t.Fatal(err)
	}
	defer other.Wait()
	// The PID reused: another live process holds it, started later than
	// the run that journalled it (here at the boot's first tick: this
	// test and the sleep may start within one tick).
	killed := start[:strings.LastIndexByte(start, '/')] + "/1"
	if (&Pending{PID: other.Process.Pid, Start: killed}).Running() {
		t.Error("a live process that took the journalled PID counts as the journalling one")
	}
	theirs := procStart(other.Process.Pid)
	if !(&Pending{PID: other.Process.Pid, Start: theirs}).Running() {
		t.Errorf("a live process with its own start %q is not running", theirs)
	}
	// Killed and not reaped: a zombie, which kill(pid, 0) still finds.
	other.Process.Signal(syscall.SIGKILL)
	deadline := time.Now().Add(30 * time.Second)
	for procStart(other.Process.Pid) != "" && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
	}
	if syscall.Kill(other.Process.Pid, 0) != nil {
		t.Fatal("the killed child was reaped; the test needs its zombie")
	}
	for _, p := range []*Pending{{PID: other.Process.Pid, Start: theirs}, {PID: other.Process.Pid}} {
		if p.Running() {
			t.Errorf("a zombie counts as running: %+v", p)
		}
	}
	if (*Pending)(nil).Running() || (&Pending{}).Running() {
		t.Error("no entry, or one nobody holds, counts as running")
	}
}
