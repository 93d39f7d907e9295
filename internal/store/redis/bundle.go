package redis

import (
	"context"
	"errors"
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
	res, err := publishScript.Run(ctx, s.c, []string{s.k("bundle", b.Name), s.k("fence", b.Name), s.k("lineages"), s.k("ver", b.Name), s.k("deleted")}, args...).Text()
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
	vals, err := s.c.HMGet(ctx, s.k("bundle", name), "version", "fence", "not_before", "epoch", "node", "meta").Result()
	if err != nil {
		return nil, s.unavailable(err)
	}
	if vals[0] == nil {
		return nil, ErrNoBundle
	}
	m := map[string]string{}
	for i, f := range []string{"version", "fence", "not_before", "epoch", "node", "meta"} {
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
		Epoch: int(atoi("epoch")), Node: m["node"],
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
	_, err := p.Exec(ctx)
	return s.unavailable(err)
}

func itoa(n int64) string { return strconv.FormatInt(n, 10) }
