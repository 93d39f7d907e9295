package fleet

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/lbcert/lbcert/internal/hint"
	"github.com/lbcert/lbcert/internal/store"
	"github.com/lbcert/lbcert/internal/fleet/rdb"
)

// Backend is the storage seam in fleet mode: the shared half (bundles,
// statuses, accounts, leases) in Redis, the node-local half (live
// pointer, archive, pending deploys) in the node's --dir. Version numbers
// are the fleet's, and the node's archive uses the same ones.
type Backend struct {
	N     *Node
	Local *store.Store
	// Holder names this process in leases: node and pid.
	Holder string

	mu   sync.Mutex
	held map[string]*lease // name -> the lease this process holds
}

var _ store.Backend = (*Backend)(nil)

// NewBackend is the fleet backend of node n.
func NewBackend(n *Node) *Backend {
	return &Backend{N: n, Local: n.Local, Holder: n.Name + "/" + strconv.Itoa(os.Getpid()), held: map[string]*lease{}}
}

// Redis calls get a bounded time of their own: the seam has no context,
// and a Redis that hangs must fail the item, not the run forever.
func rctx() (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.Background(), 10*time.Second)
}

func (b *Backend) sh() *rdb.Shared { return b.N.Shared }

// Names are the fleet's lineages.
func (b *Backend) Names() ([]string, error) {
	ctx, cancel := rctx()
	defer cancel()
	names, err := b.sh().Names(ctx)
	if err != nil {
		return nil, err
	}
	sort.Slice(names, func(i, j int) bool { return store.NaturalLess(names[i], names[j]) })
	return names, nil
}

// Load is the fleet's newest certificate of name.
func (b *Backend) Load(name string) (*store.Lineage, error) {
	ctx, cancel := rctx()
	defer cancel()
	bd, err := b.sh().BundleMeta(ctx, name)
	if errors.Is(err, rdb.ErrNoBundle) {
		return nil, store.ErrNotFound
	}
	if err != nil {
		return nil, err
	}
	return metaOf(bd)
}

func metaOf(bd *rdb.Bundle) (*store.Lineage, error) {
	var l store.Lineage
	if err := json.Unmarshal(bd.Meta, &l); err != nil {
		return nil, fmt.Errorf("the fleet's metadata of %s: %v", bd.Name, err)
	}
	l.Version = bd.Version
	return &l, nil
}

// LoadVersion reads version v from this node's archive, or from the
// fleet when v is the fleet's current version.
func (b *Backend) LoadVersion(name string, v int) (*store.Lineage, error) {
	l, err := b.Local.LoadVersion(name, v)
	if err == nil || !errors.Is(err, store.ErrNotFound) && !errors.Is(err, os.ErrNotExist) {
		return l, err
	}
	shared, serr := b.Load(name)
	if serr == nil && shared.Version == v {
		return shared, nil
	}
	return nil, err
}

// LiveVersion is the version this node serves.
func (b *Backend) LiveVersion(name string) (int, error) { return b.Local.LiveVersion(name) }

// ErrFenced is a certificate obtained under a lease that another node
// took over meanwhile: the fleet keeps the other node's.
type ErrFenced struct{ Name string }

func (e *ErrFenced) Error() string {
	return fmt.Sprintf("the fleet refused this certificate for %s: another node took the name over after this node's lease ran out, and published its own", e.Name)
}

// NoBackoff: the name is fine, this node was slow.
func (e *ErrFenced) NoBackoff() bool { return true }

// HintText makes *ErrFenced a hint.Hinter.
func (e *ErrFenced) HintText() string {
	return "nothing to do: the other node's certificate stands; this node stalled longer than --lease-ttl"
}

