package fleet

import (
	"context"
	"crypto/sha1"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"time"

	"github.com/lbcert/lbcert/internal/store"
)

// rolloutCache is what a node remembers of the rollouts between Redis
// reads: the fleet's waves for a moment (planning may use an answer a
// couple of seconds old; installing never does), and the seq of each
// record it copied to its disk, so an unchanged record is not written
// again.
type rolloutCache struct {
	mu    sync.Mutex
	cfg   *RolloutConfig
	cfgAt time.Time
	// followed: an agent keeps cfg current from the events stream (a
	// change of the waves is an event ahead of any publish after it), so
	// even installing needs no read of its own.
	followed bool
	copied   map[string]int64 // name -> seq on disk (version<<32 | seq)
	// plain are versions this process published that started no
	// rollout: none will ever be for them.
	plain map[string]int
	// active is the set of rollouts on their way, as planning may use
	// it for a moment (a renew over 100,000 lineages asks once, not
	// once per lineage).
	active   map[string]bool
	activeAt time.Time
}

// cfgFresh is how old an answer planning accepts.
const cfgFresh = 2 * time.Second

func (n *Node) roCache() *rolloutCache {
	n.roOnce.Do(func() { n.ro = &rolloutCache{copied: map[string]int64{}, plain: map[string]int{}} })
	return n.ro
}

// RolloutConfig reads the fleet's waves; fresh false accepts an answer
// a couple of seconds old, and an agent that follows the events has the
// current one without a read. A fleet that never set any has none.
func (n *Node) RolloutConfig(ctx context.Context, fresh bool) (*RolloutConfig, error) {
	c := n.roCache()
	c.mu.Lock()
	if c.cfg != nil && (c.followed || !fresh && time.Since(c.cfgAt) < cfgFresh) {
		cfg := c.cfg
		c.mu.Unlock()
		return cfg, nil
	}
	c.mu.Unlock()
	return n.readRolloutConfig(ctx)
}

// FollowRolloutConfig reads the fleet's waves and, from then on, keeps
// the answer for installs too: the caller (the agent) calls it again on
// every change the events stream brings, and whenever it may have
// missed one (a reconnect, a reconcile).
func (n *Node) FollowRolloutConfig(ctx context.Context) error {
	c := n.roCache()
	c.mu.Lock()
	c.followed = false
	c.mu.Unlock()
	if _, err := n.readRolloutConfig(ctx); err != nil {
		return err
	}
	c.mu.Lock()
	c.followed = true
	c.mu.Unlock()
	return nil
}

func (n *Node) readRolloutConfig(ctx context.Context) (*RolloutConfig, error) {
	raw, seq, err := n.Shared.RolloutConfig(ctx)
	if err != nil {
		return nil, err
	}
	if raw == nil && seq == 0 {
		// Redis has none, though this node kept the fleet's waves: Redis
		// lost them (a rebuild not done yet), which is not "no waves";
		// the rollouts it puts back are judged by the copy meanwhile.
		if c := readConfigCopy(n.Local); c != nil && c.Seq > 0 {
			raw, _ = json.Marshal(c)
			seq = c.Seq
		}
	}
	cfg := &RolloutConfig{}
	if raw != nil {
		if err := json.Unmarshal(raw, cfg); err != nil {
			return nil, fmt.Errorf("the fleet's rollout settings in Redis do not parse: %v", err)
		}
	}
	cfg.Seq = seq
	c := n.roCache()
	c.mu.Lock()
	c.cfg, c.cfgAt = cfg, time.Now()
	c.mu.Unlock()
	if seq > 0 {
		n.keepConfig(cfg)
	}
	return cfg, nil
}

// SetRolloutConfig makes cfg the fleet's waves (none: staging off), and
// keeps a copy on this node's disk for a rebuild of Redis. Its change
// number is above any this node knows (Redis may have been rebuilt from
// an older copy than this node's) and, clocks being roughly right, above
// the number of any change made before it elsewhere: a wall-clock floor
// in milliseconds.
func (n *Node) SetRolloutConfig(ctx context.Context, cfg *RolloutConfig) error {
	cfg.By, cfg.At, cfg.Seq = n.Name, time.Now().UTC(), 0
	floor := cfg.At.UnixMilli()
	if old := readConfigCopy(n.Local); old != nil {
		floor = max(floor, old.Seq)
	}
	seq, err := n.Shared.ChangeRolloutConfig(ctx, configJSON(cfg), len(cfg.Waves), 0, floor)
	if err != nil {
		return err
	}
	cfg.Seq = seq
	n.keepConfig(cfg)
	c := n.roCache()
	c.mu.Lock()
	c.cfg, c.cfgAt = cfg, time.Now()
	c.mu.Unlock()
	return nil
}

