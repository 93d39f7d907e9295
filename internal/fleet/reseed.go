package fleet

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"strconv"
	"time"

	"github.com/lbcert/lbcert/internal/fleet/rdb"
	"github.com/lbcert/lbcert/internal/store"
)

// Reseed rebuilds an empty Redis from this node: the fleet record, the
// membership and every member's wrapped data key (from the node's
// verified copy), then the node's own lineages, accounts and ledger
// entries. Every member does the same when it finds Redis empty, so the
// fleet's lineages come back from whichever nodes hold them; a newer
// certificate is never replaced by an older one.
//
// The fleet record names no epoch until the membership is in: the node
// that claims the empty Redis does so under the membership lock, writes
// the epoch's records and every member's wrapped key, then names the
// epoch (putBackLocked), as a rotation does. A member following
// rotations meanwhile never finds an epoch without its own key (it
// would take itself for removed), and a node that finds no epoch named
// waits for the lock: then the rebuild is done, or its node was killed
// and this one puts back its own membership (checkEpoch does the same).
func (n *Node) Reseed(ctx context.Context) error {
	err := n.locked(ctx, func() error {
		created, err := n.Shared.Create(ctx, "meta", "id", n.ID, "gen", newFleetID(),
			"created", time.Now().UTC().Format(time.RFC3339), "rebuilt_by", n.Name, "rebuilt_at", strconv.FormatInt(time.Now().UnixMilli(), 10))
		if err != nil {
			return err
		}
		if !created {
			if id, err := n.Shared.HGet(ctx, "meta", "id"); err != nil {
				return err
			} else if id != n.ID {
				return fmt.Errorf("%s was rebuilt with fleet %s meanwhile, not this node's %s; refusing", n.Shared.Addr(), id, n.ID)
			}
		}
		return n.putBackLocked(ctx, func(string) {})
	})
	if err != nil {
		return err
	}
	return n.publishDisk(ctx)
}

// publishDisk adds what this node holds to Redis, in an order that
// keeps every invariant whichever node gets there first: its tombstones
// (a delete wins over a certificate issued before it; put in before the
// look that the other nodes wait for), its accounts (so
// nobody registers a second one), its copy of the issuance ledger, its
// copies of the staged rollouts, then the certificates it serves,
// unfenced (the version and notBefore rules keep whatever is newer in
// Redis), and the previous versions those rollouts keep. It then records that it caught up
// with this Redis generation, which orders wait for after a rebuild.
func (n *Node) publishDisk(ctx context.Context) error {
	meta, err := n.Shared.HGetAll(ctx, "meta")
	if err != nil {
		return err
	}
	gen := meta["gen"]
	// Tombstones first, before this node says it has looked: a node
	// that rebuilt Redis waits for the others' look before it publishes
	// its certificates, so a name one node deleted just before Redis
	// was emptied is refused there, not published and taken back later
	// (I3; the delete may not have reached the rebuilder's disk). They
	// seal nothing, so no epoch needs following first.
	if err := n.seedTombstones(ctx); err != nil {
		return err
	}
	if err := n.awaitLooked(ctx, meta); err != nil {
		return err
	}
	if err := n.seedSeen(ctx); err != nil {
		return err
	}
	if err := n.seedAccounts(ctx); err != nil {
		return err
	}
	if err := n.seedLedger(ctx); err != nil {
		return err
	}
	if err := n.seedRollouts(ctx); err != nil {
		return err
	}
	seeded, err := n.seedLineages(ctx)
	if err != nil {
		return err
	}
	if err := n.seedRolloutHeads(ctx); err != nil {
		return err
	}
	if err := n.seedPrevs(ctx); err != nil {
		return err
	}
	slog.Info("published this node's certificates into a rebuilt Redis", "fleet", n.ID, "lineages", seeded)
	if err := n.Shared.MarkCaughtUp(ctx, gen, n.Name); err != nil {
		return err
	}
	return n.save(func(l *local) { l.Gen = gen })
}

