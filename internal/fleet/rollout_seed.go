package fleet

import (
	"context"
	"errors"
	"log/slog"

	"github.com/lbcert/lbcert/internal/fleet/rdb"
)

// Every node keeps a copy of the fleet's waves and of each rollout on
// its way (rollout_store.go), so that an emptied or new Redis gets them
// back (invariant R4 of package catalog): a rebuild publishes the
// copies before the certificates, so that the head and the previous
// version land where the record says, and the previous bundle last.

// seedRollouts puts this node's copies of the waves and of the records
// back into a Redis that lost them; the newest copy of each wins.
func (n *Node) seedRollouts(ctx context.Context) error {
	if c := readConfigCopy(n.Local); c != nil && c.Seq > 0 {
		if _, err := n.Shared.SetRolloutConfig(ctx, configJSON(c), len(c.Waves), c.Seq); err != nil {
			return err
		}
	}
	for name, r := range recordCopies(n.Local) {
		if t, _ := n.Local.ReadTombstone(name); t != nil {
			continue
		}
		if _, err := n.Shared.SeedRollout(ctx, name, r.Version, r.Seq, r.fields()...); err != nil {
			return err
		}
	}
	return nil
}

// seedRolloutHeads puts back the version each rollout this node has a
// copy of is rolling out, from its archive when it holds that version
// without serving it (the node that ordered it, a canary that went
// back): seedLineages publishes only what nodes serve, and in a held
// rollout no node may serve it.
func (n *Node) seedRolloutHeads(ctx context.Context) error {
	for name, r := range recordCopies(n.Local) {
		if live, _ := n.Local.LiveVersion(name); live == r.Version {
			continue // seedLineages did
		}
		if l, err := n.Local.LoadVersion(name, r.Version); err != nil || l.Cert.Serial != r.Serial {
			slog.Debug("this node does not hold the version a staged rollout rolls out", "name", name, "version", r.Version, "err", err)
			continue
		}
		err := n.publishVersion(ctx, name, r.Version)
		switch {
		case err == nil:
			slog.Info("put back the version a staged rollout rolls out", "name", name, "version", r.Version)
		case errors.As(err, new(*rdb.ErrStale)):
			slog.Debug("the version a staged rollout rolls out is in Redis already, or newer", "name", name, "version", r.Version, "why", err)
		default:
			return err
		}
	}
	return nil
}

// seedPrevs puts back the previous bundle of each rollout this node
// has a copy of, from its archive, when it holds that version.
func (n *Node) seedPrevs(ctx context.Context) error {
	for name, r := range recordCopies(n.Local) {
		if r.Previous == 0 {
			continue
		}
		l, files, err := n.Local.ReadVersion(name, r.Previous)
		if err != nil || l.Cert.Serial != r.PrevSerial {
			continue
		}
		bd, err := n.bundle(l, files, r.Previous, 0)
		if err != nil {
			return err
		}
		if ok, err := n.Shared.SeedPrev(ctx, bd); err != nil {
			return err
		} else if ok {
			slog.Info("put back the version a staged rollout keeps on the nodes not reached yet", "name", name, "version", r.Previous)
		}
	}
	return nil
}

// seedRecordCopy puts back this node's copy of name's record before a
// version Redis lost is published again (giveBack): the publish then
// finds its rollout instead of going to every node at once.
func (n *Node) seedRecordCopy(ctx context.Context, name string) error {
	r := readRecordCopy(n.Local, name)
	if r == nil {
		return nil
	}
	_, err := n.Shared.SeedRollout(ctx, name, r.Version, r.Seq, r.fields()...)
	return err
}
