package store

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// A state directory that taking the lock created, and that nothing was
// written in, is gone after Unlock, with the parents the lock made; one
// that held something before, or got something meanwhile, stays.
func TestLockRemovesADirectoryMadeForNothing(t *testing.T) {
	base := t.TempDir()
	dir := filepath.Join(base, "a", "b", "state")
	l, err := New(dir).TryLock()
	if err != nil {
		t.Fatal(err)
	}
	l.Unlock()
	if _, err := os.Lstat(filepath.Join(base, "a")); !os.IsNotExist(err) {
		t.Fatalf("the directories made for nothing are still there: %v", err)
	}

	l, err = New(dir).TryLock()
	if err != nil {
		t.Fatal(err)
	}
	if err := WriteFile(filepath.Join(dir, "ratelimit.json"), []byte("{}\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	l.Unlock()
	if _, err := os.Stat(filepath.Join(dir, "ratelimit.json")); err != nil {
		t.Fatalf("a directory something was written in was removed: %v", err)
	}

	// The directory existed before this lock: it stays, empty or not.
	os.Remove(filepath.Join(dir, "ratelimit.json"))
	os.Remove(filepath.Join(dir, LockFile))
	l, err = New(dir).TryLock()
	if err != nil {
		t.Fatal(err)
	}
	l.Unlock()
	if _, err := os.Stat(dir); err != nil {
		t.Fatalf("a directory that was there before the lock was removed: %v", err)
	}
}

// A run waiting for the lock of a directory its holder removes takes the
// lock of a new directory at the same path, and what it writes there
// stays: it never writes into the removed one.
func TestWaiterAfterTheDirectoryWasRemoved(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "state")
	holder, err := New(dir).TryLock()
	if err != nil {
		t.Fatal(err)
	}
	got := make(chan error, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		l, err := New(dir).WaitLock(ctx)
		if err == nil {
			err = WriteFile(filepath.Join(dir, "account.json"), []byte("{}\n"), 0o600)
			l.Unlock()
		}
		got <- err
	}()
	time.Sleep(300 * time.Millisecond) // the waiter holds the old directory open
	holder.Unlock()
	if err := <-got; err != nil {
		t.Fatalf("the waiter: %v", err)
	}
	if _, err := os.Stat(filepath.Join(dir, "account.json")); err != nil {
		t.Fatalf("what the waiter wrote is not in the state directory: %v", err)
	}
}

// TestDirWithDotDotCreatesNothingElse: a state directory named through a
// directory that does not exist ("x/a/../b") is x/b; taking the lock
// creates only x/b, and a run that wrote nothing leaves neither. A ".."
// after a directory that exists is left to the kernel (a symbolic link
// leaves by its target's parent).
func TestDirWithDotDotCreatesNothingElse(t *testing.T) {
	root, err := filepath.EvalSymlinks(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	os.MkdirAll(filepath.Join(root, "real", "inner"), 0o755)
	os.Symlink(filepath.Join(root, "real", "inner"), filepath.Join(root, "link"))
	os.Symlink(filepath.Join(root, "nowhere"), filepath.Join(root, "dangling"))
	os.WriteFile(filepath.Join(root, "file"), nil, 0o644)
	for _, tc := range []struct{ in, want string }{
		{root + "/x/a/../b", root + "/x/b"},
		{root + "/x/a/../../b/", root + "/b"},
		{root + "/./x//c", root + "/./x//c"},               // no "..": as given
		{root + "/link/../s", root + "/real/s"},            // the kernel's "..": the link's target's parent
		{root + "/link/../m/../b", root + "/real/b"},       // then a missing part
		{root + "/link/s/../t", root + "/real/inner/t"},    // a missing part under the link
		{root + "/dangling/../b", root + "/dangling/../b"}, // left for the kernel to refuse
		{root + "/file/a/../b", root + "/file/a/../b"},
		{root + "/real/" + strings.Repeat("A", 300) + "/../b", root + "/real/" + strings.Repeat("A", 300) + "/../b"}, // a name too long
	} {
		if got := New(tc.in).Dir; got != tc.want {
			t.Errorf("New(%q).Dir = %q, want %q", tc.in, got, tc.want)
		}
	}
	t.Chdir(root)
	for _, tc := range []struct{ in, want string }{
		{"a/../b", "b"},
		{"x/a/../../y", "y"},
		{"link/../s", filepath.Join(root, "real", "s")},
	} {
		if got := New(tc.in).Dir; got != tc.want {
			t.Errorf("New(%q).Dir = %q, want %q", tc.in, got, tc.want)
		}
	}

	s := New(filepath.Join(root, "x", "a", "..", "b"))
	l, err := s.TryLock()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(root, "x", "a")); err == nil {
		t.Fatal("x/a was created on the way to x/a/../b")
	}
	l.Unlock()
	if _, err := os.Stat(filepath.Join(root, "x")); err == nil {
		t.Fatal("a state directory made for nothing was left (x)")
	}
}

// TestForeignDirectoryNotTightened: a --dir that names a directory of
// other files (a typo: /etc for /etc/lbcert) is refused, not chmod'ed
// to 0700 under everyone else; an empty one, or a state directory, is
// tightened as before.
func TestForeignDirectoryNotTightened(t *testing.T) {
	root := t.TempDir()
	etc := filepath.Join(root, "etc")
	os.MkdirAll(etc, 0o755)
	os.WriteFile(filepath.Join(etc, "passwd"), nil, 0o644)
	os.Chmod(etc, 0o755)
	_, err := New(etc).TryLock()
	if err == nil || !strings.Contains(err.Error(), "holds files that are not lbcert's (passwd): refusing to tighten it to 0700") {
		t.Fatalf("a foreign directory: %v", err)
	}
	if fi, _ := os.Stat(etc); fi.Mode().Perm() != 0o755 {
		t.Fatalf("mode now %04o", fi.Mode().Perm())
	}
	if _, err := os.Stat(filepath.Join(etc, LockFile)); err == nil {
		t.Fatal("a lock file was left in it")
	}
	for _, name := range []string{"", "live"} {
		dir := filepath.Join(root, "ok"+name)
		os.MkdirAll(filepath.Join(dir, name), 0o755)
		os.Chmod(dir, 0o755)
		l, err := New(dir).TryLock()
		if err != nil {
			t.Fatalf("%s: %v", dir, err)
		}
		l.Unlock()
		if fi, _ := os.Stat(dir); fi.Mode().Perm() != 0o700 {
			t.Fatalf("%s: mode %04o, want 0700", dir, fi.Mode().Perm())
		}
	}
}
