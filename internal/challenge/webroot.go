package challenge

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sync"

	"github.com/lbcert/lbcert/internal/store"
)

// CheckWebroot refuses a webroot that does not exist, is not a directory,
// or cannot be written, before anything is asked of the CA. It proves
// writability by creating and removing a file, because as root access(2)
// says yes even on a read-only mount.
func CheckWebroot(dir string) error {
	if dir == "" {
		return errors.New("--webroot is empty")
	}
	fi, err := os.Stat(dir)
	if errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("webroot %s does not exist", dir)
	}
	if err != nil {
		return fmt.Errorf("webroot %s: %v", dir, unwrap(err))
	}
	if !fi.IsDir() {
		return fmt.Errorf("webroot %s is not a directory", dir)
	}
	// The web server's worker is not root: unless its group or everyone
	// may enter and read the webroot, it answers 403 to the CA, and the
	// failed validation counts against the CA's limits.
	if m := fi.Mode().Perm(); m&0o050 != 0o050 && m&0o005 != 0o005 {
		return fmt.Errorf("webroot %s has mode %04o: the web server cannot read it, so it would answer the CA 403; chmod o+rx (or give its group r-x) first", dir, m)
	}
	f, err := os.CreateTemp(dir, ".lbcert-write-test-*")
	if err != nil {
		return fmt.Errorf("webroot %s cannot be written: %v", dir, unwrap(err))
	}
	f.Close()
	os.Remove(f.Name())
	return nil
}

// Webroot writes each token to <Root>/.well-known/acme-challenge/<token>,
// for a web server that serves that path from Root.
type Webroot struct {
	Root string

	mu      sync.Mutex
	created []string // directories we made, removed again when empty
}

// Present writes the key authorization for token.
func (w *Webroot) Present(domain, token, keyAuth string) error {
	if err := checkToken(token); err != nil {
		return err
	}
	dir := filepath.Join(w.Root, ".well-known", "acme-challenge")
	// Under the lock from mkdir to the written token: CleanUp removes
	// the directories it made once they are empty, and must not find
	// this one empty between the two.
	w.mu.Lock()
	defer w.mu.Unlock()
	if err := w.mkdir(dir); err != nil {
		return fmt.Errorf("webroot %s: %v", w.Root, unwrap(err))
	}
	// 0644 and 0755 because the web server's worker, not root, reads it.
	if err := store.WriteFile(filepath.Join(dir, token), []byte(keyAuth), 0o644); err != nil {
		return fmt.Errorf("webroot %s: write token for %s: %v", w.Root, domain, unwrap(err))
	}
	return nil
}

// CleanUp removes the token file and any directory Present created that is
// now empty, so the webroot is left as it was found.
func (w *Webroot) CleanUp(domain, token, keyAuth string) error {
	if err := checkToken(token); err != nil {
		return err
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	err := os.Remove(filepath.Join(w.Root, ".well-known", "acme-challenge", token))
	if errors.Is(err, fs.ErrNotExist) {
		err = nil
	}
	for i := len(w.created) - 1; i >= 0; i-- {
		if os.Remove(w.created[i]) == nil {
			w.created = append(w.created[:i], w.created[i+1:]...)
		}
	}
	return err
}

// mkdir makes dir and the missing directories above it up to Root;
// the caller holds w.mu.
func (w *Webroot) mkdir(dir string) error {
	var missing []string
	for d := dir; d != w.Root && d != filepath.Dir(d); d = filepath.Dir(d) {
		if _, err := os.Stat(d); err == nil {
			break
		}
		missing = append(missing, d)
	}
	for i := len(missing) - 1; i >= 0; i-- {
		if err := os.Mkdir(missing[i], 0o755); err != nil && !errors.Is(err, fs.ErrExist) {
			return err
		}
		// Mkdir's mode goes through the umask: under 077 the web server
		// could not enter the directory. It must read it whatever the umask.
		if err := os.Chmod(missing[i], 0o755); err != nil {
			return err
		}
		w.created = append(w.created, missing[i])
	}
	return nil
}

func unwrap(err error) error {
	var pe *fs.PathError
	if errors.As(err, &pe) {
		return pe.Err
	}
	return err
}

// Resolve is the challenge of --webroot DIR (made absolute, checked),
// or, with no webroot, of --standalone on httpAddr (checked offline).
func Resolve(webroot, httpAddr string) (store.Challenge, error) {
	if webroot == "" {
		if err := CheckAddr(httpAddr); err != nil {
			return store.Challenge{}, err
		}
		return store.Challenge{Mode: "standalone", HTTPAddr: httpAddr}, nil
	}
	root, err := filepath.Abs(webroot)
	if err != nil {
		return store.Challenge{}, fmt.Errorf("--webroot %s: %w", webroot, err)
	}
	if err := CheckWebroot(root); err != nil {
		return store.Challenge{}, err
	}
	return store.Challenge{Mode: "webroot", Webroot: root}, nil
}
