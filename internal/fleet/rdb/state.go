package rdb

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"

	goredis "github.com/redis/go-redis/v9"
)

// Status is name's renewal status (ARI, backoff) as JSON; nil for none.
func (s *Shared) Status(ctx context.Context, name string) ([]byte, error) {
	b, err := s.c.Get(ctx, s.k("status", name)).Bytes()
	if errors.Is(err, goredis.Nil) {
		return nil, nil
	}
	return b, s.unavailable(err)
}

// SetStatus replaces name's status.
func (s *Shared) SetStatus(ctx context.Context, name string, status []byte) error {
	return s.unavailable(s.c.Set(ctx, s.k("status", name), status, 0).Err())
}

// DelStatus removes name's status.
func (s *Shared) DelStatus(ctx context.Context, name string) error {
	return s.unavailable(s.c.Del(ctx, s.k("status", name)).Err())
}

// accountKey names an account by a hash of (server, email), which keeps
// odd characters of either out of the key.
func (s *Shared) accountKey(server, email string) string {
	h := sha256.Sum256([]byte(server + "\x00" + email))
	return s.k("account", hex.EncodeToString(h[:16]))
}

// Account reads the sealed account key and the registration.
func (s *Shared) Account(ctx context.Context, server, email string) (sealedKey, reg []byte, epoch int, err error) {
	m, err := s.c.HGetAll(ctx, s.accountKey(server, email)).Result()
	if err != nil {
		return nil, nil, 0, s.unavailable(err)
	}
	epoch, _ = strconv.Atoi(m["epoch"])
	return []byte(m["key"]), []byte(m["reg"]), epoch, nil
}

// accountScript saves an account's key and registration together, only
// if the fleet has none yet: two nodes registering at the same moment
// must not leave one node's key beside the other's registration (the CA
// would refuse every signature). The loser's account stays unused.
var accountScript = goredis.NewScript(`
if tonumber(redis.call('HGET', KEYS[2], 'epoch') or '0') ~= tonumber(ARGV[3]) then return -1 end
if redis.call('HEXISTS', KEYS[1], 'reg') == 1 then return 0 end
redis.call('HSET', KEYS[1], 'server', ARGV[1], 'email', ARGV[2], 'epoch', ARGV[3], 'key', ARGV[4], 'reg', ARGV[5])
return 1
`)

// CreateAccount saves a registered account if the fleet has none for
// (server, email); false means another node's account is the fleet's.
// A key sealed under another epoch than the fleet's current one is
// refused with ErrEpoch.
func (s *Shared) CreateAccount(ctx context.Context, server, email string, epoch int, sealed, reg []byte) (bool, error) {
	n, err := accountScript.Run(ctx, s.c, []string{s.accountKey(server, email), s.k("meta")}, server, email, epoch, sealed, reg).Int()
	if err == nil && n < 0 {
		return false, ErrEpoch
	}
	return n == 1, s.unavailable(err)
}

// ErrEpoch is a key sealed under a data key that is no longer the
// fleet's current one.
var ErrEpoch = &ErrStale{Why: "epoch"}

// DelAccount forgets the account.
func (s *Shared) DelAccount(ctx context.Context, server, email string) error {
	return s.unavailable(s.c.Del(ctx, s.accountKey(server, email)).Err())
}

// Accounts lists (server, email) of every saved account, for a key
// rotation.
func (s *Shared) Accounts(ctx context.Context) ([][2]string, error) {
	var out [][2]string
	iter := s.c.Scan(ctx, 0, s.k("account", "*"), 1000).Iterator()
	for iter.Next(ctx) {
		m, err := s.c.HMGet(ctx, iter.Val(), "server", "email").Result()
		if err != nil {
			return nil, s.unavailable(err)
		}
		sv, _ := m[0].(string)
		em, _ := m[1].(string)
		if sv != "" {
			out = append(out, [2]string{sv, em})
		}
	}
	return out, s.unavailable(iter.Err())
}

// PutToken publishes an HTTP-01 key authorization for host and token.
func (s *Shared) PutToken(ctx context.Context, host, token, keyAuth string, ttl time.Duration) error {
	return s.unavailable(s.c.Set(ctx, s.k("token", host, token), keyAuth, ttl).Err())
}

