package store

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/lbcert/lbcert/internal/hint"
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

// Lock is an exclusive flock(2) on the state directory. The kernel drops it
// when the process dies, even by kill -9, so a crash never leaves a stale
// lock that an operator has to clear by hand.
type Lock struct {
	f *os.File
	// made lists the directories taking the lock created (the state
	// directory, then its new parents): a run that fails before it
	// writes anything (a CA it cannot reach or does not trust) removes
	// them again, leaving no state directory created for nothing.
	made []string
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
	for {
		l, err := s.lockOnce(ctx, wait)
		if err != errRemoved {
			return l, err
		}
	}
}

// errRemoved: the directory locked was removed before the lock was
// taken (by a run that had created it for nothing); lock again.
var errRemoved = errors.New("state directory removed while waiting for its lock")

// missing lists dir and those of its parents that do not exist, the
// deepest first.
func missing(dir string) []string {
	var out []string
	for d := filepath.Clean(dir); ; d = filepath.Dir(d) {
		if _, err := os.Lstat(d); !errors.Is(err, fs.ErrNotExist) || d == filepath.Dir(d) {
			return out
		}
		out = append(out, d)
	}
}

func (s *Store) lockOnce(ctx context.Context, wait bool) (*Lock, error) {
	made := missing(s.Dir)
	if err := os.MkdirAll(s.Dir, 0o700); err != nil {
		return nil, err
	}
	if err := s.CheckDir(); err != nil {
		return nil, err
	}
	// The flock is on the state directory itself: deleting lbcert.lock
	// while a run holds it must not let a second writer in, and a
	// directory cannot be swapped out from under its open descriptor.
	// lbcert.lock only carries the holder's PID for the message.
	dir, err := os.OpenFile(s.Dir, os.O_RDONLY|syscall.O_DIRECTORY|syscall.O_NOFOLLOW, 0)
	if err != nil {
		return nil, fmt.Errorf("lock %s: %w", s.Dir, err)
	}
	path := filepath.Join(s.Dir, LockFile)
	for {
		err = syscall.Flock(int(dir.Fd()), syscall.LOCK_EX|syscall.LOCK_NB)
		if err == nil {
			break
		}
		if !errors.Is(err, syscall.EWOULDBLOCK) {
			dir.Close()
			return nil, fmt.Errorf("lock %s: %w", s.Dir, err)
		}
		if !wait {
			dir.Close()
			return nil, &LockedError{Path: s.Dir, PID: readPIDFile(path)}
		}
		select {
		case <-ctx.Done():
			dir.Close()
			return nil, &LockedError{Path: s.Dir, PID: readPIDFile(path)}
		case <-time.After(200 * time.Millisecond):
		}
	}
	if !sameFile(dir, s.Dir) {
		dir.Close()
		return nil, errRemoved
	}
	// O_NOFOLLOW: a link planted at lbcert.lock (say to a root-owned
	// file) is refused, never truncated.
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|syscall.O_NOFOLLOW, 0o600)
	if err != nil {
		dir.Close()
		if errors.Is(err, syscall.ELOOP) {
			return nil, fmt.Errorf("%s is a symbolic link: remove it; lbcert never writes through links in its state directory", path)
		}
		return nil, fmt.Errorf("lock %s: %w", path, err)
	}
	if err := f.Truncate(0); err == nil {
		f.WriteAt([]byte(strconv.Itoa(os.Getpid())+"\n"), 0)
	}
	f.Close()
	// What this process read of any record before it held the lock
	// (a pass that waited for it read the failed names' statuses
	// first) may have been written over by the holder meanwhile: the
	// records kept for the plan are void (Heads.keepRecord).
	recordWrites.Add(1)
	return &Lock{f: dir, made: made}, nil
}

// sameFile reports whether path still names the directory open as f.
func sameFile(f *os.File, path string) bool {
	a, err1 := f.Stat()
	b, err2 := os.Lstat(path)
	return err1 == nil && err2 == nil && os.SameFile(a, b)
}

