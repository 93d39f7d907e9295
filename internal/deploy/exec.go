package deploy

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"time"
)

// maxOutput caps what a command's output contributes to an error message.
const maxOutput = 4000

// run runs argv (or, when shell is set, "/bin/sh -c shell") with a
// timeout, in its own process group so that a timeout kills whatever it
// started too, and returns its combined output.
func run(ctx context.Context, timeout time.Duration, env []string, shell string, argv ...string) (string, error) {
	if shell != "" {
		argv = []string{"/bin/sh", "-c", shell}
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	cmd := exec.Command(argv[0], argv[1:]...)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	cmd.Env = append(os.Environ(), env...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		return "", err
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	var err error
	select {
	case err = <-done:
	case <-ctx.Done():
		syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
		<-done
		if errors.Is(ctx.Err(), context.DeadlineExceeded) {
			err = fmt.Errorf("timed out after %s and was killed", timeout)
		} else {
			err = fmt.Errorf("interrupted")
		}
	}
	return trimOutput(out.String()), err
}

func trimOutput(s string) string {
	s = strings.TrimSpace(s)
	if len(s) > maxOutput {
		s = "..." + s[len(s)-maxOutput:]
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
