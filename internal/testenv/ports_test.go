package testenv

import (
	"bufio"
	"io"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"testing"
)

// A port another test process holds is never handed out here, even while
// nothing listens on it: two test binaries walking the same ports (make
// test runs several packages at once, make torture two shards) once gave
// a test's standalone port, free between its runs, to the other's server.
func TestPortClaimsAreMachineWide(t *testing.T) {
	if os.Getenv("LBCERT_TEST_PORT_CHILD") != "" {
		for range 20 {
			p, err := FreePort()
			if err != nil {
				t.Fatal(err)
			}
			os.Stdout.WriteString(strconv.Itoa(p) + "\n")
		}
		os.Stdout.WriteString("done\n")
		io.Copy(io.Discard, os.Stdin) // hold the claims until the parent is done
		return
	}
	child := exec.Command(os.Args[0], "-test.run=^TestPortClaimsAreMachineWide$")
	child.Env = append(os.Environ(), "LBCERT_TEST_PORT_CHILD=1")
	in, _ := child.StdinPipe()
	out, _ := child.StdoutPipe()
	if err := child.Start(); err != nil {
		t.Fatal(err)
	}
	defer child.Wait()
	defer in.Close()
	theirs := map[int]bool{}
	first := 0
	sc := bufio.NewScanner(out)
	for sc.Scan() && sc.Text() != "done" {
		p, err := strconv.Atoi(strings.TrimSpace(sc.Text()))
		if err != nil {
			continue // the test framework's own lines
		}
		if first == 0 {
			first = p
		}
		theirs[p] = true
	}
	if len(theirs) != 20 {
		t.Fatalf("the other process claimed %d ports, want 20", len(theirs))
	}
	// Walk the very ports the other process was given: it holds them,
	// though nothing listens on them.
	portMu.Lock()
	portNext = first
	portMu.Unlock()
	for range 20 {
		p, err := FreePort()
		if err != nil {
			t.Fatal(err)
		}
		if theirs[p] {
			t.Fatalf("port %d, which another running test process holds, was handed out again", p)
		}
	}
}
