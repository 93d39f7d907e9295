package store

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/lbcert/lbcert/internal/names"
)

// Status is what renew learns between runs about a lineage: the ARI
// window and the moment picked in it, and the failure backoff. It is
// the catalog's (shared by a fleet); on one host it lives in
// <dir>/renewal/<name>.json beside this node's Journal, apart from the
// versioned lineage, because it changes without a new certificate.
// Losing it loses nothing that matters: renew asks ARI again and starts
// the backoff afresh.
type Status struct {
	// ARI (RFC 9773) for the certificate with serial ARISerial.
	ARISerial      string    `json:"ari_serial,omitempty"`
	ARIWindowStart time.Time `json:"ari_window_start,omitzero"`
	ARIWindowEnd   time.Time `json:"ari_window_end,omitzero"`
	ARIRenewAt     time.Time `json:"ari_renew_at,omitzero"`    // random moment in the window, picked once
	ARINextCheck   time.Time `json:"ari_next_check,omitzero"`  // now + the CA's Retry-After
	ARIUnsupported time.Time `json:"ari_unsupported,omitzero"` // the CA had no ARI; ask again after this

	// Backoff after failed attempts: 1h, 2h, 4h, ... up to 24h.
	Failures    int       `json:"failures,omitempty"`
	LastError   string    `json:"last_error,omitempty"`
	LastAttempt time.Time `json:"last_attempt,omitzero"`
	NextAttempt time.Time `json:"next_attempt,omitzero"`

	// WarnedAt is when a report last warned that this certificate is
	// heading for expiry unrenewed: at most one such warning a day.
	WarnedAt time.Time `json:"warned_at,omitzero"`

	// Request is the settings of a name's first order, kept while it
	// fails: a name never issued has no lineage to read them from, and
	// renew retries it with them once its backoff ends. Cleared with the
	// rest of the status when a certificate is issued.
	Request *Lineage `json:"request,omitempty"`
}

// Journal is what this node owes and has done for a lineage (see Local).
type Journal struct {
	// Pending is a version that was obtained or fetched and made live
	// (or is about to be) but is not known to be deployed: written
	// before live/ is switched to it, cleared once the load balancer
	// serves it. A run that finds one deploys it instead of ordering
	// again (a failed deploy must not burn the CA's five-per-week limit
	// on the same names).
	Pending *Pending `json:"pending,omitempty"`
	// Deployed is the version this node last deployed, and with what.
	Deployed *Deployed `json:"deployed,omitempty"`
}

// Pending is a deploy still owed.
type Pending struct {
	Version  int       `json:"version"`
	Previous int       `json:"previous"` // live before it; 0 for a new lineage
	Since    time.Time `json:"since"`
	Error    string    `json:"error,omitempty"` // why the last deploy failed
	// Check names the load balancer's failed config test when that is
	// why (deploy.Result's Check): the next try first tests the config
	// as it is, and waits while it still fails the same way.
	Check string `json:"check,omitempty"`
	// PID is the process that journalled it, Start when that process
	// started (Self): while it runs (Running), another process of the
	// node leaves the deploy to it.
	PID   int    `json:"pid,omitempty"`
	Start string `json:"start,omitempty"`
}

// Deployed is the last successful deploy of a lineage on this node.
type Deployed struct {
	Version int       `json:"version"`
	Serial  string    `json:"serial"`
	With    string    `json:"with"` // DeployDigest of the settings used
	At      time.Time `json:"at"`
}

// DeployDigest names a set of deploy settings: a node whose settings
// changed redeploys what it already serves.
func DeployDigest(d Deploy) string {
	// A pass over a million lineages asks it of each, nearly always with
	// the same settings: the last answer is kept.
	if m := lastDigest.Load(); m != nil && m.d == d {
		return m.digest
	}
	data, _ := json.Marshal(d)
	sum := sha256.Sum256(data)
	m := &digestMemo{d: d, digest: hex.EncodeToString(sum[:8])}
	lastDigest.Store(m)
	return m.digest
}

type digestMemo struct {
	d      Deploy
	digest string
}

var lastDigest atomic.Pointer[digestMemo]

// record is the file <dir>/renewal/<name>.json: the status and this
// node's journal side by side (the format of earlier releases, whose
// "pending" key is the journal's).
type record struct {
	Status
	Journal
}

func (s *Store) statusPath(name string) string {
	return filepath.Join(s.Dir, "renewal", name+".json")
}

// recordLocks serialises the read-modify-write of one record by the
// workers of this process: the status and the journal of one lineage
// are written by different steps.
var recordLocks sync.Map // path -> *sync.Mutex

