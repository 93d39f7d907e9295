package testenv

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"time"
)

// HAProxyBin finds haproxy, or says how to install it.
func HAProxyBin() (string, error) {
	for _, p := range []string{"haproxy", "/usr/sbin/haproxy"} {
		if path, err := exec.LookPath(p); err == nil {
			return path, nil
		}
	}
	return "", fmt.Errorf("haproxy not found: run 'make deps' (apt-get install haproxy)")
}

// HAProxy is a running HAProxy in master-worker mode (-W), in the
// foreground, with its own config and runtime socket.
type HAProxy struct {
	Bin     string
	Conf    string
	PIDFile string
	proc    *proc
}

// StartHAProxy starts HAProxy on conf and waits for waitAddr.
func StartHAProxy(dir, conf, waitAddr string) (*HAProxy, error) {
	bin, err := HAProxyBin()
	if err != nil {
		return nil, err
	}
	h := &HAProxy{Bin: bin, Conf: conf, PIDFile: filepath.Join(dir, "haproxy.pid")}
	h.proc, err = start(filepath.Join(dir, "haproxy.log"), nil, bin, "-W", "-db", "-f", conf, "-p", h.PIDFile)
	if err != nil {
		return nil, err
	}
	if err := waitTCP(waitAddr, 10*time.Second, h.proc.done, "haproxy", h.proc.log); err != nil {
		h.Stop()
		return nil, err
	}
	return h, nil
}

// Stop stops HAProxy.
func (h *HAProxy) Stop() {
	if h != nil {
		h.proc.stop()
	}
}

// MasterPID is the master process, which survives reloads.
func (h *HAProxy) MasterPID() int { return h.proc.cmd.Process.Pid }

// WorkerPIDs lists the master's children: a reload replaces them, a
// runtime API update does not.
func (h *HAProxy) WorkerPIDs() []int {
	data, _ := os.ReadFile(fmt.Sprintf("/proc/%d/task/%d/children", h.MasterPID(), h.MasterPID()))
	var out []int
	for _, f := range strings.Fields(string(data)) {
		if n, err := strconv.Atoi(f); err == nil {
			out = append(out, n)
		}
	}
	return out
}

// Log returns HAProxy's output so far.
func (h *HAProxy) Log() string { return tail(h.proc.log) }
