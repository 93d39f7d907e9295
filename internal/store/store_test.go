package store

import (
	"bytes"
	"errors"
	"fmt"
	"io/fs"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"syscall"
	"testing"
	"time"
)

func files(tag string) Files {
	return Files{
		Cert:      []byte("cert-" + tag),
		Chain:     []byte("chain-" + tag),
		Fullchain: []byte("cert-" + tag + "chain-" + tag),
		Key:       []byte("key-" + tag),
	}
}

func lineage(name, serial string) *Lineage {
	return &Lineage{
		Name: name, Domains: []string{name}, Server: "https://ca.test/dir", KeyType: "ec256",
		Challenge: Challenge{Mode: "webroot", Webroot: "/var/www"},
		Cert:      CertInfo{Serial: serial, NotBefore: time.Unix(0, 0).UTC(), NotAfter: time.Unix(90*86400, 0).UTC()},
	}
}

// consistent checks that live/<name> holds one whole version: every file
// carries the same tag and lineage.json agrees.
func consistent(t *testing.T, s *Store, name, tag, serial string) {
	t.Helper()
	p := s.LivePaths(name)
	for path, want := range map[string]string{
		p.Cert: "cert-" + tag, p.Chain: "chain-" + tag, p.Key: "key-" + tag,
		p.Fullchain: "cert-" + tag + "chain-" + tag,
	} {
		got, err := os.ReadFile(path)
		if err != nil || string(got) != want {
			t.Fatalf("%s = %q, %v; want %q", path, got, err, want)
		}
	}
	l, err := s.Load(name)
	if err != nil || l.Cert.Serial != serial {
		t.Fatalf("Load(%s) = %+v, %v; want serial %s", name, l, err, serial)
	}
}

func TestSaveAndLoad(t *testing.T) {
	s := New(t.TempDir())
	v, prev, err := s.Save(lineage("a.example", "01"), files("v1"))
	if err != nil || v != 1 || prev != 0 {
		t.Fatalf("Save = %d, %d, %v", v, prev, err)
	}
	consistent(t, s, "a.example", "v1", "01")
	v, prev, err = s.Save(lineage("a.example", "02"), files("v2"))
	if err != nil || v != 2 || prev != 1 {
		t.Fatalf("second Save = %d, %d, %v", v, prev, err)
	}
	consistent(t, s, "a.example", "v2", "02")
	// The archive keeps the previous version, and rollback restores it.
	if err := s.Activate("a.example", 1); err != nil {
		t.Fatal(err)
	}
	consistent(t, s, "a.example", "v1", "01")

	for path, want := range map[string]os.FileMode{
		filepath.Join(s.Dir, "archive", "a.example", "2", KeyFile): 0o600,
		filepath.Join(s.Dir, "archive", "a.example", "2"):          0o700 | os.ModeDir,
		filepath.Join(s.Dir, "archive"):                            0o700 | os.ModeDir,
		filepath.Join(s.Dir, "live"):                               0o700 | os.ModeDir,
	} {
		fi, err := os.Stat(path)
		if err != nil || fi.Mode() != want {
			t.Errorf("%s: mode %v, %v; want %v", path, fi.Mode(), err, want)
		}
	}
	names, err := s.Names()
	if err != nil || len(names) != 1 || names[0] != "a.example" {
		t.Fatalf("Names = %v, %v", names, err)
	}
}

// TestSaveFailureKeepsPrevious injects a failure after every step of Save
// and checks that the previous version stays live and whole, and that no
// temporary directory is left behind.
func TestSaveFailureKeepsPrevious(t *testing.T) {
	steps := []string{"write privkey.pem", "write cert.pem", "write chain.pem", "write fullchain.pem", "write lineage.json", "archive"}
	for _, failAt := range steps {
		t.Run(failAt, func(t *testing.T) {
			s := New(t.TempDir())
			if _, _, err := s.Save(lineage("a.example", "01"), files("v1")); err != nil {
				t.Fatal(err)
			}
			boom := errors.New("injected")
			s.afterWrite = func(step string) error {
				if step == failAt {
					return boom
				}
				return nil
			}
			if _, _, err := s.Save(lineage("a.example", "02"), files("v2")); !errors.Is(err, boom) {
				t.Fatalf("Save = %v, want injected failure", err)
			}
			consistent(t, s, "a.example", "v1", "01")
			entries, _ := os.ReadDir(filepath.Join(s.Dir, "archive", "a.example"))
			for _, e := range entries {
				if strings.HasPrefix(e.Name(), ".tmp") {
					t.Errorf("temporary %s left behind", e.Name())
				}
			}
			// A later Save succeeds and becomes live.
			s.afterWrite = nil
			if _, _, err := s.Save(lineage("a.example", "03"), files("v3")); err != nil {
				t.Fatal(err)
			}
			consistent(t, s, "a.example", "v3", "03")
		})
	}
}

