package rdb

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"

	goredis "github.com/redis/go-redis/v9"
)

// Bundle is one published certificate of a lineage: what every node
// needs to serve it. SealedKey is the private key as package fleet
// sealed it; this package never sees it in the clear.
type Bundle struct {
	Name      string
	Version   int
	Fence     int64 // the publisher's lease token
	NotBefore time.Time
	Epoch     int    // the data key generation SealedKey is sealed under
	Node      string // who published it
	Published time.Time
	IssuedAt  time.Time // when the publisher obtained it
	Born      time.Time // when its lineage's first certificate was issued: a tombstone beats a lineage born before it
	Serial    string    // of the certificate: nodes compare serials, not only version numbers
	Meta      []byte    // lineage.json
	Cert      []byte
	Chain     []byte
	Fullchain []byte
	SealedKey []byte
}

// ErrStale is a publish refused by the fleet: Why says which rule.
type ErrStale struct{ Why string }

func (e *ErrStale) Error() string { return "refused: " + staleWhy[e.Why] }

var staleWhy = map[string]string{
	"epoch":   "sealed under a data key that is no longer the fleet's (a key rotation ran meanwhile)",
	"version": "the fleet already holds this version number or a newer one",
	"older":   "the fleet holds a certificate issued later",
	"lease":   "a newer lease on the name was handed out since this publisher's (it stalled past --lease-ttl)",
	"deleted": "the name was deleted after this publisher took its lease",
}

// ErrNoBundle is a lineage the fleet has no bundle for.
var ErrNoBundle = errors.New("the fleet has no certificate for this name")

// nextVersionScript hands out a version number for name that is above
// every one used so far: the counter's, the published bundle's, and the
// caller's floor (its own archive), so a wiped counter never reuses one.
var nextVersionScript = goredis.NewScript(`
local v = redis.call('INCR', KEYS[1])
local floor = tonumber(ARGV[1])
local bv = tonumber(redis.call('HGET', KEYS[2], 'version') or '0')
if bv > floor then floor = bv end
if v <= floor then
  v = floor + 1
  redis.call('SET', KEYS[1], v)
end
return v
`)

// publishScript makes a bundle the fleet's certificate for a name, only
// if every rule holds (package catalog's contract and invariants I2, I3,
// I5), in this order:
//   - its key is sealed under the fleet's current data key epoch;
//   - its version is above the one there (numbers are never reused);
//   - it was issued later than the one there (notBefore);
//   - for a fenced publish, no lease newer than the publisher's was
//     handed out, and no delete happened after the publisher's lease
//     (a delete moves the fence past every lease, and clears nothing
//     until a lease taken after it publishes);
//   - an unfenced publish (a node rebuilding Redis from its disk) never
//     brings back a deleted name, unless its lineage was born after the
//     delete (the name was issued again, and Redis lost that); a renewal
//     of a lineage born before it does not count (ARGV[6] is the birth).
//
// A fence counter lower than the token (lost in a failover with
// asynchronous replication) is no reason to refuse: the version and
// notBefore checks still hold.
//
// When the fleet stages rollouts (rollout.go), a fenced publish over an
// existing head starts the new version's rollout in the same step: the
// head becomes the previous bundle (unless the rollout it replaces never
// finished: then the version every node may serve stays the previous
// one), and the record starts at the first wave. An unfenced publish
// starts nothing; it only puts the head back where a record that came
// back first says it was the previous version.
var publishScript = goredis.NewScript(`
local epoch = tonumber(redis.call('HGET', KEYS[7], 'epoch') or '0')
if tonumber(ARGV[4]) ~= epoch then return 'epoch' end
if tonumber(ARGV[5]) <= tonumber(redis.call('HGET', KEYS[1], 'version') or '0') then return 'version' end
if tonumber(ARGV[3]) <= tonumber(redis.call('HGET', KEYS[1], 'not_before') or '-1') then return 'older' end
local token = tonumber(ARGV[2])
local tomb = redis.call('HGET', KEYS[5], ARGV[1])
if token > 0 then
  if tonumber(redis.call('GET', KEYS[2]) or '0') > token then return 'lease' end
  if tomb then
    if tonumber(string.match(tomb, '^(%d+)') or '0') >= token then return 'deleted' end
    redis.call('HDEL', KEYS[5], ARGV[1])
  end
elseif tomb then
  if tonumber(ARGV[6]) <= tonumber(string.match(tomb, ' (%d+)$') or '0') then return 'deleted' end
  redis.call('HDEL', KEYS[5], ARGV[1])
end
local v = tonumber(ARGV[5])
local staged = 0
if tonumber(redis.call('HGET', KEYS[8], 'waves') or '0') > 0 and redis.call('EXISTS', KEYS[1]) == 1 then
  local rv = tonumber(redis.call('HGET', KEYS[10], 'version') or '0')
  if token > 0 and rv ~= v then
    if rv == 0 or redis.call('HGET', KEYS[9], 'version') ~= redis.call('HGET', KEYS[10], 'previous') then
      redis.call('DEL', KEYS[9])
      redis.call('RENAME', KEYS[1], KEYS[9])
    end
    local seq = tonumber(redis.call('HGET', KEYS[10], 'seq') or '0') + 1
    redis.call('DEL', KEYS[10])
    redis.call('HSET', KEYS[10], 'version', v, 'serial', ARGV[8], 'previous', redis.call('HGET', KEYS[9], 'version'),
      'prev_serial', redis.call('HGET', KEYS[9], 'serial') or '', 'wave', 0, 'state', 'rolling', 'since', ARGV[7], 'started', ARGV[7], 'seq', seq)
    redis.call('SADD', KEYS[11], ARGV[1])
    staged = 1
  elseif rv == v and redis.call('EXISTS', KEYS[9]) == 0 and redis.call('HGET', KEYS[1], 'version') == redis.call('HGET', KEYS[10], 'previous') then
    redis.call('RENAME', KEYS[1], KEYS[9])
  end
end
redis.call('DEL', KEYS[1])
for i = 9, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i+1]) end
redis.call('SADD', KEYS[3], ARGV[1])
if tonumber(redis.call('GET', KEYS[4]) or '0') < v then redis.call('SET', KEYS[4], v) end
redis.call('XADD', KEYS[6], 'MAXLEN', '~', '100000', '*', 'name', ARGV[1], 'version', v)
if staged == 1 then return 'staged' end
return 'ok'
`)

