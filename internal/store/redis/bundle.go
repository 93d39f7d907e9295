package redis

import (
	"context"
	"errors"
	"fmt"
	"strconv"
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
	Meta      []byte // lineage.json
	Cert      []byte
	Chain     []byte
	Fullchain []byte
	SealedKey []byte
}

// ErrStale is a publish refused because the fleet already holds a newer
// certificate for the name, or a newer lease was handed out since the
// publisher's: a holder that stalled past its lease never replaces the
// work of the one that took over.
var ErrStale = errors.New("refused: the fleet holds a newer certificate or lease for this name")

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

// publishScript replaces the bundle only with a certificate issued later
// than the one there (notBefore), and, for a fenced publish, only while
// no lease newer than the publisher's was handed out. A counter lower
// than the token (lost in a failover with asynchronous replication) is
// no reason to refuse: the notBefore check still holds.
var publishScript = goredis.NewScript(`
local cur = tonumber(redis.call('HGET', KEYS[1], 'not_before') or '-1')
if tonumber(ARGV[3]) <= cur then return 'stale' end
local token = tonumber(ARGV[2])
if token > 0 then
  local f = tonumber(redis.call('GET', KEYS[2]) or '0')
  if f > token then return 'stale' end
  redis.call('HDEL', KEYS[5], ARGV[1])
elseif redis.call('HEXISTS', KEYS[5], ARGV[1]) == 1 then
  return 'stale'
end
redis.call('DEL', KEYS[1])
for i = 4, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i+1]) end
redis.call('SADD', KEYS[3], ARGV[1])
local v = tonumber(redis.call('HGET', KEYS[1], 'version'))
if tonumber(redis.call('GET', KEYS[4]) or '0') < v then redis.call('SET', KEYS[4], v) end
redis.call('XADD', KEYS[6], 'MAXLEN', '~', '100000', '*', 'name', ARGV[1], 'version', v)
return 'ok'
`)

// NextVersion reserves a version number for a new certificate of name.
func (s *Shared) NextVersion(ctx context.Context, name string, floor int) (int, error) {
	v, err := nextVersionScript.Run(ctx, s.c, []string{s.k("ver", name), s.k("bundle", name)}, floor).Int()
	return v, s.unavailable(err)
}

// Publish makes b the fleet's certificate for b.Name, fenced by b.Fence
// (0 for a re-seed from a node's disk, which only the notBefore rule
// guards, and which never brings back a name deleted from the fleet).
// It returns ErrStale when refused.
func (s *Shared) Publish(ctx context.Context, b *Bundle) error {
	args := []any{b.Name, b.Fence, b.NotBefore.UnixMilli(),
		"version", b.Version, "fence", b.Fence, "not_before", b.NotBefore.UnixMilli(), "epoch", b.Epoch,
		"node", b.Node, "published_at", time.Now().UnixMilli(),
		"meta", b.Meta, "cert", b.Cert, "chain", b.Chain, "fullchain", b.Fullchain, "key", b.SealedKey}
	res, err := publishScript.Run(ctx, s.c, []string{s.k("bundle", b.Name), s.k("fence", b.Name), s.k("lineages"), s.k("ver", b.Name), s.k("deleted"), s.k("events")}, args...).Text()
	if err != nil {
		return s.unavailable(err)
	}
	if res != "ok" {
		return ErrStale
	}
	return nil
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
	vals, err := s.c.HMGet(ctx, s.k("bundle", name), "version", "fence", "not_before", "epoch", "node", "meta", "published_at").Result()
	if err != nil {
		return nil, s.unavailable(err)
	}
	if vals[0] == nil {
		return nil, ErrNoBundle
	}
	m := map[string]string{}
	for i, f := range []string{"version", "fence", "not_before", "epoch", "node", "meta", "published_at"} {
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
		Epoch: int(atoi("epoch")), Node: m["node"], Published: time.UnixMilli(atoi("published_at")).UTC(),
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

// DeleteBundle removes name from the fleet: its bundle, status and set
// membership, leaving a tombstone that a new fenced publish clears. The version and fence counters stay, so numbers are never
// reused.
func (s *Shared) DeleteBundle(ctx context.Context, name string) error {
	p := s.c.TxPipeline()
	p.SRem(ctx, s.k("lineages"), name)
	p.Del(ctx, s.k("bundle", name), s.k("status", name))
	// A tombstone: nodes that still hold the name on disk must not bring
	// it back when they republish into a rebuilt Redis.
	p.HSet(ctx, s.k("deleted"), name, time.Now().UTC().Format(time.RFC3339))
	p.XAdd(ctx, &goredis.XAddArgs{Stream: s.k("events"), MaxLen: 100000, Approx: true, Values: []any{"name", name, "deleted", "1"}})
	_, err := p.Exec(ctx)
	return s.unavailable(err)
}

func itoa(n int64) string { return strconv.FormatInt(n, 10) }

// Event is one change to the fleet's lineages, from the events stream:
// a version published, or a lineage deleted.
type Event struct {
	ID      string
	Name    string
	Version int
	Deleted bool
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

// Head is a bundle's version and when it was published.
type Head struct {
	Version   int
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
			cmds[i] = p.HMGet(ctx, s.k("bundle", n), "version", "published_at")
		}
		if _, err := p.Exec(ctx); err != nil && !errors.Is(err, goredis.Nil) {
			return nil, s.unavailable(err)
		}
		for i, n := range chunk {
			vals := cmds[i].Val()
			if len(vals) < 2 || vals[0] == nil {
				continue
			}
			v, _ := strconv.Atoi(vals[0].(string))
			ms, _ := strconv.ParseInt(fmt.Sprint(vals[1]), 10, 64)
			out[n] = Head{Version: v, Published: time.UnixMilli(ms).UTC()}
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