// Token reads a key authorization and how long it has left ("" when
// none), and in the same round trip the fleet's current data key epoch
// (0 when Redis has none), so that an agent learns of a key rotation (a
// removal) before it answers a token published after it.
func (s *Shared) Token(ctx context.Context, host, token string) (keyAuth string, ttl time.Duration, epoch int, err error) {
	p := s.c.Pipeline()
	get := p.Get(ctx, s.k("token", host, token))
	pttl := p.PTTL(ctx, s.k("token", host, token))
	ep := p.HGet(ctx, s.k("meta"), "epoch")
	p.Exec(ctx)
	for _, c := range []goredis.Cmder{get, pttl, ep} {
		if err := c.Err(); err != nil && !errors.Is(err, goredis.Nil) {
			return "", 0, 0, s.unavailable(err)
		}
	}
	epoch, _ = strconv.Atoi(ep.Val())
	return get.Val(), pttl.Val(), epoch, nil
}

// DelToken removes a key authorization.
func (s *Shared) DelToken(ctx context.Context, host, token string) error {
	return s.unavailable(s.c.Del(ctx, s.k("token", host, token)).Err())
}

// Heartbeat records that node's agent is alive, with what it says about
// itself (JSON: address, version), for ttl.
func (s *Shared) Heartbeat(ctx context.Context, node string, info []byte, ttl time.Duration) error {
	return s.unavailable(s.c.Set(ctx, s.k("agent", node), info, ttl).Err())
}

// Agents returns the live agents' heartbeats by node.
func (s *Shared) Agents(ctx context.Context) (map[string][]byte, error) {
	out := map[string][]byte{}
	iter := s.c.Scan(ctx, 0, s.k("agent", "*"), 1000).Iterator()
	var keys []string
	for iter.Next(ctx) {
		keys = append(keys, iter.Val())
	}
	if err := iter.Err(); err != nil {
		return nil, s.unavailable(err)
	}
	if len(keys) == 0 {
		return out, nil
	}
	vals, err := s.c.MGet(ctx, keys...).Result()
	if err != nil {
		return nil, s.unavailable(err)
	}
	for i, k := range keys {
		if v, ok := vals[i].(string); ok {
			out[k[len(s.k("agent", "")):]] = []byte(v)
		}
	}
	return out, nil
}

// ledgerScript counts the certificates of one exact set of names in the
// window and takes a place if there is one, atomically: a second node
// cannot see the same free place. ARGV[5..] are (member, issued at)
// pairs the caller knows of for the set: they go in first, if missing,
// so a Redis that came back from an older snapshot (or lost writes in a
// failover) counts them again. It returns 0 and the oldest entry's time
// when the set is at its cap.
var ledgerScript = goredis.NewScript(`
local now, window, cap = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
for i = 5, #ARGV, 2 do
  local at = tonumber(ARGV[i+1])
  if at > now - window then
    redis.call('ZADD', KEYS[1], 'NX', at, ARGV[i])
  end
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
if redis.call('ZCARD', KEYS[1]) >= cap then
  local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  return {0, tonumber(oldest[2])}
end
redis.call('ZADD', KEYS[1], now, ARGV[4])
redis.call('PEXPIRE', KEYS[1], window)
return {1, 0}
`)

func (s *Shared) ledgerKey(set string) string {
	h := sha256.Sum256([]byte(set))
	return s.k("ledger", hex.EncodeToString(h[:16]))
}

// LedgerTake takes one of cap places for a new certificate of the exact
// set of names set, within window, after putting back the places of
// known (member -> when) that Redis lacks. When the set is full it
// returns false and when the oldest place frees.
func (s *Shared) LedgerTake(ctx context.Context, set, id string, cap int, window time.Duration, now time.Time, known map[string]time.Time) (bool, time.Time, error) {
	args := []any{now.UnixMilli(), window.Milliseconds(), cap, id}
	for m, at := range known {
		args = append(args, m, at.UnixMilli())
	}
	res, err := ledgerScript.Run(ctx, s.c, []string{s.ledgerKey(set)}, args...).Int64Slice()
	if err != nil {
		return false, time.Time{}, s.unavailable(err)
	}
	if res[0] == 1 {
		return true, time.Time{}, nil
	}
	return false, time.UnixMilli(res[1]).Add(window), nil
}

// LedgerGive returns a place taken for an order that issued nothing.
func (s *Shared) LedgerGive(ctx context.Context, set, id string) error {
	return s.unavailable(s.c.ZRem(ctx, s.ledgerKey(set), id).Err())
}

