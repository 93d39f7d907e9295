package catalog

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"github.com/lbcert/lbcert/internal/store"
)

// Dir is the catalog of a single host: its state directory, whose
// archive holds every version and whose renewal/ files hold the
// statuses. The node-local half is the same *store.Store, so a version
// Publish writes is already staged on the node.
type Dir struct {
	S *store.Store

	mu    sync.Mutex
	held  map[string]bool
	token int64
}

var (
	_ Catalog  = (*Dir)(nil)
	_ Accounts = (*store.Store)(nil)
)

// NewDir is the catalog of the state directory st.
func NewDir(st *store.Store) *Dir { return &Dir{S: st, held: map[string]bool{}} }

// Names are the archived lineages, live or not: one whose first deploy
// failed is still a lineage, which renew deploys and list shows.
func (d *Dir) Names(ctx context.Context) ([]string, error) { return d.S.Lineages() }

// Pass begins a renew pass over every lineage, which reads their
// metadata through the state directory's heads index (store.OpenHeads),
// and returns its end, which leaves the index for the next pass.
func (d *Dir) Pass() func() {
	h := d.S.OpenHeads()
	return func() {
		if err := h.Close(); err != nil {
			// Not a warning: no decision depends on it, and cron's -q
			// would mail it every night (hostile review). -v and an
			// interactive run say it.
			slog.Info("could not save the heads index; the next pass reads every lineage from disk", "err", err)
		}
	}
}

// Head is the newest archived version.
func (d *Dir) Head(ctx context.Context, name string) (*store.Lineage, error) {
	return d.S.Newest(name)
}

// Fetch reads one archived version.
func (d *Dir) Fetch(ctx context.Context, name string, version int) (*store.Lineage, store.Files, error) {
	if version == 0 {
		version = d.S.MaxVersion(name)
	}
	l, f, err := d.S.ReadVersion(name, version)
	if errors.Is(err, store.ErrNotFound) {
		return nil, store.Files{}, fmt.Errorf("lineage %q version %d: %w", name, version, ErrSuperseded)
	}
	return l, f, err
}

// Publish archives the certificate as the next version. The state
// directory's lock keeps other processes out on one host; a delete that
// came after the lease was taken (its tombstone is newer) still wins.
func (d *Dir) Publish(ctx context.Context, lease Lease, l *store.Lineage, files store.Files) (int, error) {
	if dl, ok := lease.(*dirLease); ok {
		if t, _ := d.S.ReadTombstone(l.Name); t != nil && !t.At.Before(dl.at) {
			return 0, &ErrStale{Name: l.Name, Reason: "it was deleted after this run took it"}
		}
	}
	v, err := d.S.SaveVersion(l, files)
	if err != nil {
		return 0, err
	}
	l.Version = v
	// Issued again after a delete: the tombstone goes.
	return v, d.S.ClearTombstoneBefore(l.Name, l.IssuedAt)
}

// SetMeta rewrites the metadata of version l.Version.
func (d *Dir) SetMeta(ctx context.Context, l *store.Lineage) error { return d.S.UpdateMeta(l) }

// Delete removes the lineage, its archive and status, and leaves a
// tombstone.
func (d *Dir) Delete(ctx context.Context, name string) error {
	d.mu.Lock()
	d.token++
	fence := d.token
	d.mu.Unlock()
	return d.S.Forget(name, store.Tombstone{At: time.Now().UTC(), Fence: fence})
}

func (d *Dir) Status(ctx context.Context, name string) (store.Status, error) {
	return d.S.ReadStatus(name)
}

func (d *Dir) SetStatus(ctx context.Context, name string, st store.Status) error {
	return d.S.WriteStatus(name, st)
}

// Acquire takes the in-process lease for name: on one host the state
// directory's flock already excludes other processes, so leases only
// exclude the workers of this process from each other, and the TTL is
// moot (a stalled holder is this very process).
func (d *Dir) Acquire(ctx context.Context, name string, ttl time.Duration) (Lease, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.held == nil {
		d.held = map[string]bool{}
	}
	if d.held[name] {
		return nil, ErrLeaseHeld
	}
	d.held[name] = true
	d.token++
	return &dirLease{d: d, name: name, token: d.token, at: time.Now().UTC()}, nil
}

type dirLease struct {
	d     *Dir
	name  string
	token int64
	at    time.Time // when it was taken: a delete after it fences it
	once  sync.Once
}

func (l *dirLease) Token() int64 { return l.token }

func (l *dirLease) Release() {
	l.once.Do(func() {
		l.d.mu.Lock()
		delete(l.d.held, l.name)
		l.d.mu.Unlock()
	})
}
