package store

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/lbcert/lbcert/internal/names"
)

// Stage writes version l.Version of lineage l.Name (see Local): nothing
// when that version is here with the same serial; a replacement when it
// is here with another.
func (s *Store) Stage(l *Lineage, files Files) error {
	if err := names.Lineage(l.Name); err != nil {
		return err
	}
	if l.Version < 1 {
		return fmt.Errorf("lineage %q: version %d", l.Name, l.Version)
	}
	have, err := s.LoadVersion(l.Name, l.Version)
	switch {
	case err == nil && have.Cert.Serial == l.Cert.Serial:
		return s.ClearTombstoneBefore(l.Name, l.BornAt())
	case err == nil:
		if err := s.supersede(l.Name, l.Version, have.Cert.Serial); err != nil {
			return err
		}
	case !errors.Is(err, ErrNotFound):
		return err
	}
	if _, err := s.saveAt(l, files, l.Version); err != nil {
		return err
	}
	return s.ClearTombstoneBefore(l.Name, l.BornAt())
}

// supersede moves version v of name out of the way: its number names
// another certificate now. The directory is renamed, then removed: a
// crash in between leaves a hidden directory that is never read.
func (s *Store) supersede(name string, v int, serial string) error {
	dir := filepath.Join(s.ArchiveDir(name), strconv.Itoa(v))
	aside := filepath.Join(s.ArchiveDir(name), fmt.Sprintf(".superseded-%d-%s", v, serial))
	if err := os.Rename(dir, aside); err != nil {
		return fmt.Errorf("lineage %q: move version %d aside: %w", name, v, err)
	}
	return os.RemoveAll(aside)
}

// Tombstone records that a lineage was deleted, so that a node that
// still holds it (or a catalog rebuilt from nodes) never brings it back.
// Fence is the catalog's lease counter at the delete: a certificate
// obtained under an older lease is refused. Version is the highest
// version number the lineage had here: a catalog rebuilt from nodes
// numbers the name, issued again, above it, so that no number names two
// certificates (invariant I2) even though the files are gone.
type Tombstone struct {
	At      time.Time `json:"deleted_at"`
	Fence   int64     `json:"fence,omitempty"`
	By      string    `json:"by,omitempty"`
	Version int       `json:"version,omitempty"`
}

func (s *Store) tombstonePath(name string) string {
	return filepath.Join(s.Dir, "deleted", name+".json")
}

// Forget removes lineage name from this node (see Local) after writing
// its tombstone.
func (s *Store) Forget(name string, t Tombstone) error {
	if err := names.Lineage(name); err != nil {
		return err
	}
	if !t.At.IsZero() {
		if err := s.WriteTombstone(name, t); err != nil {
			return err
		}
	}
	return s.Delete(name)
}

// WriteTombstone records that name was deleted, keeping its files: a
// fleet node whose load balancer config still names them. Its Version
// is at least the highest version here, archived or in a tombstone.
func (s *Store) WriteTombstone(name string, t Tombstone) error {
	if err := names.Lineage(name); err != nil {
		return err
	}
	t.Version = max(t.Version, s.MaxVersion(name))
	if old, _ := s.ReadTombstone(name); old != nil {
		t.Version = max(t.Version, old.Version)
	}
	data, _ := json.Marshal(t)
	if err := os.MkdirAll(filepath.Join(s.Dir, "deleted"), 0o700); err != nil {
		return err
	}
	return WriteFile(s.tombstonePath(name), append(data, '\n'), 0o600)
}

// Tombstones are the lineages deleted on or through this node.
func (s *Store) Tombstones() (map[string]Tombstone, error) {
	entries, err := os.ReadDir(filepath.Join(s.Dir, "deleted"))
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	out := map[string]Tombstone{}
	for _, e := range entries {
		name, ok := cutSuffix(e.Name(), ".json")
		if !ok || names.Lineage(name) != nil {
			continue
		}
		if t, err := s.ReadTombstone(name); err == nil && t != nil {
			out[name] = *t
		}
	}
	return out, nil
}