// LedgerSeed records a certificate issued at at, as a re-seed from a
// node's disk does; id makes seeding the same certificate twice count once.
func (s *Shared) LedgerSeed(ctx context.Context, set, id string, at time.Time, window time.Duration) error {
	if time.Since(at) > window {
		return nil
	}
	p := s.c.Pipeline()
	p.ZAddNX(ctx, s.ledgerKey(set), goredis.Z{Score: float64(at.UnixMilli()), Member: id})
	p.PExpire(ctx, s.ledgerKey(set), window)
	_, err := p.Exec(ctx)
	return s.unavailable(err)
}

// LedgerPlace is one place a node knows of: a member of the exact set
// Set's ledger, taken at At.
type LedgerPlace struct {
	Set, Member string
	At          time.Time
}

// LedgerPutBack puts places back into the ledger, each only where it is
// missing, in one round trip: a Redis back from an older snapshot, or
// one that lost its last writes in a failover, is not empty, and
// nothing else would rebuild its ledger.
func (s *Shared) LedgerPutBack(ctx context.Context, places []LedgerPlace, window time.Duration) error {
	// One ZADD and one PEXPIRE per set, whatever its number of places:
	// an agent puts its places back at each reconcile.
	bySet := map[string][]goredis.Z{}
	var sets []string
	for _, pl := range places {
		if time.Since(pl.At) > window {
			continue
		}
		if _, ok := bySet[pl.Set]; !ok {
			sets = append(sets, pl.Set)
		}
		bySet[pl.Set] = append(bySet[pl.Set], goredis.Z{Score: float64(pl.At.UnixMilli()), Member: pl.Member})
	}
	p := s.c.Pipeline()
	for _, set := range sets {
		k := s.ledgerKey(set)
		p.ZAddNX(ctx, k, bySet[set]...)
		p.PExpire(ctx, k, window)
	}
	if p.Len() == 0 {
		return nil
	}
	_, err := p.Exec(ctx)
	return s.unavailable(err)
}

// LedgerEntry is one place in the ledger: an order's place id (its
// certificate's LedgerID), or a certificate's serial.
type LedgerEntry struct {
	Key    string // the exact set's ledger key (a hash of the set)
	Member string
	At     time.Time
}

// LedgerEntries reads the whole ledger (every exact set with a place in
// the window: one round trip per hundred sets, and one for their places).
func (s *Shared) LedgerEntries(ctx context.Context) ([]LedgerEntry, error) {
	var keys []string
	prefix := s.k("ledger", "")
	iter := s.c.Scan(ctx, 0, prefix+"*", 100).Iterator()
	for iter.Next(ctx) {
		keys = append(keys, iter.Val())
	}
	if err := iter.Err(); err != nil {
		return nil, s.unavailable(err)
	}
	p := s.c.Pipeline()
	cmds := make([]*goredis.ZSliceCmd, len(keys))
	for i, k := range keys {
		cmds[i] = p.ZRangeWithScores(ctx, k, 0, -1)
	}
	if len(keys) > 0 {
		if _, err := p.Exec(ctx); err != nil {
			return nil, s.unavailable(err)
		}
	}
	var out []LedgerEntry
	for i, c := range cmds {
		for _, z := range c.Val() {
			m, _ := z.Member.(string)
			out = append(out, LedgerEntry{Key: strings.TrimPrefix(keys[i], prefix), Member: m, At: time.UnixMilli(int64(z.Score)).UTC()})
		}
	}
	return out, nil
}

// LedgerSeedKey is LedgerSeed for an entry known by its set's ledger key
// (a node's copy of an entry it did not see issued).
func (s *Shared) LedgerSeedKey(ctx context.Context, key, id string, at time.Time, window time.Duration) error {
	if time.Since(at) > window {
		return nil
	}
	p := s.c.Pipeline()
	p.ZAddNX(ctx, s.k("ledger", key), goredis.Z{Score: float64(at.UnixMilli()), Member: id})
	p.PExpire(ctx, s.k("ledger", key), window)
	_, err := p.Exec(ctx)
	return s.unavailable(err)
}

// LedgerCount is how many certificates of set the window holds.
func (s *Shared) LedgerCount(ctx context.Context, set string, window time.Duration, now time.Time) (int, error) {
	n, err := s.c.ZCount(ctx, s.ledgerKey(set), strconv.FormatInt(now.Add(-window).UnixMilli(), 10), "+inf").Result()
	return int(n), s.unavailable(err)
}

