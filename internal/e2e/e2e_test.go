// Package e2e runs the built lbcert binary against real servers: Pebble
// and pebble-challtestsrv (from go.mod's tool directives), step-ca
// (built from the module proxy, internal/testenv/stepca), and nginx from
// Debian's package. Nothing is mocked and nothing skips: a missing server
// fails the test with the command that installs it.
package e2e

import (
	"bytes"
	"context"
	"crypto/x509"
	"encoding/pem"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/lbcert/lbcert/internal/testenv"
)

// lbcertBin is built once per test binary run.
var lbcertBin string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "lbcert-e2e-bin-")
	if err != nil {
		panic(err)
	}
	lbcertBin = filepath.Join(dir, "lbcert")
	root, err := testenv.ModuleRoot()
	if err != nil {
		panic(err)
	}
	build := exec.Command("go", "build", "-o", lbcertBin, "./cmd/lbcert")
	build.Dir = root
	if out, err := build.CombinedOutput(); err != nil {
		os.Stderr.Write(out)
		panic("build lbcert: " + err.Error())
	}
	// step-ca is built here, once per machine (a few minutes on two
	// cores the first time), rather than by the first step-ca test while
	// the others run against deadlines.
	if _, err := testenv.BuildStepCA(); err != nil {
		panic(err)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// env is one test's CA (Pebble, or step-ca for newStepEnv) and state
// directory.
type env struct {
	t      *testing.T
	pebble *testenv.Pebble
	stepca *testenv.StepCA // set instead of pebble by newStepEnv
	dir    string          // lbcert --dir
	work   string
	// server, when set, is the directory lbcert is given instead of
	// Pebble's own (a RateFront in front of it).
	server string
}

func newEnv(t *testing.T, o testenv.PebbleOptions) *env {
	t.Helper()
	work := t.TempDir()
	o.Dir = work
	p, err := testenv.StartPebble(o)
	if err != nil {
		t.Fatalf("start Pebble: %v", err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("pebble log:\n%s", p.Log())
		}
		p.Stop()
	})
	return &env{t: t, pebble: p, dir: filepath.Join(work, "state"), work: work}
}

// newStepEnv is newEnv with a real step-ca instead of Pebble.
func newStepEnv(t *testing.T, o testenv.StepCAOptions) *env {
	t.Helper()
	work := t.TempDir()
	o.Dir = work
	s, err := testenv.StartStepCA(o)
	if err != nil {
		t.Fatalf("start step-ca: %v", err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("step-ca log:\n%s", s.Log())
		}
		s.Stop()
	})
	return &env{t: t, stepca: s, dir: filepath.Join(work, "state"), work: work}
}

// caServer is the env's CA directory and the root lbcert must trust.
func (e *env) caServer() (server, bundle string) {
	if e.stepca != nil {
		return e.stepca.DirectoryURL, e.stepca.CABundle
	}
	return e.pebble.DirectoryURL, e.pebble.CABundle
}

// caDump is the env's CA's goroutine dump, for a run that hung.
func (e *env) caDump() string {
	if e.stepca != nil {
		return e.stepca.Dump()
	}
	return e.pebble.Dump()
}

type result struct {
	stdout, stderr string
	code           int
}

// run runs lbcert with the env's server, CA bundle and state directory.
func (e *env) run(args ...string) result {
	e.t.Helper()
	return e.runEnv(nil, args...)
}

// runDeadline bounds every lbcert run of the suite. A run that passes
// it is stopped with SIGQUIT, so the Go runtime prints where each of its
// goroutines waits, and Pebble is asked for the same dump: a hang names
// its cause (lbcert, or Pebble's own deadlock) instead of a bare timeout.
const runDeadline = 3 * time.Minute

