package store

import (
	"encoding/binary"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
)

// readSmall gives what os.ReadFile gives, files larger than its first
// buffer included, and the same kind of error for a missing file.
func TestReadSmall(t *testing.T) {
	dir := t.TempDir()
	for _, size := range []int{0, 1, 8191, 8192, 8193, 70000} {
		path := filepath.Join(dir, "f")
		want := []byte(strings.Repeat("x", size))
		os.WriteFile(path, want, 0o644)
		var got []byte
		if err := readSmall(path, func(b []byte) error { got = slices.Clone(b); return nil }); err != nil || string(got) != string(want) {
			t.Fatalf("size %d: got %d bytes, %v", size, len(got), err)
		}
	}
	err := readSmall(filepath.Join(dir, "missing"), func([]byte) error { return nil })
	var pe *os.PathError
	if !errors.Is(err, fs.ErrNotExist) || !errors.As(err, &pe) || !strings.Contains(err.Error(), "open "+filepath.Join(dir, "missing")) {
		t.Fatalf("missing file: %v", err)
	}
	if err := readSmall(dir, func([]byte) error { return nil }); !errors.Is(err, syscall.EISDIR) {
		t.Fatalf("a directory: %v", err)
	}
}

// readDirs lists subdirectories only, whatever else the directory holds.
func TestReadDirs(t *testing.T) {
	dir := t.TempDir()
	for _, d := range []string{"1", "2", ".tmp-3", "10"} {
		os.Mkdir(filepath.Join(dir, d), 0o700)
	}
	os.WriteFile(filepath.Join(dir, "4"), nil, 0o644)
	os.Symlink("1", filepath.Join(dir, "5"))
	got, err := readDirs(dir)
	slices.Sort(got)
	if err != nil || strings.Join(got, " ") != ".tmp-3 1 10 2" {
		t.Fatalf("got %q, %v", got, err)
	}
	if _, err := readDirs(filepath.Join(dir, "nope")); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("missing directory: %v", err)
	}
}

// A file system that does not say an entry's type (DT_UNKNOWN) is asked
// with lstat.
func TestAppendDirsUnknownType(t *testing.T) {
	dir := t.TempDir()
	os.Mkdir(filepath.Join(dir, "d"), 0o700)
	os.WriteFile(filepath.Join(dir, "f"), nil, 0o644)
	var b []byte
	for _, e := range []struct {
		name string
		typ  byte
	}{{".", syscall.DT_DIR}, {"..", syscall.DT_DIR}, {"d", syscall.DT_UNKNOWN}, {"f", syscall.DT_UNKNOWN}, {"x", syscall.DT_DIR}, {"r", syscall.DT_REG}} {
		rec := make([]byte, 24) // 19 bytes of header and name, padded to 8
		binary.NativeEndian.PutUint16(rec[16:], uint16(len(rec)))
		rec[18] = e.typ
		copy(rec[19:], e.name)
		b = append(b, rec...)
	}
	if got := appendNames(nil, dir, b, true); strings.Join(got, " ") != "d x" {
		t.Fatalf("got %q, want d (a directory by lstat) and x (by its type)", got)
	}
	if got := appendNames(nil, dir, b, false); strings.Join(got, " ") != "d f x r" {
		t.Fatalf("every entry: got %q, want d f x r", got)
	}
}

// DeployDigest keeps its last answer: asked of two settings in turn, it
// still tells them apart, and gives each the digest it gave before.
func TestDeployDigestMemo(t *testing.T) {
	a, b := Deploy{Target: "nginx"}, Deploy{Target: "haproxy", HAProxyCerts: "/etc/haproxy/certs"}
	da, db := DeployDigest(a), DeployDigest(b)
	if da == db || DeployDigest(a) != da || DeployDigest(b) != db || DeployDigest(Deploy{}) == da {
		t.Fatalf("digests %s %s: not stable or not distinct", da, db)
	}
}
