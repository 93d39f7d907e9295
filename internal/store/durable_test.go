package store

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// Writers that wait while a sync runs share the next one: ten writers
// arriving during a held sync cost one more sync, not ten; each returns
// only after a sync that began after it was called.
func TestGroupSyncShares(t *testing.T) {
	g := &groupSync{}
	g.cond = sync.NewCond(&g.mu)
	var calls atomic.Int32
	hold, held := make(chan struct{}), make(chan struct{})
	defer func(f func(int) error) { syncfsCall = f }(syncfsCall)
	syncfsCall = func(int) error {
		if calls.Add(1) == 1 {
			close(held)
			<-hold
		}
		return nil
	}
	first := make(chan error)
	go func() { first <- g.sync() }()
	<-held // the first sync runs, and was begun before the writers below
	var wg sync.WaitGroup
	var returned atomic.Int32
	for range 10 {
		wg.Go(func() {
			if err := g.sync(); err != nil {
				t.Error(err)
			}
			returned.Add(1)
		})
	}
	for deadline := time.Now().Add(10 * time.Second); g.waiting()+int(returned.Load()) < 10; runtime.Gosched() {
		if time.Now().After(deadline) {
			t.Fatalf("%d writers wait for a sync, want 10", g.waiting())
		}
	}
	if returned.Load() != 0 {
		t.Fatal("a writer returned on a sync that began before it")
	}
	close(hold)
	wg.Wait()
	if err := <-first; err != nil {
		t.Fatal(err)
	}
	if n := calls.Load(); n != 2 {
		t.Fatalf("%d syncs for 11 writers, want 2", n)
	}
}

// A failed sync fails every writer it was meant to cover, and not a
// writer that came after it.
func TestGroupSyncError(t *testing.T) {
	g := &groupSync{}
	g.cond = sync.NewCond(&g.mu)
	defer func(f func(int) error) { syncfsCall = f }(syncfsCall)
	bad := errors.New("EIO")
	syncfsCall = func(int) error { return bad }
	if err := g.sync(); !errors.Is(err, bad) {
		t.Fatalf("failed sync: %v", err)
	}
	syncfsCall = func(int) error { return nil }
	if err := g.sync(); err != nil {
		t.Fatalf("a later sync: %v", err)
	}
}

// durable syncs a real directory's file system.
func TestDurable(t *testing.T) {
	if err := durable(t.TempDir()); err != nil {
		t.Fatal(err)
	}
	if err := durable("/nonexistent/lbcert"); err == nil {
		t.Fatal("a missing directory: no error")
	}
}

// WriteFiles makes two syncs for all its files: the first while only
// the temporary files exist, the second after every rename; each file
// lands whole, in order, with its mode, and no temporary file stays.
func TestWriteFilesTwoSyncsInOrder(t *testing.T) {
	dir := t.TempDir()
	var files []FileWrite
	for i := range 50 {
		p := filepath.Join(dir, fmt.Sprintf("f%02d.pem", i))
		if i%2 == 0 {
			os.WriteFile(p, []byte("old"), 0o644)
		}
		files = append(files, FileWrite{Path: p, Data: []byte(fmt.Sprint("new ", i)), Perm: 0o600})
	}
	newOnes := func() (n int) {
		for _, f := range files {
			if b, _ := os.ReadFile(f.Path); string(b) == string(f.Data) {
				n++
			}
		}
		return n
	}
	var seen []int
	defer func(f func(int) error) { syncfsCall = f }(syncfsCall)
	syncfsCall = func(int) error { seen = append(seen, newOnes()); return nil }
	var order []int
	if err := WriteFiles(files, func(i int) { order = append(order, i) }); err != nil {
		t.Fatal(err)
	}
	if len(seen) != 2 || seen[0] != 0 || seen[1] != len(files) {
		t.Errorf("syncs saw %v files in place, want [0 %d]: data synced before any rename, every rename synced", seen, len(files))
	}
	for i, f := range files {
		st, err := os.Stat(f.Path)
		if b, _ := os.ReadFile(f.Path); err != nil || string(b) != string(f.Data) || st.Mode().Perm() != 0o600 {
			t.Errorf("%s: %q, %v", f.Path, b, st.Mode())
		}
		if i >= len(order) || order[i] != i {
			t.Fatalf("renamed in order %v", order)
		}
	}
	noTemps(t, dir)
}

// A file that cannot be written stops the batch before any rename; one
// that cannot be renamed stops it there, the files before it in place.
// Either way no temporary file stays, and the error names the file.
func TestWriteFilesFailures(t *testing.T) {
	for _, tc := range []struct {
		name    string
		bad     func(dir string, files []FileWrite)
		renamed int
	}{
		{"no such directory", func(dir string, files []FileWrite) {
			files[2].Path = filepath.Join(dir, "gone", "f2.pem")
		}, 0},
		{"a directory in the way", func(dir string, files []FileWrite) {
			os.Remove(files[3].Path)
			os.MkdirAll(filepath.Join(files[3].Path, "x"), 0o700)
		}, 3},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			var files []FileWrite
			for i := range 6 {
				p := filepath.Join(dir, fmt.Sprintf("f%d.pem", i))
				os.WriteFile(p, []byte("old"), 0o600)
				files = append(files, FileWrite{Path: p, Data: []byte("new"), Perm: 0o600})
			}
			tc.bad(dir, files)
			bad := files[2].Path
			if tc.renamed > 0 {
				bad = files[tc.renamed].Path
			}
			n := 0
			err := WriteFiles(files, func(i int) {
				if i != n {
					t.Errorf("renamed %d after %d", i, n)
				}
				n++
			})
			if err == nil || !strings.Contains(err.Error(), bad) {
				t.Fatalf("error %v, want one naming %s", err, bad)
			}
			if n != tc.renamed {
				t.Errorf("%d renamed, want %d", n, tc.renamed)
			}
			for i, f := range files {
				b, _ := os.ReadFile(f.Path)
				if want := map[bool]string{true: "new", false: "old"}[i < tc.renamed]; f.Path != bad && string(b) != want {
					t.Errorf("%s holds %q, want %q", f.Path, b, want)
				}
			}
			noTemps(t, dir)
		})
	}
}

