// Package store owns lbcert's state directory: accounts, certificate
// lineages and the lock.
//
// Layout (certbot-compatible paths, so existing nginx configs keep working):
//
//	<dir>/lbcert.lock                      flock held by the running process
//	<dir>/accounts/<server>/<email>/       account.json, account.key (0600)
//	<dir>/archive/<name>/<N>/              one directory per issuance:
//	    cert.pem chain.pem fullchain.pem privkey.pem lineage.json
//	<dir>/live/<name> -> ../archive/<name>/<N>
//	<dir>/renewal/<name>.json              status and this node's journal
//	<dir>/cache/heads                      the heads index (heads.go): a
//	                                       cache a renew pass reads the
//	                                       newest lineage.json through
//
// The promise: live/<name> always names one complete, consistent version,
// whose certificate matches its key and its lineage.json, whatever moment
// a crash or kill -9 happens at. A version is written into a private
// temporary directory, fsynced, renamed into archive/ as a whole, and only
// then does a single rename(2) of the live/<name> symlink make it current.
// certbot swaps four per-file symlinks one after another, which leaves a
// window where cert.pem and privkey.pem belong to different versions; one
// directory symlink has no such window.
//
// The store never talks to the network and never decides policy; callers
// hold the Lock around anything that writes.
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
	"sync/atomic"
	"syscall"
	"time"

	"github.com/lbcert/lbcert/internal/names"
)

// File names inside a version directory. They are certbot's, so
// ssl_certificate /etc/lbcert/live/NAME/fullchain.pem works unchanged.
const (
	CertFile      = "cert.pem"
	ChainFile     = "chain.pem"
	FullchainFile = "fullchain.pem"
	KeyFile       = "privkey.pem"
	MetaFile      = "lineage.json"
)

// FormatVersion is the lineage.json schema version.
const FormatVersion = 1

// Store is a state directory.
type Store struct {
	Dir string

	// afterWrite, when set by tests, runs after each step of Save and can
	// fail it, to prove that a failure at any point leaves the previous
	// version live and intact.
	afterWrite func(step string) error

	// heads, during a renew pass, is the heads index Newest reads
	// through (see OpenHeads).
	heads atomic.Pointer[Heads]
}

// New returns the store rooted at dir. It touches nothing on disk, so bad
// input refused after New still leaves no files behind.
func New(dir string) *Store { return &Store{Dir: resolveDotDot(dir)} }

// resolveDotDot is dir as the kernel resolves it, when dir has
// a ".." in it: the part that exists with its symbolic links followed,
// then the rest, which does not exist yet, with each ".." taking out
// the name before it. Creating the state directory (os.MkdirAll) would
// otherwise create "/x/a" for "/x/a/../b" and leave it behind, and a
// ".." after a symbolic link would name one directory to the kernel (the
// lock) and another to every path lbcert joins to it (filepath.Join
// takes ".." out by the letters). A path that cannot be looked at (a
// file in the middle, a dangling link, a name too long) is left as it
// is, for the kernel to refuse. A dir without ".." is left as given.
func resolveDotDot(dir string) string {
	const sep = string(filepath.Separator)
	elems := strings.Split(dir, sep)
	if !slices.Contains(elems, "..") {
		return dir
	}
	p := "."
	if filepath.IsAbs(dir) {
		p = sep
	}
	for i, e := range elems {
		if e == "" || e == "." {
			continue
		}
		next := p + sep + e // not filepath.Join, which would take ".." out
		real, err := filepath.EvalSymlinks(next)
		if err == nil {
			p = real
			continue
		}
		if _, lerr := os.Lstat(next); !errors.Is(lerr, fs.ErrNotExist) {
			return dir
		}
		// From here nothing exists: no link can be among the rest, and p
		// has none, so taking ".." out by the letters is what the kernel
		// would do.
		return filepath.Join(p, filepath.Join(elems[i:]...))
	}
	return p
}

