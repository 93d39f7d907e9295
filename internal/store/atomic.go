package store

import (
	"cmp"
	"errors"
	"fmt"
	"io/fs"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"sync/atomic"

	"golang.org/x/sys/unix"
)

// WriteFile writes data to path so that a reader (or a crash) sees either
// the old content or the new, never a mix: it writes a temporary file in
// the same directory, makes it durable, renames it over path and makes
// the rename durable too, so that it survives a power cut (durable.go).
func WriteFile(path string, data []byte, perm os.FileMode) error {
	dir, base := filepath.Split(path)
	if dir == "" {
		dir = "."
	}
	tmp, err := writeTemp(dir, base, data, perm)
	if err != nil {
		return err
	}
	if err := durable(dir); err != nil {
		os.Remove(tmp)
		return err
	}
	if err := os.Rename(tmp, path); err != nil {
		os.Remove(tmp)
		return err
	}
	return durable(dir)
}

// FileWrite is one file of WriteFiles.
type FileWrite struct {
	Path string
	Data []byte
	Perm os.FileMode
}

// WriteFiles writes each of files as WriteFile does, atomically, but
// with two syncs of the file system for them all where WriteFile makes
// two each: every file is written to a temporary file beside it, the
// temporary files are made durable together, each is renamed into
// place, in order, and the renames are made durable together. A node
// joining a fleet writes 5,000 PEMs at a time for HAProxy; one by one,
// waiting for their syncs was most of the time it took. renamed is
// called with the index of each file once it is in place. On an error
// the files renamed before it stay renamed (each whole: old or new
// content, never a mix), the rest are untouched, and no temporary file
// is left behind.
func WriteFiles(files []FileWrite, renamed func(i int)) error {
	tmps := make([]string, len(files))
	defer func() {
		for _, t := range tmps {
			if t != "" {
				os.Remove(t)
			}
		}
	}()
	dirs := map[string]bool{}
	for _, f := range files {
		dirs[dirOf(f.Path)] = true
	}
	if err := writeTemps(files, tmps); err != nil {
		return err
	}
	if err := durableAll(dirs); err != nil {
		return err
	}
	var err error
	for i, f := range files {
		if err = os.Rename(tmps[i], f.Path); err != nil {
			err = fmt.Errorf("write %s: %w", f.Path, err)
			break
		}
		tmps[i] = ""
		if renamed != nil {
			renamed(i)
		}
	}
	// What was renamed is made durable even after an error: a rollback
	// writes those files again, after them.
	return cmp.Or(err, durableAll(dirs))
}

func dirOf(path string) string {
	dir, _ := filepath.Split(path)
	return cmp.Or(dir, ".")
}

// tempWorkers is how many temporary files WriteFiles writes at once.
// Creating a file is most of a small write's cost, nearly all of it in
// the kernel, and a batch of 100,000 (a node joining a fleet records a
// journal per lineage) took twelve seconds one at a time.
const tempWorkers = 4

// writeTemps writes each file's temporary file, its path in tmps[i],
// tempWorkers at a time; after an error no more are started, and the
// first error is returned (the caller removes those written).
func writeTemps(files []FileWrite, tmps []string) error {
	var mu sync.Mutex
	var first error
	atOnce(len(files), tempWorkers, func(i int) bool {
		mu.Lock()
		stop := first != nil
		mu.Unlock()
		if stop {
			return false
		}
		f := files[i]
		t, err := writeTemp(dirOf(f.Path), filepath.Base(f.Path), f.Data, f.Perm)
		if err != nil {
			mu.Lock()
			first = cmp.Or(first, fmt.Errorf("write %s: %w", f.Path, err))
			mu.Unlock()
			return false
		}
		tmps[i] = t
		return true
	})
	return first
}

// atOnce calls fn for each index below n, from workers goroutines at
// once, until fn says to stop (each worker stops at its own false).
func atOnce(n, workers int, fn func(i int) (more bool)) {
	var next atomic.Int64
	var wg sync.WaitGroup
	for range min(workers, n) {
		wg.Go(func() {
			for i := int(next.Add(1) - 1); i < n && fn(i); i = int(next.Add(1) - 1) {
			}
		})
	}
	wg.Wait()
}

func durableAll(dirs map[string]bool) error {
	for d := range dirs {
		if err := durable(d); err != nil {
			return err
		}
	}
	return nil
}

// writeTemp writes data to a new temporary file in dir, named after base
// and hidden, and returns its path; on an error it leaves none. Its mode
// is perm, as os.CreateTemp and a Chmod would make it (the umask does not
// apply).
func writeTemp(dir, base string, data []byte, perm os.FileMode) (string, error) {
	var f *os.File
	var err error
	for range 100 {
		f, err = openNew(filepath.Join(dir, "."+base+".tmp-"+strconv.FormatUint(uint64(rand.Uint32()), 10)), os.O_RDWR, 0o600)
		if !errors.Is(err, fs.ErrExist) {
			break
		}
	}
	if err != nil {
		return "", err
	}
	tmp := f.Name()
	err = f.Chmod(perm)
	if err == nil {
		_, err = f.Write(data)
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		os.Remove(tmp)
		return "", err
	}
	return tmp, nil
}

// openNew creates path, which must not exist, as os.OpenFile(path,
// flag|O_CREATE|O_EXCL, perm) does, without registering it with the Go
// runtime's poller: os.OpenFile does that for every file (an epoll_ctl
// that a regular file refuses, and four fcntl to set and clear
// O_NONBLOCK), a twentieth of the CPU of a node that installs 100,000
// lineages as it joins a fleet. Reads and writes of a regular file
// never wait on the poller anyway.
func openNew(path string, flag int, perm os.FileMode) (*os.File, error) {
	fd, err := ignoringEINTR(func() (int, error) {
		return unix.Open(path, flag|unix.O_CREAT|unix.O_EXCL|unix.O_CLOEXEC, uint32(perm.Perm()))
	})
	if err != nil {
		return nil, &fs.PathError{Op: "open", Path: path, Err: err}
	}
	return os.NewFile(uintptr(fd), path), nil
}

// writeNew writes a file that must not exist yet. It is used inside a
// private temporary directory that is made durable (durable) and then
// renamed into place as a whole, so the individual files need neither a
// sync nor a rename of their own.
func writeNew(path string, data []byte, perm os.FileMode) error {
	f, err := openNew(path, os.O_WRONLY, perm)
	if err != nil {
		return err
	}
	if _, err := f.Write(data); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

// symlinkAtomic points link at target, replacing whatever link was, with a
// single rename(2): readers see the old target or the new, never nothing.
func symlinkAtomic(target, link string) error {
	dir, base := filepath.Split(link)
	tmp := filepath.Join(dir, "."+base+".new")
	err := os.Symlink(target, tmp)
	if errors.Is(err, fs.ErrExist) {
		os.Remove(tmp) // left over from a crash; we hold the lock
		err = os.Symlink(target, tmp)
	}
	if err != nil {
		return err
	}
	if err := os.Rename(tmp, link); err != nil {
		os.Remove(tmp)
		return err
	}
	return durable(dir)
}