// SaveVersion publishes the certificate to the fleet, fenced by this
// process's lease, and then saves it in the node's archive under the
// same version. A refused publish saves nothing. A Redis that does not
// answer keeps the certificate on this node and queues it: the next run
// or the agent publishes it before anything else, so it is never
// ordered again.
func (b *Backend) SaveVersion(l *store.Lineage, files store.Files) (int, error) {
	ctx, cancel := rctx()
	defer cancel()
	floor := b.Local.MaxVersion(l.Name)
	v, err := b.sh().NextVersion(ctx, l.Name, floor)
	var unavailable *rdb.Unavailable
	if errors.As(err, &unavailable) {
		v = floor + 1
	} else if err != nil {
		return 0, err
	}
	var fence int64
	b.mu.Lock()
	if h := b.held[l.Name]; h != nil {
		fence = h.token
	}
	b.mu.Unlock()
	if fence == 0 && err == nil {
		return 0, fmt.Errorf("publish %s: this process holds no lease on it", l.Name)
	}
	l.Version = v
	if err == nil {
		bd, berr := b.bundle(l, files, v, fence)
		if berr != nil {
			return 0, berr
		}
		err = b.sh().Publish(ctx, bd)
		if errors.Is(err, rdb.ErrStale) {
			return 0, &ErrFenced{Name: l.Name}
		}
		if err != nil && !errors.As(err, &unavailable) {
			return 0, err
		}
	}
	if err := b.Local.SaveVersionAt(l, files, v); err != nil {
		// This node's agent may have installed the very version already,
		// from the fleet's event: the same certificate is no failure.
		have, lerr := b.Local.LoadVersion(l.Name, v)
		if lerr != nil || have.Cert.Serial != l.Cert.Serial {
			return 0, err
		}
	}
	if err != nil {
		slog.Warn("the fleet's Redis did not answer; the certificate is kept on this node and published when Redis is back", "name", l.Name, "err", err)
		if qerr := b.queue(l.Name, v); qerr != nil {
			return 0, qerr
		}
	}
	return v, nil
}

func (b *Backend) bundle(l *store.Lineage, files store.Files, v int, fence int64) (*rdb.Bundle, error) {
	epoch, sealed, err := b.N.SealBundleKey(l.Name, v, files.Key)
	if err != nil {
		return nil, err
	}
	cp := *l
	cp.Version, cp.Format = v, store.FormatVersion
	meta, _ := json.Marshal(&cp)
	return &rdb.Bundle{Name: l.Name, Version: v, Fence: fence, NotBefore: l.Cert.NotBefore, Epoch: epoch, Node: b.N.Name,
		Meta: meta, Cert: files.Cert, Chain: files.Chain, Fullchain: files.Fullchain, SealedKey: sealed}, nil
}

// The queue of certificates saved here while Redis was away.
func (b *Backend) queuePath() string { return filepath.Join(fleetDir(b.Local), "unpublished.json") }

func (b *Backend) queue(name string, v int) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	return withQueueLock(b.Local, func() error {
		q := readQueue(b.queuePath())
		q[name] = v
		data, _ := json.Marshal(q)
		return store.WriteFile(b.queuePath(), data, 0o600)
	})
}

// withQueueLock runs fn under a flock of the queue's own lock file: a
// run adding to the queue and the agent publishing it are two
// processes, and neither may lose the other's entry. The lock is held
// for a file's read and write only.
func withQueueLock(st *store.Store, fn func() error) error {
	path := filepath.Join(fleetDir(st), "unpublished.lock")
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|syscall.O_NOFOLLOW, 0o600)
	if err != nil {
		return err
	}
	defer f.Close()
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX); err != nil {
		return err
	}
	return fn()
}

// hasQueue says whether certificates wait on this node to be published.
func hasQueue(st *store.Store) bool {
	_, err := os.Stat(filepath.Join(fleetDir(st), "unpublished.json"))
	return err == nil
}

// readQueue is name -> the version waiting to be published.
func readQueue(path string) map[string]int {
	q := map[string]int{}
	if data, err := os.ReadFile(path); err == nil {
		json.Unmarshal(data, &q)
	}
	return q
}

// PublishQueued publishes what SaveVersion kept here while Redis was
// away. Commands call it before they plan.
func (b *Backend) PublishQueued(ctx context.Context) error {
	q := readQueue(b.queuePath())
	if len(q) == 0 {
		return nil
	}
	for name, v := range q {
		if err := b.N.publishVersion(ctx, name, v, 0); err != nil && !errors.Is(err, rdb.ErrStale) && !errors.Is(err, os.ErrNotExist) {
			return err
		}
		slog.Info("published a certificate kept on this node while Redis was away", "name", name)
		b.unqueue(name, v)
	}
	return nil
}