// Challenge is how a lineage proves control of its names.
type Challenge struct {
	Mode     string `json:"mode"`                // "webroot" or "standalone"
	Webroot  string `json:"webroot,omitempty"`   // webroot mode
	HTTPAddr string `json:"http_addr,omitempty"` // standalone mode
}

// Deploy is how a lineage's certificate reaches the load balancer. It is
// saved with the lineage so that renew repeats it without flags.
type Deploy struct {
	Target        string `json:"target,omitempty"` // "nginx", "haproxy" or "" for none
	NginxConf     string `json:"nginx_conf,omitempty"`
	NginxBin      string `json:"nginx_bin,omitempty"`
	HAProxyConf   string `json:"haproxy_conf,omitempty"`
	HAProxyBin    string `json:"haproxy_bin,omitempty"`
	HAProxyCerts  string `json:"haproxy_certs,omitempty"`  // directory of <name>.pem
	HAProxySocket string `json:"haproxy_socket,omitempty"` // runtime API, for reload-free updates
	ReloadCmd     string `json:"reload_cmd,omitempty"`
	Hook          string `json:"hook,omitempty"`
	HookTimeout   int    `json:"hook_timeout_seconds,omitempty"`
	VerifyAddr    string `json:"verify_addr,omitempty"`
	// VerifyRoots is a PEM file of roots the served chain must verify
	// to (with the name or address checked), beside the serial check.
	VerifyRoots string `json:"verify_roots,omitempty"`
	// NginxInclude is a file lbcert writes and keeps current for
	// "include FILE;" in nginx's http block: one server block per live
	// lineage of the state directory, with all its names and literal
	// certificate paths, each including NginxServerBody (the operator's
	// listen lines and locations). Empty: nginx's config is the
	// operator's alone.
	NginxInclude    string `json:"nginx_include,omitempty"`
	NginxServerBody string `json:"nginx_server_body,omitempty"`
}

// Mail is a lineage's own report recipients and relay (seed 004's
// -f FROM -t TO -r RELAY -x PORT). The SMTP password is never saved.
type Mail struct {
	To   []string `json:"to,omitempty"`
	From string   `json:"from,omitempty"`
	Host string   `json:"smtp_host,omitempty"`
	Port int      `json:"smtp_port,omitempty"`
	// The rest of the relay setting travels with its host: a relay saved
	// without its TLS mode would be tried with the global one.
	TLS      string `json:"smtp_tls,omitempty"`
	CABundle string `json:"smtp_ca_bundle,omitempty"`
	// User is the relay's login (--smtp-user), whose password the run
	// that mails gives (LBCERT_SMTP_PASSWORD or --smtp-password-file).
	User string `json:"smtp_user,omitempty"`
}

// CertInfo describes the certificate of one version, so that renew can
// decide what is due without parsing 10,000 certificates.
type CertInfo struct {
	Serial    string    `json:"serial"` // hex, as openssl prints it
	NotBefore time.Time `json:"not_before"`
	NotAfter  time.Time `json:"not_after"`
	ARICertID string    `json:"ari_cert_id,omitempty"` // RFC 9773 section 4.1
	Issuer    string    `json:"issuer,omitempty"`
}

