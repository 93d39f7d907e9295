package store

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// The heads index, <dir>/cache/heads, lets a renew pass over a million
// lineages decide each one without listing archive/<name>/, reading its
// newest lineage.json and reading its renewal record. A pass over
// 100,000 lineages reads those from the page cache; over a million, the
// directory blocks, file pages and inodes the pass touches no longer fit
// in the page cache of a machine with 24 GiB (or a virtual machine's host
// pages them out between passes), and each pass reads most of them from
// disk again. With the index a lineage costs three stat(2) calls and a
// read of the index, which holds the metadata and the renewal record of
// every lineage in one file.
//
// What is true of it (enforced in one place, Heads.Newest):
//
//   - It is a cache and nothing else. Deleting it, truncating it, or a
//     crash while it is written loses nothing: an index that does not
//     check out (its trailer, its table's checksum, an entry's checksum
//     and name) is not used, and the pass writes a new one.
//   - An entry is used only when archive/<name>/ and the entry's
//     version's lineage.json have now the inode number, modification
//     time and change time (and, for the file, the size) they had when
//     the entry's bytes were read, and both change times were then more
//     than Margin older than the read. Its renewal record's bytes are
//     used on the same terms, checked against renewal/<name>.json on
//     their own: an entry whose record changed keeps its metadata, and
//     the record is read from disk. A record that is not there now is
//     none, whatever the entry holds. Any change to either, by lbcert
//     or by hand (a new version renamed in, a version removed, an
//     editor's write, UpdateMeta's rename), sets its change time to the
//     kernel's clock, which is at least the read's moment less one clock
//     tick and so differs from the recorded one; Margin is far above any
//     tick. So a used entry holds the bytes that are on disk.
//   - A lineage the index does not know, or one whose entry fails the
//     check, is read from disk as without the index.
//
// The one thing that can defeat the check is the wall clock stepped back
// by more than Margin between the read and a change, with the change
// landing on the recorded change time to the tick; the inode number,
// mtime and size must then all match too.
//
// Two passes at once each write their own temporary file and rename it
// into place; the last one wins, and either is a valid cache. A pass that
// is killed leaves a temporary file, which the next pass that writes the
// index removes when it is more than an hour old.

// HeadsFile is the heads index, relative to the state directory.
const HeadsFile = "cache/heads"

// Margin is how much older than the read an entry's change times must
// be for the entry to be kept; tests shorten it.
var Margin = time.Second

// grain, set by tests, coarsens the times keyOf reads to a kernel whose
// file timestamps tick that slowly (this machine's are finer than any
// tick), so that the test meets changes within one tick of a read.
var grain time.Duration

const (
	headsMagic  = "lbcert heads 2\n"
	headsTail   = "LBHEADS2"
	keyBytes    = 8 * 11               // three stat keys: the directory's, lineage.json's, the record's (files with their size)
	entryHeader = keyBytes + 4 + 2 + 4 // then the version, the name's length, the metadata's length

	// An index is only believed within these bounds (a file crafted or
	// damaged to claim more must not size lbcert's memory): a table of
	// ten million lineages is under 300 MB, and a lineage.json under
	// 64 KiB.
	maxTable      = 1 << 30
	maxEntry      = 1 << 20
	maxRecord     = maxEntry / 4 // a larger record is read from disk, and its entry kept under maxEntry
	minTableEntry = 2 + 1 + 8 + 4
)

// statKey is what a change to a file or directory changes.
type statKey struct {
	ino          uint64
	mtime, ctime int64 // nanoseconds
	size         int64 // files only; 0 for directories
}

func keyOf(path string, dir bool) (statKey, error) {
	var st unix.Stat_t
	if err := ignoringEINTRErr(func() error { return unix.Stat(path, &st) }); err != nil {
		return statKey{}, &os.PathError{Op: "stat", Path: path, Err: err}
	}
	return keyFrom(&st, dir), nil
}

func keyFrom(st *unix.Stat_t, dir bool) statKey {
	k := statKey{ino: st.Ino, mtime: st.Mtim.Nano(), ctime: st.Ctim.Nano()}
	if g := int64(grain); g > 0 {
		k.mtime, k.ctime = k.mtime/g*g, k.ctime/g*g
	}
	if !dir {
		k.size = st.Size
	}
	return k
}