func TestSaveRejectsBadName(t *testing.T) {
	dir := t.TempDir()
	s := New(dir)
	if _, _, err := s.Save(lineage("../escape", "01"), files("x")); err == nil {
		t.Fatal("want error")
	}
	entries, _ := os.ReadDir(dir)
	if len(entries) != 0 {
		t.Fatalf("bad name wrote %v", entries)
	}
}

func TestLock(t *testing.T) {
	s := New(t.TempDir())
	l1, err := s.TryLock()
	if err != nil {
		t.Fatal(err)
	}
	// flock is per open file, so a second open in this process conflicts
	// just as another process would.
	_, err = s.TryLock()
	var le *LockedError
	if !errors.As(err, &le) || !errors.Is(err, ErrLocked) || le.PID != os.Getpid() {
		t.Fatalf("second TryLock = %v, want LockedError with our pid", err)
	}
	l1.Unlock()
	l2, err := s.TryLock()
	if err != nil {
		t.Fatalf("after Unlock: %v", err)
	}
	l2.Unlock()
}

func TestWriteFileAtomic(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "f")
	if err := WriteFile(p, []byte("one"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := WriteFile(p, []byte("two"), 0o600); err != nil {
		t.Fatal(err)
	}
	got, _ := os.ReadFile(p)
	fi, _ := os.Stat(p)
	if !bytes.Equal(got, []byte("two")) || fi.Mode() != 0o600 {
		t.Fatalf("got %q mode %v", got, fi.Mode())
	}
	entries, _ := os.ReadDir(dir)
	if len(entries) != 1 {
		t.Fatalf("temp files left: %v", entries)
	}
}

func TestAccountDirStaysInside(t *testing.T) {
	s := New("/state")
	for _, email := range []string{"../../etc", "a/b@c.d", "..", ""} {
		d := s.AccountDir("https://ca.test/dir", email)
		if !strings.HasPrefix(d, "/state/accounts/ca.test_dir/") || strings.Count(d, "/") != 4 {
			t.Errorf("AccountDir(%q) = %s", email, d)
		}
	}
}

func TestNaturalOrder(t *testing.T) {
	names := []string{"c10.example.com", "c2.example.com", "c1.example.com", "c11.example.com", "b.example.com", "c02.example.com", "c1a.example.com"}
	sort.Slice(names, func(i, j int) bool { return NaturalLess(names[i], names[j]) })
	want := "b.example.com c1.example.com c1a.example.com c2.example.com c02.example.com c10.example.com c11.example.com"
	if got := strings.Join(names, " "); got != want {
		t.Fatalf("got  %s\nwant %s", got, want)
	}
}

// NaturalLess, which starts at the digit run where two names first
// differ, orders random names as comparing them from their first byte
// does.
func TestNaturalLessFromTheFirstDifference(t *testing.T) {
	r := rand.New(rand.NewPCG(29, 5))
	const alphabet = "0019az.-"
	name := func() string {
		b := make([]byte, r.IntN(9))
		for i := range b {
			b[i] = alphabet[r.IntN(len(alphabet))]
		}
		return string(b)
	}
	for range 200000 {
		a := name()
		b := a[:r.IntN(len(a)+1)] + name() // often a shared prefix
		if got, want := NaturalLess(a, b), naturalLess(a, b); got != want {
			t.Fatalf("NaturalLess(%q, %q) = %v, from the first byte %v", a, b, got, want)
		}
	}
}

// Deleting lbcert.lock while a run holds the lock lets no second writer
// in; a link planted at lbcert.lock is refused, its target untouched.
func TestLockSurvivesDeletionAndRefusesLinks(t *testing.T) {
	dir := t.TempDir()
	a := New(dir)
	l, err := a.TryLock()
	if err != nil {
		t.Fatal(err)
	}
	os.Remove(filepath.Join(dir, LockFile))
	if _, err := New(dir).TryLock(); !errors.Is(err, ErrLocked) {
		t.Fatalf("a second writer got in after lbcert.lock was deleted: %v", err)
	}
	l.Unlock()

	victim := filepath.Join(t.TempDir(), "victim")
	os.WriteFile(victim, []byte("precious"), 0o644)
	os.Remove(filepath.Join(dir, LockFile))
	os.Symlink(victim, filepath.Join(dir, LockFile))
	if _, err := New(dir).TryLock(); err == nil || !strings.Contains(err.Error(), "is a symbolic link") {
		t.Fatalf("a planted link: %v", err)
	}
	if data, _ := os.ReadFile(victim); string(data) != "precious" {
		t.Fatalf("the link's target was written: %q", data)
	}
}

// A link planted at archive/<name> is refused: no key is written
// outside the state directory, and live/ does not move.
func TestPlantedArchiveLinkRefused(t *testing.T) {
	dir := t.TempDir()
	s := New(dir)
	outside := t.TempDir()
	os.MkdirAll(filepath.Join(dir, "archive"), 0o700)
	os.Symlink(outside, filepath.Join(dir, "archive", "x.example.com"))
	_, _, err := s.Save(&Lineage{Name: "x.example.com", Domains: []string{"x.example.com"}}, Files{Key: []byte("KEY")})
	if err == nil || !strings.Contains(err.Error(), "is a symbolic link") {
		t.Fatalf("Save through a planted link: %v", err)
	}
	if entries, _ := os.ReadDir(outside); len(entries) != 0 {
		t.Fatalf("wrote outside the state directory: %v", entries)
	}
}

// The state directory is this user's alone: 0755 is tightened to 0700,
// a directory others may write is refused.
func TestStateDirModes(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "state")
	os.Mkdir(dir, 0o755)
	os.Chmod(dir, 0o755)
	l, err := New(dir).TryLock()
	if err != nil {
		t.Fatal(err)
	}
	l.Unlock()
	if fi, _ := os.Stat(dir); fi.Mode().Perm() != 0o700 {
		t.Fatalf("mode %04o, want 0700", fi.Mode().Perm())
	}
	os.Chmod(dir, 0o777)
	if _, err := New(dir).TryLock(); err == nil || !strings.Contains(err.Error(), "others may write it") {
		t.Fatalf("a world-writable dir: %v", err)
	}
	os.Chmod(dir, 0o700)
	if err := os.Chown(dir, 65534, 65534); err == nil { // as root: owned by nobody
		if _, err := New(dir).TryLock(); err == nil || !strings.Contains(err.Error(), "owned by uid 65534") {
			t.Fatalf("someone else's dir: %v", err)
		}
	}
}