// NextVersion reserves a version number for a new certificate of name.
func (s *Shared) NextVersion(ctx context.Context, name string, floor int) (int, error) {
	v, err := nextVersionScript.Run(ctx, s.c, []string{s.k("ver", name), s.k("bundle", name)}, floor).Int()
	return v, s.unavailable(err)
}

// raiseScript raises a counter to ARGV[1] if it is below.
var raiseScript = goredis.NewScript(`
if tonumber(redis.call('GET', KEYS[1]) or '0') < tonumber(ARGV[1]) then redis.call('SET', KEYS[1], ARGV[1]) end
return 0
`)

// SeedVersions raises the version counter of each name to at least the
// version given (numbers a node saw handed out, put back into a Redis
// that lost them: I2), pipelined.
func (s *Shared) SeedVersions(ctx context.Context, vs map[string]int) error {
	if len(vs) == 0 {
		return nil
	}
	if err := raiseScript.Load(ctx, s.c).Err(); err != nil {
		return s.unavailable(err)
	}
	p := s.c.Pipeline()
	for name, v := range vs {
		p.EvalSha(ctx, raiseScript.Hash(), []string{s.k("ver", name)}, v)
	}
	_, err := p.Exec(ctx)
	return s.unavailable(err)
}

// Publish makes b the fleet's certificate for b.Name, fenced by b.Fence
// (0 for a re-seed from a node's disk). It returns an *ErrStale when
// refused.
func (s *Shared) Publish(ctx context.Context, b *Bundle) error {
	_, err := s.PublishStaged(ctx, b)
	return err
}

// PublishStaged is Publish, and says whether it started a staged
// rollout of b (no rollout means none will ever be for this version).
func (s *Shared) PublishStaged(ctx context.Context, b *Bundle) (bool, error) {
	now := time.Now()
	args := append([]any{b.Name, b.Fence, b.NotBefore.UnixMilli(), b.Epoch, b.Version, b.bornAt().UnixMilli(), now.UnixMilli(), b.Serial}, b.fields()...)
	keys := []string{s.k("bundle", b.Name), s.k("fence", b.Name), s.k("lineages"), s.k("ver", b.Name), s.k("deleted"), s.k("events"), s.k("meta"),
		s.k("rollout"), s.k("prev", b.Name), s.k("rollout", b.Name), s.k("rollouts")}
	res, err := publishScript.Run(ctx, s.c, keys, args...).Text()
	if err != nil {
		return false, s.unavailable(err)
	}
	if res != "ok" && res != "staged" {
		return false, &ErrStale{Why: res}
	}
	return res == "staged", nil
}