// seedLineages publishes the newest version of every lineage this node
// holds and has no tombstone for (seedLineage).
func (n *Node) seedLineages(ctx context.Context) (int, error) {
	names, err := n.Local.Lineages()
	if err != nil {
		return 0, err
	}
	seeded := 0
	for _, name := range names {
		if t, _ := n.Local.ReadTombstone(name); t != nil {
			continue
		}
		err := n.seedLineage(ctx, name)
		switch {
		case err == nil:
			seeded++
		case errors.As(err, new(*rdb.ErrStale)):
		case errors.As(err, new(*rdb.Unavailable)):
			return seeded, err
		default:
			slog.Warn("could not republish a lineage", "name", name, "err", err)
		}
	}
	return seeded, nil
}

// seedTombstones puts this node's tombstones back into Redis.
func (n *Node) seedTombstones(ctx context.Context) error {
	ts, err := n.Local.Tombstones()
	if err != nil {
		return err
	}
	for name, t := range ts {
		if err := n.Shared.SeedTombstone(ctx, name, t.Fence, t.At, t.Version); err != nil {
			return err
		}
	}
	return nil
}

// seedAccounts publishes every account this node holds that the fleet
// has none for.
func (n *Node) seedAccounts(ctx context.Context) error {
	accts, err := n.Local.AccountList()
	if err != nil {
		return err
	}
	for _, a := range accts {
		if err := n.seedAccount(ctx, a[0], a[1]); err != nil {
			return err
		}
	}
	return nil
}

// seedLineage publishes this node's newest version of name, unfenced:
// the notBefore rule keeps a newer certificate another node published.
// That is the live one, or one this node took out of its live files
// after its deploy failed here (a first certificate, or one rolled
// back): the fleet had it all the same, published before its deploy as
// every order's is. Left out, the only record of its number could leave
// the fleet with this node, and a name issued again would get the same
// number for another certificate (torture seed 15: I2).
func (n *Node) seedLineage(ctx context.Context, name string) error {
	v, err := n.Local.LiveVersion(name)
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	if j, _ := n.Local.Journal(name); j.Pending != nil && j.Pending.Version > v {
		v = j.Pending.Version
	}
	if v == 0 {
		return nil // neither served here nor owed: nothing to say
	}
	if n.Local.IsLost(name, v) {
		return nil // its number names another certificate in the fleet
	}
	return n.publishVersion(ctx, name, v)
}

// publishVersion publishes version v of name from this node's archive,
// under its own number, unfenced: a rebuild, or a Redis that lost the
// newest version this node serves.
func (n *Node) publishVersion(ctx context.Context, name string, v int) error {
	l, files, err := n.Local.ReadVersion(name, v)
	if err != nil {
		return err
	}
	bd, err := n.bundle(l, files, l.Version, 0)
	if err != nil {
		return err
	}
	if err := n.Shared.Publish(ctx, bd); err != nil {
		return err
	}
	n.noteIssued(l)
	return nil
}

// seedAccount publishes this node's account for (server, email) when
// the fleet has none.
func (n *Node) seedAccount(ctx context.Context, server, email string) error {
	sealed, _, _, err := n.Shared.Account(ctx, server, email)
	if err != nil || len(sealed) > 0 {
		return err
	}
	key, reg, err := n.Local.ReadAccount(server, email)
	if errors.Is(err, store.ErrNotFound) {
		return nil
	}
	if err != nil {
		return err
	}
	if len(reg) == 0 {
		return nil // never registered: nothing the fleet could use
	}
	epoch, dk := n.current()
	s, err := seal(dk, accountAD(n.ID, server, email), key)
	if err != nil {
		return err
	}
	_, err = n.Shared.CreateAccount(ctx, server, email, epoch, s, reg)
	return err
}

// importJoined adds what a newly approved node held before it joined:
// its lineages the fleet does not hold, and its accounts for CAs the
// fleet has none for. A lineage the fleet holds already is the fleet's:
// this node's own versions of it, numbered before it joined, are marked
// lost (they go once it serves the fleet's), so that neither a version
// number nor a set of names is taken from a node that was not a member
// when it issued them.
func (n *Node) importJoined(ctx context.Context) error {
	gen, err := n.Shared.HGet(ctx, "meta", "gen")
	if err != nil {
		return err
	}
	if err := n.seedAccounts(ctx); err != nil {
		return err
	}
	names, err := n.Local.Lineages()
	if err != nil {
		return err
	}
	for _, name := range names {
		_, err := n.Shared.BundleMeta(ctx, name)
		switch {
		case err == nil:
			for v := n.Local.MaxVersion(name); v > 0; v = n.Local.MaxVersionBelow(name, v) {
				n.Local.MarkLost(name, v)
			}
			slog.Info("the fleet holds this lineage already: its certificate replaces this node's", "name", name)
		case errors.Is(err, rdb.ErrNoBundle):
			if err := n.seedLineage(ctx, name); err != nil && !errors.As(err, new(*rdb.ErrStale)) {
				return fmt.Errorf("import %s: %w", name, err)
			}
		default:
			return err
		}
	}
	if err := n.Shared.MarkCaughtUp(ctx, gen, n.Name); err != nil {
		return err
	}
	return n.save(func(l *local) { l.Gen = gen })
}

