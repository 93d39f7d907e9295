package store

import (
	"errors"
	"fmt"
	"os"
	"sync"
	"syscall"

	"golang.org/x/sys/unix"
)

// Durability by group commit. Every write the store promises to keep
// through a power cut (a version's files before the rename that commits
// them, a record before the rename that replaces it, the renames
// themselves) is made durable by durable(dir), which waits for one
// syncfs(2) of dir's file system that began after the caller's writes.
// Writers that wait at the same moment share it: where each used to
// fsync every file and directory, a device cache flush apiece (twelve
// per certificate installed, and about 2,800 flushes a second is all
// the virtio disk of the benchmark machine does), a joining fleet node
// installing 100,000 lineages, or a batch with 50 orders in flight,
// flushes once for all the workers waiting then (#29). syncfs covers
// every file of the file system, so it is at least what the fsyncs
// were; the order of the steps, data before the rename that makes it
// visible, is unchanged.

// groups are the group commits by file system (st_dev).
var groups sync.Map // uint64 -> *groupSync

type groupSync struct {
	fd int // a directory on the file system, kept open for syncfs

	mu      sync.Mutex
	cond    *sync.Cond
	started uint64 // syncs begun
	ended   uint64 // syncs finished
	running bool
	failed  uint64 // the last sync that failed, and its error
	err     error
	waiters int // writers waiting for a sync (tests watch it)
}

func (g *groupSync) waiting() int {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.waiters
}

// durable makes everything written so far on dir's file system durable.
func durable(dir string) error {
	var st syscall.Stat_t
	if err := syscall.Stat(dir, &st); err != nil {
		return &os.PathError{Op: "stat", Path: dir, Err: err}
	}
	v, ok := groups.Load(uint64(st.Dev))
	if !ok {
		fd, err := syscall.Open(dir, syscall.O_RDONLY|syscall.O_DIRECTORY|syscall.O_CLOEXEC, 0)
		if err != nil {
			return &os.PathError{Op: "open", Path: dir, Err: err}
		}
		g := &groupSync{fd: fd}
		g.cond = sync.NewCond(&g.mu)
		if v, ok = groups.LoadOrStore(uint64(st.Dev), g); ok {
			syscall.Close(fd) // another writer opened it first
		}
	}
	if err := v.(*groupSync).sync(); err != nil {
		return fmt.Errorf("sync the file system of %s: %w", dir, err)
	}
	return nil
}

// sync returns once a syncfs that began after it was called has
// finished: running it, or waiting for the one another writer runs.
func (g *groupSync) sync() error {
	g.mu.Lock()
	defer g.mu.Unlock()
	target := g.started + 1 // one that begins from now on
	for g.ended < target {
		if g.running {
			g.waiters++
			g.cond.Wait()
			g.waiters--
			continue
		}
		g.running = true
		g.started++
		n := g.started
		g.mu.Unlock()
		err := syncfsCall(g.fd)
		g.mu.Lock()
		g.running, g.ended = false, n
		if err != nil {
			g.failed, g.err = n, err
		}
		g.cond.Broadcast()
	}
	if g.failed >= target {
		return g.err // a write of this caller's may be among those that failed
	}
	return nil
}

// syncfsCall is syncfs; tests count and hold the calls.
var syncfsCall = syncfs

// syncfs is syncfs(2), or sync(2) where the kernel (or a sandbox)
// refuses it: every file system then, which covers this one.
func syncfs(fd int) error {
	err := unix.Syncfs(fd)
	if errors.Is(err, syscall.ENOSYS) || errors.Is(err, syscall.EPERM) {
		syscall.Sync()
		return nil
	}
	return err
}
