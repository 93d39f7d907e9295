package fleet

import (
	"context"
	"encoding/json"
	"log/slog"
	"maps"
	"os"
	"path/filepath"
	"sync"

	"github.com/lbcert/lbcert/internal/fleet/rdb"
	"github.com/lbcert/lbcert/internal/store"
)

// The highest version number this node saw the fleet give each name,
// <dir>/fleet/seen.json (name -> version), whether or not the node
// installed it: a version published and then lost with Redis, whose only
// holder left the fleet meanwhile, was still handed out, and a name
// issued again must be numbered above it (invariant I2). The agent
// notes every head it reads; a rebuilt Redis gets the counters back
// (publishDisk), and an order's version floor includes it.
func seenPath(st *store.Store) string { return filepath.Join(fleetDir(st), "seen.json") }

var seenMu sync.Mutex

func readSeen(st *store.Store) map[string]int {
	m := map[string]int{}
	if data, err := os.ReadFile(seenPath(st)); err == nil {
		json.Unmarshal(data, &m)
	}
	return m
}

// noteSeen keeps the versions of heads above those seen before, in one
// write when any is. Only the agent notes (its copy is kept in memory
// between reconciles; a fleet of 100,000 names has a file of megabytes);
// the node's commands read the file.
func (n *Node) noteSeen(heads map[string]rdb.Head) {
	seenMu.Lock()
	defer seenMu.Unlock()
	if n.seen == nil {
		n.seen = readSeen(n.Local)
	}
	m := n.seen
	changed := false
	for name, h := range heads {
		if h.Version > m[name] {
			m[name] = h.Version
			changed = true
		}
	}
	if !changed {
		return
	}
	data, _ := json.Marshal(m)
	err := os.MkdirAll(fleetDir(n.Local), 0o700)
	if err == nil {
		err = store.WriteFile(seenPath(n.Local), data, 0o600)
	}
	if err != nil {
		slog.Warn("could not keep the fleet's version numbers on this node", "err", err)
	}
}

// seenVersion is the highest version this node saw given to name.
func (n *Node) seenVersion(name string) int {
	seenMu.Lock()
	defer seenMu.Unlock()
	if n.seen != nil {
		return n.seen[name]
	}
	return readSeen(n.Local)[name]
}

// seedSeen raises Redis's version counters to what this node saw.
func (n *Node) seedSeen(ctx context.Context) error {
	seenMu.Lock()
	m := n.seen
	if m == nil {
		m = readSeen(n.Local)
	}
	m = maps.Clone(m)
	seenMu.Unlock()
	// And every version in this node's archive, live or not: one whose
	// deploy failed here, published just before Redis lost it (torture
	// run 15: a FLUSHALL as lb1 published c15-05's version 1 with its
	// load balancer broken), was handed out all the same, and a name
	// issued again must be numbered above it (I2).
	names, err := n.Local.Lineages()
	if err != nil {
		return err
	}
	for _, name := range names {
		m[name] = max(m[name], n.Local.MaxVersion(name))
	}
	return n.Shared.SeedVersions(ctx, m)
}