// Lineage is the metadata of one version: everything a later renew needs
// to repeat the issuance without flags.
type Lineage struct {
	Format  int      `json:"format"`
	Name    string   `json:"name"`
	Version int      `json:"version"`
	Domains []string `json:"domains"`
	Server  string   `json:"server"`
	Email   string   `json:"email,omitempty"`
	KeyType string   `json:"key_type"`
	Profile string   `json:"profile,omitempty"`
	// PreferredChain picks, among the chains the CA offers, the one
	// whose top certificate's issuer has this common name (lego's
	// PreferredChain); empty takes the CA's default chain.
	PreferredChain string    `json:"preferred_chain,omitempty"`
	ReuseKey       bool      `json:"reuse_key,omitempty"`
	Challenge      Challenge `json:"challenge"`
	Deploy         Deploy    `json:"deploy"`
	Mail           Mail      `json:"mail,omitzero"`
	Cert           CertInfo  `json:"cert"`
	IssuedAt       time.Time `json:"issued_at"`
	// Server and Email above are the CA and account that issued Cert
	// (ARI, "replaces" and revocation go there). Fallback is set when
	// that CA is a fallback, not the lineage's primary: renewals go
	// back to the primary first.
	Fallback Fallback `json:"fallback,omitzero"`
	// LedgerID is, in fleet mode, the place the order of Cert took in
	// the fleet's issuance ledger: every node that holds the certificate
	// counts it under that same key, so a ledger rebuilt from their
	// copies counts it once.
	LedgerID string `json:"ledger_id,omitempty"`
	// Born is when the lineage's first certificate was issued; renewals
	// keep it, and a certificate the operator asks for by name (issue, a
	// batch row) starts it again. A delete beats a lineage born before
	// it, renewed or not: a copy published by a node that never saw the
	// delete, and renewed there, is not the name issued again
	// (invariant I3).
	Born time.Time `json:"born,omitzero"`
}

// BornAt is Born, or IssuedAt for a lineage saved before Born was kept.
func (l *Lineage) BornAt() time.Time {
	if l.Born.IsZero() {
		return l.IssuedAt
	}
	return l.Born
}

// Fallback says a lineage's live certificate came from a fallback CA
// because its primary (and any fallback before this one) failed.
type Fallback struct {
	Primary string `json:"primary"`         // the primary CA's directory URL
	Email   string `json:"email,omitempty"` // the account at the primary
	CA      string `json:"ca"`              // the fallback's name in the settings
	Reason  string `json:"reason"`          // why the CAs before it were passed over
}

// Home is the CA and account the lineage orders from first: its primary.
func (l *Lineage) Home() (server, email string) {
	if l.Fallback.Primary != "" {
		return l.Fallback.Primary, l.Fallback.Email
	}
	return l.Server, l.Email
}

// Files is the PEM content of one version.
type Files struct {
	Cert, Chain, Fullchain, Key []byte
}

// Paths are the live paths of a lineage, the ones configs should use.
type Paths struct {
	Dir       string `json:"dir"`
	Cert      string `json:"cert"`
	Chain     string `json:"chain"`
	Fullchain string `json:"fullchain"`
	Key       string `json:"key"`
}

// ErrNotFound is returned for a lineage that does not exist.
var ErrNotFound = errors.New("no such lineage")

// LivePaths returns the live paths of lineage name.
func (s *Store) LivePaths(name string) Paths {
	d := filepath.Join(s.Dir, "live", name)
	return Paths{
		Dir:       d,
		Cert:      filepath.Join(d, CertFile),
		Chain:     filepath.Join(d, ChainFile),
		Fullchain: filepath.Join(d, FullchainFile),
		Key:       filepath.Join(d, KeyFile),
	}
}

// Load reads the current version's metadata of lineage name.
func (s *Store) Load(name string) (*Lineage, error) {
	if err := names.Lineage(name); err != nil {
		return nil, err
	}
	return s.readMeta(name, filepath.Join(s.Dir, "live", name, MetaFile))
}

// Exists reports whether lineage name has live metadata, readable or
// not (Load then says what is wrong with it), without reading it.
func (s *Store) Exists(name string) bool {
	if names.Lineage(name) != nil {
		return false
	}
	_, err := os.Lstat(filepath.Join(s.Dir, "live", name, MetaFile))
	return err == nil
}

// LoadVersion reads the metadata of one archived version, live or not:
// a pending deploy is a version that is not live.
func (s *Store) LoadVersion(name string, version int) (*Lineage, error) {
	if err := names.Lineage(name); err != nil {
		return nil, err
	}
	return s.readMeta(name, filepath.Join(s.ArchiveDir(name), strconv.Itoa(version), MetaFile))
}

