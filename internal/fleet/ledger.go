package fleet

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/lbcert/lbcert/internal/ca"
	"github.com/lbcert/lbcert/internal/fleet/rdb"
	"github.com/lbcert/lbcert/internal/store"
)

// LedgerWindow is the issuance ledger's window, Let's Encrypt's for
// duplicate certificates.
const LedgerWindow = 7 * 24 * time.Hour

// LedgerSet names an exact set of names at one CA, independently of the
// names' order and case and of how the CA's directory is spelt (a
// capital in its host or a trailing slash must not open a second cap).
func LedgerSet(server string, names []string) string {
	s := slices.Clone(names)
	for i := range s {
		s[i] = strings.ToLower(s[i])
	}
	slices.Sort(s)
	return ca.Canonical(server) + " " + strings.Join(slices.Compact(s), ",")
}

// issued is one certificate (or one order's place) in this node's copy
// of the ledger.
type issued struct {
	Set string    `json:"set,omitempty"`
	At  time.Time `json:"at"`
	// Key is the set's ledger key, for an entry copied from the fleet's
	// ledger (copyLedger), which names sets only by it; From is the Redis
	// generation it was copied from.
	Key  string `json:"key,omitempty"`
	From string `json:"from,omitempty"`
}

// The node's copy of the ledger, <dir>/fleet/ledger.json: serial ->
// issued, for every certificate this node published or installed in
// the last LedgerWindow, and reservation id -> issued for the orders
// this node started whose certificate it has not noted (noteReserved). A rebuilt Redis gets its ledger back from
// every node's copy (invariant I4), so an emptied Redis never resets
// the count of certificates per exact set of names.
func ledgerPath(st *store.Store) string { return filepath.Join(fleetDir(st), "ledger.json") }

var ledgerMu sync.Mutex

func readLedger(st *store.Store) map[string]issued {
	m, _ := readLedgerFile(st)
	return m
}

// readLedgerFile is readLedger that says when the file is there but
// not a ledger (truncated, edited by hand): what it held is unknown.
func readLedgerFile(st *store.Store) (map[string]issued, error) {
	m := map[string]issued{}
	data, err := os.ReadFile(ledgerPath(st))
	if err != nil {
		return m, nil
	}
	if err := json.Unmarshal(data, &m); err != nil {
		return map[string]issued{}, fmt.Errorf("%s is not a ledger (%v): look at it, move it aside and run again (orders wait until then)", ledgerPath(st), err)
	}
	return m, nil
}

// noteIssued adds the certificates of ls to this node's copy of the
// ledger: one read and one write of the file for all of them (a node
// joining a fleet installs thousands at once, and a write per
// certificate made the join quadratic).
func (n *Node) noteIssued(ls ...*store.Lineage) {
	n.editLedger(func(m map[string]issued) bool { return addIssued(m, ls) })
}

// takeReserved gives the oldest ledger place this process's orders took
// for set (noteReserved) to the certificate being published: it becomes
// the certificate's LedgerID, the key every node counts it under, and
// the node's own entry for the place turns into the certificate's
// (noteIssued) under the same key.
func (n *Node) takeReserved(set string) string {
	n.resMu.Lock()
	defer n.resMu.Unlock()
	ids := n.reserved[set]
	if len(ids) == 0 {
		return ""
	}
	n.reserved[set] = ids[1:]
	return ids[0]
}

// ledgerKey is the key l's certificate is counted under: its order's
// ledger place, or its serial for one without (published before the
// place was recorded, or by a single host).
func ledgerKey(l *store.Lineage) string {
	if l.LedgerID != "" {
		return l.LedgerID
	}
	return l.Cert.Serial
}