// The state directory's subdirectories a pass names its files in.
const (
	inArchive = iota
	inRenewal
	inLive
)

var passDirs = [...]string{inArchive: "archive", inRenewal: "renewal", inLive: "live"}

// openDirs opens archive/, renewal/ and live/ for the pass's stat and
// readlink calls (O_PATH: for naming files, not reading them). One that
// cannot be opened is named by its path.
func (h *Heads) openDirs() {
	for i, d := range passDirs {
		fd, err := unix.Open(filepath.Join(h.s.Dir, d), unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
		if err != nil {
			fd = -1
		}
		h.dirFD[i] = fd
	}
}

// closeDirs closes them; a call still running elsewhere (none should
// be: the pass ends after its plan) names its file by path instead.
func (h *Heads) closeDirs() {
	h.dirMu.Lock()
	defer h.dirMu.Unlock()
	for i, fd := range h.dirFD {
		if fd >= 0 {
			unix.Close(fd)
		}
		h.dirFD[i] = -1
	}
}

// keyIn is keyOf of the file rel in the pass directory in.
func (h *Heads) keyIn(in int, rel string, dir bool) (statKey, error) {
	h.dirMu.RLock()
	defer h.dirMu.RUnlock()
	fd := h.dirFD[in]
	if fd < 0 {
		return keyOf(filepath.Join(h.s.Dir, passDirs[in], rel), dir)
	}
	var st unix.Stat_t
	if err := ignoringEINTRErr(func() error { return unix.Fstatat(fd, rel, &st, 0) }); err != nil {
		return statKey{}, &os.PathError{Op: "stat", Path: filepath.Join(h.s.Dir, passDirs[in], rel), Err: err}
	}
	return keyFrom(&st, dir), nil
}

// readIn is readSmall of the file rel in the pass directory in (path
// names it in errors). The pass reads each file through the directory
// it took its key from: were archive/ or renewal/ swapped for another
// during a pass, an entry would otherwise hold one file's key and
// another's bytes, and be believed once the first came back.
func (h *Heads) readIn(in int, rel, path string, use func(data []byte) error) error {
	h.dirMu.RLock()
	defer h.dirMu.RUnlock()
	if fd := h.dirFD[in]; fd >= 0 {
		return readSmallAt(fd, rel, path, use)
	}
	return readSmall(path, use)
}

// maxVersion is Store.MaxVersion through the pass's archive/, as readIn.
func (h *Heads) maxVersion(name string) int {
	h.dirMu.RLock()
	defer h.dirMu.RUnlock()
	fd := h.dirFD[inArchive]
	if fd < 0 || strings.ContainsAny(name, "/\x00") {
		return h.s.MaxVersion(name)
	}
	dirs, _ := readEntriesAt(fd, name, filepath.Join(h.s.Dir, "archive", name), true)
	if v := versionsIn(dirs); len(v) > 0 {
		return v[len(v)-1]
	}
	return 0
}

// readLive is the target of the link live/<name>, read through the
// pass's directory; ok is false when it cannot be (then by path).
func (h *Heads) readLive(name string) (target string, ok bool, err error) {
	if strings.ContainsAny(name, "/\x00") {
		return "", false, nil
	}
	h.dirMu.RLock()
	defer h.dirMu.RUnlock()
	fd := h.dirFD[inLive]
	if fd < 0 {
		return "", false, nil
	}
	var b [256]byte
	n, err := unix.Readlinkat(fd, name, b[:])
	switch {
	case err != nil:
		return "", true, &os.PathError{Op: "readlink", Path: filepath.Join(h.s.Dir, "live", name), Err: err}
	case n == len(b):
		return "", false, nil // may be cut: read by path
	}
	return string(b[:n]), true, nil
}

func ignoringEINTRErr(f func() error) error {
	for {
		if err := f(); err != syscall.EINTR {
			return err
		}
	}
}

// Heads is one pass's use of the heads index: the index it found, and
// the one it writes for the next pass.
type Heads struct {
	s *Store

	dirMu sync.RWMutex
	// dirFD are archive/, renewal/ and live/ (passDirs), open for the
	// pass, -1 when not: a lineage's stat and readlink calls name their
	// files relative to them, a component or three, where a path from
	// the root walks every component of the state directory's path
	// again, three or four times a lineage (on a million lineages the
	// kernel's path walk was an eighth of the pass's CPU).
	dirFD [len(passDirs)]int

	// The index found: the names (sorted, as strings.Compare orders
	// them), where each one's entry is and how long it is.
	old   *os.File
	names []string
	offs  []int64
	lens  []uint32

	mu      sync.Mutex
	tmp     *os.File // the new index, made at the first entry read from disk
	w       *bufio.Writer
	wrote   int64
	entries []headEntry // every entry the next index holds
	misses  int         // entries read from disk
	// recordHits counts the records answered from the index found.
	recordHits atomic.Int64
	listed     []string // the lineages the pass listed; nil if none
	werr       error    // the first write error: the new index is dropped

	// The plan reads each lineage's head, its status, then its journal:
	// three reads microseconds apart, the last two of one record. The
	// record Newest (or ReadStatus) read is kept here for the next
	// ReadStatus and Journal of that name, unless this process wrote any
	// record in between (recordWrites counts them); other processes do
	// not write records during a pass, which holds the state directory's
	// lock.
	recMu   sync.Mutex
	records map[string]keptRecord
}

type keptRecord struct {
	r      record
	writes uint64 // recordWrites before the read
}

// keptRecords bounds the records kept: those of lineages whose journal
// the plan does not read (due now) are dropped when it is reached.
const keptRecords = 4096

func (h *Heads) keepRecord(name string, r record, writes uint64) {
	h.recMu.Lock()
	defer h.recMu.Unlock()
	if h.records == nil || len(h.records) >= keptRecords {
		h.records = map[string]keptRecord{}
	}
	h.records[name] = keptRecord{r: r, writes: writes}
}

// takeRecord is the record kept for name, once, if no record was
// written since it was read.
func (h *Heads) takeRecord(name string) (record, bool) {
	h.recMu.Lock()
	k, ok := h.records[name]
	delete(h.records, name)
	h.recMu.Unlock()
	return k.r, ok && k.writes == recordWrites.Load()
}

// peekRecord is takeRecord that leaves the record kept: the status read
// before the journal.
func (h *Heads) peekRecord(name string) (record, bool) {
	h.recMu.Lock()
	k, ok := h.records[name]
	h.recMu.Unlock()
	return k.r, ok && k.writes == recordWrites.Load()
}

// headEntry is one entry of the next index: in the old file (fromOld)
// or already written to the new one.
type headEntry struct {
	name    string
	off     int64
	n       uint32
	fromOld bool
}

// OpenHeads starts a pass's use of the heads index: Newest then goes
// through it until Close. An index that is missing or does not check out
// is as good as an empty one.
func (s *Store) OpenHeads() *Heads {
	h := &Heads{s: s}
	h.openDirs()
	if err := h.load(filepath.Join(s.Dir, HeadsFile)); err != nil {
		h.names, h.offs, h.lens = nil, nil, nil
		if h.old != nil {
			h.old.Close()
			h.old = nil
		}
	}
	s.heads.Store(h)
	return h
}

// load reads the table of the index at path: trailer (table offset,
// checksum, magic), then the table (count, then name, offset and length
// of each entry, sorted by name).
func (h *Heads) load(path string) error {
	// Not through a link, and not blocking on a FIFO planted there.
	f, err := os.OpenFile(path, os.O_RDONLY|syscall.O_NOFOLLOW|syscall.O_NONBLOCK, 0)
	if err != nil {
		return err
	}
	h.old = f
	fi, err := f.Stat()
	if err != nil {
		return err
	}
	if !fi.Mode().IsRegular() {
		return errors.New("heads index: not a regular file")
	}
	size := fi.Size()
	trailer := make([]byte, 8+4+len(headsTail))
	if size < int64(len(headsMagic)+len(trailer)) {
		return errors.New("heads index: too short")
	}
	if _, err := f.ReadAt(trailer, size-int64(len(trailer))); err != nil {
		return err
	}
	if string(trailer[12:]) != headsTail {
		return errors.New("heads index: no trailer")
	}
	at := int64(binary.LittleEndian.Uint64(trailer))
	if at < int64(len(headsMagic)) || at > size-int64(len(trailer)) {
		return errors.New("heads index: bad table offset")
	}
	if size-int64(len(trailer))-at > maxTable {
		return errors.New("heads index: table too large")
	}
	table := make([]byte, size-int64(len(trailer))-at)
	if _, err := f.ReadAt(table, at); err != nil {
		return err
	}
	if crc32.ChecksumIEEE(table) != binary.LittleEndian.Uint32(trailer[8:]) {
		return errors.New("heads index: table checksum")
	}
	return h.parseTable(table, at)
}

func (h *Heads) parseTable(table []byte, end int64) error {
	if len(table) < 4 {
		return errors.New("heads index: short table")
	}
	n := int(binary.LittleEndian.Uint32(table))
	if n > len(table)/minTableEntry {
		return errors.New("heads index: bad entry count")
	}
	all := string(table) // one allocation that every name shares
	h.names, h.offs, h.lens = make([]string, 0, n), make([]int64, 0, n), make([]uint32, 0, n)
	p := 4
	for range n {
		if p+2 > len(all) {
			return errors.New("heads index: short table")
		}
		l := int(binary.LittleEndian.Uint16(table[p:]))
		if p+2+l+12 > len(all) {
			return errors.New("heads index: short table")
		}
		name := all[p+2 : p+2+l]
		off := int64(binary.LittleEndian.Uint64(table[p+2+l:]))
		ln := binary.LittleEndian.Uint32(table[p+2+l+8:])
		if off < int64(len(headsMagic)) || off+int64(ln) > end || ln > maxEntry || (len(h.names) > 0 && name <= h.names[len(h.names)-1]) {
			return errors.New("heads index: bad table entry")
		}
		h.names, h.offs, h.lens = append(h.names, name), append(h.offs, off), append(h.lens, ln)
		p += 2 + l + 12
	}
	return nil
}

// entry is one lineage's entry of an index: its newest version, the
// keys its parts were read under, and the parts: the metadata and the
// renewal record, compact JSON. A zero rec key is a record not kept (there
// was none, or it was too new to trust).
type entry struct {
	v              int
	dir, meta, rec statKey
	data, recData  []byte
}

// cached is name's entry in the index found, checked against its
// checksum and its name, with its bytes in *bp (a buffer of buffers,
// grown as needed), and its place in the index.
func (h *Heads) cached(name string, bp *[]byte) (int, entry, bool) {
	i, found := slices.BinarySearch(h.names, name)
	if !found || h.old == nil {
		return 0, entry{}, false
	}
	*bp = slices.Grow((*bp)[:0], int(h.lens[i]))
	buf := (*bp)[:h.lens[i]]
	if _, err := h.old.ReadAt(buf, h.offs[i]); err != nil || len(buf) < entryHeader+4 {
		return 0, entry{}, false
	}
	body, sum := buf[:len(buf)-4], binary.LittleEndian.Uint32(buf[len(buf)-4:])
	if crc32.ChecksumIEEE(body) != sum {
		return 0, entry{}, false
	}
	var e entry
	e.dir, e.meta, e.rec = decodeKeys(body)
	e.v = int(binary.LittleEndian.Uint32(body[keyBytes:]))
	nl := int(binary.LittleEndian.Uint16(body[keyBytes+4:]))
	ml := int(binary.LittleEndian.Uint32(body[keyBytes+6:]))
	if entryHeader+nl+ml > len(body) || string(body[entryHeader:entryHeader+nl]) != name {
		return 0, entry{}, false
	}
	e.data, e.recData = body[entryHeader+nl:entryHeader+nl+ml], body[entryHeader+nl+ml:]
	return i, e, true
}

func encodeKeys(b []byte, dir, meta, rec statKey) []byte {
	for _, x := range []uint64{dir.ino, uint64(dir.mtime), uint64(dir.ctime),
		meta.ino, uint64(meta.mtime), uint64(meta.ctime), uint64(meta.size),
		rec.ino, uint64(rec.mtime), uint64(rec.ctime), uint64(rec.size)} {
		b = binary.LittleEndian.AppendUint64(b, x)
	}
	return b
}

func decodeKeys(b []byte) (dir, meta, rec statKey) {
	u := func(i int) uint64 { return binary.LittleEndian.Uint64(b[8*i:]) }
	dir = statKey{ino: u(0), mtime: int64(u(1)), ctime: int64(u(2))}
	meta = statKey{ino: u(3), mtime: int64(u(4)), ctime: int64(u(5)), size: int64(u(6))}
	rec = statKey{ino: u(7), mtime: int64(u(8)), ctime: int64(u(9)), size: int64(u(10))}
	return dir, meta, rec
}

// Newest is Store.Newest through the index: the entry when its keys
// still hold (see the package's heads index), else the disk, whose
// answer becomes the next index's entry once it is old enough to trust.
//
// It also reads the lineage's renewal record, through the entry when its
// part holds, for the plan's ReadStatus and Journal of name that follow
// (keepRecord): every pass through the index is a renew plan, which asks
// for both.
func (h *Heads) Newest(name string) (*Lineage, error) {
	start := time.Now()
	gen := recordWrites.Load()
	dir, err := h.keyIn(inArchive, name, true)
	if err != nil {
		return h.s.newestOnDisk(name)
	}
	bp := buffers.Get().(*[]byte)
	defer buffers.Put(bp)
	if i, e, ok := h.cached(name, bp); ok && e.dir == dir {
		meta, err := h.keyIn(inArchive, name+"/"+strconv.Itoa(e.v)+"/"+MetaFile, false)
		if err == nil && meta == e.meta {
			if l, err := h.s.parseMeta(name, e.data); err == nil {
				if rec, recData, changed := h.record(name, e.rec, e.recData, start, gen); changed {
					h.add(name, entry{v: e.v, dir: dir, meta: meta, rec: rec, data: e.data, recData: recData})
				} else {
					h.keepOld(i)
				}
				return l, nil
			}
		}
	}
	v := h.maxVersion(name)
	if v == 0 {
		return nil, fmt.Errorf("lineage %q: %w", name, ErrNotFound)
	}
	path := filepath.Join(h.s.ArchiveDir(name), strconv.Itoa(v), MetaFile)
	rel := name + "/" + strconv.Itoa(v) + "/" + MetaFile
	meta, kerr := h.keyIn(inArchive, rel, false)
	var l *Lineage
	compact := bytes.NewBuffer((*bp)[:0]) // the entry's buffer, free again
	err = h.readIn(inArchive, rel, path, func(data []byte) error {
		var perr error
		if l, perr = h.s.parseMeta(name, data); perr == nil {
			perr = json.Compact(compact, data)
		}
		return perr
	})
	defer func() { *bp = compact.Bytes()[:0] }()
	if errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("lineage %q: %w", name, ErrNotFound)
	}
	if err != nil {
		return nil, err
	}
	rec, recData, _ := h.record(name, statKey{}, nil, start, gen)
	if old := start.Add(-Margin).UnixNano(); kerr == nil && dir.ctime < old && meta.ctime < old {
		h.add(name, entry{v: v, dir: dir, meta: meta, rec: rec, data: compact.Bytes(), recData: recData})
	}
	return l, nil
}