func noTemps(t *testing.T, dir string) {
	t.Helper()
	entries, _ := os.ReadDir(dir)
	for _, e := range entries {
		if strings.Contains(e.Name(), ".tmp-") {
			t.Errorf("temporary file left: %s", e.Name())
		}
	}
}

// SetJournals saves each journal beside its lineage's status, with two
// syncs for them all; a bad name fails alone, a name given twice keeps
// its last journal, and a journal cleared where no status is removes
// the record.
func TestSetJournals(t *testing.T) {
	s := New(t.TempDir())
	if err := s.WriteStatus("a.example", Status{Failures: 2, LastError: "refused"}); err != nil {
		t.Fatal(err)
	}
	if err := s.SetJournal("c.example", Journal{Deployed: &Deployed{Version: 1, Serial: "c1"}}); err != nil {
		t.Fatal(err)
	}
	var syncs atomic.Int32
	defer func(f func(int) error) { syncfsCall = f }(syncfsCall)
	syncfsCall = func(int) error { syncs.Add(1); return nil }
	lineages := []string{"a.example", "b.example", "../x", "b.example", "c.example"}
	js := []Journal{
		{Deployed: &Deployed{Version: 3, Serial: "a3"}},
		{Pending: &Pending{Version: 1, Error: "first"}},
		{Deployed: &Deployed{Version: 1}},
		{Pending: &Pending{Version: 2, Error: "second"}},
		{},
	}
	errs := s.SetJournals(lineages, js)
	for i, err := range errs {
		if (err != nil) != (lineages[i] == "../x") {
			t.Errorf("%s: %v", lineages[i], err)
		}
	}
	if n := syncs.Load(); n != 2 {
		t.Errorf("%d syncs, want 2", n)
	}
	if st, _ := s.ReadStatus("a.example"); st.Failures != 2 {
		t.Errorf("a.example's status lost: %+v", st)
	}
	if j, _ := s.Journal("a.example"); j.Deployed == nil || j.Deployed.Serial != "a3" {
		t.Errorf("a.example's journal %+v", j)
	}
	if j, _ := s.Journal("b.example"); j.Pending == nil || j.Pending.Error != "second" {
		t.Errorf("b.example's journal %+v, want the last one given", j)
	}
	if _, err := os.Stat(s.statusPath("c.example")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("c.example's record, cleared: %v", err)
	}
	noTemps(t, filepath.Join(s.Dir, "renewal"))
}

// A batch of journals that fails partway (no room for every temporary
// file at once, or one record that cannot be replaced) leaves each
// record it did not write to a write of its own, with its own error;
// a batch whose last sync fails reports every record it wrote.
func TestSetJournalsWhenTheBatchFails(t *testing.T) {
	s := New(t.TempDir())
	lineages := []string{"a.example", "b.example", "c.example"}
	js := make([]Journal, len(lineages))
	for i, n := range lineages {
		js[i] = Journal{Deployed: &Deployed{Version: 2, Serial: n}}
	}
	defer func() { writeFiles = WriteFiles }()
	// b.example's record is a directory: it cannot be read or replaced,
	// and fails alone. The batch renames a.example's record, then fails
	// on c.example's (as on an immutable file): c.example's is then
	// written on its own.
	writeFiles = func(files []FileWrite, renamed func(int)) error {
		if err := WriteFiles(files[:1], renamed); err != nil {
			return err
		}
		return fmt.Errorf("write %s: operation not permitted", files[1].Path)
	}
	if err := os.MkdirAll(filepath.Join(s.statusPath("b.example"), "x"), 0o700); err != nil {
		t.Fatal(err)
	}
	errs := s.SetJournals(lineages, js)
	if errs[0] != nil || errs[2] != nil || errs[1] == nil || !strings.Contains(errs[1].Error(), "b.example.json") {
		t.Fatalf("errors %v: want b.example's own, and none for the others", errs)
	}
	for _, n := range []string{"a.example", "c.example"} {
		if j, _ := s.Journal(n); j.Deployed == nil || j.Deployed.Serial != n {
			t.Errorf("%s's journal %+v", n, j)
		}
	}
	// Every rename made, the last sync failed: none is known durable.
	os.RemoveAll(s.statusPath("b.example"))
	writeFiles = WriteFiles
	var calls atomic.Int32
	defer func(f func(int) error) { syncfsCall = f }(syncfsCall)
	syncfsCall = func(int) error {
		if calls.Add(1) == 2 {
			return errors.New("EIO")
		}
		return nil
	}
	for i, err := range s.SetJournals(lineages, js) {
		if err == nil || !strings.Contains(err.Error(), "EIO") {
			t.Errorf("%s: %v, want the failed sync", lineages[i], err)
		}
	}
}