func (s *Store) readMeta(name, path string) (*Lineage, error) {
	var l *Lineage
	err := readSmall(path, func(data []byte) error {
		var err error
		l, err = s.parseMeta(name, data)
		return err
	})
	if errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("lineage %q: %w", name, ErrNotFound)
	}
	if err != nil {
		return nil, err
	}
	return l, nil
}

// parseMeta decodes the lineage.json of name.
func (s *Store) parseMeta(name string, data []byte) (*Lineage, error) {
	var l Lineage
	if err := json.Unmarshal(data, &l); err != nil {
		return nil, fmt.Errorf("lineage %q: %s: %v", name, MetaFile, err)
	}
	if l.Format > FormatVersion {
		return nil, fmt.Errorf("lineage %q: written by a newer lbcert (format %d)", name, l.Format)
	}
	return &l, nil
}

// UpdateMeta rewrites the metadata of version l.Version of l.Name in
// place, atomically, keeping its certificate: new deploy, mail or
// challenge settings for a certificate that is not due. The version
// need not be live: one whose deploy is still owed takes new settings
// too.
func (s *Store) UpdateMeta(l *Lineage) error {
	if _, err := s.LoadVersion(l.Name, l.Version); err != nil {
		return err
	}
	l.Format = FormatVersion
	meta, err := json.MarshalIndent(l, "", "  ")
	if err != nil {
		return err
	}
	return WriteFile(filepath.Join(s.ArchiveDir(l.Name), strconv.Itoa(l.Version), MetaFile), append(meta, '\n'), 0o644)
}

// realDir makes sure path is a directory of its own, creating it (0700)
// when missing. A symbolic link there is refused: a link planted at
// archive/<name> would make lbcert write a private key outside the state
// directory, and live/ would then point at it.
func realDir(path string) error {
	_, err := ownDir(path)
	return err
}

// ownDir is realDir that also says whether it made path: a directory
// this process just made holds nothing yet, nor can be a link.
func ownDir(path string) (made bool, err error) {
	fi, err := os.Lstat(path)
	if errors.Is(err, fs.ErrNotExist) {
		err = os.Mkdir(path, 0o700)
		if err == nil {
			return true, nil
		}
		if !errors.Is(err, fs.ErrExist) {
			return false, err
		}
		fi, err = os.Lstat(path) // made meanwhile by another: look again
	}
	if err != nil {
		return false, err
	}
	if fi.Mode()&os.ModeSymlink != 0 {
		return false, fmt.Errorf("%s is a symbolic link: remove it; lbcert never writes through links in its state directory", path)
	}
	if !fi.IsDir() {
		return false, fmt.Errorf("%s is not a directory", path)
	}
	return false, nil
}

// CheckDir refuses a state directory that another user could tamper
// with, as ssh's StrictModes does: one owned by someone else, or that
// group or others may write. A directory others may only read (0755, as
// an old install or a careless mkdir leaves it) is tightened to 0700:
// it holds private keys.
func (s *Store) CheckDir() error {
	fi, err := os.Stat(s.Dir)
	if err != nil {
		return err
	}
	st, ok := fi.Sys().(*syscall.Stat_t)
	if ok && int(st.Uid) != os.Geteuid() {
		return fmt.Errorf("state directory %s is owned by uid %d, not by this user (uid %d): refusing to keep keys where another user can replace them; chown it, or pass another --dir", s.Dir, st.Uid, os.Geteuid())
	}
	if m := fi.Mode().Perm(); m&0o022 != 0 {
		return fmt.Errorf("state directory %s has mode %04o: others may write it; chmod 700 %s", s.Dir, m, s.Dir)
	} else if m&0o077 != 0 {
		if other := notOurs(s.Dir); other != "" {
			// "--dir /etc" for "--dir /etc/lbcert" must not make /etc
			// unreadable to every other user.
			return fmt.Errorf("state directory %s has mode %04o and holds files that are not lbcert's (%s): refusing to tighten it to 0700; pass a directory of its own to --dir, like /etc/lbcert", s.Dir, m, other)
		}
		if err := os.Chmod(s.Dir, 0o700); err != nil {
			return fmt.Errorf("tighten %s to 0700: %w", s.Dir, err)
		}
	}
	return nil
}

