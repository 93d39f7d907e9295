// Package argfile reads the files an operator names in a flag or the
// config file: a CA bundle, a password or EAB key file, a batch CSV, the
// config file itself.
//
// Such a file may be a regular file or a pipe: the shell's <(...) and a
// secret manager's FIFO are how secrets are handed over without writing
// them to disk. What it may not do is stop the run. os.ReadFile on a
// FIFO no one writes to blocks in open(2) past every signal (a review
// saw a run hang 28 minutes through SIGTERM and SIGINT), and a pipe whose
// writer stalls blocks the read the same way. So a file is opened
// without waiting for a writer, a pipe's reads give up after Idle
// without data, and a pipe no one wrote to is an error, not an empty
// file. Anything else (a directory, a socket, a device) is refused at
// once.
//
// A pipe can be read once, and a run may read a file twice (the settings
// are checked, then used): Read keeps what it read from a pipe and gives
// it again for the same path. A run interrupted twice stops waiting on a
// pipe at once (StopOn).
//
// Errors never name the path: the caller names the flag and the path.
package argfile

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"sync"
	"syscall"
	"time"
)

var (
	// piped is what Read read from each pipe, by path.
	piped sync.Map
	// stop ends every wait on a pipe when done (StopOn).
	stop = context.Background()
	mu   sync.Mutex
)

// StopOn makes a read from a pipe give up as soon as ctx is done: a run
// told to stop at once while a secret manager's pipe stalls ends then,
// not Idle later.
func StopOn(ctx context.Context) {
	mu.Lock()
	stop = ctx
	mu.Unlock()
}

func stopCtx() context.Context {
	mu.Lock()
	defer mu.Unlock()
	return stop
}

// Idle is how long a read from a pipe waits for data.
var Idle = 30 * time.Second

// Limits of Read for the kinds of files named.
const (
	Secret = 64 << 10 // a password or a key
	Bundle = 16 << 20 // a PEM bundle, a config file
)

// The errors for a path that names neither a regular file nor a pipe.
var (
	ErrNotFile   = errors.New("not a regular file or a pipe")
	ErrDirectory = errors.New("a directory, not a file")
)

// Open opens path for reading (see the package comment). The reader's
// errors do not name the path either.
func Open(path string) (io.ReadCloser, error) {
	f, err := os.OpenFile(path, os.O_RDONLY|syscall.O_NONBLOCK|syscall.O_CLOEXEC, 0)
	if errors.Is(err, syscall.ENXIO) {
		return nil, ErrNotFile // a socket, or a device with nothing behind it
	}
	if err != nil {
		return nil, bare(err)
	}
	fi, err := f.Stat()
	switch {
	case err != nil:
		f.Close()
		return nil, bare(err)
	case fi.Mode().IsRegular():
		return plain{f}, nil
	case fi.Mode()&fs.ModeNamedPipe != 0:
		return &pipe{f: f}, nil
	case fi.IsDir():
		f.Close()
		return nil, ErrDirectory
	case isDevNull(fi):
		return plain{f}, nil // "--config /dev/null": no file, said so
	}
	f.Close()
	return nil, ErrNotFile
}

// Read is the content of path, at most limit bytes (more is an error:
// a bundle cut short would be read as a smaller one).
func Read(path string, limit int64) ([]byte, error) {
	key := pipeKey(path)
	if data, ok := piped.Load(key); ok && key != "" {
		return data.([]byte), nil
	}
	r, err := Open(path)
	if err != nil {
		return nil, err
	}
	defer r.Close()
	data, err := io.ReadAll(io.LimitReader(r, limit+1))
	if err != nil {
		return nil, err
	}
	if int64(len(data)) > limit {
		return nil, fmt.Errorf("larger than %d KiB: not the file wanted", limit>>10)
	}
	if _, ok := r.(*pipe); ok && key != "" {
		piped.Store(key, data)
	}
	return data, nil
}

// pipeKey names the pipe path leads to, without opening it: the path
// and the pipe's inode (a /dev/fd/N path may name another pipe later).
func pipeKey(path string) string {
	fi, err := os.Stat(path)
	if err != nil || fi.Mode()&fs.ModeNamedPipe == 0 {
		return ""
	}
	st, _ := fi.Sys().(*syscall.Stat_t)
	if st == nil {
		return ""
	}
	return fmt.Sprintf("%s %d %d", path, st.Dev, st.Ino)
}

// plain is a regular file whose errors do not name it.
type plain struct{ f *os.File }

func (p plain) Read(b []byte) (int, error) {
	n, err := p.f.Read(b)
	return n, bare(err)
}

func (p plain) Close() error { return p.f.Close() }

// pipe reads a FIFO, each read waiting at most Idle. Go puts a FIFO
// opened non-blocking in its poller, so a read deadline applies to it.
type pipe struct {
	f    *os.File
	read int64
}

func (p *pipe) Read(b []byte) (int, error) {
	if err := p.f.SetReadDeadline(time.Now().Add(Idle)); err != nil {
		return 0, bare(err)
	}
	ctx := stopCtx()
	undo := context.AfterFunc(ctx, func() { p.f.SetReadDeadline(time.Unix(1, 0)) })
	n, err := p.f.Read(b)
	undo()
	p.read += int64(n)
	switch {
	case errors.Is(err, os.ErrDeadlineExceeded) && ctx.Err() != nil:
		return n, errors.New("a pipe: interrupted while waiting for its writer")
	case errors.Is(err, os.ErrDeadlineExceeded) && p.read > 0:
		return n, fmt.Errorf("a pipe: nothing more written to it for %s, and no end", Idle)
	case errors.Is(err, os.ErrDeadlineExceeded):
		return n, fmt.Errorf("a pipe: nothing written to it for %s", Idle)
	case err == io.EOF && p.read == 0:
		// Opened without waiting, a FIFO whose writer has not come
		// reads as at its end: say so rather than pass an empty file.
		return n, errors.New("a pipe with nothing written to it (start its writer first)")
	}
	return n, bare(err)
}

func (p *pipe) Close() error { return p.f.Close() }

// isDevNull reports whether fi is /dev/null (character device 1, 3),
// the usual way to say "an empty file".
func isDevNull(fi fs.FileInfo) bool {
	st, ok := fi.Sys().(*syscall.Stat_t)
	return ok && fi.Mode()&fs.ModeCharDevice != 0 && st.Rdev == 1<<8|3
}

// bare is err without the path an *os.PathError adds.
func bare(err error) error {
	var pe *fs.PathError
	if errors.As(err, &pe) {
		return pe.Err
	}
	return err
}