// UpdateMeta saves new settings for the current version, in the fleet
// and in this node's archive.
func (b *Backend) UpdateMeta(l *store.Lineage) error {
	ctx, cancel := rctx()
	defer cancel()
	cp := *l
	cp.Format = store.FormatVersion
	meta, _ := json.Marshal(&cp)
	if err := b.sh().UpdateMeta(ctx, l.Name, l.Version, meta); err != nil {
		return err
	}
	if _, err := b.Local.LoadVersion(l.Name, l.Version); err == nil {
		return b.Local.UpdateMeta(l)
	}
	return nil
}

// Activate, Rollback, Prune, LivePaths and ArchiveDir are this node's.
func (b *Backend) Activate(name string, v int) error    { return b.Local.Activate(name, v) }
func (b *Backend) Rollback(name string, prev int) error { return b.Local.Rollback(name, prev) }
func (b *Backend) Prune(name string, keep int, protect ...int) ([]int, error) {
	return b.Local.Prune(name, keep, protect...)
}
func (b *Backend) LivePaths(name string) store.Paths { return b.Local.LivePaths(name) }
func (b *Backend) ArchiveDir(name string) string     { return b.Local.ArchiveDir(name) }

// Delete removes name from the fleet and from this node.
func (b *Backend) Delete(name string) error {
	ctx, cancel := rctx()
	defer cancel()
	if err := b.sh().DeleteBundle(ctx, name); err != nil {
		return err
	}
	if !b.Local.Exists(name) {
		return nil // another node held it
	}
	return b.Local.Delete(name)
}

// ReadKey is the current private key: this node's copy when it serves
// the fleet's version, otherwise the fleet's, opened here.
func (b *Backend) ReadKey(name string) ([]byte, error) {
	ctx, cancel := rctx()
	defer cancel()
	bd, err := b.sh().Bundle(ctx, name)
	if err != nil {
		if live, lerr := b.Local.LiveVersion(name); lerr == nil && live > 0 {
			return b.Local.ReadKey(name)
		}
		return nil, err
	}
	if live, lerr := b.Local.LiveVersion(name); lerr == nil && live == bd.Version {
		return b.Local.ReadKey(name)
	}
	return b.N.OpenBundleKey(bd)
}

// ReadFullchain is the fleet's current chain.
func (b *Backend) ReadFullchain(name string) ([]byte, error) {
	ctx, cancel := rctx()
	defer cancel()
	full, err := b.sh().Fullchain(ctx, name)
	if err != nil {
		return b.Local.ReadFullchain(name)
	}
	return full, nil
}

// ReadStatus merges the fleet's status (ARI, backoff, warnings) with this
// node's pending deploy. A status that cannot be read counts as none, as
// the seam's contract allows.
func (b *Backend) ReadStatus(name string) (store.Status, error) {
	local, _ := b.Local.ReadStatus(name)
	ctx, cancel := rctx()
	defer cancel()
	raw, err := b.sh().Status(ctx, name)
	var st store.Status
	if err == nil && raw != nil {
		json.Unmarshal(raw, &st)
	}
	st.Pending = local.Pending
	return st, nil
}

// WriteStatus writes the shared part to the fleet and the pending
// deploy to this node.
func (b *Backend) WriteStatus(name string, st store.Status) error {
	if err := b.Local.WriteStatus(name, store.Status{Pending: st.Pending}); err != nil {
		return err
	}
	st.Pending = nil
	ctx, cancel := rctx()
	defer cancel()
	data, _ := json.Marshal(st)
	err := b.sh().SetStatus(ctx, name, data)
	if errors.As(err, new(*rdb.Unavailable)) {
		// The pending deploy, the part that must not be lost, is on
		// disk; the shared part (ARI, backoff) is learnt again.
		slog.Warn("could not save the renewal status in Redis; it is learnt again on the next run", "name", name, "err", err)
		return nil
	}
	return err
}

// RemoveStatus removes both parts.
func (b *Backend) RemoveStatus(name string) error {
	if err := b.Local.RemoveStatus(name); err != nil {
		return err
	}
	ctx, cancel := rctx()
	defer cancel()
	return b.sh().DelStatus(ctx, name)
}