// HGetAll reads a whole fleet hash (meta, members, join requests,
// wrapped keys, epochs): the small records package fleet keeps.
func (s *Shared) HGetAll(ctx context.Context, hash string) (map[string]string, error) {
	m, err := s.c.HGetAll(ctx, s.k(hash)).Result()
	return m, s.unavailable(err)
}

// HGet reads one field; "" when absent.
func (s *Shared) HGet(ctx context.Context, hash, field string) (string, error) {
	v, err := s.c.HGet(ctx, s.k(hash), field).Result()
	if errors.Is(err, goredis.Nil) {
		return "", nil
	}
	return v, s.unavailable(err)
}

// HSet writes fields of a hash.
func (s *Shared) HSet(ctx context.Context, hash string, kv ...string) error {
	args := make([]any, len(kv))
	for i, v := range kv {
		args[i] = v
	}
	return s.unavailable(s.c.HSet(ctx, s.k(hash), args...).Err())
}

// HDel removes fields of a hash.
func (s *Shared) HDel(ctx context.Context, hash string, fields ...string) error {
	return s.unavailable(s.c.HDel(ctx, s.k(hash), fields...).Err())
}

// createScript writes a hash only if it does not hold its first field
// (anything else in it is what a write cut short left, and goes): the
// first of two racing creators wins, the second learns it lost.
var createScript = goredis.NewScript(`
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 then return 0 end
redis.call('DEL', KEYS[1])
for i = 1, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i+1]) end
return 1
`)

// nameEpochScript names epoch ARGV[1] the fleet's current one, only if
// the fleet record and that epoch's record are both there: a Redis
// emptied or restarted while a rebuild or a rotation wrote them holds
// neither, and naming the epoch into it would leave a fleet record
// with no fleet ID and an epoch nobody can follow.
var nameEpochScript = goredis.NewScript(`
if redis.call('HEXISTS', KEYS[1], 'id') == 0 or redis.call('HEXISTS', KEYS[2], ARGV[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'epoch', ARGV[1])
return 1
`)

// ErrLostWrites is a fleet record written in several steps whose first
// steps Redis lost (emptied, or restarted without them) before the
// last: the writer starts again.
var ErrLostWrites = errors.New("the fleet's Redis lost the membership records while they were being written (emptied or restarted meanwhile); writing them again")

// NameEpoch makes epoch e the fleet's current one (see nameEpochScript).
func (s *Shared) NameEpoch(ctx context.Context, e int) error {
	n, err := nameEpochScript.Run(ctx, s.c, []string{s.k("meta"), s.k("epochs")}, e).Int()
	if err != nil {
		return s.unavailable(err)
	}
	if n == 0 {
		return ErrLostWrites
	}
	return nil
}

// Create writes hash with kv if it does not hold kv's first field yet
// (the fleet record's ID: a record without one is what a Redis emptied
// during a write leaves); false if it did.
func (s *Shared) Create(ctx context.Context, hash string, kv ...string) (bool, error) {
	args := make([]any, len(kv))
	for i, v := range kv {
		args[i] = v
	}
	n, err := createScript.Run(ctx, s.c, []string{s.k(hash)}, args...).Int()
	return n == 1, s.unavailable(err)
}

// Del removes whole hashes.
func (s *Shared) Del(ctx context.Context, hashes ...string) error {
	keys := make([]string, len(hashes))
	for i, h := range hashes {
		keys[i] = s.k(h)
	}
	return s.unavailable(s.c.Del(ctx, keys...).Err())
}

// SetAccountKeyKeepReg replaces the sealed account key after a data key
// rotation; the registration stays, the key itself is the same.
func (s *Shared) SetAccountKeyKeepReg(ctx context.Context, server, email string, epoch int, sealed []byte) error {
	return s.unavailable(s.c.HSet(ctx, s.accountKey(server, email), "server", server, "email", email, "epoch", epoch, "key", sealed).Err())
}

// DelHeartbeat removes node's heartbeat: an agent that stops cleanly is
// not waited for by orderers.
func (s *Shared) DelHeartbeat(ctx context.Context, node string) error {
	return s.unavailable(s.c.Del(ctx, s.k("agent", node)).Err())
}

