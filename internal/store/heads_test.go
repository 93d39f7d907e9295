package store

import (
	"encoding/binary"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"hash/crc32"
	"io/fs"
	"maps"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// headsMargin replaces Margin in these tests: above the 20 ms tick the
// tests give file times (grain), as Margin is above any kernel's, and
// small enough that a test waits it out between passes.
const headsMargin = 30 * time.Millisecond

func shortMargin(t *testing.T) {
	old := Margin
	Margin, grain = headsMargin, 20*time.Millisecond
	t.Cleanup(func() { Margin, grain = old, 0 })
}

// pass is one renew pass through the index: every name asked once.
func pass(t *testing.T, s *Store, names []string) (map[string]*Lineage, *Heads) {
	t.Helper()
	out, _, h := passRecords(t, s, names)
	return out, h
}

// passRecords is pass that also reads, as the renew plan does, each
// name's status and journal after its head, and returns those records.
func passRecords(t *testing.T, s *Store, names []string) (map[string]*Lineage, map[string]record, *Heads) {
	t.Helper()
	h := s.OpenHeads()
	if _, err := s.Lineages(); err != nil { // as renew's catalog does
		t.Fatal(err)
	}
	out, recs := map[string]*Lineage{}, map[string]record{}
	for _, n := range names {
		l, err := s.Newest(n)
		if err == nil {
			out[n] = l
		} else if !errors.Is(err, ErrNotFound) {
			t.Fatalf("Newest(%s) through the index: %v", n, err)
		}
		st, err := s.ReadStatus(n)
		if err != nil {
			t.Fatalf("ReadStatus(%s) through the index: %v", n, err)
		}
		j, err := s.Journal(n)
		if err != nil {
			t.Fatalf("Journal(%s) through the index: %v", n, err)
		}
		if r := (record{Status: st, Journal: j}); !reflect.DeepEqual(r, record{}) {
			recs[n] = r
		}
	}
	if err := h.Close(); err != nil {
		t.Fatal(err)
	}
	return out, recs, h
}

// recordsOnDisk is what ReadStatus and Journal answer without the index.
func recordsOnDisk(t *testing.T, dir string, names []string) map[string]record {
	t.Helper()
	s := New(dir)
	out := map[string]record{}
	for _, n := range names {
		if r, err := s.readRecord(n); err == nil && !reflect.DeepEqual(r, record{}) {
			out[n] = r
		}
	}
	return out
}

// onDisk is what Newest answers without the index.
func onDisk(t *testing.T, dir string, names []string) map[string]*Lineage {
	t.Helper()
	s := New(dir)
	out := map[string]*Lineage{}
	for _, n := range names {
		if l, err := s.Newest(n); err == nil {
			out[n] = l
		}
	}
	return out
}

func TestHeadsIndexIsUsedAndChecked(t *testing.T) {
	shortMargin(t)
	dir := t.TempDir()
	s := New(dir)
	names := []string{"a.example", "b.example", "c.example"}
	for i, n := range names {
		if _, err := s.SaveVersion(lineage(n, fmt.Sprint(i)), files(n)); err != nil {
			t.Fatal(err)
		}
	}
	// Counted once the store has written (it keeps a directory open
	// for its syncs).
	fds := func() int { e, _ := os.ReadDir("/proc/self/fd"); return len(e) }
	openFDs := fds()
	defer func() {
		if n := fds(); n > openFDs {
			t.Errorf("%d descriptors open after the passes, %d before: a pass leaks its directories", n, openFDs)
		}
	}()
	// The live version through the pass's directory is the path's.
	if err := s.Activate("a.example", 1); err != nil {
		t.Fatal(err)
	}
	want, werr := s.LiveVersion("a.example")
	var h *Heads
	_, wmiss := s.LiveVersion("b.example")
	h = s.OpenHeads()
	// live/ swapped for another after the pass opened it: the pass
	// still reads the one it opened, which a read by path would not.
	liveDir := filepath.Join(dir, "live")
	if err := os.Rename(liveDir, liveDir+".moved"); err != nil {
		t.Fatal(err)
	}
	if err := os.Mkdir(liveDir, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink("../archive/a.example/7", filepath.Join(liveDir, "a.example")); err != nil {
		t.Fatal(err)
	}
	live, gerr := s.LiveVersion("a.example")
	_, gmiss := s.LiveVersion("b.example")
	h.Close()
	if err := os.RemoveAll(liveDir); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(liveDir+".moved", liveDir); err != nil {
		t.Fatal(err)
	}
	if live != want || gerr != nil || werr != nil || !errors.Is(gmiss, fs.ErrNotExist) || !errors.Is(wmiss, fs.ErrNotExist) {
		t.Errorf("live version during a pass %d (%v), %v for none; without %d (%v), %v", live, gerr, gmiss, want, werr, wmiss)
	}
	// Two with a renewal record, one without.
	s.SetJournal("a.example", Journal{Deployed: &Deployed{Version: 1, Serial: "0"}})
	s.WriteStatus("b.example", Status{Failures: 1, LastError: "refused"})
	time.Sleep(2 * headsMargin)
	if _, h := pass(t, s, names); h.misses != 3 || h.recordHits.Load() != 0 {
		t.Fatalf("first pass read %d lineages from disk, want 3 (%d records from an index)", h.misses, h.recordHits.Load())
	}
	index := filepath.Join(dir, HeadsFile)
	before, err := os.Stat(index)
	if err != nil {
		t.Fatalf("no index after the first pass: %v", err)
	}
	got, recs, h := passRecords(t, s, names)
	if h.misses != 0 || h.recordHits.Load() != 2 {
		t.Errorf("second pass read %d lineages from disk, want 0, and %d records from the index, want 2", h.misses, h.recordHits.Load())
	}
	if !reflect.DeepEqual(got, onDisk(t, dir, names)) {
		t.Errorf("the index answers %+v, the disk %+v", got, onDisk(t, dir, names))
	}
	if want := recordsOnDisk(t, dir, names); !reflect.DeepEqual(recs, want) || len(recs) != 2 {
		t.Errorf("the index answers the records %s, the disk %s", briefRecords(recs), briefRecords(want))
	}
	// A record written is read from disk, and only it: the entry keeps
	// its metadata and the index is written again.
	s.WriteStatus("b.example", Status{Failures: 2, LastError: "refused again"})
	time.Sleep(2 * headsMargin)
	if _, recs, h := passRecords(t, s, names); h.recordHits.Load() != 1 || recs["b.example"].Failures != 2 {
		t.Errorf("after a status was written: %d records from the index, want 1; b.example %s", h.recordHits.Load(), briefRecords(recs))
	}
	if _, _, h := passRecords(t, s, names); h.recordHits.Load() != 2 || h.misses != 0 {
		t.Errorf("the pass after: %d records from the index, want 2; %d lineages from disk, want 0", h.recordHits.Load(), h.misses)
	}
	before, _ = os.Stat(index)
	if after, _ := os.Stat(index); !os.SameFile(before, after) {
		t.Errorf("a pass that read nothing from disk rewrote the index")
	}

	// An edit by hand, in place (same inode, same size), is seen.
	meta := filepath.Join(s.ArchiveDir("b.example"), "1", MetaFile)
	data, _ := os.ReadFile(meta)
	os.WriteFile(meta, []byte(strings.Replace(string(data), "/var/www", "/srv/www", 1)), 0o644)
	got, _ = pass(t, s, names)
	if got["b.example"].Challenge.Webroot != "/srv/www" {
		t.Errorf("a hand edit of lineage.json is not seen through the index: webroot %q", got["b.example"].Challenge.Webroot)
	}
	// A new version, UpdateMeta and a delete are seen.
	if _, err := s.SaveVersion(lineage("a.example", "9"), files("a2")); err != nil {
		t.Fatal(err)
	}
	l := lineage("c.example", "2")
	l.Version, l.Email = 1, "new@example.com"
	if err := s.UpdateMeta(l); err != nil {
		t.Fatal(err)
	}
	if err := s.Delete("b.example"); err != nil {
		t.Fatal(err)
	}
	got, _ = pass(t, s, names)
	if !reflect.DeepEqual(got, onDisk(t, dir, names)) || got["a.example"].Version != 2 || got["c.example"].Email != "new@example.com" || got["b.example"] != nil {
		t.Errorf("after a new version, UpdateMeta and a delete, the index answers %+v; the disk %+v", got, onDisk(t, dir, names))
	}
}

var headsSeeds = flag.Int("heads-seeds", 6, "seeds of TestHeadsIndexRandomized")

// TestHeadsIndexRandomized mixes, seed by seed, the writes lbcert makes
// (a new version, UpdateMeta, Prune, Delete, a version superseded), an
// operator's (an edit in place, a version directory removed or planted
// by hand), and faults on the index itself (flipped or truncated bytes,
// deleted, a pass killed before it wrote, two passes at once), with
// passes between them, some right after a write and some after
// Margin. After every pass, what Newest answered through the index must
// be exactly what the disk holds, for every name (the package's heads
// index rule); and across a seed the index must have answered some.
func TestHeadsIndexRandomized(t *testing.T) {
	shortMargin(t)
	for seed := 1; seed <= *headsSeeds; seed++ {
		t.Run(strconv.Itoa(seed), func(t *testing.T) { headsSeed(t, uint64(seed)) })
	}
}

func headsSeed(t *testing.T, seed uint64) {
	r := rand.New(rand.NewPCG(seed, 29))
	dir := t.TempDir()
	s := New(dir)
	var names []string
	for i := range 12 {
		names = append(names, fmt.Sprintf("n%d.example", i))
	}
	serial := 0
	hits := 0
	for op := range 150 {
		n := names[r.IntN(len(names))]
		what := headsOp(t, r, s, n, &serial)
		switch r.IntN(3) {
		case 0:
			continue // more writes before the next pass
		case 1:
			time.Sleep(headsMargin + 5*time.Millisecond)
		}
		want, wantRecs := onDisk(t, dir, names), recordsOnDisk(t, dir, names)
		if r.IntN(8) == 0 {
			// Two passes at once, from two processes.
			s2 := New(dir)
			h1, h2 := s.OpenHeads(), s2.OpenHeads()
			for _, x := range names {
				s.Newest(x)
				s2.Newest(x)
			}
			if r.IntN(2) == 0 {
				h1, h2 = h2, h1
			}
			h1.Close()
			h2.Close()
			continue
		}
		got, recs, h := passRecords(t, s, names)
		hits += len(names) - h.misses
		if !reflect.DeepEqual(got, want) {
			t.Fatalf("seed %d, after op %d (%s): through the index %s; on disk %s", seed, op, what, brief(got), brief(want))
		}
		if !reflect.DeepEqual(recs, wantRecs) {
			t.Fatalf("seed %d, after op %d (%s): records through the index %s; on disk %s", seed, op, what, briefRecords(recs), briefRecords(wantRecs))
		}
	}
	if hits == 0 {
		t.Fatalf("seed %d: the index never answered", seed)
	}
}

func briefRecords(m map[string]record) string {
	out := ""
	for _, n := range slices.Sorted(maps.Keys(m)) {
		r := m[n]
		out += fmt.Sprintf("%s=failures %d/%q", n, r.Failures, r.LastError)
		if r.Deployed != nil {
			out += fmt.Sprintf("/deployed v%d", r.Deployed.Version)
		}
		out += " "
	}
	return out
}

func brief(m map[string]*Lineage) string {
	out := ""
	for _, n := range slices.Sorted(maps.Keys(m)) {
		l := m[n]
		out += fmt.Sprintf("%s=v%d/%s/%s/%s ", n, l.Version, l.Cert.Serial, l.Email, l.Challenge.Webroot)
	}
	return out
}

// headsOp makes one random write or fault and says which.
func headsOp(t *testing.T, r *rand.Rand, s *Store, n string, serial *int) string {
	t.Helper()
	*serial++
	sn := strconv.Itoa(*serial)
	index := filepath.Join(s.Dir, HeadsFile)
	v := s.MaxVersion(n)
	switch k := r.IntN(16); {
	case k < 3 || v == 0:
		if _, err := s.SaveVersion(lineage(n, sn), files(sn)); err != nil {
			t.Fatal(err)
		}
		return "new version of " + n
	case k == 3:
		l, _ := s.LoadVersion(n, v)
		l.Email = "e" + sn + "@example.com"
		if err := s.UpdateMeta(l); err != nil {
			t.Fatal(err)
		}
		return "UpdateMeta of " + n
	case k == 4:
		s.Prune(n, 1)
		return "Prune of " + n
	case k == 5:
		s.Delete(n)
		return "Delete of " + n
	case k == 6:
		// In place, same inode and often the same size: an editor.
		p := filepath.Join(s.ArchiveDir(n), strconv.Itoa(v), MetaFile)
		data, _ := os.ReadFile(p)
		l, _ := s.parseMeta(n, data)
		if l != nil {
			l.Challenge.Webroot = fmt.Sprintf("/w%04d", *serial%10000)
			writeInPlace(t, p, l)
		}
		return "hand edit of " + n
	case k == 7:
		os.RemoveAll(filepath.Join(s.ArchiveDir(n), strconv.Itoa(v)))
		return "newest version of " + n + " removed by hand"
	case k == 8:
		l := lineage(n, sn)
		l.Version = v + 1
		s.Stage(l, files(sn))
		return "version staged for " + n
	case k == 9:
		data, err := os.ReadFile(index)
		if err == nil && len(data) > 0 {
			switch r.IntN(3) {
			case 0:
				data[r.IntN(len(data))] ^= byte(1 + r.IntN(255))
			case 1:
				data = data[:r.IntN(len(data))]
			default:
				data = nil
			}
			os.WriteFile(index, data, 0o600)
		}
		return "index damaged"
	case k == 11:
		if err := s.WriteStatus(n, Status{Failures: r.IntN(3), LastError: "e" + sn}); err != nil {
			t.Fatal(err)
		}
		return "status of " + n
	case k == 12:
		if err := s.SetJournal(n, Journal{Deployed: &Deployed{Version: r.IntN(4), Serial: sn}}); err != nil {
			t.Fatal(err)
		}
		return "journal of " + n
	case k == 13:
		// In place, same inode, often the same size.
		p := s.statusPath(n)
		rec, _ := s.readRecord(n)
		rec.LastError = fmt.Sprintf("h%04d", *serial%10000)
		data, _ := json.Marshal(rec)
		if f, err := os.OpenFile(p, os.O_WRONLY|os.O_TRUNC, 0); err == nil {
			f.Write(data)
			f.Close()
		}
		return "hand edit of the record of " + n
	case k == 14:
		if r.IntN(2) == 0 {
			os.WriteFile(s.statusPath(n), []byte("{not json"), 0o600)
			return "record of " + n + " corrupted"
		}
		os.Remove(s.statusPath(n))
		return "record of " + n + " removed by hand"
	default:
		// A pass killed before it wrote: its temporary file stays.
		s2 := New(s.Dir)
		s2.OpenHeads()
		s2.Newest(n)
		return "pass killed"
	}
}

// writeInPlace rewrites lineage.json through the same inode, as an
// editor that truncates and writes does.
func writeInPlace(t *testing.T, path string, l *Lineage) {
	data, err := json.MarshalIndent(l, "", "  ")
	if err != nil {
		t.Fatal(err)
	}
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_TRUNC, 0)
	if err != nil {
		t.Fatal(err)
	}
	f.Write(data)
	f.Close()
}

// During a pass the journal read after a status comes from that read,
// unless this process wrote a record in between, through any Store.
func TestPassReadsARecordOnce(t *testing.T) {
	dir := t.TempDir()
	s := New(dir)
	const n = "r.example"
	deployed := func(v int) Journal { return Journal{Deployed: &Deployed{Version: v, Serial: "s", With: "w"}} }
	if err := s.SetJournal(n, deployed(1)); err != nil {
		t.Fatal(err)
	}
	h := s.OpenHeads()
	defer h.Close()
	// A write no Store of this process makes (there is none during a
	// pass: the pass holds the lock) is not seen: the record was kept.
	s.ReadStatus(n)
	other := New(dir)
	hand, _ := json.Marshal(record{Journal: deployed(2)})
	os.WriteFile(other.statusPath(n), hand, 0o600)
	if j, _ := s.Journal(n); j.Deployed.Version != 1 {
		t.Fatalf("the journal after a status was read again from disk (version %d), not taken from that read", j.Deployed.Version)
	}
	// Once only: the next read is the disk's.
	if j, _ := s.Journal(n); j.Deployed.Version != 2 {
		t.Fatalf("a second journal read gave version %d, want the disk's 2", j.Deployed.Version)
	}
	// A write by this process, through another Store, voids it.
	s.ReadStatus(n)
	if err := other.SetJournal(n, deployed(3)); err != nil {
		t.Fatal(err)
	}
	if j, _ := s.Journal(n); j.Deployed.Version != 3 {
		t.Fatalf("the journal after this process wrote version 3 reads version %d", j.Deployed.Version)
	}
	h.Close()
	s.ReadStatus(n)
	os.WriteFile(other.statusPath(n), hand, 0o600)
	if j, _ := s.Journal(n); j.Deployed.Version != 2 {
		t.Fatalf("after the pass a journal read gave version %d, not the disk's 2", j.Deployed.Version)
	}
}

// A pass that stops before it reads a lineage (another run holds the
// lock, an interrupt) keeps that lineage's entry, and a pass that reads
// nothing leaves the index as it was; the entry of a lineage that is gone
// goes.
func TestHeadsIndexKeepsWhatAPassDidNotReach(t *testing.T) {
	shortMargin(t)
	dir := t.TempDir()
	s := New(dir)
	names := []string{"k1.example", "k2.example", "k3.example", "k4.example"}
	for i, n := range names {
		if _, err := s.SaveVersion(lineage(n, fmt.Sprint(i)), files(n)); err != nil {
			t.Fatal(err)
		}
	}
	time.Sleep(2 * headsMargin)
	pass(t, s, names)
	index := filepath.Join(dir, HeadsFile)
	before, _ := os.Stat(index)

	h := s.OpenHeads()
	s.Lineages()
	if err := h.Close(); err != nil {
		t.Fatal(err)
	}
	if after, _ := os.Stat(index); !os.SameFile(before, after) {
		t.Errorf("a pass that read no lineage rewrote the index")
	}

	// Stopped after two lineages, one of them changed: the index is
	// written again, with the two it did not reach.
	if _, err := s.SaveVersion(lineage("k1.example", "9"), files("k1b")); err != nil {
		t.Fatal(err)
	}
	time.Sleep(2 * headsMargin)
	h = s.OpenHeads()
	s.Lineages()
	s.Newest("k1.example")
	s.Newest("k2.example")
	h.Close()
	if _, h := pass(t, s, names); h.misses != 0 {
		t.Errorf("after a pass stopped halfway the next pass read %d lineages from disk, want 0", h.misses)
	}

	// A lineage deleted: its entry goes at the next pass.
	if err := s.Delete("k3.example"); err != nil {
		t.Fatal(err)
	}
	pass(t, s, names)
	h = s.OpenHeads()
	defer h.Close()
	if _, found := slices.BinarySearch(h.names, "k3.example"); found || len(h.names) != 3 {
		t.Errorf("after k3.example was deleted the index holds %v", h.names)
	}
}

// An index file lbcert cannot trust is no index: one crafted to claim
// four billion entries, a sparse 100 GiB file, a FIFO, a link. None of
// them sizes lbcert's memory, blocks it, or is written through; and a
// cache directory that is a link is not written into.
func TestHeadsIndexRefusesWhatItCannotTrust(t *testing.T) {
	shortMargin(t)
	names := []string{"t1.example", "t2.example"}
	setup := func(t *testing.T) (*Store, string) {
		dir := t.TempDir()
		s := New(dir)
		for i, n := range names {
			if _, err := s.SaveVersion(lineage(n, fmt.Sprint(i)), files(n)); err != nil {
				t.Fatal(err)
			}
		}
		os.MkdirAll(filepath.Join(dir, "cache"), 0o700)
		return s, filepath.Join(dir, HeadsFile)
	}
	trailer := func(at uint64, table []byte) []byte {
		b := binary.LittleEndian.AppendUint64(nil, at)
		b = binary.LittleEndian.AppendUint32(b, crc32.ChecksumIEEE(table))
		return append(b, headsTail...)
	}
	opens := func(t *testing.T, s *Store) {
		t.Helper()
		done := make(chan *Heads, 1)
		go func() { done <- s.OpenHeads() }()
		select {
		case h := <-done:
			if len(h.names) != 0 {
				t.Errorf("an index that cannot be trusted was loaded: %d names", len(h.names))
			}
			got := map[string]*Lineage{}
			for _, n := range names {
				got[n], _ = s.Newest(n)
			}
			if want := onDisk(t, s.Dir, names); !reflect.DeepEqual(got, want) {
				t.Errorf("through the refused index %s, on disk %s", brief(got), brief(want))
			}
			h.Close()
		case <-time.After(10 * time.Second):
			t.Fatal("opening the heads index blocked")
		}
	}
	t.Run("count", func(t *testing.T) {
		s, index := setup(t)
		table := binary.LittleEndian.AppendUint32(nil, 0xFFFFFFF0)
		os.WriteFile(index, append(append([]byte(headsMagic), table...), trailer(uint64(len(headsMagic)), table)...), 0o600)
		opens(t, s)
	})
	t.Run("sparse", func(t *testing.T) {
		s, index := setup(t)
		f, _ := os.Create(index)
		f.WriteString(headsMagic)
		tr := trailer(uint64(len(headsMagic)), nil)
		f.WriteAt(tr, 100<<30-int64(len(tr)))
		f.Close()
		opens(t, s)
	})
	t.Run("fifo", func(t *testing.T) {
		s, index := setup(t)
		if err := syscall.Mkfifo(index, 0o600); err != nil {
			t.Fatal(err)
		}
		opens(t, s)
	})
	t.Run("links", func(t *testing.T) {
		s, index := setup(t)
		elsewhere := t.TempDir()
		precious := filepath.Join(elsewhere, "heads")
		os.WriteFile(precious, []byte("precious"), 0o600)
		os.Symlink(precious, index)
		time.Sleep(2 * headsMargin)
		opens(t, s)
		if data, _ := os.ReadFile(precious); string(data) != "precious" {
			t.Errorf("the file cache/heads linked to was written: %q", data)
		}
		os.RemoveAll(filepath.Join(s.Dir, "cache"))
		os.Symlink(elsewhere, filepath.Join(s.Dir, "cache"))
		h := s.OpenHeads()
		for _, n := range names {
			s.Newest(n)
		}
		if err := h.Close(); err == nil || !strings.Contains(err.Error(), "symbolic link") {
			t.Errorf("writing the index into a linked cache directory: %v, want a refusal", err)
		}
		if data, _ := os.ReadFile(precious); string(data) != "precious" {
			t.Errorf("the index was written through the linked cache directory: %q", data)
		}
	})
}

// withRecords is a state directory of the lineages names, each with a
// status whose error is lastError, for a test of the heads index.
func withRecords(t *testing.T, names []string, lastError string) (*Store, string) {
	t.Helper()
	shortMargin(t)
	dir := t.TempDir()
	s := New(dir)
	for i, n := range names {
		if _, err := s.SaveVersion(lineage(n, fmt.Sprint(i)), files(n)); err != nil {
			t.Fatal(err)
		}
		s.WriteStatus(n, Status{Failures: 1, LastError: lastError})
	}
	return s, dir
}

// A pass reads each file through the directory it took the file's key
// from. archive/ and renewal/ swapped for copies in the middle of a pass
// (the copies edited), then put back: the next pass answers what is on
// disk, not the copies' bytes under the originals' keys.
func TestHeadsIndexAcrossADirectorySwappedMidPass(t *testing.T) {
	names := []string{"s1.example", "s2.example"}
	s, dir := withRecords(t, names, "original")
	time.Sleep(2 * headsMargin)
	pass(t, s, names)
	// Changed, so that the next pass reads s1 from disk.
	l, _ := s.LoadVersion("s1.example", 1)
	l.Email = "original@example.com"
	if err := s.UpdateMeta(l); err != nil {
		t.Fatal(err)
	}
	s.WriteStatus("s1.example", Status{Failures: 2, LastError: "original again"})
	time.Sleep(2 * headsMargin)

	h := s.OpenHeads()
	s.Lineages()
	for _, d := range []string{"archive", "renewal"} {
		p := filepath.Join(dir, d)
		if err := os.Rename(p, p+".old"); err != nil {
			t.Fatal(err)
		}
		if out, err := exec.Command("cp", "-a", p+".old", p).CombinedOutput(); err != nil {
			t.Fatalf("cp: %v %s", err, out)
		}
	}
	copyMeta := filepath.Join(s.ArchiveDir("s1.example"), "1", MetaFile)
	writeInPlace(t, copyMeta, &Lineage{Name: "s1.example", Domains: []string{"s1.example"}, Version: 1, Email: "copy@example.com"})
	copyRec, _ := json.Marshal(record{Status: Status{Failures: 9, LastError: "the copy"}})
	os.WriteFile(s.statusPath("s1.example"), copyRec, 0o600)
	for _, n := range names {
		s.Newest(n)
		s.ReadStatus(n)
		s.Journal(n)
	}
	if err := h.Close(); err != nil {
		t.Fatal(err)
	}
	for _, d := range []string{"archive", "renewal"} {
		p := filepath.Join(dir, d)
		os.RemoveAll(p)
		if err := os.Rename(p+".old", p); err != nil {
			t.Fatal(err)
		}
	}
	time.Sleep(2 * headsMargin)
	got, recs, _ := passRecords(t, s, names)
	if want := onDisk(t, dir, names); !reflect.DeepEqual(got, want) {
		t.Errorf("after the swap and back, the index answers %s, the disk %s", brief(got), brief(want))
	}
	if want := recordsOnDisk(t, dir, names); !reflect.DeepEqual(recs, want) {
		t.Errorf("after the swap and back, the index answers the records %s, the disk %s", briefRecords(recs), briefRecords(want))
	}
}

// A status read before the pass held the state directory's lock (renew
// reads the failed names' first, then waits for the lock) is not the
// one the plan uses: the holder may have written it meanwhile.
func TestRecordsReadBeforeTheLockAreReadAgain(t *testing.T) {
	dir := t.TempDir()
	s := New(dir)
	const n = "w.example"
	s.WriteStatus(n, Status{Failures: 1, LastError: "before the wait"})
	h := s.OpenHeads()
	defer h.Close()
	if st, _ := s.ReadStatus(n); st.LastError != "before the wait" {
		t.Fatalf("status %+v", st)
	}
	// The lock holder, another process, writes it.
	later, _ := json.Marshal(record{Status: Status{Failures: 2, LastError: "written while it waited"}})
	os.WriteFile(s.statusPath(n), later, 0o600)
	l, err := s.TryLock()
	if err != nil {
		t.Fatal(err)
	}
	defer l.Unlock()
	if st, _ := s.ReadStatus(n); st.LastError != "written while it waited" {
		t.Fatalf("after the lock the status is %q, not the disk's", st.LastError)
	}
}

// A record too large for the index is read from disk, and the index
// stays in use for every other lineage.
func TestHeadsIndexWithAHugeRecord(t *testing.T) {
	names := []string{"h1.example", "h2.example"}
	s, _ := withRecords(t, names, "small")
	huge := strings.Repeat("x", maxEntry+1)
	s.WriteStatus("h2.example", Status{Failures: 1, LastError: huge})
	time.Sleep(2 * headsMargin)
	pass(t, s, names)
	for range 2 {
		_, recs, h := passRecords(t, s, names)
		if len(h.names) != 2 || h.misses != 0 || h.recordHits.Load() != 1 {
			t.Fatalf("with a huge record: %d names in the index, %d lineages read from disk, %d records from the index; want 2, 0, 1",
				len(h.names), h.misses, h.recordHits.Load())
		}
		if recs["h2.example"].LastError != huge {
			t.Fatalf("the huge record read back as %d bytes", len(recs["h2.example"].LastError))
		}
	}
}

// A FIFO planted as a record reads as no record; nothing blocks on it.
func TestHeadsPassThroughAFIFORecord(t *testing.T) {
	dir := t.TempDir()
	s := New(dir)
	const n = "f.example"
	if _, err := s.SaveVersion(lineage(n, "1"), files(n)); err != nil {
		t.Fatal(err)
	}
	os.MkdirAll(filepath.Join(dir, "renewal"), 0o700)
	if err := syscall.Mkfifo(s.statusPath(n), 0o600); err != nil {
		t.Fatal(err)
	}
	done := make(chan Status, 1)
	go func() {
		h := s.OpenHeads()
		defer h.Close()
		s.Newest(n)
		st, _ := s.ReadStatus(n)
		done <- st
	}()
	select {
	case st := <-done:
		if !reflect.DeepEqual(st, Status{}) {
			t.Errorf("a FIFO read as the status %+v", st)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("a pass blocked on a FIFO planted as a record")
	}
}
