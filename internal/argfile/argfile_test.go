package argfile

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// within runs f and fails the test if it has not returned after 5 s:
// every case here must answer at once, not block.
func within(t *testing.T, what string, f func() ([]byte, error)) ([]byte, error) {
	t.Helper()
	type result struct {
		b   []byte
		err error
	}
	done := make(chan result, 1)
	go func() { b, err := f(); done <- result{b, err} }()
	select {
	case r := <-done:
		return r.b, r.err
	case <-time.After(5 * time.Second):
		t.Fatalf("%s: still reading after 5 s", what)
		return nil, nil
	}
}

// A regular file is read; what is neither a file nor a pipe is refused
// at once with a message that does not name the path; a FIFO no one
// writes to is an error at once, not a hang nor an empty file.
func TestReadRefusesWithoutBlocking(t *testing.T) {
	dir := t.TempDir()
	file, fifo, sock := filepath.Join(dir, "bundle.pem"), filepath.Join(dir, "fifo"), filepath.Join(dir, "sock")
	os.WriteFile(file, []byte("PEM"), 0o644)
	if err := syscall.Mkfifo(fifo, 0o600); err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	if b, err := Read(file, Secret); err != nil || string(b) != "PEM" {
		t.Fatalf("a regular file: %q, %v", b, err)
	}
	// /dev/null is the usual empty file ("--config /dev/null").
	if b, err := Read("/dev/null", Secret); err != nil || len(b) != 0 {
		t.Fatalf("/dev/null: %q, %v", b, err)
	}
	cases := map[string]string{
		fifo:                        "a pipe with nothing written to it",
		dir:                         "a directory, not a file",
		sock:                        "not a regular file or a pipe",
		"/dev/zero":                 "not a regular file or a pipe",
		filepath.Join(dir, "gone"):  "no such file or directory",
		filepath.Join(file, "deep"): "not a directory",
	}
	for p, want := range cases {
		_, err := within(t, p, func() ([]byte, error) { return Read(p, Secret) })
		if err == nil || !strings.HasPrefix(err.Error(), want) || strings.Contains(err.Error(), dir) {
			t.Errorf("%s: %v, want %q without the path", p, err, want)
		}
	}
}

// pipePath is a path that opens the read end of a new pipe, as the
// shell's <(...) gives one, and its write end.
func pipePath(t *testing.T) (string, *os.File) {
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { r.Close(); w.Close() })
	return fmt.Sprintf("/proc/self/fd/%d", r.Fd()), w
}

// A pipe is read to its end, its writer writing after the read began;
// one whose writer stalls fails after Idle, whatever it wrote before.
func TestReadAPipe(t *testing.T) {
	p, w := pipePath(t)
	go func() {
		time.Sleep(100 * time.Millisecond)
		io.WriteString(w, "s3cret\n")
		w.Close()
	}()
	b, err := within(t, "a pipe written to", func() ([]byte, error) { return Read(p, Secret) })
	if err != nil || string(b) != "s3cret\n" {
		t.Fatalf("a pipe written to: %q, %v", b, err)
	}

	defer func(old time.Duration) { Idle = old }(Idle)
	Idle = 200 * time.Millisecond
	p, w = pipePath(t)
	io.WriteString(w, "half")
	start := time.Now()
	_, err = within(t, "a stalled pipe", func() ([]byte, error) { return Read(p, Secret) })
	if err == nil || !strings.Contains(err.Error(), "nothing more written to it for 200ms") {
		t.Fatalf("a stalled pipe: %v", err)
	}
	if d := time.Since(start); d < Idle {
		t.Fatalf("gave up after %s, before Idle", d)
	}
}

// More than the limit is an error, not the first limit bytes.
func TestReadOverTheLimit(t *testing.T) {
	file := filepath.Join(t.TempDir(), "big")
	os.WriteFile(file, make([]byte, 2<<10+1), 0o600)
	if _, err := Read(file, 2<<10); err == nil || !strings.Contains(err.Error(), "larger than 2 KiB") {
		t.Fatalf("%v", err)
	}
	if b, err := Read(file, 4<<10); err != nil || len(b) != 2<<10+1 {
		t.Fatalf("%d bytes, %v", len(b), err)
	}
	if !errors.Is(func() error { _, err := Open("/dev/zero"); return err }(), ErrNotFile) {
		t.Fatal("a device was opened")
	}
}

// A pipe is read once; a second Read of its path (settings checked, then
// used) gives what the first read, where the pipe would now read empty.
// A regular file is read again.
func TestReadAPipeTwice(t *testing.T) {
	p, w := pipePath(t)
	go func() { io.WriteString(w, "bundle"); w.Close() }()
	for i := range 2 {
		b, err := within(t, "a pipe", func() ([]byte, error) { return Read(p, Secret) })
		if err != nil || string(b) != "bundle" {
			t.Fatalf("read %d: %q, %v", i+1, b, err)
		}
	}
	file := filepath.Join(t.TempDir(), "f")
	os.WriteFile(file, []byte("one"), 0o600)
	Read(file, Secret)
	os.WriteFile(file, []byte("two"), 0o600)
	if b, _ := Read(file, Secret); string(b) != "two" {
		t.Fatalf("a regular file was not read again: %q", b)
	}
}

// A read waiting on a stalled pipe gives up as soon as StopOn's context
// is done, not Idle later.
func TestReadAPipeStops(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	StopOn(ctx)
	defer StopOn(context.Background())
	p, w := pipePath(t)
	io.WriteString(w, "half")
	time.AfterFunc(200*time.Millisecond, cancel)
	start := time.Now()
	_, err := within(t, "a stalled pipe, stopped", func() ([]byte, error) { return Read(p, Secret) })
	if err == nil || !strings.Contains(err.Error(), "interrupted") || time.Since(start) > 3*time.Second {
		t.Fatalf("after %s: %v", time.Since(start), err)
	}
}
