package store

import (
	"context"
	"os"
	"path/filepath"
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