// copyLedger makes this node's copy of the ledger hold the fleet's
// whole ledger, not only the certificates it published or installed: a
// fleet whose nodes were all replaced since a name's certificates were
// issued (or deleted before a new node installed them) still counts
// them after a Redis loss (invariant I4). An entry copied from this
// Redis generation that Redis no longer holds went on purpose (an
// order's place given back, or named by its certificate's serial) and
// goes here too; entries from an older generation stay, as they are
// what rebuilt this one.
func (n *Node) copyLedger(ctx context.Context) error {
	gen, err := n.Shared.HGet(ctx, "meta", "gen")
	if err != nil || gen == "" {
		return err
	}
	entries, err := n.Shared.LedgerEntries(ctx)
	if err != nil {
		return err
	}
	from := "redis:" + gen
	in := make(map[string]bool, len(entries))
	for _, e := range entries {
		in[e.Member] = true
	}
	n.editLedger(func(m map[string]issued) bool {
		changed := false
		for member, e := range m {
			if e.From == from && !in[member] {
				delete(m, member)
				changed = true
			}
		}
		for _, e := range entries {
			if _, ok := m[e.Member]; !ok && time.Since(e.At) <= LedgerWindow {
				m[e.Member] = issued{Key: e.Key, At: e.At, From: from}
				changed = true
			}
		}
		return changed
	})
	return nil
}

// putBackLedger puts every place this node noted itself (knownPlaces,
// for every set) back into Redis where it is missing. The agent does it
// at every reconcile: after a Redis loss that left Redis not empty (an
// older snapshot, a failover that lost writes), the places only other
// nodes' disks hold come back within one reconcile, before most orders.
func (n *Node) putBackLedger(ctx context.Context) error {
	ledgerMu.Lock()
	m := n.ledgerCopy()
	var places []rdb.LedgerPlace
	for member, e := range m {
		if e.Set != "" && e.From == "" {
			places = append(places, rdb.LedgerPlace{Set: e.Set, Member: member, At: e.At})
		}
	}
	ledgerMu.Unlock()
	return n.Shared.LedgerPutBack(ctx, places, LedgerWindow)
}

// knownPlaces are the places of set in this node's copy of the ledger
// that it noted itself: the certificates it published or installed,
// and the places its own orders took. Copies of the fleet's ledger
// (copyLedger) stay out: a place another node gave back would be
// counted again until the next copy.
func (n *Node) knownPlaces(set string) map[string]time.Time {
	ledgerMu.Lock()
	m := n.ledgerCopy()
	ledgerMu.Unlock()
	out := map[string]time.Time{}
	for member, e := range m {
		if e.Set == set && e.From == "" {
			out[member] = e.At
		}
	}
	return out
}

// ledgerCopy is this node's copy of the ledger, read again only when
// the file changed (another process of the node wrote it): a batch of
// thousands of orders reads it once per order. The caller holds
// ledgerMu and must not change what it returns.
func (n *Node) ledgerCopy() map[string]issued {
	fi, err := os.Stat(ledgerPath(n.Local))
	if err != nil {
		n.ledgerCache = nil
		return nil
	}
	// Every write is an atomic rename: a new file, a new inode.
	if c := n.ledgerCache; c != nil && os.SameFile(c.fi, fi) && c.fi.ModTime().Equal(fi.ModTime()) {
		return c.m
	}
	m, err := readLedgerFile(n.Local)
	n.ledgerCache = &ledgerCache{m: m, fi: fi, err: err}
	return m
}

// ledgerCache is ledgerCopy's parsed file and the stat it was read at,
// and whether the file was no ledger.
type ledgerCache struct {
	m   map[string]issued
	fi  os.FileInfo
	err error
}

// noteReserved keeps, before an order reaches the CA, the ledger place
// it took (id, the same member as in Redis) in this node's copy: a run
// killed after the CA issued, and before it noted the certificate,
// still counts in a Redis rebuilt from the nodes' copies (I4). The
// place becomes the certificate's key when it is published
// (takeReserved), and goes when the order issued nothing
// (dropReserved).
func (n *Node) noteReserved(set, id string, at time.Time) error {
	err := n.editLedger(func(m map[string]issued) bool {
		m[id] = issued{Set: set, At: at.UTC()}
		return true
	})
	if err != nil {
		return err
	}
	n.resMu.Lock()
	if n.reserved == nil {
		n.reserved = map[string][]string{}
	}
	n.reserved[set] = append(n.reserved[set], id)
	n.resMu.Unlock()
	return nil
}