// ReadAccount reads the fleet's account, opened here; an account only
// this node has is used as it is (and published by Reseed).
func (b *Backend) ReadAccount(server, email string) ([]byte, []byte, error) {
	ctx, cancel := rctx()
	defer cancel()
	sealed, reg, epoch, err := b.sh().Account(ctx, server, email)
	if err != nil {
		return nil, nil, err
	}
	if len(sealed) == 0 {
		return b.Local.ReadAccount(server, email)
	}
	key, err := b.N.key(epoch)
	if err != nil {
		return nil, nil, err
	}
	pem, err := open(key, accountAD(b.N.ID, server, email), sealed)
	if err != nil {
		return nil, nil, fmt.Errorf("the fleet's account %s at %s: %w", email, server, err)
	}
	if len(reg) == 0 {
		reg = nil
	}
	// A copy on this node's disk (0600, as on a single host): a Redis
	// that comes back empty gets the account back from any node that
	// used it, so renewals never stop on "register a new account".
	if !b.Local.HasAccount(server, email) && reg != nil {
		if err := b.Local.WriteAccountKey(server, email, pem); err == nil {
			b.Local.WriteAccount(server, email, reg)
		}
	}
	return pem, reg, nil
}

// HasAccount reports a registered account in the fleet or on this node.
func (b *Backend) HasAccount(server, email string) bool {
	ctx, cancel := rctx()
	defer cancel()
	_, reg, _, err := b.sh().Account(ctx, server, email)
	return err == nil && len(reg) > 0 || b.Local.HasAccount(server, email)
}

// WriteAccountKey saves the new account key on this node; the fleet
// gets it with its registration, in one piece (WriteAccount).
func (b *Backend) WriteAccountKey(server, email string, key []byte) error {
	return b.Local.WriteAccountKey(server, email, key)
}

// WriteAccount saves the registration here and, with its key sealed, in
// the fleet, unless another node registered first: then the fleet keeps
// that one, and this node uses it from its next run on.
func (b *Backend) WriteAccount(server, email string, reg []byte) error {
	if err := b.Local.WriteAccount(server, email, reg); err != nil {
		return err
	}
	key, _, err := b.Local.ReadAccount(server, email)
	if err != nil {
		return err
	}
	epoch, dk := b.N.current()
	sealed, err := seal(dk, accountAD(b.N.ID, server, email), key)
	if err != nil {
		return err
	}
	ctx, cancel := rctx()
	defer cancel()
	created, err := b.sh().CreateAccount(ctx, server, email, epoch, sealed, reg)
	if err == nil && !created {
		slog.Info("another node registered the fleet's account at the same moment; the fleet keeps that one", "server", server, "email", email)
	}
	return err
}

// RemoveAccount forgets the account here and in the fleet.
func (b *Backend) RemoveAccount(server, email string) error {
	if err := b.Local.RemoveAccount(server, email); err != nil {
		return err
	}
	ctx, cancel := rctx()
	defer cancel()
	return b.sh().DelAccount(ctx, server, email)
}

func (b *Backend) queued(name string) int {
	b.mu.Lock()
	defer b.mu.Unlock()
	return readQueue(b.queuePath())[name]
}

// unqueue drops name's entry if it is still version v: a newer version
// queued meanwhile waits for its own publish.
func (b *Backend) unqueue(name string, v int) {
	b.mu.Lock()
	defer b.mu.Unlock()
	withQueueLock(b.Local, func() error {
		q := readQueue(b.queuePath())
		if q[name] != v {
			return nil
		}
		delete(q, name)
		if len(q) == 0 {
			return os.Remove(b.queuePath())
		}
		data, _ := json.Marshal(q)
		return store.WriteFile(b.queuePath(), data, 0o600)
	})
}

// queuedWait is how long a lease holder whose certificate could not be
// published keeps trying before it gives the name back.
const queuedWait = 30 * time.Second

// publishQueued publishes the certificate this lease's holder saved
// while Redis was away, under the lease, retrying for queuedWait.
func (l *lease) publishQueued(v int) bool {
	deadline := time.Now().Add(queuedWait)
	for {
		ctx, cancel := rctx()
		err := l.b.N.publishVersion(ctx, l.name, v, l.token)
		cancel()
		if err == nil || errors.Is(err, rdb.ErrStale) {
			l.b.unqueue(l.name, v)
			if err == nil {
				slog.Info("published the certificate once Redis was back", "name", l.name)
			}
			return true
		}
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(time.Second)
	}
}