// record reads name's renewal record, through the entry's part (read
// under key k, bytes b) when it holds, and keeps it for the plan
// (keepRecord, with gen, recordWrites before the first stat). It returns
// the part the next index holds, and whether that differs from the
// entry's: a record read from disk that is old enough to trust. A record
// that cannot be read is not kept: ReadStatus reads it and says why.
func (h *Heads) record(name string, k statKey, b []byte, start time.Time, gen uint64) (statKey, []byte, bool) {
	path := h.s.statusPath(name)
	now, err := h.keyIn(inRenewal, name+".json", false)
	var r record
	switch {
	case errors.Is(err, os.ErrNotExist):
		// None: the entry's part, if any, is of a record that went,
		// and its key cannot match a file made later (its change time
		// is then the clock's).
		h.keepRecord(name, r, gen)
		return k, b, false
	case err == nil && k != (statKey{}) && now == k && json.Unmarshal(b, &r) == nil:
		h.recordHits.Add(1)
		h.keepRecord(name, r, gen)
		return k, b, false
	}
	r = record{} // an entry's part that did not parse may have filled some
	var compact bytes.Buffer
	rerr := h.readIn(inRenewal, name+".json", path, func(data []byte) error {
		if json.Unmarshal(data, &r) != nil {
			r = record{} // corrupt counts as none (readRecord), and is not kept
			return nil
		}
		return json.Compact(&compact, data)
	})
	if rerr != nil {
		return k, b, false
	}
	h.keepRecord(name, r, gen)
	if err != nil || compact.Len() == 0 || compact.Len() > maxRecord || now.ctime >= start.Add(-Margin).UnixNano() {
		// Not to be trusted yet: the entry's part, if any, cannot
		// match this file, and the next pass reads it again.
		return k, b, false
	}
	return now, compact.Bytes(), true
}

