package fleet

import (
	"context"
	"encoding/json"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/lbcert/lbcert/internal/store"
)

// LedgerWindow is the issuance ledger's window, Let's Encrypt's for
// duplicate certificates.
const LedgerWindow = 7 * 24 * time.Hour

// LedgerSet names an exact set of names at one CA, independently of order.
func LedgerSet(server string, names []string) string {
	s := slices.Clone(names)
	for i := range s {
		s[i] = strings.ToLower(s[i])
	}
	slices.Sort(s)
	return server + " " + strings.Join(slices.Compact(s), ",")
}

// issued is one certificate in this node's copy of the ledger.
type issued struct {
	Set string    `json:"set"`
	At  time.Time `json:"at"`
}

// The node's copy of the ledger, <dir>/fleet/ledger.json: serial ->
// issued, for every certificate this node published or installed in
// the last LedgerWindow. A rebuilt Redis gets its ledger back from
// every node's copy (invariant I4), so an emptied Redis never resets
// the count of certificates per exact set of names.
func ledgerPath(st *store.Store) string { return filepath.Join(fleetDir(st), "ledger.json") }

var ledgerMu sync.Mutex

func readLedger(st *store.Store) map[string]issued {
	m := map[string]issued{}
	if data, err := os.ReadFile(ledgerPath(st)); err == nil {
		json.Unmarshal(data, &m)
	}
	return m
}

// noteIssued adds l's certificate to this node's copy of the ledger.
func (n *Node) noteIssued(l *store.Lineage) {
	if l.IssuedAt.IsZero() || time.Since(l.IssuedAt) > LedgerWindow || l.Cert.Serial == "" {
		return
	}
	ledgerMu.Lock()
	defer ledgerMu.Unlock()
	m := readLedger(n.Local)
	if _, ok := m[l.Cert.Serial]; ok {
		return
	}
	for serial, e := range m {
		if time.Since(e.At) > LedgerWindow {
			delete(m, serial)
		}
	}
	m[l.Cert.Serial] = issued{Set: LedgerSet(l.Server, l.Domains), At: l.IssuedAt.UTC()}
	data, _ := json.Marshal(m)
	err := os.MkdirAll(fleetDir(n.Local), 0o700)
	if err == nil {
		err = store.WriteFile(ledgerPath(n.Local), data, 0o600)
	}
	if err != nil {
		slog.Warn("could not keep this node's copy of the issuance ledger", "err", err)
	}
}

// seedLedger puts this node's copy of the ledger into Redis. A
// certificate is one entry whichever node seeds it (its serial), and an
// order's reservation stays beside it: through one Redis loss the count
// errs on the side of the CA's limit.
func (n *Node) seedLedger(ctx context.Context) error {
	ledgerMu.Lock()
	m := readLedger(n.Local)
	ledgerMu.Unlock()
	for serial, e := range m {
		if err := n.Shared.LedgerSeed(ctx, e.Set, serial, e.At, LedgerWindow); err != nil {
			return err
		}
	}
	return nil
}
