package fleet

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"time"

	"github.com/lbcert/lbcert/internal/fleet/rdb"
)

// ReadAccount reads the fleet's account, opened here; an account only
// this node has is used as it is (and published by Reseed).
func (c *Catalog) ReadAccount(server, email string) ([]byte, []byte, error) {
	ctx, cancel := rctx(context.Background())
	defer cancel()
	sealed, reg, epoch, err := c.sh().Account(ctx, server, email)
	if err != nil {
		return nil, nil, err
	}
	if len(sealed) == 0 {
		return c.N.Local.ReadAccount(server, email)
	}
	pem, err := c.N.openAccount(ctx, server, email, epoch, sealed)
	if errors.As(err, new(*NoKey)) {
		// Sealed under a key from before this node joined (a lagging
		// node rebuilt Redis at an older epoch): this node's own copy is
		// the same account until a member re-seals it.
		if lpem, lreg, lerr := c.N.Local.ReadAccount(server, email); lerr == nil {
			return lpem, lreg, nil
		}
	}
	if err != nil {
		return nil, nil, err
	}
	if len(reg) == 0 {
		reg = nil
	}
	c.N.keepAccount(server, email, pem, reg)
	return pem, reg, nil
}

// openAccount opens a sealed account key, following a key rotation that
// ran since this process opened the fleet.
func (n *Node) openAccount(ctx context.Context, server, email string, epoch int, sealed []byte) ([]byte, error) {
	key, err := n.keyFor(ctx, epoch)
	if err != nil {
		return nil, err
	}
	pem, err := open(key, accountAD(n.ID, server, email), sealed)
	if err != nil {
		return nil, fmt.Errorf("the fleet's account %s at %s: %w", email, server, err)
	}
	return pem, nil
}

// keepAccount keeps a copy of the fleet's account on this node's disk
// (0600, as on a single host): a Redis that comes back empty gets the
// account back from every node, so the fleet keeps one account per CA
// and renewals never stop on "register a new account".
func (n *Node) keepAccount(server, email string, pem, reg []byte) {
	if reg == nil {
		return
	}
	if k, r, err := n.Local.ReadAccount(server, email); err == nil && string(k) == string(pem) && string(r) == string(reg) {
		return
	}
	if err := n.Local.WriteAccountKey(server, email, pem); err == nil {
		n.Local.WriteAccount(server, email, reg)
	}
}

// SyncAccounts keeps a copy of every fleet account on this node: the
// agent calls it, so that even a node that never ordered can give the
// accounts back to a rebuilt Redis.
func (n *Node) SyncAccounts(ctx context.Context) error {
	accts, err := n.Shared.Accounts(ctx)
	if err != nil {
		return err
	}
	for _, a := range accts {
		sealed, reg, epoch, err := n.Shared.Account(ctx, a[0], a[1])
		if err != nil {
			return err
		}
		if len(sealed) == 0 || len(reg) == 0 {
			continue
		}
		pem, err := n.openAccount(ctx, a[0], a[1], epoch, sealed)
		if errors.As(err, new(*NoKey)) {
			continue // under a key from before this node joined: the copy it has stays (a repair re-seals it)
		}
		if err != nil {
			return err
		}
		n.keepAccount(a[0], a[1], pem, reg)
	}
	return nil
}

// HasAccount reports a registered account in the fleet or on this node.
func (c *Catalog) HasAccount(server, email string) bool {
	ctx, cancel := rctx(context.Background())
	defer cancel()
	_, reg, _, err := c.sh().Account(ctx, server, email)
	return err == nil && len(reg) > 0 || c.N.Local.HasAccount(server, email)
}

// WriteAccountKey saves the new account key on this node; the fleet
// gets it with its registration, in one piece (WriteAccount).
func (c *Catalog) WriteAccountKey(server, email string, key []byte) error {
	return c.N.Local.WriteAccountKey(server, email, key)
}

// WriteAccount saves the registration here and, with its key sealed, in
// the fleet, unless another node registered first: then the fleet keeps
// that one, and this node uses it from its next run on. After a Redis
// rebuild it first waits for the other nodes to add their copies, so
// the fleet keeps one account per CA.
func (c *Catalog) WriteAccount(server, email string, reg []byte) error {
	if err := c.N.Local.WriteAccount(server, email, reg); err != nil {
		return err
	}
	key, _, err := c.N.Local.ReadAccount(server, email)
	if err != nil {
		return err
	}
	// Long enough to wait out the catch-up after a rebuild (a member that
	// is down is waited for up to catchUpWait) and still write.
	ctx, cancel := context.WithTimeout(context.Background(), catchUpWait+10*time.Second)
	defer cancel()
	if err := c.N.awaitCatchUp(ctx); err != nil {
		return err
	}
	for attempt := 0; ; attempt++ {
		epoch, dk := c.N.current()
		sealed, err := seal(dk, accountAD(c.N.ID, server, email), key)
		if err != nil {
			return err
		}
		created, err := c.sh().CreateAccount(ctx, server, email, epoch, sealed, reg)
		if errors.Is(err, rdb.ErrEpoch) && attempt == 0 {
			if err := c.N.Refresh(ctx); err != nil {
				return err
			}
			continue
		}
		if err == nil && !created {
			slog.Info("another node registered the fleet's account at the same moment; the fleet keeps that one", "server", server, "email", email)
		}
		return err
	}
}

// RemoveAccount forgets the account here and in the fleet.
func (c *Catalog) RemoveAccount(server, email string) error {
	if err := c.N.Local.RemoveAccount(server, email); err != nil {
		return err
	}
	ctx, cancel := rctx(context.Background())
	defer cancel()
	return c.sh().DelAccount(ctx, server, email)
}