// ReadTombstone returns the tombstone of name, or nil when it has none.
func (s *Store) ReadTombstone(name string) (*Tombstone, error) {
	data, err := os.ReadFile(s.tombstonePath(name))
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var t Tombstone
	if err := json.Unmarshal(data, &t); err != nil {
		return nil, fmt.Errorf("%s: %v", s.tombstonePath(name), err)
	}
	return &t, nil
}

// ClearTombstoneBefore removes name's tombstone when a lineage born
// after the delete arrives: the name was issued again.
func (s *Store) ClearTombstoneBefore(name string, issued time.Time) error {
	t, err := s.ReadTombstone(name)
	if err != nil || t == nil || !issued.After(t.At) {
		return err
	}
	err = os.Remove(s.tombstonePath(name))
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	return err
}

// Lineages lists every lineage with an archived version, live or not
// (one whose first deploy failed is archived but not live), sorted the
// way people count. It is what a directory catalog holds.
func (s *Store) Lineages() ([]string, error) {
	dirs, err := readDirs(filepath.Join(s.Dir, "archive"))
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	out := dirs[:0]
	for _, n := range dirs {
		if !strings.HasPrefix(n, ".") && names.Lineage(n) == nil {
			out = append(out, n)
		}
	}
	sort.Slice(out, func(i, j int) bool { return NaturalLess(out[i], out[j]) })
	if h := s.heads.Load(); h != nil {
		h.listing(out)
	}
	return slices.Clip(out), nil
}

// Newest is the metadata of the newest archived version of name, or
// ErrNotFound when it has none.
func (s *Store) Newest(name string) (*Lineage, error) {
	if err := names.Lineage(name); err != nil {
		return nil, err
	}
	if h := s.heads.Load(); h != nil {
		return h.Newest(name)
	}
	return s.newestOnDisk(name)
}

func (s *Store) newestOnDisk(name string) (*Lineage, error) {
	v := s.MaxVersion(name)
	if v == 0 {
		return nil, fmt.Errorf("lineage %q: %w", name, ErrNotFound)
	}
	return s.readMeta(name, filepath.Join(s.ArchiveDir(name), strconv.Itoa(v), MetaFile)) // name checked above
}

// ReadVersion returns the metadata and files of one archived version.
func (s *Store) ReadVersion(name string, v int) (*Lineage, Files, error) {
	l, err := s.LoadVersion(name, v)
	if err != nil {
		return nil, Files{}, err
	}
	dir := filepath.Join(s.ArchiveDir(name), strconv.Itoa(v))
	var f Files
	for _, p := range []struct {
		file string
		to   *[]byte
	}{{CertFile, &f.Cert}, {ChainFile, &f.Chain}, {FullchainFile, &f.Fullchain}, {KeyFile, &f.Key}} {
		data, err := os.ReadFile(filepath.Join(dir, p.file))
		if err != nil {
			return nil, Files{}, err
		}
		*p.to = data
	}
	return l, f, nil
}

// lostMark, inside a version's directory, says that the catalog gave
// its number to another certificate (a Redis that lost the write this
// node made): the version goes at the next Prune once it is not live,
// whatever --keep-versions says, so that one number names one
// certificate on every node (package catalog's invariant I2).
const lostMark = ".lost"

// MarkLost marks version v of name as lost (see lostMark).
func (s *Store) MarkLost(name string, v int) error {
	if err := names.Lineage(name); err != nil {
		return err
	}
	return WriteFile(filepath.Join(s.ArchiveDir(name), strconv.Itoa(v), lostMark), nil, 0o600)
}

func (s *Store) IsLost(name string, v int) bool {
	_, err := os.Stat(filepath.Join(s.ArchiveDir(name), strconv.Itoa(v), lostMark))
	return err == nil
}