// dropReserved forgets the place id of an order that issued nothing.
func (n *Node) dropReserved(set, id string) {
	n.resMu.Lock()
	n.reserved[set] = slices.DeleteFunc(n.reserved[set], func(x string) bool { return x == id })
	n.resMu.Unlock()
	n.editLedger(func(m map[string]issued) bool {
		_, ok := m[id]
		delete(m, id)
		return ok
	})
}

func addIssued(m map[string]issued, ls []*store.Lineage) bool {
	added := false
	for _, l := range ls {
		key := ledgerKey(l)
		if l.IssuedAt.IsZero() || time.Since(l.IssuedAt) > LedgerWindow || key == "" {
			continue
		}
		if e, ok := m[key]; !ok || e.Set == "" || e.From != "" {
			// New, or known only as an order's place or a copy: now as
			// the certificate this node holds.
			m[key] = issued{Set: LedgerSet(l.Server, l.Domains), At: l.IssuedAt.UTC()}
			added = true
		}
	}
	return added
}

// editLedger applies edit to this node's copy of the ledger and writes
// it back when edit says it changed, without the entries older than
// the window.
//
// The node's processes edit the file one at a time (ledger.lock): an
// agent noting what it installed and a renew noting an order's place at
// once would otherwise each write back the file without the other's
// entry, and a lost place is a certificate a rebuilt Redis does not
// count (I4). Under that lock it edits a clone of the cached copy
// (ledgerCopy) and caches what it wrote, which no other process can
// have replaced before the stat: an order notes its place and then its
// certificate, and parsing the file each time made a batch of thousands
// quadratic in JSON work. A cached map is never changed once cached, so
// a reader may range over it after unlocking.
//
// It says when the copy could not be kept (and logs it): an order's
// place that is not on the node's disk is one a rebuilt Redis does not
// count, so noteReserved's caller orders nothing then.
func (n *Node) editLedger(edit func(m map[string]issued) bool) error {
	ledgerMu.Lock()
	defer ledgerMu.Unlock()
	unlock, err := lockFleetFile(n.Local, "ledger.lock")
	if err != nil {
		slog.Warn("could not keep this node's copy of the issuance ledger", "err", err)
		return err
	}
	defer unlock()
	m := maps.Clone(n.ledgerCopy())
	if c := n.ledgerCache; c != nil && c.err != nil {
		// Writing back what could be read would drop what it held: a
		// killed order's place that only this copy keeps (I4).
		slog.Warn("could not keep this node's copy of the issuance ledger", "err", c.err)
		return c.err
	}
	if m == nil {
		m = map[string]issued{}
	}
	if !edit(m) {
		return nil
	}
	for key, e := range m {
		if time.Since(e.At) > LedgerWindow {
			delete(m, key)
		}
	}
	data, _ := json.Marshal(m)
	err = store.WriteFile(ledgerPath(n.Local), data, 0o600)
	if err != nil {
		slog.Warn("could not keep this node's copy of the issuance ledger", "err", err)
		return err
	}
	if fi, err := os.Stat(ledgerPath(n.Local)); err == nil {
		n.ledgerCache = &ledgerCache{m: m, fi: fi}
	}
	return nil
}

// seedLedger puts this node's copy of the ledger into Redis. A
// certificate is one entry whichever node seeds it (its serial), and an
// order's reservation stays beside it: through one Redis loss the count
// errs on the side of the CA's limit.
func (n *Node) seedLedger(ctx context.Context) error {
	ledgerMu.Lock()
	m := readLedger(n.Local)
	ledgerMu.Unlock()
	for member, e := range m { // a serial, or an order's place id
		seed := n.Shared.LedgerSeed
		set := e.Set
		if set == "" {
			seed, set = n.Shared.LedgerSeedKey, e.Key
		}
		if err := seed(ctx, set, member, e.At, LedgerWindow); err != nil {
			return err
		}
	}
	return nil
}