func (s *Store) lockRecord(name string) func() {
	v, _ := recordLocks.LoadOrStore(s.statusPath(name), &sync.Mutex{})
	m := v.(*sync.Mutex)
	m.Lock()
	return m.Unlock
}

// readRecord returns the record of name, or a zero one when there is
// none. A corrupt file counts as none, for the reason Status gives.
func (s *Store) readRecord(name string) (record, error) {
	var r record
	if err := names.Lineage(name); err != nil {
		return r, err
	}
	err := readSmall(s.statusPath(name), func(data []byte) error {
		if json.Unmarshal(data, &r) != nil {
			r = record{}
		}
		return nil
	})
	if errors.Is(err, fs.ErrNotExist) {
		return r, nil
	}
	return r, err
}

func (s *Store) writeRecord(name string, r record) error {
	if r == (record{}) {
		return s.removeRecord(name)
	}
	dir := filepath.Join(s.Dir, "renewal")
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	data, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return err
	}
	err = WriteFile(s.statusPath(name), append(data, '\n'), 0o600)
	s.recordWritten()
	if err != nil {
		return fmt.Errorf("status of %s: %w", name, err)
	}
	return nil
}

// recordWrites counts the writes of records by this process, through
// any Store: one voids the records a pass kept (Heads.keepRecord),
// whichever lineage they are of.
var recordWrites atomic.Uint64

func (s *Store) recordWritten() { recordWrites.Add(1) }

// ReadStatus returns the status of lineage name (zero when none).
func (s *Store) ReadStatus(name string) (Status, error) {
	h := s.heads.Load()
	if h != nil {
		if r, ok := h.peekRecord(name); ok {
			return r.Status, nil
		}
	}
	gen := recordWrites.Load()
	r, err := s.readRecord(name)
	if h != nil && err == nil {
		h.keepRecord(name, r, gen)
	}
	return r.Status, err
}

// WriteStatus saves the status of lineage name atomically, keeping its
// journal.
func (s *Store) WriteStatus(name string, st Status) error {
	if err := names.Lineage(name); err != nil {
		return err
	}
	defer s.lockRecord(name)()
	r, err := s.readRecord(name)
	if err != nil {
		return err
	}
	r.Status = st
	return s.writeRecord(name, r)
}

// Journal returns this node's journal of lineage name (zero when none).
func (s *Store) Journal(name string) (Journal, error) {
	if h := s.heads.Load(); h != nil {
		if r, ok := h.takeRecord(name); ok {
			return r.Journal, nil
		}
	}
	r, err := s.readRecord(name)
	return r.Journal, err
}

// SetJournal saves the journal of lineage name atomically, keeping its
// status.
func (s *Store) SetJournal(name string, j Journal) error {
	if err := names.Lineage(name); err != nil {
		return err
	}
	defer s.lockRecord(name)()
	r, err := s.readRecord(name)
	if err != nil {
		return err
	}
	r.Journal = j
	return s.writeRecord(name, r)
}

// SetJournals is SetJournal for many lineages at once (lineages[i]
// gets js[i]), with two syncs of the file system for them all
// (WriteFiles): a deploy of thousands records each. errs[i] is the
// error of lineages[i], nil when its journal was saved.
func (s *Store) SetJournals(lineages []string, js []Journal) (errs []error) {
	errs = make([]error, len(lineages))
	held := map[string]bool{}
	for i, name := range lineages {
		if errs[i] = names.Lineage(name); errs[i] != nil {
			continue
		}
		if !held[name] { // a name given twice: the last journal wins
			held[name] = true
			defer s.lockRecord(name)()
		}
	}
	enc := s.encodeJournals(lineages, js, errs)
	var files []FileWrite
	var at []int      // the lineages index of each file
	var recs []record // and its record
	for i, name := range lineages {
		switch {
		case errs[i] != nil:
		case enc[i].remove:
			errs[i] = s.removeRecord(name)
		default:
			files = append(files, FileWrite{Path: s.statusPath(name), Data: enc[i].data, Perm: 0o600})
			at = append(at, i)
			recs = append(recs, enc[i].rec)
		}
	}
	if len(files) == 0 {
		return errs
	}
	if err := os.MkdirAll(filepath.Join(s.Dir, "renewal"), 0o700); err != nil {
		for _, i := range at {
			errs[i] = err
		}
		return errs
	}
	done := make([]bool, len(files))
	err := writeFiles(files, func(k int) { done[k] = true })
	s.recordWritten()
	if err == nil {
		return errs
	}
	// The batch needs room for every temporary file at once, and stops
	// at the first record it cannot replace: the records it did not
	// write are written one at a time, as SetJournal does, each with its
	// own error. When it wrote them all, its last sync failed.
	all := !slices.Contains(done, false)
	for k, i := range at {
		switch {
		case all:
			errs[i] = fmt.Errorf("status of %s: %w", lineages[i], err)
		case !done[k]:
			errs[i] = s.writeRecord(lineages[i], recs[k])
		}
	}
	return errs
}