// bornAt is b.Born, or IssuedAt for a publisher that did not say.
func (b *Bundle) bornAt() time.Time {
	if b.Born.IsZero() || b.Born.UnixMilli() == 0 {
		return b.IssuedAt
	}
	return b.Born
}

// fields are b as the field-value pairs of its hash.
func (b *Bundle) fields() []any {
	published := b.Published
	if published.IsZero() {
		published = time.Now()
	}
	return []any{"version", b.Version, "fence", b.Fence, "not_before", b.NotBefore.UnixMilli(), "epoch", b.Epoch,
		"node", b.Node, "published_at", published.UnixMilli(), "issued_at", b.IssuedAt.UnixMilli(), "born", b.bornAt().UnixMilli(), "serial", b.Serial,
		"meta", b.Meta, "cert", b.Cert, "chain", b.Chain, "fullchain", b.Fullchain, "key", b.SealedKey}
}

// Bundle reads the fleet's certificate for name.
func (s *Shared) Bundle(ctx context.Context, name string) (*Bundle, error) {
	m, err := s.c.HGetAll(ctx, s.k("bundle", name)).Result()
	if err != nil {
		return nil, s.unavailable(err)
	}
	if len(m) == 0 {
		return nil, ErrNoBundle
	}
	return bundleOf(name, m), nil
}

// BundleMeta reads only the metadata and version fields of name's
// bundle: what deciding what is due needs, without the PEM.
func (s *Shared) BundleMeta(ctx context.Context, name string) (*Bundle, error) {
	return s.BundleMetaOf(ctx, "bundle", name)
}

// BundleMetaOf is BundleMeta of the head ("bundle") or of the previous
// version a staged rollout keeps ("prev").
func (s *Shared) BundleMetaOf(ctx context.Context, kind, name string) (*Bundle, error) {
	fields := []string{"version", "fence", "not_before", "epoch", "node", "meta", "published_at", "issued_at", "born", "serial"}
	vals, err := s.c.HMGet(ctx, s.k(kind, name), fields...).Result()
	if err != nil {
		return nil, s.unavailable(err)
	}
	if vals[0] == nil {
		return nil, ErrNoBundle
	}
	m := map[string]string{}
	for i, f := range fields {
		if v, ok := vals[i].(string); ok {
			m[f] = v
		}
	}
	return bundleOf(name, m), nil
}

func bundleOf(name string, m map[string]string) *Bundle {
	atoi := func(f string) int64 { n, _ := strconv.ParseInt(m[f], 10, 64); return n }
	return &Bundle{
		Name: name, Version: int(atoi("version")), Fence: atoi("fence"), NotBefore: time.UnixMilli(atoi("not_before")).UTC(),
		Epoch: int(atoi("epoch")), Node: m["node"], Published: time.UnixMilli(atoi("published_at")).UTC(), IssuedAt: time.UnixMilli(atoi("issued_at")).UTC(), Born: time.UnixMilli(atoi("born")).UTC(), Serial: m["serial"],
		Meta: []byte(m["meta"]), Cert: []byte(m["cert"]), Chain: []byte(m["chain"]), Fullchain: []byte(m["fullchain"]),
		SealedKey: []byte(m["key"]),
	}
}

// Names lists the fleet's lineages.
func (s *Shared) Names(ctx context.Context) ([]string, error) {
	n, err := s.c.SMembers(ctx, s.k("lineages")).Result()
	return n, s.unavailable(err)
}

// UpdateMeta replaces the metadata of name's bundle if it is still at
// version (settings changed without a new certificate).
func (s *Shared) UpdateMeta(ctx context.Context, name string, version int, meta []byte) error {
	err := updateMetaScript.Run(ctx, s.c, []string{s.k("bundle", name)}, version, meta).Err()
	if errors.Is(err, goredis.Nil) {
		return nil
	}
	return s.unavailable(err)
}

var updateMetaScript = goredis.NewScript(`
if redis.call('HGET', KEYS[1], 'version') == ARGV[1] then redis.call('HSET', KEYS[1], 'meta', ARGV[2]) end
return 1
`)

