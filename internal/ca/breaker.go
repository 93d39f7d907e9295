package ca

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/lbcert/lbcert/internal/store"
)

// State is one CA's breaker as saved: closed (zero), or open (passed
// over) until OpenUntil, after Failures faults in a row.
type State struct {
	Failures  int           `json:"failures,omitempty"`
	OpenUntil time.Time     `json:"open_until,omitzero"`
	Backoff   time.Duration `json:"backoff_ns,omitempty"` // how long it was opened for, last time
	Reason    string        `json:"reason,omitempty"`     // the last fault
	Since     time.Time     `json:"since,omitzero"`       // the first fault in a row
	By        string        `json:"by,omitempty"`         // the fleet node that saw the last fault
}

// Store keeps breakers across runs: a file in the state directory on
// one host (FileStore), the fleet's Redis in a fleet, where one node's
// finding that a CA is down makes every node pass it over.
type Store interface {
	Load(ctx context.Context) (map[string]State, error)
	// Save records server's breaker; the zero State removes it.
	Save(ctx context.Context, server string, st State) error
}

// Breakers are the run's breaker per CA. A CA opens after After faults
// in a row (acme.CAFault: it did not answer, a 5xx, its directory) and
// is then passed over for Backoff; after that, one order at a time
// tries it again (half-open): an answer closes it, a fault opens it for
// twice as long, up to MaxBackoff. The breakers are re-read from the
// store every Refresh, so a run sees what another node found meanwhile.
type Breakers struct {
	Store   Store
	Now     func() time.Time
	Backoff time.Duration // --ca-backoff
	After   int           // default 3
	Node    string        // this fleet node, for the reason others read
	Refresh time.Duration // default 10 s

	mu      sync.Mutex
	states  map[string]State
	read    time.Time
	probing map[string]bool
}

// MaxBackoff bounds how long a CA is passed over without a try.
const MaxBackoff = time.Hour

func (b *Breakers) after() int {
	if b.After > 0 {
		return b.After
	}
	return 3
}

// load re-reads the store when the copy is older than Refresh. A store
// that cannot be read leaves the copy as it was: breakers are advice.
func (b *Breakers) load(now time.Time) {
	refresh := b.Refresh
	if refresh <= 0 {
		refresh = 10 * time.Second
	}
	if b.states != nil && now.Sub(b.read) < refresh {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	st, err := b.Store.Load(ctx)
	if err != nil {
		slog.Warn("could not read the CA breakers", "err", err)
		if b.states == nil {
			b.states = map[string]State{}
		}
		return
	}
	b.states, b.read = st, now
}

// locked takes the lock and refreshes the copy from the store; the
// caller unlocks.
func (b *Breakers) locked() time.Time {
	b.mu.Lock()
	now := b.Now()
	b.load(now)
	return now
}

// Allow reports whether an order may go to server now, and when not,
// why it is passed over.
func (b *Breakers) Allow(server string) (bool, string) {
	if b == nil {
		return true, ""
	}
	now := b.locked()
	defer b.mu.Unlock()
	st := b.states[server]
	switch {
	case st.OpenUntil.IsZero():
		return true, ""
	case now.Before(st.OpenUntil):
		why := fmt.Sprintf("passed over until %s: %s", st.OpenUntil.UTC().Format(time.RFC3339), st.Reason)
		if st.By != "" && st.By != b.Node {
			why += " (seen by node " + st.By + ")"
		}
		return false, why
	case b.probing[server]:
		return false, "being tried again by another order: " + st.Reason
	}
	if b.probing == nil {
		b.probing = map[string]bool{}
	}
	b.probing[server] = true
	return true, ""
}

// Fault records a CA fault at server.
func (b *Breakers) Fault(server, why string) {
	if b == nil {
		return
	}
	now := b.locked()
	defer b.mu.Unlock()
	st := b.states[server]
	st.Failures++
	st.Reason, st.By = why, b.Node
	if st.Since.IsZero() {
		st.Since = now.UTC()
	}
	switch {
	case b.probing[server]: // the try after the backoff failed: longer
		st.Backoff = min(2*max(st.Backoff, b.Backoff), MaxBackoff)
		st.OpenUntil = now.Add(st.Backoff).UTC()
		delete(b.probing, server)
	case st.OpenUntil.IsZero() && st.Failures >= b.after():
		st.Backoff = min(max(b.Backoff, time.Second), MaxBackoff)
		st.OpenUntil = now.Add(st.Backoff).UTC()
		slog.Warn("the CA failed several orders in a row; passing it over for the next orders", "server", server, "until", st.OpenUntil.Format(time.RFC3339), "why", why)
	}
	b.save(server, st)
}

// Success records that server answered an order (issued, or refused it
// for the names' sake): its breaker closes.
func (b *Breakers) Success(server string) {
	if b == nil {
		return
	}
	b.locked()
	defer b.mu.Unlock()
	delete(b.probing, server)
	if st := b.states[server]; st == (State{}) {
		return
	} else if !st.OpenUntil.IsZero() {
		slog.Info("the CA answers again; it is no longer passed over", "server", server)
	}
	b.save(server, State{})
}

// Untried ends an order's claim on server without a verdict (it never
// reached the CA: the budget or an interrupt stopped it), so another
// order may be the one that tries it again.
func (b *Breakers) Untried(server string) {
	if b == nil {
		return
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	delete(b.probing, server)
}

func (b *Breakers) save(server string, st State) {
	if st == (State{}) {
		delete(b.states, server)
	} else {
		b.states[server] = st
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := b.Store.Save(ctx, server, st); err != nil {
		slog.Warn("could not save the CA breaker", "server", server, "err", err)
	}
}

// Open lists the breakers that are open now, by server, for reports.
func (b *Breakers) Open() map[string]State {
	out := map[string]State{}
	if b == nil {
		return out
	}
	b.locked()
	defer b.mu.Unlock()
	for s, st := range b.states {
		if !st.OpenUntil.IsZero() {
			out[s] = st
		}
	}
	return out
}

// FileName is the breakers' file in a single host's state directory.
const FileName = "ca-breakers.json"

// FileStore keeps the breakers in one file of the state directory; the
// run holding the directory's lock is its only writer.
type FileStore struct{ Dir string }

// Load reads the file; a missing or unreadable one is all closed.
func (f FileStore) Load(context.Context) (map[string]State, error) {
	out := map[string]State{}
	data, err := os.ReadFile(filepath.Join(f.Dir, FileName))
	if errors.Is(err, fs.ErrNotExist) {
		return out, nil
	}
	if err != nil {
		return out, err
	}
	if err := json.Unmarshal(data, &out); err != nil {
		return map[string]State{}, nil // advice only: start closed
	}
	return out, nil
}

// Save rewrites the file with server's state.
func (f FileStore) Save(ctx context.Context, server string, st State) error {
	all, err := f.Load(ctx)
	if err != nil {
		return err
	}
	if st == (State{}) {
		if _, ok := all[server]; !ok {
			return nil
		}
		delete(all, server)
	} else {
		all[server] = st
	}
	data, err := json.MarshalIndent(all, "", "  ")
	if err != nil {
		return err
	}
	return store.WriteFile(filepath.Join(f.Dir, FileName), append(data, '\n'), 0o600)
}
