package deploy

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os/exec"
	"strings"
	"sync"
	"syscall"
	"time"
	"unicode/utf8"

	"github.com/lbcert/lbcert/internal/secret"
)

// maxOutput caps what a command's output contributes to an error message.
const maxOutput = 4000

// keepOutput is how much of a command's output is kept while it runs:
// the last 64 KiB. A hook that prints 100 MB must not take lbcert's
// memory with it.
const keepOutput = 64 << 10

// waitDelay is how long a command's pipes stay open after it exits. A
// hook that starts "sleep 30 &" has exited: it is judged by its own exit,
// not by the children that inherited its output.
const waitDelay = 2 * time.Second

// tail keeps the last keepOutput bytes written to it.
type tail struct {
	mu  sync.Mutex
	buf []byte
	cut bool
}

func (t *tail) Write(p []byte) (int, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	n := len(p)
	if len(p) >= keepOutput {
		t.buf, t.cut = append(t.buf[:0], p[len(p)-keepOutput:]...), true
		return n, nil
	}
	if over := len(t.buf) + len(p) - keepOutput; over > 0 {
		t.buf, t.cut = append(t.buf[:0], t.buf[over:]...), true
	}
	t.buf = append(t.buf, p...)
	return n, nil
}

func (t *tail) String() string {
	t.mu.Lock()
	defer t.mu.Unlock()
	return string(t.buf)
}

// run runs argv (or, when shell is set, "/bin/sh -c shell") with a
// timeout, in its own process group so that a timeout kills whatever it
// started too, and returns its combined output.
func run(ctx context.Context, timeout time.Duration, env []string, shell string, argv ...string) (string, error) {
	if shell != "" {
		argv = []string{"/bin/sh", "-c", shell}
	}
	out := &tail{}
	err := runTo(ctx, timeout, env, argv, out, out)
	return trimOutput(secret.Scrub(out.String())), err
}

// runLines runs argv as run does, handing each line of its standard
// output to onLine as it comes instead of keeping it, and returns the
// end of its standard error.
func runLines(ctx context.Context, timeout time.Duration, onLine func(string), argv ...string) (string, error) {
	errOut := &tail{}
	lines := &lineWriter{fn: onLine}
	err := runTo(ctx, timeout, nil, argv, lines, errOut)
	lines.flush()
	return trimOutput(secret.Scrub(errOut.String())), err
}

func runTo(ctx context.Context, timeout time.Duration, env, argv []string, stdout, stderr io.Writer) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Stdout, cmd.Stderr = stdout, stderr
	// Everything but lbcert's own secrets: certbot's hooks expect the
	// environment they were started from.
	cmd.Env = secret.Env(env...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	cmd.WaitDelay = waitDelay
	if err := cmd.Start(); err != nil {
		return err
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	var err error
	select {
	case err = <-done:
		if errors.Is(err, exec.ErrWaitDelay) {
			err = nil // it exited 0; a child it left behind kept the pipe
		}
	case <-ctx.Done():
		syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
		<-done
		if errors.Is(ctx.Err(), context.DeadlineExceeded) {
			err = fmt.Errorf("timed out after %s and was killed", timeout)
		} else {
			err = fmt.Errorf("interrupted")
		}
	}
	return err
}

// lineWriter hands each complete line written to it to fn.
type lineWriter struct {
	fn   func(string)
	part []byte
}

func (w *lineWriter) Write(p []byte) (int, error) {
	n := len(p)
	for {
		i := bytes.IndexByte(p, '\n')
		if i < 0 {
			w.part = append(w.part, p...)
			return n, nil
		}
		w.fn(string(append(w.part, p[:i]...)))
		w.part, p = w.part[:0], p[i+1:]
	}
}

func (w *lineWriter) flush() {
	if len(w.part) > 0 {
		w.fn(string(w.part))
		w.part = nil
	}
}

func trimOutput(s string) string {
	s = strings.TrimSpace(s)
	if len(s) > maxOutput {
		i := len(s) - maxOutput
		// Start at a character, not in the middle of one (at most three
		// bytes on; output that is not UTF-8 is cut where it is).
		for k := 0; k < utf8.UTFMax-1 && i < len(s) && !utf8.RuneStart(s[i]); k++ {
			i++
		}
		s = "..." + s[i:]
	}
	return s
}

// cmdError makes one line of a failed command: what it was, how it ended,
// and the last lines of what it printed.
func cmdError(what string, err error, output string) error {
	if output == "" {
		return fmt.Errorf("%s: %v", what, err)
	}
	return fmt.Errorf("%s: %v: %s", what, err, strings.Join(strings.Fields(output), " "))
}