// Import publishes every lineage and account of this node's --dir, for
// fleet init.
func (n *Node) Import(ctx context.Context) (int, error) {
	if err := n.seedAccounts(ctx); err != nil {
		return 0, err
	}
	return n.seedLineages(ctx)
}

// awaitLooked waits, before this node seals anything into Redis
// generation gen (meta, the fleet record), for the other members to
// look at it (MarkLooked, or catchUpWait), then follows the epoch they
// named. A node that had not followed the last rotation before Redis
// lost it would rebuild, or catch up, under the older key, which the
// removed node holds; a member that made or followed the rotation puts
// its epoch back as it looks (checkEpoch), and this node then seals
// under that one, or learns it was the one removed (invariant I5).
func (n *Node) awaitLooked(ctx context.Context, meta map[string]string) error {
	ms, _ := strconv.ParseInt(meta["rebuilt_at"], 10, 64)
	rebuilt := time.UnixMilli(ms)
	if err := n.Shared.MarkLooked(ctx, meta["gen"], n.Name); err != nil {
		return err
	}
	for deadline := time.Now().Add(lookWait); ms > 0 && time.Since(rebuilt) < catchUpWindow; {
		// Following a newer epoch as soon as it is named also brings the
		// members under it: a removed node is not waited for.
		if err := n.Refresh(ctx); err != nil {
			return err
		}
		looked, err := n.Shared.Looked(ctx, meta["gen"])
		if err != nil {
			return err
		}
		missing, err := n.notDone(ctx, looked, rebuilt, time.Now())
		if err != nil {
			return err
		}
		if len(missing) == 0 {
			break
		}
		if time.Now().After(deadline) {
			slog.Warn("Redis was rebuilt and some nodes have not looked at it yet; adding this node's certificates", "nodes", missing)
			break
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(250 * time.Millisecond):
		}
	}
	return n.Refresh(ctx)
}

// lookWait bounds awaitLooked: a running agent looks at a rebuilt Redis
// on its next heartbeat (every 3 s by default); one that is down, or
// stuck in its reconnect backoff, is not waited for longer.
var lookWait = 8 * time.Second

// CheckSeeded re-seeds Redis if it lost the fleet (FLUSHALL, a new
// instance) since this node opened it. The agent calls it on every
// heartbeat.
func (n *Node) CheckSeeded(ctx context.Context) error {
	id, err := n.Shared.HGet(ctx, "meta", "id")
	if err != nil {
		return err
	}
	if id == "" {
		slog.Warn("the fleet's Redis is empty; rebuilding it from this node", "redis", n.Shared.Addr(), "fleet", n.ID)
		return n.Reseed(ctx)
	}
	if id != n.ID {
		return fmt.Errorf("%s now holds fleet %s, not this node's %s", n.Shared.Addr(), id, n.ID)
	}
	if err := n.checkEpoch(ctx); err != nil {
		return err
	}
	return n.catchUp(ctx)
}

// caughtUpGen is the Redis generation this node last added its disk to.
func (n *Node) caughtUpGen() string {
	n.stMu.Lock()
	defer n.stMu.Unlock()
	return n.st.Gen
}

// catchUp publishes this node's certificates when another member has
// rebuilt Redis since this node last looked (a new generation): every
// node holds the lineages it ordered, so all of them must add theirs.
func (n *Node) catchUp(ctx context.Context) error {
	gen, err := n.Shared.HGet(ctx, "meta", "gen")
	if err != nil || gen == n.caughtUpGen() {
		return err
	}
	slog.Info("the fleet's Redis was rebuilt; adding this node's certificates", "fleet", n.ID)
	return n.publishDisk(ctx)
}
