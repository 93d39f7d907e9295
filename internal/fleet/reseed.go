package fleet

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/lbcert/lbcert/internal/store"
	"github.com/lbcert/lbcert/internal/fleet/rdb"
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

// Reseed rebuilds an empty Redis from this node: the fleet record, the
// membership and every member's wrapped data key (from the node's
// verified copy), then the node's own lineages, accounts and ledger
// entries. Every member does the same when it finds Redis empty, so the
// fleet's lineages come back from whichever nodes hold them; a newer
// certificate is never replaced by an older one.
func (n *Node) Reseed(ctx context.Context) error {
	epoch, key := n.current()
	gen := newFleetID()
	created, err := n.Shared.Create(ctx, "meta", "id", n.ID, "epoch", strconv.Itoa(epoch), "gen", gen,
		"created", time.Now().UTC().Format(time.RFC3339), "rebuilt_by", n.Name)
	if err != nil {
		return err
	}
	if created {
		for _, ep := range n.st.Epochs {
			j, _ := json.Marshal(ep)
			if err := n.Shared.HSet(ctx, "epochs", strconv.Itoa(ep.N), string(j)); err != nil {
				return err
			}
		}
		var ms []Member
		for _, m := range n.st.Members {
			if macOK(key, m.MAC, "member", n.ID, m.Node, m.Recipient) {
				ms = append(ms, m)
			}
		}
		n.mu.Lock()
		n.members = ms
		n.mu.Unlock()
		cur := Epoch{N: epoch, KeyID: keyID(key)}
		for _, ep := range n.st.Epochs {
			if ep.N == epoch {
				cur = ep
			}
		}
		if err := n.writeShared(ctx, cur); err != nil {
			return err
		}
	} else if meta, err := n.Shared.HGetAll(ctx, "meta"); err != nil {
		return err
	} else if meta["id"] != n.ID {
		return fmt.Errorf("%s was rebuilt with fleet %s meanwhile, not this node's %s; refusing", n.Shared.Addr(), meta["id"], n.ID)
	}
	return n.publishDisk(ctx)
}

// publishDisk publishes this node's lineages, accounts and ledger
// entries, unfenced: the notBefore rule keeps whatever is newer in Redis.
// It then remembers the Redis generation it published into, so it does
// this once per rebuild, not on every run.
func (n *Node) publishDisk(ctx context.Context) error {
	gen, err := n.Shared.HGet(ctx, "meta", "gen")
	if err != nil {
		return err
	}
	names, err := n.Local.Names()
	if err != nil {
		return err
	}
	seeded := 0
	accounts := map[[2]string]bool{}
	for _, name := range names {
		err := n.seedLineage(ctx, name)
		switch {
		case err == nil:
			seeded++
		case errors.Is(err, rdb.ErrStale):
		case errors.As(err, new(*rdb.Unavailable)):
			return err
		default:
			slog.Warn("could not republish a lineage", "name", name, "err", err)
		}
		if l, err := n.Local.Load(name); err == nil {
			accounts[[2]string{l.Server, l.Email}] = true
		}
	}
	for a := range accounts {
		if err := n.seedAccount(ctx, a[0], a[1]); err != nil {
			return err
		}
	}
	slog.Info("published this node's certificates into a rebuilt Redis", "fleet", n.ID, "lineages", seeded)
	n.st.Gen = gen
	return writeLocal(n.Local, &n.st)
}

// seedLineage publishes this node's live version of name, unfenced: the
// notBefore rule keeps a newer certificate another node published.
func (n *Node) seedLineage(ctx context.Context, name string) error {
	v, err := n.Local.LiveVersion(name)
	if err != nil {
		return err
	}
	return n.publishVersion(ctx, name, v, 0)
}

// publishVersion publishes version v of name from this node's archive,
// under a lease token (0 for none).
func (n *Node) publishVersion(ctx context.Context, name string, v int, fence int64) error {
	l, err := n.Local.LoadVersion(name, v)
	if err != nil {
		return err
	}
	dir := filepath.Join(n.Local.ArchiveDir(name), strconv.Itoa(v))
	read := func(f string) ([]byte, error) { return os.ReadFile(filepath.Join(dir, f)) }
	cert, err := read(store.CertFile)
	if err != nil {
		return err
	}
	chain, _ := read(store.ChainFile)
	full, err := read(store.FullchainFile)
	if err != nil {
		return err
	}
	key, err := read(store.KeyFile)
	if err != nil {
		return err
	}
	cp := *l
	cp.Challenge = store.Challenge{Mode: "fleet"}
	epoch, sealed, err := n.SealBundleKey(name, l.Version, key)
	if err != nil {
		return err
	}
	meta, _ := json.Marshal(&cp)
	if err := n.Shared.Publish(ctx, &rdb.Bundle{Name: name, Version: l.Version, Fence: fence, NotBefore: l.Cert.NotBefore, Epoch: epoch, Node: n.Name,
		Meta: meta, Cert: cert, Chain: chain, Fullchain: full, SealedKey: sealed}); err != nil {
		return err
	}
	if !l.IssuedAt.IsZero() {
		return n.Shared.LedgerSeed(ctx, LedgerSet(l.Server, l.Domains), name+":v"+strconv.Itoa(l.Version), l.IssuedAt, LedgerWindow)
	}
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

// Import publishes every lineage and account of this node's --dir, for
// fleet init.
func (n *Node) Import(ctx context.Context) (int, error) {
	names, err := n.Local.Names()
	if err != nil {
		return 0, err
	}
	count := 0
	accounts := map[[2]string]bool{}
	for _, name := range names {
		if err := n.seedLineage(ctx, name); err != nil && !errors.Is(err, rdb.ErrStale) {
			return count, fmt.Errorf("import %s: %w", name, err)
		}
		count++
		if l, err := n.Local.Load(name); err == nil {
			accounts[[2]string{l.Server, l.Email}] = true
		}
	}
	for a := range accounts {
		if err := n.seedAccount(ctx, a[0], a[1]); err != nil {
			return count, err
		}
	}
	return count, nil
}

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
	return n.catchUp(ctx)
}

// catchUp publishes this node's certificates when another member has
// rebuilt Redis since this node last looked (a new generation): every
// node holds the lineages it ordered, so all of them must add theirs.
func (n *Node) catchUp(ctx context.Context) error {
	gen, err := n.Shared.HGet(ctx, "meta", "gen")
	if err != nil || gen == n.st.Gen {
		return err
	}
	slog.Info("the fleet's Redis was rebuilt; adding this node's certificates", "fleet", n.ID)
	return n.publishDisk(ctx)
}