// ResealKey replaces the sealed key of name's bundle, if it is still at
// version, after a data key rotation.
func (s *Shared) ResealKey(ctx context.Context, name string, version, epoch int, sealed []byte) (bool, error) {
	n, err := resealScript.Run(ctx, s.c, []string{s.k("bundle", name)}, version, epoch, sealed).Int()
	return n == 1, s.unavailable(err)
}

var resealScript = goredis.NewScript(`
if redis.call('HGET', KEYS[1], 'version') == ARGV[1] then
  redis.call('HSET', KEYS[1], 'epoch', ARGV[2], 'key', ARGV[3])
  return 1
end
return 0
`)

// deleteScript removes a name from the fleet and leaves its tombstone,
// "<fence> <unix ms>": the fence counter moves past every lease handed
// out for the name, so no holder of one can publish afterwards
// (publishScript). The version and fence counters stay, so numbers are
// never reused.
var deleteScript = goredis.NewScript(`
local f = redis.call('INCR', KEYS[6])
local v = tonumber(redis.call('HGET', KEYS[2], 'version') or '0')
local c = tonumber(redis.call('GET', KEYS[10]) or '0')
if c > v then v = c end
redis.call('SREM', KEYS[1], ARGV[1])
redis.call('DEL', KEYS[2], KEYS[3], KEYS[7], KEYS[8])
redis.call('SREM', KEYS[9], ARGV[1])
redis.call('HSET', KEYS[4], ARGV[1], f .. ' ' .. ARGV[2])
redis.call('XADD', KEYS[5], 'MAXLEN', '~', '100000', '*', 'name', ARGV[1], 'deleted', '1')
return {f, v}
`)

// DeleteBundle removes name from the fleet, fenced; it returns the
// tombstone's fence and the highest version number the fleet gave name
// (which the deleting node keeps in its tombstone, I2).
func (s *Shared) DeleteBundle(ctx context.Context, name string, at time.Time) (fence int64, version int, err error) {
	keys := []string{s.k("lineages"), s.k("bundle", name), s.k("status", name), s.k("deleted"), s.k("events"), s.k("fence", name),
		s.k("prev", name), s.k("rollout", name), s.k("rollouts"), s.k("ver", name)}
	res, err := deleteScript.Run(ctx, s.c, keys, name, at.UnixMilli()).Int64Slice()
	if err != nil {
		return 0, 0, s.unavailable(err)
	}
	return res[0], int(res[1]), nil
}

// seedTombstoneScript puts back a tombstone a node kept, into a Redis
// that lost it: the version counter moves to the highest version the
// node knew the name by (numbers are never reused, I2), the newer of
// two tombstones stays, the fence counter moves past it, and a bundle
// whose lineage was born before the delete goes (renewed since or not),
// whichever node rebuilt first; a lineage born after it (the name was
// issued again) stays, and the old tombstone is not recorded.
var seedTombstoneScript = goredis.NewScript(`
if tonumber(redis.call('GET', KEYS[6]) or '0') < tonumber(ARGV[4]) then redis.call('SET', KEYS[6], ARGV[4]) end
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if cur then
  local cat = tonumber(string.match(cur, ' (%d+)$') or '0')
  if cat >= tonumber(ARGV[3]) then return 0 end
end
if redis.call('EXISTS', KEYS[2]) == 1 and tonumber(redis.call('HGET', KEYS[2], 'born') or redis.call('HGET', KEYS[2], 'issued_at') or '0') > tonumber(ARGV[3]) then
  return 0 -- issued again after that delete: the name stands
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2] .. ' ' .. ARGV[3])
if tonumber(redis.call('GET', KEYS[4]) or '0') < tonumber(ARGV[2]) then redis.call('SET', KEYS[4], ARGV[2]) end
if redis.call('EXISTS', KEYS[2]) == 1 then
  redis.call('DEL', KEYS[2], KEYS[7], KEYS[8])
  redis.call('SREM', KEYS[3], ARGV[1])
  redis.call('SREM', KEYS[9], ARGV[1])
  redis.call('XADD', KEYS[5], 'MAXLEN', '~', '100000', '*', 'name', ARGV[1], 'deleted', '1')
end
return 1
`)

