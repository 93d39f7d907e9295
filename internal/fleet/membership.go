package fleet

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strconv"
	"time"

	"github.com/lbcert/lbcert/internal/fleet/rdb"
)

// Membership changes are one at a time, fleet-wide: two 'fleet remove'
// at once would each rotate the data key to the same new epoch with a
// key of its own, and an approval during a rotation would wrap the old
// key for the new node. A member holds the membership lock for the
// whole change, and acts on the newest membership and key, read again
// under the lock.
const membershipLock = "membership"

// withMembership runs f under the fleet's membership lock, after
// following any rotation made meanwhile.
func (n *Node) withMembership(ctx context.Context, f func() error) error {
	return n.locked(ctx, func() error {
		if err := n.Refresh(ctx); err != nil {
			return err
		}
		if err := n.loadMembers(ctx, true); err != nil {
			return err
		}
		return f()
	})
}

// locked runs f under the fleet's membership lock.
func (n *Node) locked(ctx context.Context, f func() error) error {
	release, err := n.Shared.Lock(ctx, membershipLock, time.Minute)
	if err != nil {
		return err
	}
	defer release()
	return f()
}

// repair puts back the membership records of this node's epoch into a
// Redis that holds an older one of the same fleet: Redis came back from
// an older snapshot, or a node removed since rebuilt an emptied Redis
// with the key it still had. Either way the removed node would be a
// member again and could open what is sealed next (invariant I5). This
// node knows the newer key, the chain of epochs that links it to the
// old one, and the members that hold it: it writes them back, takes the
// others out, and re-seals or drops what was sealed under older keys.
func (n *Node) repair(ctx context.Context) error {
	return n.putBack(ctx, func(cur string) {
		slog.Warn("the fleet's Redis holds an older data key than this node (restored from an old snapshot, or rebuilt by a removed node): putting back this node's", "redis_epoch", cur, "epoch", n.Epoch())
	})
}

// putBack writes this node's membership and then names its epoch in the
// fleet record, under the membership lock, unless Redis names this
// epoch or a newer one already (another member did it first); say is
// told the epoch Redis named before. A rebuild of an emptied Redis
// (Reseed) and a repair both end here.
func (n *Node) putBack(ctx context.Context, say func(cur string)) error {
	return n.locked(ctx, func() error { return n.putBackLocked(ctx, say) })
}

// putBackLocked is putBack for a caller that holds the membership lock.
func (n *Node) putBackLocked(ctx context.Context, say func(cur string)) error {
	behind, cur, err := n.redisBehind(ctx)
	if err != nil || !behind {
		return err
	}
	say(cur)
	if err := n.restoreMembers(ctx); err != nil {
		return err
	}
	if err := n.Shared.NameEpoch(ctx, n.Epoch()); err != nil {
		return err
	}
	_, err = n.reseal(ctx, true)
	return err
}

// redisBehind says whether Redis needs this node's membership: it names
// an older epoch than this node's, or none, or this node's with an epoch
// record missing or other than this node's copy (a rebuild cut short by
// an earlier release, which named the epoch into a Redis emptied
// meanwhile; a record edited in Redis, which a lagging member would
// refuse to follow for good). cur is the epoch it names.
func (n *Node) redisBehind(ctx context.Context) (bool, string, error) {
	cur, err := n.Shared.HGet(ctx, "meta", "epoch")
	if err != nil {
		return false, "", err
	}
	e, _ := strconv.Atoi(cur)
	if e != n.Epoch() {
		return e < n.Epoch(), cur, nil
	}
	recs, err := n.Shared.HGetAll(ctx, "epochs")
	if err != nil {
		return false, cur, err
	}
	n.stMu.Lock()
	defer n.stMu.Unlock()
	for _, mine := range n.st.Epochs {
		var got Epoch
		if json.Unmarshal([]byte(recs[strconv.Itoa(mine.N)]), &got) != nil || got != mine {
			return true, cur, nil
		}
	}
	return recs[cur] == "", cur, nil
}

// restoreMembers writes this node's epochs and members, with the data
// key wrapped for each, and removes every other member record and
// wrapped key.
func (n *Node) restoreMembers(ctx context.Context) error {
	epoch, key := n.current()
	var keep []Member
	for _, m := range n.st.Members {
		if macOK(key, m.MAC, "member", n.ID, m.Node, m.Recipient) {
			keep = append(keep, m)
		}
	}
	if !slices.ContainsFunc(keep, func(m Member) bool { return m.Node == n.Name }) {
		return fmt.Errorf("node %s's own copy of the membership does not list it under epoch %d; refusing to rebuild the membership from it", n.Name, epoch)
	}
	for _, ep := range n.st.Epochs {
		j, _ := json.Marshal(ep)
		if err := n.Shared.HSet(ctx, "epochs", strconv.Itoa(ep.N), string(j)); err != nil {
			return err
		}
	}
	raw, err := n.Shared.HGetAll(ctx, "members")
	if err != nil {
		return err
	}
	for node := range raw {
		if !slices.ContainsFunc(keep, func(m Member) bool { return m.Node == node }) {
			if err := n.Shared.HDel(ctx, "members", node); err != nil {
				return err
			}
			for e := 1; e <= epoch; e++ {
				if err := n.Shared.HDel(ctx, "wrapped:"+strconv.Itoa(e), node); err != nil {
					return err
				}
			}
		}
	}
	n.mu.Lock()
	n.members = keep
	n.mu.Unlock()
	cur := Epoch{N: epoch, KeyID: keyID(key)}
	for _, ep := range n.st.Epochs {
		if ep.N == epoch {
			cur = ep
		}
	}
	return n.writeShared(ctx, cur)
}

// checkEpoch repairs a Redis whose data key epoch is older than this
// node's (see repair), or that names none (a rebuild under way, or its
// node killed before it named one); the agent calls it on every
// heartbeat, and every command that opens the fleet.
func (n *Node) checkEpoch(ctx context.Context) error {
	behind, _, err := n.redisBehind(ctx)
	if err != nil || !behind {
		return err
	}
	return n.repair(ctx)
}

// sealedByMember says whether a bundle under an older key may be
// re-sealed: it was published by a node that is a member now. One a
// removed node published (after rebuilding Redis with its old key) is
// dropped instead, and the members give their own copy back.
func (n *Node) sealedByMember(b *rdb.Bundle) bool {
	return slices.ContainsFunc(n.Members(), func(m Member) bool { return m.Node == b.Node })
}

// errOlderKey is a bundle sealed under an older data key than this
// node's: a re-seal is on its way (a rotation just ran), or a removed
// node sealed it; it is not installed meanwhile.
var errOlderKey = errors.New("sealed under an older data key than the fleet's current one; waiting for it to be re-sealed")