// command is lbcert with the env's server, CA bundle and state
// directory, under ctx; on cancel it gets SIGQUIT, then SIGKILL.
func (e *env) command(ctx context.Context, args ...string) *exec.Cmd {
	server, bundle := e.caServer()
	if e.server != "" {
		server = e.server
	}
	full := append([]string{"--server", server, "--ca-bundle", bundle, "--dir", e.dir}, args...)
	cmd := exec.CommandContext(ctx, lbcertBin, full...)
	cmd.Cancel = func() error { return cmd.Process.Signal(syscall.SIGQUIT) }
	cmd.WaitDelay = 10 * time.Second
	// Each run at lbcert's default concurrency, as an operator runs it:
	// the tests' Pebble has its own lock cycles cut (testenv/pebblefix.go).
	cmd.Env = append(os.Environ(), "LBCERT_CONFIG=")
	return cmd
}

// runEnv is run with extra environment variables.
func (e *env) runEnv(extra []string, args ...string) result {
	e.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), runDeadline)
	defer cancel()
	cmd := e.command(ctx, args...)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	cmd.Env = append(cmd.Env, extra...)
	err := cmd.Run()
	r := result{stdout: out.String(), stderr: errb.String()}
	if ctx.Err() != nil {
		e.t.Fatalf("lbcert %s: still running after %s; its goroutines:\n%s\nthe CA's goroutines:\n%s",
			strings.Join(args, " "), runDeadline, r.stderr, e.caDump())
	}
	if ee, ok := err.(*exec.ExitError); ok {
		r.code = ee.ExitCode()
	} else if err != nil {
		e.t.Fatalf("run lbcert: %v", err)
	}
	e.t.Logf("$ lbcert %s\n%s%s(exit %d)", strings.Join(args, " "), r.stdout, r.stderr, r.code)
	return r
}

func (e *env) mustRun(args ...string) result {
	e.t.Helper()
	r := e.run(args...)
	if r.code != 0 {
		e.t.Fatalf("lbcert %s: exit %d\n%s", strings.Join(args, " "), r.code, r.stderr)
	}
	return r
}

// leaf reads and parses live/<name>/cert.pem, and checks that it matches
// privkey.pem and that fullchain.pem is cert.pem followed by chain.pem.
func (e *env) leaf(name string) *x509.Certificate {
	e.t.Helper()
	live := filepath.Join(e.dir, "live", name)
	read := func(f string) []byte {
		b, err := os.ReadFile(filepath.Join(live, f))
		if err != nil {
			e.t.Fatal(err)
		}
		return b
	}
	certPEM, chain, full := read("cert.pem"), read("chain.pem"), read("fullchain.pem")
	if !bytes.Equal(full, append(append([]byte{}, certPEM...), chain...)) {
		e.t.Fatalf("%s: fullchain.pem is not cert.pem + chain.pem", name)
	}
	if len(chain) == 0 {
		e.t.Fatalf("%s: empty chain.pem", name)
	}
	b, _ := pem.Decode(certPEM)
	if b == nil {
		e.t.Fatalf("%s: cert.pem is not PEM", name)
	}
	c, err := x509.ParseCertificate(b.Bytes)
	if err != nil {
		e.t.Fatal(err)
	}
	if out, err := exec.Command("openssl", "x509", "-noout", "-pubkey", "-in", filepath.Join(live, "cert.pem")).Output(); err == nil {
		kout, err := exec.Command("openssl", "pkey", "-pubout", "-in", filepath.Join(live, "privkey.pem")).Output()
		if err != nil || !bytes.Equal(out, kout) {
			e.t.Fatalf("%s: privkey.pem does not match cert.pem", name)
		}
	}
	return c
}

// requests counts the ACME requests Pebble has logged so far.
func (e *env) requests() int {
	return strings.Count(e.pebble.FullLog(), "-> calling handler()")
}

// settledOrders is Pebble's order count once it has not changed for a
// second: after a kill -9, the victim's last request may still be in
// flight to Pebble.
func (e *env) settledOrders() int {
	n := e.pebble.Orders()
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); {
		time.Sleep(time.Second)
		m := e.pebble.Orders()
		if m == n {
			return n
		}
		n = m
	}
	return n
}