func (h *Heads) keepOld(i int) {
	h.mu.Lock()
	if h.entries == nil {
		h.entries = make([]headEntry, 0, len(h.names))
	}
	h.entries = append(h.entries, headEntry{name: h.names[i], off: h.offs[i], n: h.lens[i], fromOld: true})
	h.mu.Unlock()
}

// add writes an entry read from disk, in whole or in part, to the new
// index.
func (h *Heads) add(name string, e entry) {
	if entryHeader+len(name)+len(e.data)+len(e.recData)+4 > maxEntry {
		// An index holding it would be refused whole; the lineage is
		// read from disk instead, as one the index does not know.
		return
	}
	body := encodeKeys(make([]byte, 0, entryHeader+len(name)+len(e.data)+len(e.recData)+4), e.dir, e.meta, e.rec)
	body = binary.LittleEndian.AppendUint32(body, uint32(e.v))
	body = binary.LittleEndian.AppendUint16(body, uint16(len(name)))
	body = binary.LittleEndian.AppendUint32(body, uint32(len(e.data)))
	body = append(append(append(body, name...), e.data...), e.recData...)
	body = binary.LittleEndian.AppendUint32(body, crc32.ChecksumIEEE(body))
	h.mu.Lock()
	defer h.mu.Unlock()
	h.misses++
	if h.werr != nil {
		return
	}
	if h.tmp == nil {
		if h.werr = h.create(); h.werr != nil {
			return
		}
	}
	if _, h.werr = h.w.Write(body); h.werr == nil {
		h.entries = append(h.entries, headEntry{name: name, off: h.wrote, n: uint32(len(body))})
		h.wrote += int64(len(body))
	}
}

