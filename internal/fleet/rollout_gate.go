package fleet

import (
	"context"
	"errors"
	"log/slog"
	"strconv"
	"time"

	"github.com/lbcert/lbcert/internal/engine"
	"github.com/lbcert/lbcert/internal/fleet/rdb"
	"github.com/lbcert/lbcert/internal/store"
)

// Gate is engine.Node.Gate on this node: which version of head's
// lineage it may serve now. Without staged waves, or for a head that
// has no rollout on its way, it is head; otherwise the rollout's rule
// (decideTarget): head once this node's wave is released, the previous
// version until then, or while the rollout is held or aborted, unless
// that version is about to expire. Installing asks with fresh set, so
// nothing it decides is older than the Redis read just made.
func (n *Node) Gate(ctx context.Context, head *store.Lineage, fresh bool) (engine.Gated, error) {
	if n.publishedPlain(head.Name, head.Version, false) {
		return engine.Gated{Want: head}, nil // it started no rollout
	}
	cfg, err := n.RolloutConfig(ctx, fresh)
	if err != nil || !cfg.Staged() {
		return engine.Gated{Want: head}, err
	}
	if !fresh {
		if may, err := n.mayHaveRollout(ctx, head.Name); err != nil || !may {
			return engine.Gated{Want: head}, err
		}
	}
	recs, err := n.Records(ctx, head.Name)
	if err != nil {
		return engine.Gated{}, err
	}
	r := recs[head.Name]
	if r == nil || r.Version != head.Version || r.Serial != head.Cert.Serial {
		return engine.Gated{Want: head}, nil
	}
	t, prev, err := n.target(ctx, cfg, r)
	if err != nil {
		return engine.Gated{}, err
	}
	g := engine.Gated{Want: head, Held: t.Held, Override: t.Override}
	switch {
	case t.Version == r.Version:
	case prev != nil && t.Version == prev.Version:
		g.Want = prev
	default:
		if g.Want, err = n.Local.LoadVersion(r.Name, t.Version); err != nil {
			return engine.Gated{}, err
		}
		g.Want.Version = t.Version
	}
	if t.Override != "" {
		n.noteOverride(ctx, r, t)
	}
	return g, nil
}

// target is this node's Target for r, and the previous version's
// metadata (nil when the fleet has it nowhere).
func (n *Node) target(ctx context.Context, cfg *RolloutConfig, r *Record) (Target, *store.Lineage, error) {
	prev, err := n.prevLineage(ctx, r)
	if err != nil {
		return Target{}, nil, err
	}
	live, _ := n.Local.LiveVersion(r.Name)
	in := targetIn{rec: r, waves: n.wavesOf(ctx, cfg, r), node: n.Name, live: live, margin: cfg.margin(), now: time.Now()}
	if l, err := n.Local.LoadVersion(r.Name, live); err == nil {
		in.liveSerial = l.Cert.Serial
	}
	if prev != nil {
		in.prev = prev.Cert
	}
	return decideTarget(in), prev, nil
}

// prevLineage is the metadata of r's previous version: this node's own
// copy when it has that certificate, else the fleet's previous bundle.
func (n *Node) prevLineage(ctx context.Context, r *Record) (*store.Lineage, error) {
	if r.Previous == 0 {
		return nil, nil
	}
	if l, err := n.Local.LoadVersion(r.Name, r.Previous); err == nil && l.Cert.Serial == r.PrevSerial {
		l.Version = r.Previous
		return l, nil
	}
	bd, err := n.Shared.Prev(ctx, r.Name)
	if errors.Is(err, rdb.ErrNoBundle) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	if bd.Version != r.Previous {
		return nil, nil
	}
	return metaOf(bd)
}

// wavesOf is r's waves among the members now (placeWaves). A record
// whose waves are not resolved yet (the publish that started it does
// not resolve them; its publisher does right after, see startedRollout)
// gets them now, from cfg and the members, moved like the rest of the
// record (compare-and-set on its version and seq): whichever node is
// first, every node then judges by the same waves. r is updated to the
// record as moved.
func (n *Node) wavesOf(ctx context.Context, cfg *RolloutConfig, r *Record) [][]string {
	members := n.memberNames()
	if r.Waves == nil && cfg.Staged() {
		waves := cfg.Resolve(members)
		if _, err := n.Shared.MoveRollout(ctx, r.Name, r.Version, r.Seq, false, "waves", wavesJSON(waves)); err != nil {
			slog.Warn("could not keep the waves a rollout started with; the next look does", "name", r.Name, "err", err)
			return waves
		}
		recs, err := n.Records(ctx, r.Name)
		if rr := recs[r.Name]; err == nil && rr != nil && rr.Version == r.Version && rr.Waves != nil {
			*r = *rr
		} else {
			return waves // it moved meanwhile: the next look keeps them
		}
	}
	if r.Waves == nil {
		return cfg.Resolve(members)
	}
	return placeWaves(r.Waves, members)
}

// startedRollout resolves the waves of the rollout a publish of name
// just started, at once: from the fleet's waves and members as they are
// when it starts.
func (n *Node) startedRollout(ctx context.Context, name string) {
	cfg, err := n.RolloutConfig(ctx, true)
	if err != nil {
		return // the next look resolves them
	}
	recs, err := n.Records(ctx, name) // this node's copy, from the start
	if r := recs[name]; err == nil && r != nil {
		n.wavesOf(ctx, cfg, r)
	}
}

func (n *Node) memberNames() []string {
	ms := n.Members()
	out := make([]string, len(ms))
	for i, m := range ms {
		out[i] = m.Node
	}
	return out
}

// noteOverride records, once per rollout, that the expiry override
// began (fleet status, the reports and the metrics say so), and says it
// loudly here.
func (n *Node) noteOverride(ctx context.Context, r *Record, t Target) {
	now := strconv.FormatInt(time.Now().UnixMilli(), 10)
	first, err := n.Shared.NoteRollout(ctx, r.Name, r.Version, "override_at", now, "override_node", n.Name)
	if err != nil {
		slog.Warn("could not record the expiry override of a held rollout", "name", r.Name, "err", err)
	}
	live, _ := n.Local.LiveVersion(r.Name)
	if first || live != r.Version {
		slog.Error("EXPIRY OVERRIDE: a held rollout is overridden on this node", "name", r.Name, "version", r.Version, "why", t.Override)
	}
}

// Targets is this node's Target of every lineage of heads that has a
// rollout on its way (the others: their head), for the agent's
// reconcile.
func (n *Node) Targets(ctx context.Context, heads map[string]rdb.Head) (map[string]Target, map[string]*Record, error) {
	cfg, err := n.RolloutConfig(ctx, true)
	if err != nil {
		return nil, nil, err
	}
	recs, err := n.Records(ctx)
	if err != nil {
		return nil, nil, err
	}
	out := map[string]Target{}
	if !cfg.Staged() {
		return out, recs, nil
	}
	for name, r := range recs {
		if h, ok := heads[name]; !ok || h.Version != r.Version || h.Serial != r.Serial {
			continue
		}
		t, _, err := n.target(ctx, cfg, r)
		if err != nil {
			return nil, nil, err
		}
		out[name] = t
	}
	return out, recs, nil
}