// configJSON is cfg as Redis keeps it: without its change number, which
// Redis keeps beside it.
func configJSON(cfg *RolloutConfig) []byte {
	c := *cfg
	c.Seq = 0
	raw, _ := json.Marshal(&c)
	return raw
}

// newerConfig says whether a is a newer copy of the fleet's waves than
// b: a higher change number, or the same one (two changes made while
// Redis was lost, each from an older copy) and the higher SHA-1 of its
// JSON, the order Redis's script keeps too (package rdb).
func newerConfig(a, b *RolloutConfig) bool {
	if a.Seq != b.Seq {
		return a.Seq > b.Seq
	}
	return tieKey(configJSON(a)) > tieKey(configJSON(b))
}

// tieKey is the first 48 bits of raw's SHA-1.
func tieKey(raw []byte) uint64 {
	sum := sha1.Sum(raw)
	return binary.BigEndian.Uint64(sum[:8]) >> 16
}

// mayHaveRollout says whether name may have a rollout on its way, from
// an answer at most a couple of seconds old.
func (n *Node) mayHaveRollout(ctx context.Context, name string) (bool, error) {
	c := n.roCache()
	c.mu.Lock()
	if c.active != nil && time.Since(c.activeAt) < cfgFresh {
		ok := c.active[name]
		c.mu.Unlock()
		return ok, nil
	}
	c.mu.Unlock()
	names, err := n.Shared.Rollouts(ctx)
	if err != nil {
		return false, err
	}
	active := make(map[string]bool, len(names))
	for _, nm := range names {
		active[nm] = true
	}
	c.mu.Lock()
	c.active, c.activeAt = active, time.Now()
	c.mu.Unlock()
	return active[name], nil
}

// publishedPlain notes a version this process published that started
// no rollout, and says whether v of name is one.
func (n *Node) publishedPlain(name string, v int, set bool) bool {
	c := n.roCache()
	c.mu.Lock()
	defer c.mu.Unlock()
	if set {
		c.plain[name] = v
	}
	return c.plain[name] == v
}

func rolloutDir(st *store.Store) string { return filepath.Join(fleetDir(st), "rollouts") }

// keepConfig writes this node's copy of the fleet's waves, if newer
// (newerConfig).
func (n *Node) keepConfig(cfg *RolloutConfig) {
	path := filepath.Join(fleetDir(n.Local), "rollout.json")
	if old := readConfigCopy(n.Local); old != nil && !newerConfig(cfg, old) {
		return
	}
	data, _ := json.MarshalIndent(cfg, "", "  ")
	if err := store.WriteFile(path, append(data, '\n'), 0o600); err != nil {
		slog.Warn("could not keep a copy of the fleet's rollout settings", "err", err)
	}
}

func readConfigCopy(st *store.Store) *RolloutConfig {
	data, err := os.ReadFile(filepath.Join(fleetDir(st), "rollout.json"))
	if err != nil {
		return nil
	}
	var c RolloutConfig
	if json.Unmarshal(data, &c) != nil {
		return nil
	}
	return &c
}

// recordOf parses a record's hash.
func recordOf(name string, m map[string]string) *Record {
	atoi := func(f string) int64 { v, _ := strconv.ParseInt(m[f], 10, 64); return v }
	ms := func(f string) time.Time {
		if v := atoi(f); v > 0 {
			return time.UnixMilli(v).UTC()
		}
		return time.Time{}
	}
	r := &Record{Name: name, Version: int(atoi("version")), Serial: m["serial"], Previous: int(atoi("previous")),
		PrevSerial: m["prev_serial"], Wave: int(atoi("wave")), State: m["state"], Why: m["why"], Node: m["node"],
		Since: ms("since"), Resumed: ms("resumed"), Started: ms("started"), Override: ms("override_at"),
		OverNode: m["override_node"], Seq: atoi("seq")}
	if w := m["waves"]; w != "" && json.Unmarshal([]byte(w), &r.Waves) != nil {
		r.Waves = nil // unreadable: pinned again (Node.wavesOf)
	}
	return r
}

// fields are r's hash fields other than version and seq.
func (r *Record) fields() []string {
	ms := func(t time.Time) string {
		if t.IsZero() {
			return "0"
		}
		return strconv.FormatInt(t.UnixMilli(), 10)
	}
	f := []string{"serial", r.Serial, "previous", strconv.Itoa(r.Previous), "prev_serial", r.PrevSerial,
		"wave", strconv.Itoa(r.Wave), "state", r.State, "why", r.Why, "node", r.Node, "since", ms(r.Since),
		"resumed", ms(r.Resumed), "started", ms(r.Started), "override_at", ms(r.Override), "override_node", r.OverNode}
	if r.Waves != nil {
		f = append(f, "waves", wavesJSON(r.Waves))
	}
	return f
}

