package fleet

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"sort"
	"strconv"
	"sync"
	"time"

	"github.com/lbcert/lbcert/internal/catalog"
	"github.com/lbcert/lbcert/internal/fleet/rdb"
	"github.com/lbcert/lbcert/internal/store"
)

// Catalog is package catalog's Catalog and Accounts on the fleet's
// Redis, as node N sees it. N's own --dir (its store.Local) keeps what
// rebuilds an emptied Redis: a copy of each account, the tombstones of
// deleted lineages, the issue times of recent certificates (the
// ledger), and the certificates it serves.
type Catalog struct {
	N *Node
	// Holder names this process in leases: node and pid.
	Holder string

	mu   sync.Mutex
	held map[string]*lease // name -> the lease this process holds
}

var (
	_ catalog.Catalog  = (*Catalog)(nil)
	_ catalog.Accounts = (*Catalog)(nil)
)

// NewCatalog is the fleet's catalog as node n sees it.
func NewCatalog(n *Node) *Catalog {
	return &Catalog{N: n, Holder: n.Name + "/" + strconv.Itoa(os.Getpid()) + processSpace(), held: map[string]*lease{}}
}

// rctx bounds one Redis call: a Redis that hangs must fail the item,
// not the run forever.
func rctx(ctx context.Context) (context.Context, context.CancelFunc) {
	return context.WithTimeout(ctx, redisDeadline)
}

// redisDeadline bounds one step's Redis calls (rctx).
var redisDeadline = 10 * time.Second

func (c *Catalog) sh() *rdb.Shared { return c.N.Shared }

// Names are the fleet's lineages.
func (c *Catalog) Names(ctx context.Context) ([]string, error) {
	ctx, cancel := rctx(ctx)
	defer cancel()
	names, err := c.sh().Names(ctx)
	if err != nil {
		return nil, err
	}
	sort.Slice(names, func(i, j int) bool { return store.NaturalLess(names[i], names[j]) })
	return names, nil
}

// Head is the fleet's newest certificate of name.
func (c *Catalog) Head(ctx context.Context, name string) (*store.Lineage, error) {
	ctx, cancel := rctx(ctx)
	defer cancel()
	bd, err := c.sh().BundleMeta(ctx, name)
	if errors.Is(err, rdb.ErrNoBundle) {
		return nil, fmt.Errorf("lineage %q: %w", name, store.ErrNotFound)
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

// Fetch reads the fleet's certificate of name and opens its key here;
// the fleet holds the newest version (version 0 asks for it) and, while
// a staged rollout is on its way, the version before it.
func (c *Catalog) Fetch(ctx context.Context, name string, version int) (*store.Lineage, store.Files, error) {
	ctx, cancel := rctx(ctx)
	defer cancel()
	bd, err := c.sh().Bundle(ctx, name)
	if errors.Is(err, rdb.ErrNoBundle) {
		return nil, store.Files{}, fmt.Errorf("lineage %q: %w", name, store.ErrNotFound)
	}
	if err != nil {
		return nil, store.Files{}, err
	}
	if version != 0 && bd.Version > version {
		if prev, err := c.sh().Prev(ctx, name); err == nil && prev.Version == version {
			bd = prev
		}
	}
	if version != 0 && bd.Version != version {
		return nil, store.Files{}, fmt.Errorf("%s version %d: %w", name, version, catalog.ErrSuperseded)
	}
	l, err := metaOf(bd)
	if err != nil {
		return nil, store.Files{}, err
	}
	key, err := c.N.OpenBundleKey(ctx, bd)
	if err != nil {
		return nil, store.Files{}, err
	}
	return l, store.Files{Cert: bd.Cert, Chain: bd.Chain, Fullchain: bd.Fullchain, Key: key}, nil
}

// SetMeta saves new settings for the fleet's current version.
func (c *Catalog) SetMeta(ctx context.Context, l *store.Lineage) error {
	ctx, cancel := rctx(ctx)
	defer cancel()
	cp := *l
	cp.Format = store.FormatVersion
	meta, _ := json.Marshal(&cp)
	return c.sh().UpdateMeta(ctx, l.Name, l.Version, meta)
}

// Delete removes name from the fleet, fenced against every lease holder
// (invariant I3), then from this node, keeping the tombstone on its
// disk. The other nodes' agents remove it when they see the delete.
func (c *Catalog) Delete(ctx context.Context, name string) error {
	at := time.Now().UTC()
	var fence int64
	var version int
	if err := withRedis(ctx, "giving the delete up", func(ctx context.Context) (err error) {
		fence, version, err = c.sh().DeleteBundle(ctx, name, at)
		return err
	}); err != nil {
		return err
	}
	if err := c.N.Local.Forget(name, store.Tombstone{At: at, Fence: fence, By: c.N.Name, Version: version}); err != nil {
		return err
	}
	c.N.awaitTaken(ctx, name)
	return nil
}

// deleteWait bounds awaitTaken.
var deleteWait = 10 * time.Second

// awaitTaken waits, up to deleteWait, for every live agent of another
// node to have applied the fleet's events up to now, so that the delete
// just made is on their disks too: until then it is only in Redis and on
// this node's disk, and a Redis that lost its data while this node is
// down would be rebuilt without it (I3). An agent that does not take it
// in time is named, and the delete stands.
func (n *Node) awaitTaken(ctx context.Context, name string) {
	var missing []string
	for deadline := time.Now().Add(deleteWait); ; {
		rctx, cancel := rctx(ctx)
		id, err := n.Shared.LastEvent(rctx)
		var took map[string]string
		var agents []AgentInfo
		if err == nil {
			took, err = n.Shared.Took(rctx)
		}
		if err == nil {
			agents, err = n.LiveAgents(rctx)
		}
		cancel()
		if err != nil {
			return // Redis away: the agents' reconcile compares tombstones later
		}
		missing = missing[:0]
		for _, a := range agents {
			if a.Node != n.Name && !rdb.EventAtLeast(took[a.Node], id) {
				missing = append(missing, a.Node)
			}
		}
		if len(missing) == 0 || !time.Now().Before(deadline) {
			break
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(200 * time.Millisecond):
		}
	}
	if len(missing) > 0 {
		slog.Warn("the delete is in the fleet's Redis and on this node, but these nodes' agents have not taken it yet; they will on their next reconcile", "name", name, "nodes", missing)
	}
}

// Status is the fleet's renewal status of name; one that cannot be read
// counts as none, as the contract allows.
func (c *Catalog) Status(ctx context.Context, name string) (store.Status, error) {
	ctx, cancel := rctx(ctx)
	defer cancel()
	raw, err := c.sh().Status(ctx, name)
	var st store.Status
	if err == nil && raw != nil {
		json.Unmarshal(raw, &st)
	}
	return st, nil
}

// SetStatus saves the fleet's renewal status of name. A Redis that does
// not answer loses only what is learnt again (ARI, backoff).
func (c *Catalog) SetStatus(ctx context.Context, name string, st store.Status) error {
	ctx, cancel := rctx(ctx)
	defer cancel()
	var err error
	if st == (store.Status{}) {
		err = c.sh().DelStatus(ctx, name)
	} else {
		data, _ := json.Marshal(st)
		err = c.sh().SetStatus(ctx, name, data)
	}
	if errors.As(err, new(*rdb.Unavailable)) {
		slog.Warn("could not save the renewal status in Redis; it is learnt again on the next run", "name", name, "err", err)
		return nil
	}
	return err
}