// Held reports, writing nothing, whether another process holds the
// state directory's lock: a *LockedError, or nil (also when there is no
// directory yet). A command that finds a port busy asks it, so that a
// second run of the same command says "locked", not "port in use".
func (s *Store) Held() error {
	dir, err := os.OpenFile(s.Dir, os.O_RDONLY|syscall.O_DIRECTORY|syscall.O_NOFOLLOW, 0)
	if err != nil {
		return nil
	}
	defer dir.Close()
	if err := syscall.Flock(int(dir.Fd()), syscall.LOCK_SH|syscall.LOCK_NB); err != nil {
		if errors.Is(err, syscall.EWOULDBLOCK) {
			return &LockedError{Path: s.Dir, PID: readPIDFile(filepath.Join(s.Dir, LockFile))}
		}
		return nil
	}
	syscall.Flock(int(dir.Fd()), syscall.LOCK_UN)
	return nil
}

func readPIDFile(path string) int {
	f, err := os.OpenFile(path, os.O_RDONLY|syscall.O_NOFOLLOW, 0)
	if err != nil {
		return 0
	}
	defer f.Close()
	return readPID(f)
}

func readPID(f *os.File) int {
	buf := make([]byte, 32)
	n, _ := f.ReadAt(buf, 0)
	pid, _ := strconv.Atoi(strings.TrimSpace(string(buf[:n])))
	return pid
}

// Unlock releases the lock. It is safe to call on nil. A state
// directory the lock created and nothing else wrote in is removed first,
// with the parents the lock created, while the lock is still held: a run
// waiting for it then finds the directory gone (sameFile) and makes it
// anew, never writing into a removed one.
func (l *Lock) Unlock() {
	if l == nil || l.f == nil {
		return
	}
	if len(l.made) > 0 {
		if names, err := l.f.Readdirnames(-1); err == nil && len(names) == 1 && names[0] == LockFile &&
			os.Remove(filepath.Join(l.made[0], LockFile)) == nil {
			for _, d := range l.made {
				if os.Remove(d) != nil {
					break
				}
			}
		}
	}
	syscall.Flock(int(l.f.Fd()), syscall.LOCK_UN)
	l.f.Close()
	l.f = nil
}

// WriteLockFile is the short lock of fleet mode: the agent and the
// commands take it around each local write and deploy, so a long batch
// (which holds LockFile's lock for its whole run) never keeps the agent
// from installing what the fleet published.
const WriteLockFile = "lbcert.write.lock"

// WriteLock takes the short write lock, waiting until ctx is done.
func (s *Store) WriteLock(ctx context.Context) (*Lock, error) {
	if err := os.MkdirAll(s.Dir, 0o700); err != nil {
		return nil, err
	}
	path := filepath.Join(s.Dir, WriteLockFile)
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|syscall.O_NOFOLLOW, 0o600)
	if err != nil {
		return nil, fmt.Errorf("lock %s: %w", path, err)
	}
	for {
		err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB)
		if err == nil {
			return &Lock{f: f}, nil
		}
		if !errors.Is(err, syscall.EWOULDBLOCK) {
			f.Close()
			return nil, fmt.Errorf("lock %s: %w", path, err)
		}
		select {
		case <-ctx.Done():
			f.Close()
			return nil, &LockedError{Path: path}
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// Take takes the state directory's lock for a command, waiting up to
// wait for it (not at all when wait is 0). Another holder is a
// *LockedError whose hint says what to do; a directory lbcert cannot use
// says so (DirError).
func (s *Store) Take(ctx context.Context, wait time.Duration) (*Lock, error) {
	if wait <= 0 {
		l, err := s.TryLock()
		if errors.Is(err, ErrLocked) {
			return nil, hint.Wrap(err, "wait for the other run to finish, or pass --wait-lock; the lock is released when it exits, even if it is killed")
		}
		return l, DirError(err)
	}
	wctx, cancel := context.WithTimeout(ctx, wait)
	defer cancel()
	l, err := s.WaitLock(wctx)
	if errors.Is(err, ErrLocked) {
		return nil, fmt.Errorf("%w; waited %s", err, wait)
	}
	return l, DirError(err)
}

// DirError explains a state directory lbcert cannot use; nil stays nil.
func DirError(err error) error {
	if errors.Is(err, fs.ErrPermission) {
		return hint.Wrap(err, "run lbcert as root (the default --dir /etc/lbcert is root's), or pass --dir (or set LBCERT_DIR) to a directory you can write")
	}
	return err
}