// create makes the new index's temporary file, clearing those of
// passes killed more than an hour ago.
func (h *Heads) create() error {
	dir := filepath.Join(h.s.Dir, filepath.Dir(HeadsFile))
	if err := realDir(dir); err != nil {
		return err
	}
	if old, _ := filepath.Glob(filepath.Join(dir, ".heads-*.tmp")); len(old) > 0 {
		for _, p := range old {
			if fi, err := os.Stat(p); err == nil && time.Since(fi.ModTime()) > time.Hour {
				os.Remove(p)
			}
		}
	}
	f, err := os.CreateTemp(dir, ".heads-*.tmp")
	if err != nil {
		return err
	}
	h.tmp, h.w = f, bufio.NewWriterSize(f, 1<<20)
	n, err := h.w.WriteString(headsMagic)
	h.wrote = int64(n)
	return err
}

// Close ends the pass's use of the index. When the pass read anything
// from disk or did not use every entry it found, the new index replaces
// the old one; otherwise the old one is still exact and stays.
func (h *Heads) Close() error {
	h.s.heads.CompareAndSwap(h, nil)
	h.closeDirs()
	defer func() {
		if h.old != nil {
			h.old.Close()
		}
		if h.tmp != nil {
			h.tmp.Close()
			os.Remove(h.tmp.Name())
		}
	}()
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.misses == 0 && len(h.entries) >= len(h.names) {
		// Every entry came from the index found (and one per name, but
		// for a name read twice): it is still exact, at most holding a
		// lineage that went, which no lookup finds on disk.
		return nil
	}
	entries, dropped := h.untouched(dedupe(h.entries))
	if h.misses == 0 && dropped == 0 {
		return nil // the index found is still exact
	}
	if h.werr == nil && h.tmp == nil {
		h.werr = h.create()
	}
	if h.werr != nil {
		return fmt.Errorf("heads index: %w", h.werr)
	}
	if err := h.finish(entries); err != nil {
		return fmt.Errorf("heads index: %w", err)
	}
	if err := os.Rename(h.tmp.Name(), filepath.Join(h.s.Dir, HeadsFile)); err != nil {
		return fmt.Errorf("heads index: %w", err)
	}
	h.tmp.Close()
	h.tmp = nil
	return nil
}