// PaceUpdate is the fleet's pace budget (package pace's Shared): fields
// of one hash, read, changed by fn and written back in a WATCH/MULTI
// transaction, retried when another node wrote the hash meanwhile. The
// hash is watched as a whole, so two nodes' orders for unrelated names
// also retry each other; an update is two round trips, and a retry
// costs the same again.
func (s *Shared) PaceUpdate(fields []string, fn func(map[string][]byte) (map[string][]byte, error)) error {
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	key := s.k("pace")
	var fnErr error
	for range 100 {
		err := s.c.Watch(ctx, func(tx *goredis.Tx) error {
			vals, err := tx.HMGet(ctx, key, fields...).Result()
			if err != nil {
				return err
			}
			in := map[string][]byte{}
			for i, v := range vals {
				if str, ok := v.(string); ok {
					in[fields[i]] = []byte(str)
				}
			}
			out, ferr := fn(in)
			fnErr = ferr
			_, err = tx.TxPipelined(ctx, func(p goredis.Pipeliner) error {
				for f, v := range out {
					switch {
					case v != nil:
						p.HSet(ctx, key, f, v)
					case in[f] != nil:
						p.HDel(ctx, key, f)
					}
				}
				return nil
			})
			return err
		}, key)
		if errors.Is(err, goredis.TxFailedErr) {
			continue
		}
		if err != nil {
			return s.unavailable(err)
		}
		return fnErr
	}
	return errors.New("the fleet's pace budget changed under every one of 100 tries; try again")
}

// SetServed records what node serves for each name (JSON per name).
func (s *Shared) SetServed(ctx context.Context, node string, served map[string][]byte) error {
	if len(served) == 0 {
		return nil
	}
	args := make([]any, 0, 2*len(served))
	for k, v := range served {
		args = append(args, k, v)
	}
	return s.unavailable(s.c.HSet(ctx, s.k("served", node), args...).Err())
}

// Served reads what node reported serving, by name.
func (s *Shared) Served(ctx context.Context, node string) (map[string]string, error) {
	m, err := s.c.HGetAll(ctx, s.k("served", node)).Result()
	return m, s.unavailable(err)
}

// DelServed forgets names node served (deleted lineages).
func (s *Shared) DelServed(ctx context.Context, node string, names ...string) error {
	return s.unavailable(s.c.HDel(ctx, s.k("served", node), names...).Err())
}

// PaceFields lists the fields of the fleet's pace budget.
func (s *Shared) PaceFields() ([]string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	keys, err := s.c.HKeys(ctx, s.k("pace")).Result()
	return keys, s.unavailable(err)
}

// lockScript and unlockScript are a plain exclusive lock with a token:
// fleet-wide operations that must not interleave (two key rotations, a
// rotation and an approval) take it.
var extendLockScript = goredis.NewScript(`
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
`)

// Lock takes the fleet-wide lock name, waiting until ctx ends; it is
// extended every third of ttl until the returned release is called.
func (s *Shared) Lock(ctx context.Context, name string, ttl time.Duration) (release func(), err error) {
	key := s.k("lock", name)
	token := strconv.FormatInt(time.Now().UnixNano(), 36)
	for {
		ok, err := s.c.SetNX(ctx, key, token, ttl).Result()
		if err != nil {
			return nil, s.unavailable(err)
		}
		if ok {
			break
		}
		select {
		case <-ctx.Done():
			holder, _ := s.c.Get(context.Background(), key).Result()
			return nil, fmt.Errorf("another member holds the fleet's %s lock (%s); try again when it is done", name, holder)
		case <-time.After(200 * time.Millisecond):
		}
	}
	stop := make(chan struct{})
	go func() {
		t := time.NewTicker(ttl / 3)
		defer t.Stop()
		for {
			select {
			case <-stop:
				return
			case <-t.C:
				extendLockScript.Run(context.Background(), s.c, []string{key}, token, ttl.Milliseconds())
			}
		}
	}()
	return func() {
		close(stop)
		releaseLockScript.Run(context.Background(), s.c, []string{key}, token)
	}, nil
}

// DropBundle removes name's bundle without a tombstone: a certificate
// the fleet must not keep (sealed by a node no longer a member), which
// the members give back from their own disks.
func (s *Shared) DropBundle(ctx context.Context, name string) error {
	p := s.c.TxPipeline()
	p.Del(ctx, s.k("bundle", name))
	p.SRem(ctx, s.k("lineages"), name)
	_, err := p.Exec(ctx)
	return s.unavailable(err)
}