// lease is one fleet-wide lease held by this process, extended by a
// heartbeat until released.
type lease struct {
	b     *Backend
	name  string
	token int64
	stop  chan struct{}
	done  chan struct{}
	once  sync.Once
}

func (l *lease) Token() int64 { return l.token }

func (l *lease) Release() {
	l.once.Do(func() {
		if v := l.b.queued(l.name); v > 0 && !l.publishQueued(v) {
			// Keep the lease (the heartbeat too, until the TTL ends it):
			// the certificate is only on this node, and another node that
			// took the name now would order it again.
			slog.Warn("Redis still away: keeping the lease until it expires so no other node orders this name again; the certificate is published by the next run", "name", l.name)
			close(l.stop)
			<-l.done
			return
		}
		close(l.stop)
		<-l.done
		l.b.mu.Lock()
		if l.b.held[l.name] == l {
			delete(l.b.held, l.name)
		}
		l.b.mu.Unlock()
		// A Redis that is failing over comes back in seconds: waiting for
		// it to hand the name back spares every other node the lease's
		// whole TTL (10 minutes by default) of "another run holds it".
		if err := withRedis(context.Background(), "leaving the lease to expire", func(ctx context.Context) error {
			return l.b.sh().Release(ctx, l.name, l.b.Holder, l.token)
		}); err != nil {
			slog.Info("could not hand the lease back; it expires by itself", "name", l.name, "err", err)
		}
	})
}

// Acquire takes name's fleet-wide lease, or fails at once with
// store.ErrLeaseHeld. A heartbeat extends it every third of ttl; a Redis
// error is retried, not taken as a lost lease (one community Redis
// storage let its lock go after a single error); the lease is given up
// as lost only when Redis says another holder has it.
func (b *Backend) Acquire(ctx context.Context, name string, ttl time.Duration) (store.Lease, error) {
	tok, err := b.sh().Acquire(ctx, name, b.Holder, ttl)
	if err == nil && tok == 0 && b.breakDeadOwn(ctx, name) {
		tok, err = b.sh().Acquire(ctx, name, b.Holder, ttl)
	}
	if err != nil {
		return nil, hint.Wrap(fmt.Errorf("take the fleet lease of %s: %w", name, err), "no order is placed without the lease; the name is left for the next run")
	}
	if tok == 0 {
		return nil, store.ErrLeaseHeld
	}
	l := &lease{b: b, name: name, token: tok, stop: make(chan struct{}), done: make(chan struct{})}
	b.mu.Lock()
	b.held[name] = l
	b.mu.Unlock()
	go l.heartbeat(ttl)
	return l, nil
}

// breakDeadOwn frees a lease that a process of this very node holds
// and that is no longer running (killed, or it could not release while
// Redis was away). This run holds the node's state-directory lock, so
// no other lbcert run of this node can be using it. Another node's
// lease is never broken: only its TTL ends it.
func (b *Backend) breakDeadOwn(ctx context.Context, name string) bool {
	holder, token, err := b.sh().Holder(ctx, name)
	node, pidText, ok := strings.Cut(holder, "/")
	if err != nil || !ok || node != b.N.Name || holder == b.Holder {
		return false
	}
	pid, err := strconv.Atoi(pidText)
	if err != nil || pid <= 0 || syscall.Kill(pid, 0) != syscall.ESRCH {
		return false
	}
	slog.Info("freeing a lease left by a process of this node that has exited", "name", name, "pid", pid)
	return b.sh().Break(ctx, name, holder, token) == nil
}

func (l *lease) heartbeat(ttl time.Duration) {
	defer close(l.done)
	every := max(ttl/3, 100*time.Millisecond)
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-l.stop:
			return
		case <-t.C:
		}
		ctx, cancel := context.WithTimeout(context.Background(), every)
		ok, err := l.b.sh().Extend(ctx, l.name, l.b.Holder, l.token, ttl)
		cancel()
		if err != nil {
			slog.Debug("could not extend the lease; retrying", "name", l.name, "err", err)
			continue
		}
		if !ok {
			slog.Warn("lost the fleet lease (this process stalled past --lease-ttl, or Redis lost it); its certificate will be refused if another node published meanwhile", "name", l.name)
			return
		}
	}
}