// encodedRecord is one lineage's record with its new journal, encoded,
// or to be removed when nothing is left in it.
type encodedRecord struct {
	data   []byte
	rec    record
	remove bool
}

// encodeJournals reads each lineage's record and encodes it with its new
// journal, journalWorkers at a time (a node joining a fleet records
// 100,000); the caller holds the lineages' locks. errs[i] is set for a
// lineage that could not be read or encoded; one that already has an
// error is skipped.
func (s *Store) encodeJournals(lineages []string, js []Journal, errs []error) []encodedRecord {
	enc := make([]encodedRecord, len(lineages))
	atOnce(len(lineages), journalWorkers, func(i int) bool {
		if errs[i] != nil {
			return true
		}
		r, err := s.readRecord(lineages[i])
		if err != nil {
			errs[i] = err
			return true
		}
		r.Journal = js[i]
		if r == (record{}) {
			enc[i].remove = true
			return true
		}
		data, err := json.MarshalIndent(r, "", "  ")
		if err != nil {
			errs[i] = err
			return true
		}
		enc[i] = encodedRecord{data: append(data, '\n'), rec: r}
		return true
	})
	return enc
}

// journalWorkers is how many records SetJournals reads at once.
const journalWorkers = 4

// writeFiles is WriteFiles; tests replace it to fail on cue.
var writeFiles = WriteFiles

// removeRecord deletes the record of lineage name, if any.
func (s *Store) removeRecord(name string) error {
	err := os.Remove(s.statusPath(name))
	s.recordWritten()
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	return err
}

// Pending lists the lineages whose journal owes a deploy: what a
// restarted fleet agent finishes from disk before Redis answers.
func (s *Store) PendingNames() ([]string, error) {
	return s.recordNames(func(name string) bool {
		j, err := s.Journal(name)
		return err == nil && j.Pending != nil
	})
}

// FailedNames lists the names with failures on record and no lineage:
// names whose first order failed, which list shows as never issued.
//
// Only the records of names that are not live are read: a renew pass
// over a million lineages would otherwise read every record once more,
// one after the other, before planning (#29).
func (s *Store) FailedNames() ([]string, error) {
	// live/ is read beside renewal/: two directories of a million
	// entries each on a large state directory.
	var live map[string]struct{}
	var err error
	listed := make(chan struct{})
	go func() { live, err = s.liveSet(); close(listed) }()
	records, rerr := s.recordEntries()
	<-listed
	if err == nil {
		err = rerr
	}
	if err != nil {
		return nil, err
	}
	return namesOf(records, func(name string) bool {
		if _, ok := live[name]; ok {
			return false
		}
		st, err := s.ReadStatus(name)
		return err == nil && st.Failures > 0 && !s.Exists(name)
	}), nil
}

// liveSet is the set of entries of live/ (not checked further: a name
// in it is only skipped, and Exists decides for the others).
func (s *Store) liveSet() (map[string]struct{}, error) {
	names, err := readEntries(filepath.Join(s.Dir, "live"), false)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	set := make(map[string]struct{}, len(names))
	for _, n := range names {
		set[n] = struct{}{}
	}
	return set, nil
}

// recordNames lists the names with a record that keep says to keep.
// Sorted, as os.ReadDir would list them: the few kept are sorted, not
// the million listed.
func (s *Store) recordNames(keep func(name string) bool) ([]string, error) {
	entries, err := s.recordEntries()
	if err != nil {
		return nil, err
	}
	return namesOf(entries, keep), nil
}

// recordEntries are the entries of renewal/; none when it is missing.
func (s *Store) recordEntries() ([]string, error) {
	entries, err := readEntries(filepath.Join(s.Dir, "renewal"), false)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	return entries, err
}

// namesOf are the lineage names of the records among entries that keep
// keeps, sorted.
func namesOf(entries []string, keep func(name string) bool) []string {
	var out []string
	for _, e := range entries {
		name, ok := cutSuffix(e, ".json")
		if ok && names.Lineage(name) == nil && keep(name) {
			out = append(out, name)
		}
	}
	slices.Sort(out)
	return out
}

func cutSuffix(s, suffix string) (string, bool) {
	if len(s) > len(suffix) && s[len(s)-len(suffix):] == suffix {
		return s[:len(s)-len(suffix)], true
	}
	return s, false
}