// ourNames are the names lbcert keeps at the top of a state directory;
// a directory holding one of them (or nothing) is a state directory.
var ourNames = map[string]bool{LockFile: true, WriteLockFile: true, "live": true, "archive": true, "renewal": true,
	"accounts": true, "deleted": true, "cache": true, "fleet": true}

// notOurs names an entry of dir that lbcert did not put there, when dir
// holds none of lbcert's own names: "" for an empty directory or a state
// directory.
func notOurs(dir string) string {
	entries, err := os.ReadDir(dir)
	if err != nil || len(entries) == 0 {
		return ""
	}
	for _, e := range entries {
		if ourNames[e.Name()] {
			return ""
		}
	}
	return entries[0].Name()
}

// ArchiveDir is the directory holding every version of lineage name.
func (s *Store) ArchiveDir(name string) string {
	return filepath.Join(s.Dir, "archive", name)
}

// ReadKey returns the current private key PEM of lineage name.
func (s *Store) ReadKey(name string) ([]byte, error) {
	return os.ReadFile(s.LivePaths(name).Key)
}

// ReadFullchain returns the current full chain PEM of lineage name.
func (s *Store) ReadFullchain(name string) ([]byte, error) {
	return os.ReadFile(s.LivePaths(name).Fullchain)
}

// Names lists the lineages that have a live version, sorted.
func (s *Store) Names() ([]string, error) {
	entries, err := os.ReadDir(filepath.Join(s.Dir, "live"))
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	out := make([]string, 0, len(entries))
	for _, e := range entries {
		n := e.Name()
		if strings.HasPrefix(n, ".") || names.Lineage(n) != nil {
			continue
		}
		out = append(out, n)
	}
	sort.Slice(out, func(i, j int) bool { return NaturalLess(out[i], out[j]) })
	return out, nil
}

// NaturalLess orders names the way people count: c2 before c10, so that
// list and renew show customer2 before customer10.
func NaturalLess(a, b string) bool {
	// The names share a prefix, often most of them (site00123 and
	// site00124): compare from the start of the digit run, if any, in
	// which they first differ. The prefix before it ends outside a digit
	// run, so it orders them no more than it does byte by byte.
	i := 0
	for i < len(a) && i < len(b) && a[i] == b[i] {
		i++
	}
	for i > 0 && isDigit(a[i-1]) {
		i--
	}
	return naturalLess(a[i:], b[i:])
}

func isDigit(c byte) bool { return c >= '0' && c <= '9' }

func naturalLess(a, b string) bool {
	for a != "" && b != "" {
		da, db := digits(a), digits(b)
		if da > 0 && db > 0 {
			na, nb := strings.TrimLeft(a[:da], "0"), strings.TrimLeft(b[:db], "0")
			if len(na) != len(nb) {
				return len(na) < len(nb)
			}
			if na != nb {
				return na < nb
			}
			if da != db { // same value, fewer leading zeros first
				return da < db
			}
			a, b = a[da:], b[db:]
			continue
		}
		if a[0] != b[0] {
			return a[0] < b[0]
		}
		a, b = a[1:], b[1:]
	}
	return len(a) < len(b)
}

func digits(s string) int {
	n := 0
	for n < len(s) && s[n] >= '0' && s[n] <= '9' {
		n++
	}
	return n
}

// Save writes files and l as a new version of lineage l.Name and makes it
// live. It returns the version number now live and the one it replaced
// (0 when the lineage is new), so a failed deploy can roll back.
func (s *Store) Save(l *Lineage, files Files) (version, previous int, err error) {
	previous, _ = s.LiveVersion(l.Name)
	if version, err = s.SaveVersion(l, files); err != nil {
		return 0, 0, err
	}
	if err := s.Activate(l.Name, version); err != nil {
		return 0, 0, err
	}
	return version, previous, nil
}

