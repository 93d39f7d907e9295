// Package testenv starts the real servers lbcert's end-to-end tests and
// demo run against: Pebble (Let's Encrypt's test CA) and step-ca
// (smallstep's private CA), each with pebble-challtestsrv answering every
// DNS name with 127.0.0.1, and nginx with a config of its own on
// loopback ports.
//
// Everything listens on 127.0.0.1 only, lives in a caller-given temporary
// directory and is stopped by Stop. Nothing here skips: a missing binary
// is an error that says how to install it.
package testenv

import (
	"bytes"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// ModuleRoot finds the lbcert module root from the working directory, so
// tests in any package and the demo find testdata/ and the go.mod tools.
func ModuleRoot() (string, error) {
	out, err := exec.Command("go", "env", "GOMOD").Output()
	if err != nil {
		return "", fmt.Errorf("go env GOMOD: %v (is Go on PATH?)", err)
	}
	mod := strings.TrimSpace(string(out))
	if mod == "" || mod == os.DevNull {
		return "", errors.New("not inside the lbcert module")
	}
	return filepath.Dir(mod), nil
}

var toolMu sync.Mutex
var toolPaths = map[string]string{}

// Tool returns the path of a binary from go.mod's tool directives (pebble,
// pebble-challtestsrv), building it into Go's cache on first use. The
// version is pinned by go.mod, so every machine tests the same Pebble.
func Tool(name string) (string, error) {
	toolMu.Lock()
	defer toolMu.Unlock()
	if p, ok := toolPaths[name]; ok {
		return p, nil
	}
	root, err := ModuleRoot()
	if err != nil {
		return "", err
	}
	cmd := exec.Command("go", "tool", "-n", name)
	cmd.Dir = root
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return "", fmt.Errorf("go tool -n %s: %v: %s", name, err, strings.TrimSpace(stderr.String()))
	}
	p := strings.TrimSpace(string(out))
	toolPaths[name] = p
	return p, nil
}

// Ports handed out by FreePort come from below Linux's ephemeral range
// (32768-60999), so the kernel never gives one of them to an outgoing
// connection between FreePort and the server's bind, and each is handed
// out once per process, so two tests never get the same one. Test
// binaries run side by side (go test ./... runs several packages at
// once, make torture two shards) start at different offsets (by PID),
// and each port is claimed machine-wide for the life of the process
// that got it (an flock on a file under portClaims): a test that
// leaves its port free between runs of the binary (a standalone
// listener started per run) must not find another process's server
// on it.
const portLow, portHigh = 20000, 32000

// portClaims holds one lock file per port claimed by a running test
// process; a claim ends with its process, however it ends.
var portClaims = filepath.Join(os.TempDir(), "lbcert-test-ports")

// claimPort claims port p for this process's life, or reports that a
// live process holds it.
func claimPort(p int) bool {
	if err := os.MkdirAll(portClaims, 0o777); err != nil {
		return true // no claims on this machine: bind alone decides
	}
	f, err := os.OpenFile(filepath.Join(portClaims, strconv.Itoa(p)), os.O_RDWR|os.O_CREATE, 0o666)
	if err != nil {
		return true
	}
	if syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB) != nil {
		f.Close()
		return false
	}
	claimed = append(claimed, f) // held open: the claim lasts as long as the process
	return true
}

var claimed []*os.File

var portMu sync.Mutex
var portNext int
var portsGiven = map[int]bool{}

// FreePort returns a loopback TCP port that is free and that no other
// caller in this process has been given.
func FreePort() (int, error) {
	portMu.Lock()
	defer portMu.Unlock()
	if portNext == 0 {
		portNext = portLow + (os.Getpid()*577)%(portHigh-portLow)
	}
	for range portHigh - portLow {
		p := portNext
		portNext++
		if portNext >= portHigh {
			portNext = portLow
		}
		if portsGiven[p] || !claimPort(p) {
			continue
		}
		ln, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", p))
		if err != nil {
			continue
		}
		ln.Close()
		portsGiven[p] = true
		return p, nil
	}
	return 0, errors.New("no free loopback port in 20000-32000")
}

// waitTCP waits until addr accepts connections, or the process exits.
func waitTCP(addr string, timeout time.Duration, done <-chan struct{}, what string, logPath string) error {
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		select {
		case <-done:
			return fmt.Errorf("%s exited during start-up; log:\n%s", what, tail(logPath))
		default:
		}
		c, err := net.DialTimeout("tcp", addr, 200*time.Millisecond)
		if err == nil {
			c.Close()
			return nil
		}
		time.Sleep(50 * time.Millisecond)
	}
	return fmt.Errorf("%s did not listen on %s within %s; log:\n%s", what, addr, timeout, tail(logPath))
}

func tail(path string) string {
	data, _ := os.ReadFile(path)
	if len(data) > 4000 {
		data = data[len(data)-4000:]
	}
	return string(data)
}

// proc is a started child process with its log file.
type proc struct {
	cmd  *exec.Cmd
	done chan struct{}
	log  string
}

func start(logPath string, env []string, name string, args ...string) (*proc, error) {
	lf, err := os.Create(logPath)
	if err != nil {
		return nil, err
	}
	cmd := exec.Command(name, args...)
	cmd.Stdout, cmd.Stderr = lf, lf
	cmd.Env = append(os.Environ(), env...)
	if err := cmd.Start(); err != nil {
		lf.Close()
		return nil, fmt.Errorf("start %s: %v", name, err)
	}
	p := &proc{cmd: cmd, done: make(chan struct{}), log: logPath}
	go func() { cmd.Wait(); lf.Close(); close(p.done) }()
	return p, nil
}

// fullLog is all the process has logged so far.
func (p *proc) fullLog() string {
	data, _ := os.ReadFile(p.log)
	return string(data)
}

// quitDump sends SIGQUIT, on which a Go program prints every
// goroutine's stack and exits, and returns what it printed.
func (p *proc) quitDump() string {
	before := len(p.fullLog())
	p.cmd.Process.Signal(syscall.SIGQUIT)
	select {
	case <-p.done:
	case <-time.After(5 * time.Second):
	}
	return p.fullLog()[before:]
}

func (p *proc) stop() {
	if p == nil {
		return
	}
	select {
	case <-p.done:
		return
	default:
	}
	p.cmd.Process.Signal(os.Interrupt)
	select {
	case <-p.done:
	case <-time.After(5 * time.Second):
		p.cmd.Process.Kill()
		<-p.done
	}
}