func TestRecordRuns(t *testing.T) {
	s := New(t.TempDir())
	if len(s.Runs()) != 0 {
		t.Fatal("runs on a fresh store")
	}
	t0 := time.Date(2026, 12, 1, 2, 17, 0, 0, time.UTC)
	for i := range 10 {
		if err := s.RecordRun(t0.Add(time.Duration(i) * time.Hour)); err != nil {
			t.Fatal(err)
		}
	}
	runs := s.Runs()
	if len(runs) != keepRuns || !runs[0].Equal(t0.Add(2*time.Hour)) || !runs[len(runs)-1].Equal(t0.Add(9*time.Hour)) {
		t.Fatalf("runs %v", runs)
	}
}

// A version whose number the catalog gave to another certificate goes at
// the next prune once it is not live, whatever the keep count.
func TestPruneRemovesLostVersions(t *testing.T) {
	s := New(t.TempDir())
	for i := range 3 {
		if _, _, err := s.Save(lineage("lost.test", fmt.Sprint(i)), files(fmt.Sprint(i))); err != nil {
			t.Fatal(err)
		}
	}
	if err := s.MarkLost("lost.test", 2); err != nil {
		t.Fatal(err)
	}
	if err := s.MarkLost("lost.test", 3); err != nil { // live: kept until another is live
		t.Fatal(err)
	}
	removed, err := s.Prune("lost.test", 3)
	if err != nil || len(removed) != 1 || removed[0] != 2 {
		t.Fatalf("removed %v, %v; want [2]", removed, err)
	}
}