// SaveVersion writes files and l as a new archived version of lineage
// l.Name without making it live, and returns its number. The engine
// records a pending deploy between SaveVersion and Activate, so a kill
// at any moment leaves either the old version live with nothing to do,
// or a journal entry that the next run finishes.
func (s *Store) SaveVersion(l *Lineage, files Files) (version int, err error) {
	if err := names.Lineage(l.Name); err != nil {
		return 0, err
	}
	archive := filepath.Join(s.Dir, "archive", l.Name)
	live := filepath.Join(s.Dir, "live")
	for _, d := range []string{s.Dir, filepath.Join(s.Dir, "archive"), archive, live} {
		if err := realDir(d); err != nil {
			return 0, err
		}
	}
	versions, err := s.versions(l.Name)
	if err != nil {
		return 0, err
	}
	version = 1
	if n := len(versions); n > 0 {
		version = versions[n-1] + 1
	}
	return s.saveAt(l, files, version)
}

// MaxVersion is the newest archived version of lineage name (0 for none).
func (s *Store) MaxVersion(name string) int {
	v, _ := s.versions(name)
	if len(v) == 0 {
		return 0
	}
	return v[len(v)-1]
}

// MaxVersionBelow is the newest archived version of name older than v
// (0 for none): what a rollback of v goes back to.
func (s *Store) MaxVersionBelow(name string, v int) int {
	vs, _ := s.versions(name)
	best := 0
	for _, x := range vs {
		if x < v {
			best = x
		}
	}
	return best
}

func (s *Store) saveAt(l *Lineage, files Files, version int) (int, error) {
	archive := filepath.Join(s.Dir, "archive", l.Name)
	live := filepath.Join(s.Dir, "live")
	made := false
	for _, d := range []string{s.Dir, filepath.Join(s.Dir, "archive"), archive, live} {
		m, err := ownDir(d)
		if err != nil {
			return 0, err
		}
		if d == archive {
			made = m
		}
	}
	l.Format = FormatVersion
	l.Version = version
	meta, err := json.MarshalIndent(l, "", "  ")
	if err != nil {
		return 0, err
	}

	// Versions half-written by a run that was killed are never live;
	// the caller holds the lock, so any left here are dead and go. An
	// archive made just now has none (a node joining a fleet makes one
	// per lineage).
	if !made {
		stale, _ := filepath.Glob(filepath.Join(archive, ".tmp-*"))
		for _, d := range stale {
			os.RemoveAll(d)
		}
	}
	tmp := filepath.Join(archive, fmt.Sprintf(".tmp-%d-%d", version, os.Getpid()))
	if err := os.Mkdir(tmp, 0o700); err != nil {
		return 0, err
	}
	committed := false
	defer func() {
		if !committed {
			os.RemoveAll(tmp)
		}
	}()
	steps := []struct {
		name string
		data []byte
		perm os.FileMode
	}{
		{KeyFile, files.Key, 0o600},
		{CertFile, files.Cert, 0o644},
		{ChainFile, files.Chain, 0o644},
		{FullchainFile, files.Fullchain, 0o644},
		{MetaFile, append(meta, '\n'), 0o644},
	}
	for _, st := range steps {
		if err := writeNew(filepath.Join(tmp, st.name), st.data, st.perm); err != nil {
			return 0, err
		}
		if err := s.step("write " + st.name); err != nil {
			return 0, err
		}
	}
	if err := durable(tmp); err != nil {
		return 0, err
	}
	final := filepath.Join(archive, strconv.Itoa(version))
	if err := os.Rename(tmp, final); err != nil {
		return 0, err
	}
	committed = true
	if err := durable(archive); err != nil {
		return 0, err
	}
	if err := s.step("archive"); err != nil {
		return 0, err
	}
	return version, nil
}