// SeedTombstone records a delete a node kept on disk (see the script);
// version is the highest version number the node knew name by.
func (s *Shared) SeedTombstone(ctx context.Context, name string, fence int64, at time.Time, version int) error {
	keys := []string{s.k("deleted"), s.k("bundle", name), s.k("lineages"), s.k("fence", name), s.k("events"), s.k("ver", name),
		s.k("prev", name), s.k("rollout", name), s.k("rollouts")}
	return s.unavailable(seedTombstoneScript.Run(ctx, s.c, keys, name, fence, at.UnixMilli(), version).Err())
}

// Tombstone is a delete the fleet records.
type Tombstone struct {
	Fence   int64
	At      time.Time
	Version int // the name's version counter: a name issued again is numbered above it
}

// Tombstones reads every tombstone, with the version counter of each
// name (one more round trip, pipelined).
func (s *Shared) Tombstones(ctx context.Context) (map[string]Tombstone, error) {
	m, err := s.c.HGetAll(ctx, s.k("deleted")).Result()
	if err != nil {
		return nil, s.unavailable(err)
	}
	out := make(map[string]Tombstone, len(m))
	if len(m) == 0 {
		return out, nil
	}
	p := s.c.Pipeline()
	vers := make(map[string]*goredis.StringCmd, len(m))
	for name := range m {
		vers[name] = p.Get(ctx, s.k("ver", name))
	}
	if _, err := p.Exec(ctx); err != nil && !errors.Is(err, goredis.Nil) {
		return nil, s.unavailable(err)
	}
	for name, v := range m {
		f, at, _ := strings.Cut(v, " ")
		fence, _ := strconv.ParseInt(f, 10, 64)
		ms, _ := strconv.ParseInt(at, 10, 64)
		ver, _ := vers[name].Int()
		out[name] = Tombstone{Fence: fence, At: time.UnixMilli(ms).UTC(), Version: ver}
	}
	return out, nil
}

// IsDeleted says whether name has a tombstone.
func (s *Shared) IsDeleted(ctx context.Context, name string) (bool, error) {
	ok, err := s.c.HExists(ctx, s.k("deleted"), name).Result()
	return ok, s.unavailable(err)
}

func itoa(n int64) string { return strconv.FormatInt(n, 10) }

// Event is one change to the fleet's lineages, from the events stream:
// a version published, or a lineage deleted.
type Event struct {
	ID      string
	Name    string
	Version int
	Deleted bool
	// Config is a change of the fleet's rollout waves (no Name).
	Config bool
}

// LastEvent is the ID of the newest event ("0" for none): an agent that
// reconciles everything first reads from here on, missing nothing
// published during its reconcile.
func (s *Shared) LastEvent(ctx context.Context) (string, error) {
	msgs, err := s.c.XRevRangeN(ctx, s.k("events"), "+", "-", 1).Result()
	if err != nil {
		return "", s.unavailable(err)
	}
	if len(msgs) == 0 {
		return "0", nil
	}
	return msgs[0].ID, nil
}

// MarkTook records that node's agent has applied the fleet's events up
// to id (its tombstones are on its disk): a delete waits for it.
func (s *Shared) MarkTook(ctx context.Context, node, id string) error {
	return s.unavailable(s.c.HSet(ctx, s.k("took"), node, id).Err())
}

// Took is the last event each node's agent has applied.
func (s *Shared) Took(ctx context.Context) (map[string]string, error) {
	m, err := s.c.HGetAll(ctx, s.k("took")).Result()
	return m, s.unavailable(err)
}

// EventAtLeast compares two event IDs ("<ms>-<seq>").
func EventAtLeast(a, b string) bool {
	split := func(id string) (int64, int64) {
		ms, seq, _ := strings.Cut(id, "-")
		m, _ := strconv.ParseInt(ms, 10, 64)
		q, _ := strconv.ParseInt(seq, 10, 64)
		return m, q
	}
	am, aq := split(a)
	bm, bq := split(b)
	return am > bm || am == bm && aq >= bq
}

