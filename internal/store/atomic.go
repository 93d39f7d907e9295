package store

import (
	"os"
	"path/filepath"
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
	f, err := os.CreateTemp(dir, "."+base+".tmp-*")
	if err != nil {
		return err
	}
	tmp := f.Name()
	ok := false
	defer func() {
		if !ok {
			f.Close()
			os.Remove(tmp)
		}
	}()
	if err := f.Chmod(perm); err != nil {
		return err
	}
	if _, err := f.Write(data); err != nil {
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	if err := durable(dir); err != nil {
		return err
	}
	if err := os.Rename(tmp, path); err != nil {
		return err
	}
	ok = true
	return durable(dir)
}

// writeNew writes a file that must not exist yet. It is used inside a
// private temporary directory that is made durable (durable) and then
// renamed into place as a whole, so the individual files need neither a
// sync nor a rename of their own.
func writeNew(path string, data []byte, perm os.FileMode) error {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, perm)
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
	os.Remove(tmp) // left over from a crash; we hold the lock
	if err := os.Symlink(target, tmp); err != nil {
		return err
	}
	if err := os.Rename(tmp, link); err != nil {
		os.Remove(tmp)
		return err
	}
	return durable(dir)
}
