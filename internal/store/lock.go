package store

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// ErrLocked is returned when another process holds the state directory.
var ErrLocked = errors.New("state directory is locked")

// LockedError says who holds the lock, when the holder wrote its PID.
type LockedError struct {
	Path string
	PID  int
}

func (e *LockedError) Error() string {
	if e.PID > 0 {
		return fmt.Sprintf("%s is locked by another lbcert process (pid %d)", e.Path, e.PID)
	}
	return fmt.Sprintf("%s is locked by another lbcert process", e.Path)
}

func (e *LockedError) Is(target error) bool { return target == ErrLocked }

// Lock is an exclusive flock(2) on <dir>/lbcert.lock. The kernel drops it
// when the process dies, even by kill -9, so a crash never leaves a stale
// lock that an operator has to clear by hand.
type Lock struct {
	f *os.File
}

// LockFile is the name of the lock file inside the state directory.
const LockFile = "lbcert.lock"

// TryLock takes the lock or fails at once with a *LockedError.
func (s *Store) TryLock() (*Lock, error) {
	return s.lock(context.Background(), false)
}

// WaitLock waits for the lock until ctx is done.
func (s *Store) WaitLock(ctx context.Context) (*Lock, error) {
	return s.lock(ctx, true)
}

func (s *Store) lock(ctx context.Context, wait bool) (*Lock, error) {
	if err := os.MkdirAll(s.Dir, 0o700); err != nil {
		return nil, err
	}
	path := filepath.Join(s.Dir, LockFile)
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, err
	}
	for {
		err = syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB)
		if err == nil {
			break
		}
		if !errors.Is(err, syscall.EWOULDBLOCK) {
			f.Close()
			return nil, fmt.Errorf("lock %s: %w", path, err)
		}
		if !wait {
			pid := readPID(f)
			f.Close()
			return nil, &LockedError{Path: s.Dir, PID: pid}
		}
		select {
		case <-ctx.Done():
			pid := readPID(f)
			f.Close()
			return nil, &LockedError{Path: s.Dir, PID: pid}
		case <-time.After(200 * time.Millisecond):
		}
	}
	// The PID is only for the message another process prints; the flock
	// is what excludes.
	if err := f.Truncate(0); err == nil {
		f.WriteAt([]byte(strconv.Itoa(os.Getpid())+"\n"), 0)
	}
	return &Lock{f: f}, nil
}

func readPID(f *os.File) int {
	buf := make([]byte, 32)
	n, _ := f.ReadAt(buf, 0)
	pid, _ := strconv.Atoi(strings.TrimSpace(string(buf[:n])))
	return pid
}

// Unlock releases the lock. It is safe to call on nil.
func (l *Lock) Unlock() {
	if l == nil || l.f == nil {
		return
	}
	syscall.Flock(int(l.f.Fd()), syscall.LOCK_UN)
	l.f.Close()
	l.f = nil
}