// untouched adds to entries (sorted by name) the old entries the pass
// did not read, when they are of lineages the pass listed (it was
// stopped before it reached them, or failed before its plan) or when it
// listed none; it also sorts the result and reports how many old
// entries went: lineages that are gone.
func (h *Heads) untouched(entries []headEntry) ([]headEntry, int) {
	dropped := 0
	j := 0
	sorted := false
	for i, n := range h.names {
		for j < len(entries) && entries[j].name < n {
			j++
		}
		if j < len(entries) && entries[j].name == n {
			continue
		}
		if h.listed != nil && !sorted {
			slices.Sort(h.listed) // only now: most passes read every lineage
			sorted = true
		}
		if _, listed := slices.BinarySearch(h.listed, n); h.listed != nil && !listed {
			dropped++
			continue
		}
		entries = append(entries, headEntry{name: n, off: h.offs[i], n: h.lens[i], fromOld: true})
	}
	slices.SortFunc(entries, func(a, b headEntry) int { return strings.Compare(a.name, b.name) })
	return entries, dropped
}

// listing tells the pass which lineages the state directory holds
// (Store.Lineages).
func (h *Heads) listing(names []string) {
	l := slices.Clone(names)
	h.mu.Lock()
	h.listed = l
	h.mu.Unlock()
}