// The files the store writes keep the modes they had when os.OpenFile
// and os.CreateTemp made them: a record written whole (WriteFile) has
// exactly its mode, whatever the umask; a version's files (writeNew)
// get theirs less the umask, and one that exists already is never
// overwritten.
func TestNewFilesKeepTheirModes(t *testing.T) {
	old := syscall.Umask(0o077)
	defer syscall.Umask(old)
	dir := t.TempDir()
	p := filepath.Join(dir, "record.json")
	if err := WriteFile(p, []byte("{}"), 0o644); err != nil {
		t.Fatal(err)
	}
	if fi, err := os.Stat(p); err != nil || fi.Mode() != 0o644 {
		t.Errorf("WriteFile 0644 under umask 077: %v, %v", fi.Mode(), err)
	}
	n := filepath.Join(dir, "cert.pem")
	if err := writeNew(n, []byte("one"), 0o644); err != nil {
		t.Fatal(err)
	}
	if fi, err := os.Stat(n); err != nil || fi.Mode() != 0o600 {
		t.Errorf("writeNew 0644 under umask 077: %v, %v", fi.Mode(), err)
	}
	if err := writeNew(n, []byte("two"), 0o644); !errors.Is(err, fs.ErrExist) || !strings.Contains(err.Error(), n) {
		t.Errorf("writeNew over an existing file: %v, want an error that it exists, naming it", err)
	}
	if got, _ := os.ReadFile(n); string(got) != "one" {
		t.Errorf("writeNew overwrote an existing file: %q", got)
	}
	if _, err := writeTemp(filepath.Join(dir, "missing"), "x", nil, 0o600); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("writeTemp in a missing directory: %v", err)
	}
	entries, _ := os.ReadDir(dir)
	if len(entries) != 2 {
		t.Errorf("files left behind: %v", entries)
	}
}

// A version half-written by a run killed with -9 (its temporary
// directory, which the run would have removed) goes with the next save
// of that lineage.
func TestSaveSweepsAKilledRunsVersion(t *testing.T) {
	s := New(t.TempDir())
	if _, _, err := s.Save(lineage("a.example", "01"), files("v1")); err != nil {
		t.Fatal(err)
	}
	stale := filepath.Join(s.Dir, "archive", "a.example", ".tmp-2-4242")
	if err := os.Mkdir(stale, 0o700); err != nil {
		t.Fatal(err)
	}
	os.WriteFile(filepath.Join(stale, "privkey.pem"), []byte("half"), 0o600)
	if _, _, err := s.Save(lineage("a.example", "02"), files("v2")); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Lstat(stale); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("the killed run's version is still there: %v", err)
	}
	consistent(t, s, "a.example", "v2", "02")
}

// A link half-made by a run killed between making live/.<name>.new and
// renaming it over live/<name> is replaced by the next Activate.
func TestActivateReplacesAKilledRunsLink(t *testing.T) {
	s := New(t.TempDir())
	if _, _, err := s.Save(lineage("a.example", "01"), files("v1")); err != nil {
		t.Fatal(err)
	}
	v, err := s.SaveVersion(lineage("a.example", "02"), files("v2"))
	if err != nil {
		t.Fatal(err)
	}
	left := filepath.Join(s.Dir, "live", ".a.example.new")
	if err := os.Symlink("../archive/a.example/1", left); err != nil {
		t.Fatal(err)
	}
	if err := s.Activate("a.example", v); err != nil {
		t.Fatal(err)
	}
	consistent(t, s, "a.example", "v2", "02")
	if _, err := os.Lstat(left); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("the killed run's link is still there: %v", err)
	}
}