// Events waits up to block for events after id, and returns them.
func (s *Shared) Events(ctx context.Context, id string, block time.Duration) ([]Event, error) {
	res, err := s.c.XRead(ctx, &goredis.XReadArgs{Streams: []string{s.k("events"), id}, Block: block, Count: 1000}).Result()
	if errors.Is(err, goredis.Nil) {
		return nil, nil
	}
	if err != nil {
		return nil, s.unavailable(err)
	}
	var out []Event
	for _, st := range res {
		for _, m := range st.Messages {
			e := Event{ID: m.ID}
			e.Name, _ = m.Values["name"].(string)
			v, _ := m.Values["version"].(string)
			e.Version, _ = strconv.Atoi(v)
			d, _ := m.Values["deleted"].(string)
			e.Deleted = d == "1"
			c, _ := m.Values["config"].(string)
			e.Config = c == "1"
			out = append(out, e)
		}
	}
	return out, nil
}

// Versions reads the fleet's current version of each name (0 for none),
// pipelined: a full reconcile of 10,000 lineages is a few round trips.
func (s *Shared) Versions(ctx context.Context, names []string) (map[string]int, error) {
	heads, err := s.Heads(ctx, names)
	if err != nil {
		return nil, err
	}
	out := make(map[string]int, len(names))
	for _, n := range names {
		out[n] = heads[n].Version
	}
	return out, nil
}

// Head is a bundle's version, serial and when it was published.
type Head struct {
	Version   int
	Serial    string
	Published time.Time
}

// Heads reads the version and publish time of each name, pipelined.
func (s *Shared) Heads(ctx context.Context, names []string) (map[string]Head, error) {
	out := make(map[string]Head, len(names))
	for start := 0; start < len(names); start += 1000 {
		chunk := names[start:min(start+1000, len(names))]
		p := s.c.Pipeline()
		cmds := make([]*goredis.SliceCmd, len(chunk))
		for i, n := range chunk {
			cmds[i] = p.HMGet(ctx, s.k("bundle", n), "version", "published_at", "serial")
		}
		if _, err := p.Exec(ctx); err != nil && !errors.Is(err, goredis.Nil) {
			return nil, s.unavailable(err)
		}
		for i, n := range chunk {
			vals := cmds[i].Val()
			if len(vals) < 3 || vals[0] == nil {
				continue
			}
			v, _ := strconv.Atoi(vals[0].(string))
			ms, _ := strconv.ParseInt(fmt.Sprint(vals[1]), 10, 64)
			serial, _ := vals[2].(string)
			out[n] = Head{Version: v, Serial: serial, Published: time.UnixMilli(ms).UTC()}
		}
	}
	return out, nil
}

// Fullchain reads only name's full chain: an ARI check needs no more,
// and renew makes one per lineage.
func (s *Shared) Fullchain(ctx context.Context, name string) ([]byte, error) {
	b, err := s.c.HGet(ctx, s.k("bundle", name), "fullchain").Bytes()
	if errors.Is(err, goredis.Nil) {
		return nil, ErrNoBundle
	}
	return b, s.unavailable(err)
}

// MarkCaughtUp records that node added its disk to Redis generation gen.
func (s *Shared) MarkCaughtUp(ctx context.Context, gen, node string) error {
	return s.markGen(ctx, "caughtup", gen, node)
}

// MarkLooked records that node looked at Redis generation gen: it put
// its newer epoch back, if it held one (the step before it adds its
// disk).
func (s *Shared) MarkLooked(ctx context.Context, gen, node string) error {
	return s.markGen(ctx, "looked", gen, node)
}

func (s *Shared) markGen(ctx context.Context, set, gen, node string) error {
	p := s.c.TxPipeline()
	p.SAdd(ctx, s.k(set, gen), node)
	p.Expire(ctx, s.k(set, gen), 24*time.Hour)
	_, err := p.Exec(ctx)
	return s.unavailable(err)
}

// CaughtUp is the set of nodes that added their disk to generation gen.
func (s *Shared) CaughtUp(ctx context.Context, gen string) (map[string]bool, error) {
	return s.genSet(ctx, "caughtup", gen)
}

// Looked is the set of nodes that looked at generation gen (MarkLooked).
func (s *Shared) Looked(ctx context.Context, gen string) (map[string]bool, error) {
	return s.genSet(ctx, "looked", gen)
}

func (s *Shared) genSet(ctx context.Context, set, gen string) (map[string]bool, error) {
	m, err := s.c.SMembers(ctx, s.k(set, gen)).Result()
	if err != nil {
		return nil, s.unavailable(err)
	}
	out := make(map[string]bool, len(m))
	for _, n := range m {
		out[n] = true
	}
	return out, nil
}