// dedupe sorts entries by name and keeps, of a name read twice in one
// pass, the last.
func dedupe(es []headEntry) []headEntry {
	slices.SortStableFunc(es, func(a, b headEntry) int { return strings.Compare(a.name, b.name) })
	out := es[:0]
	for i, e := range es {
		if i+1 < len(es) && es[i+1].name == e.name {
			continue
		}
		out = append(out, e)
	}
	return out
}

// finish copies the entries kept from the old index after the new
// ones, then writes the table and the trailer.
func (h *Heads) finish(entries []headEntry) error {
	// Entries kept are copied in runs of neighbours in the old file
	// (most of them, after a pass like the last), not one read each.
	var runAt, runLen int64
	flush := func() error {
		if runLen == 0 {
			return nil
		}
		_, err := io.Copy(h.w, io.NewSectionReader(h.old, runAt, runLen))
		runLen = 0
		return err
	}
	for i := range entries {
		e := &entries[i]
		if !e.fromOld {
			continue
		}
		if runLen > 0 && runAt+runLen != e.off {
			if err := flush(); err != nil {
				return err
			}
		}
		if runLen == 0 {
			runAt = e.off
		}
		runLen += int64(e.n)
		e.off, e.fromOld = h.wrote, false
		h.wrote += int64(e.n)
	}
	if err := flush(); err != nil {
		return err
	}
	table := binary.LittleEndian.AppendUint32(nil, uint32(len(entries)))
	for _, e := range entries {
		table = binary.LittleEndian.AppendUint16(table, uint16(len(e.name)))
		table = append(table, e.name...)
		table = binary.LittleEndian.AppendUint64(table, uint64(e.off))
		table = binary.LittleEndian.AppendUint32(table, e.n)
	}
	at := h.wrote
	if _, err := h.w.Write(table); err != nil {
		return err
	}
	trailer := binary.LittleEndian.AppendUint64(nil, uint64(at))
	trailer = binary.LittleEndian.AppendUint32(trailer, crc32.ChecksumIEEE(table))
	if _, err := h.w.WriteString(string(trailer) + headsTail); err != nil {
		return err
	}
	return h.w.Flush()
}