// Activate makes an existing version of lineage name live. Rollback after
// a failed deploy is Activate of the previous version.
func (s *Store) Activate(name string, version int) error {
	target := filepath.Join("..", "archive", name, strconv.Itoa(version))
	if _, err := os.Stat(filepath.Join(s.Dir, "live", target)); err != nil {
		return fmt.Errorf("lineage %q: version %d: %w", name, version, err)
	}
	return symlinkAtomic(target, filepath.Join(s.Dir, "live", name))
}

// Deactivate removes live/<name>, keeping the archive. It is the rollback
// of a lineage that had no previous version.
func (s *Store) Deactivate(name string) error {
	if err := names.Lineage(name); err != nil {
		return err
	}
	err := os.Remove(filepath.Join(s.Dir, "live", name))
	if errors.Is(err, fs.ErrNotExist) {
		return nil // never live here: nothing to make durable
	}
	if err != nil {
		return err
	}
	return durable(filepath.Join(s.Dir, "live"))
}

// Delete removes lineage name: first live/<name>, so it is gone for
// every reader at once, then its archive and renewal status.
func (s *Store) Delete(name string) error {
	if err := s.Deactivate(name); err != nil {
		return err
	}
	if err := os.RemoveAll(filepath.Join(s.Dir, "archive", name)); err != nil {
		return err
	}
	return s.removeRecord(name)
}

// Rollback makes version previous live again, or removes the lineage from
// live/ when previous is 0 (it was new in this run).
func (s *Store) Rollback(name string, previous int) error {
	if previous == 0 {
		return s.Deactivate(name)
	}
	return s.Activate(name, previous)
}

// Versions lists the archived versions of lineage name, oldest first.
func (s *Store) versions(name string) ([]int, error) {
	dirs, err := readDirs(filepath.Join(s.Dir, "archive", name))
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	return versionsIn(dirs), nil
}

// versionsIn is the versions among the directory names dirs of a
// lineage's archive, oldest first: the names that are a number above 0.
// Anything else there (an operator's backup copy, "3.old") is no version.
func versionsIn(dirs []string) []int {
	var out []int
	for _, d := range dirs {
		if n, err := strconv.Atoi(d); err == nil && n > 0 {
			out = append(out, n)
		}
	}
	sort.Ints(out)
	return out
}

// LiveVersion returns the version live/<name> points at.
func (s *Store) LiveVersion(name string) (int, error) {
	if h := s.heads.Load(); h != nil {
		if target, ok, err := h.readLive(name); ok {
			if err != nil {
				return 0, err
			}
			return strconv.Atoi(filepath.Base(target))
		}
	}
	target, err := os.Readlink(filepath.Join(s.Dir, "live", name))
	if err != nil {
		return 0, err
	}
	return strconv.Atoi(filepath.Base(target))
}

func (s *Store) step(name string) error {
	if s.afterWrite == nil {
		return nil
	}
	return s.afterWrite(name)
}

// Prune removes archived versions of lineage name beyond the newest keep,
// never the live one or any in protect (a pending deploy). It returns the
// versions removed. Old private keys are a liability, not a backup: the
// live version and the ones before it are enough to roll back.
func (s *Store) Prune(name string, keep int, protect ...int) ([]int, error) {
	if err := names.Lineage(name); err != nil {
		return nil, err
	}
	if keep < 1 {
		keep = 1
	}
	versions, err := s.versions(name)
	if err != nil {
		return nil, err
	}
	live, _ := s.LiveVersion(name)
	keepSet := map[int]bool{live: true}
	for _, v := range protect {
		keepSet[v] = true
	}
	var removed []int
	for i, v := range versions {
		lost := s.IsLost(name, v)
		if (len(versions)-i <= keep && !lost) || keepSet[v] {
			continue
		}
		if err := os.RemoveAll(filepath.Join(s.ArchiveDir(name), strconv.Itoa(v))); err != nil {
			return removed, err
		}
		removed = append(removed, v)
	}
	if len(removed) > 0 {
		if err := durable(s.ArchiveDir(name)); err != nil {
			return removed, err
		}
	}
	return removed, nil
}