func wavesJSON(w [][]string) string {
	raw, _ := json.Marshal(w)
	return string(raw)
}

// Records reads the rollouts on their way: every one, or those of
// names; each read is copied to this node's disk.
func (n *Node) Records(ctx context.Context, names ...string) (map[string]*Record, error) {
	if names == nil {
		var err error
		if names, err = n.Shared.Rollouts(ctx); err != nil {
			return nil, err
		}
	}
	raw, err := n.Shared.RolloutRecords(ctx, names)
	if err != nil {
		return nil, err
	}
	out := make(map[string]*Record, len(raw))
	for name, m := range raw {
		out[name] = recordOf(name, m)
	}
	for name, r := range out {
		n.keepRecord(name, r)
	}
	return out, nil
}

// keepRecord keeps this node's copy of name's record (nil: none), so
// that a Redis that loses it gets it back (Reseed).
func (n *Node) keepRecord(name string, r *Record) {
	c := n.roCache()
	key := int64(0)
	if r != nil {
		key = int64(r.Version)<<32 | r.Seq&0xffffffff
	}
	c.mu.Lock()
	had, known := c.copied[name]
	c.copied[name] = key
	c.mu.Unlock()
	if known && had == key {
		return
	}
	path := filepath.Join(rolloutDir(n.Local), name+".json")
	if r == nil {
		if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
			slog.Warn("could not remove this node's copy of a finished rollout", "name", name, "err", err)
		}
		return
	}
	if old := readRecordCopy(n.Local, name); old != nil && (old.Version > r.Version || old.Version == r.Version && old.Seq > r.Seq) {
		return // a newer move another process of this node saw
	}
	if err := os.MkdirAll(rolloutDir(n.Local), 0o700); err != nil {
		slog.Warn("could not keep a copy of a rollout", "name", name, "err", err)
		return
	}
	data, _ := json.Marshal(r)
	if err := store.WriteFile(path, data, 0o600); err != nil {
		slog.Warn("could not keep a copy of a rollout", "name", name, "err", err)
	}
}

func readRecordCopy(st *store.Store, name string) *Record {
	data, err := os.ReadFile(filepath.Join(rolloutDir(st), name+".json"))
	if err != nil {
		return nil
	}
	var r Record
	if json.Unmarshal(data, &r) != nil || r.Name != name {
		return nil
	}
	return &r
}

// recordCopies are the records this node kept, by name.
func recordCopies(st *store.Store) map[string]*Record {
	out := map[string]*Record{}
	entries, _ := os.ReadDir(rolloutDir(st))
	for _, e := range entries {
		if name, ok := cutJSON(e.Name()); ok {
			if r := readRecordCopy(st, name); r != nil {
				out[name] = r
			}
		}
	}
	return out
}

// dropStaleCopies removes the copies of rollouts that finished: Redis
// has no record for them and a head at least as new. Only once this
// node has added its disk to this Redis (its generation): a Redis that
// was just emptied has no records either, and the copies are what
// brings them back.
func (n *Node) dropStaleCopies(ctx context.Context, active map[string]*Record, heads map[string]int) error {
	copies := recordCopies(n.Local)
	if len(copies) == 0 {
		return nil
	}
	gen, err := n.Shared.HGet(ctx, "meta", "gen")
	if err != nil {
		return err
	}
	n.stMu.Lock()
	mine := n.st.Gen
	n.stMu.Unlock()
	if gen == "" || gen != mine {
		return nil
	}
	for name, r := range copies {
		t, _ := n.Local.ReadTombstone(name)
		if active[name] == nil && (heads[name] >= r.Version || t != nil) {
			n.keepRecord(name, nil)
		}
	}
	return nil
}

// resealPrevs re-seals the keys of the previous bundles that staged
// rollouts keep, as reseal does the heads' (invariant I5: nothing stays
// sealed under a key a removed node can unwrap); dropStrangers likewise.
func (n *Node) resealPrevs(ctx context.Context, dropStrangers bool) (int, error) {
	names, err := n.Shared.PrevNames(ctx)
	if err != nil {
		return 0, err
	}
	return n.resealBundles(ctx, names, n.Shared.Prev, n.Shared.ResealPrev, dropStrangers, n.Shared.DropPrev)
}
