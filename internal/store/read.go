package store

import (
	"os"
	"strings"
	"sync"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// The nothing-due renew pass reads, per lineage, one directory listing
// and two small files, a million times over (#29). os.ReadFile and
// os.ReadDir spend more system calls than that takes: each open of
// theirs also asks the file's kind (fstat), tries to add it to the
// network poller (epoll_ctl, refused for a file) and sets its blocking
// mode (fcntl, four times), about ten calls where open, read and close
// do. readSmall and readDirs make only those, with the same errors (an
// *os.PathError whose Err is the errno, so errors.Is(err,
// fs.ErrNotExist) holds for a missing file).

// buffers are readSmall's and readDirs': a pass over a million
// lineages would otherwise leave three buffers a lineage to the garbage
// collector.
var buffers = sync.Pool{New: func() any { b := make([]byte, 0, 8192); return &b }}

// readSmall calls use with the content of the small file at path, in a
// buffer that is reused once use returns (json.Unmarshal copies what it
// keeps).
func readSmall(path string, use func(data []byte) error) error {
	return readSmallAt(atFDCWD, path, path, use)
}

// readSmallAt is readSmall of the file rel names from the directory
// open as dirfd (path names it in errors). Opened without blocking: a
// FIFO planted in the state directory reads as empty, where it would
// hang the run.
func readSmallAt(dirfd int, rel, path string, use func(data []byte) error) error {
	fd, err := openRead(dirfd, rel, syscall.O_RDONLY|syscall.O_CLOEXEC|syscall.O_NONBLOCK)
	if err != nil {
		return &os.PathError{Op: "open", Path: path, Err: err}
	}
	defer syscall.Close(fd)
	bp := buffers.Get().(*[]byte)
	defer buffers.Put(bp)
	buf := (*bp)[:0]
	for {
		if len(buf) == cap(buf) {
			buf = append(buf, 0)[:len(buf)]
			*bp = buf
		}
		n, err := ignoringEINTR(func() (int, error) { return syscall.Read(fd, buf[len(buf):cap(buf)]) })
		if err != nil {
			return &os.PathError{Op: "read", Path: path, Err: err}
		}
		if n == 0 {
			return use(buf)
		}
		buf = buf[:len(buf)+n]
	}
}

// readDirs returns the names of the subdirectories of dir, in the order
// the file system lists them, without "." and "..".
func readDirs(dir string) ([]string, error) { return readEntries(dir, true) }

// readEntries returns the names in dir, in the order the file system
// lists them, without "." and "..": of subdirectories only when dirs,
// else of all. os.ReadDir would also sort them and make an entry of
// each, a second of CPU over the million records of a large state
// directory.
func readEntries(dir string, dirs bool) ([]string, error) {
	return readEntriesAt(atFDCWD, dir, dir, dirs)
}

// readEntriesAt is readEntries of the directory rel names from the
// directory open as dirfd (dir names it in errors).
func readEntriesAt(dirfd int, rel, dir string, dirs bool) ([]string, error) {
	fd, err := openRead(dirfd, rel, syscall.O_RDONLY|syscall.O_DIRECTORY|syscall.O_CLOEXEC)
	if err != nil {
		return nil, &os.PathError{Op: "open", Path: dir, Err: err}
	}
	defer syscall.Close(fd)
	var out []string
	bp := buffers.Get().(*[]byte)
	defer buffers.Put(bp)
	buf := (*bp)[:cap(*bp)]
	for {
		n, err := ignoringEINTR(func() (int, error) { return syscall.ReadDirent(fd, buf) })
		if err != nil {
			return nil, &os.PathError{Op: "readdirent", Path: dir, Err: err}
		}
		if n <= 0 {
			return out, nil
		}
		out = appendNames(out, dir, buf[:n], dirs)
	}
}

// appendNames appends the names among the Linux dirent64 records in b,
// read from dir (those of directories only when dirs): inode (8
// bytes), offset (8), record length (2), type (1), then the
// NUL-terminated name. A file system that does not say the type
// (DT_UNKNOWN) is asked with lstat, as os.ReadDir does.
func appendNames(out []string, dir string, b []byte, dirs bool) []string {
	for len(b) >= 19 {
		reclen := int(*(*uint16)(unsafe.Pointer(&b[16])))
		if reclen < 19 || reclen > len(b) {
			break
		}
		typ, name := b[18], b[19:reclen]
		for i, c := range name {
			if c == 0 {
				name = name[:i]
				break
			}
		}
		if string(name) != "." && string(name) != ".." {
			if !dirs {
				out = append(out, string(name))
				b = b[reclen:]
				continue
			}
			if typ == syscall.DT_UNKNOWN {
				var st syscall.Stat_t
				if syscall.Lstat(dir+"/"+string(name), &st) == nil && st.Mode&syscall.S_IFMT == syscall.S_IFDIR {
					typ = syscall.DT_DIR
				}
			}
			if typ == syscall.DT_DIR {
				out = append(out, string(name))
			}
		}
		b = b[reclen:]
	}
	return out
}

// openRead is openat(2) of path from the directory open as dirfd
// (atFDCWD: the working directory's), without syscall.Open's allocation
// of the path: a path that fits is made NUL-terminated on the stack.
func openRead(dirfd int, path string, flags int) (int, error) {
	var b [512]byte
	if len(path) >= len(b) || strings.IndexByte(path, 0) >= 0 {
		return ignoringEINTR(func() (int, error) { return unix.Openat(dirfd, path, flags, 0) })
	}
	copy(b[:], path)
	return ignoringEINTR(func() (int, error) {
		fd, _, errno := syscall.Syscall6(syscall.SYS_OPENAT, uintptr(dirfd), uintptr(unsafe.Pointer(&b[0])), uintptr(flags), 0, 0, 0)
		if errno != 0 {
			return -1, errno
		}
		return int(fd), nil
	})
}

// atFDCWD is AT_FDCWD (a relative path is the working directory's), a
// variable so that it converts to the uintptr the call takes.
var atFDCWD = -100

func ignoringEINTR(f func() (int, error)) (int, error) {
	for {
		n, err := f()
		if err != syscall.EINTR {
			return n, err
		}
	}
}
