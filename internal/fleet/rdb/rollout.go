package rdb

import (
	"context"
	"errors"
	"strconv"

	goredis "github.com/redis/go-redis/v9"
)

// A staged rollout's state lives in three kinds of keys, beside the
// bundles: the fleet's waves ("rollout": fields waves, seq, json), one
// record per lineage whose new version is on its way ("rollout:NAME",
// a hash of the fields package fleet names, with version and seq for
// the scripts' compare-and-set), the set of those lineages ("rollouts"),
// and the version the nodes keep until their wave ("prev:NAME", a
// bundle). The publish script makes the record and moves the head to
// prev:NAME in the same step that publishes a new version, so no node
// can see the new head without its rollout.

// RolloutConfig reads the fleet's waves as package fleet wrote them
// (nil when never set) and their change count.
func (s *Shared) RolloutConfig(ctx context.Context) ([]byte, int64, error) {
	vals, err := s.c.HMGet(ctx, s.k("rollout"), "json", "seq").Result()
	if err != nil {
		return nil, 0, s.unavailable(err)
	}
	raw, _ := vals[0].(string)
	seqs, _ := vals[1].(string)
	seq, _ := strconv.ParseInt(seqs, 10, 64)
	if raw == "" {
		return nil, seq, nil
	}
	return []byte(raw), seq, nil
}

// setConfigScript writes the fleet's waves: with a seq of 0 as a new
// change, numbered above both what Redis holds and the caller's floor
// (the newest number the changing node knows: a Redis rebuilt from an
// older copy must not hand out a number a node already holds), or as a
// copy a node kept, only when it is newer than what Redis holds (a
// rebuild). Two copies with the same number (changes made apart, while
// Redis was lost) are ordered by the SHA-1 of their JSON, as package
// fleet orders its own copies, so every node and Redis keep the same.
var setConfigScript = goredis.NewScript(`
local cur = tonumber(redis.call('HGET', KEYS[1], 'seq') or '0')
local seq = tonumber(ARGV[3])
if seq == 0 then
  seq = math.max(cur, tonumber(ARGV[4])) + 1
elseif seq < cur then
  return 0
elseif seq == cur then
  local old = redis.call('HGET', KEYS[1], 'json') or ''
  if tonumber(string.sub(redis.sha1hex(ARGV[1]), 1, 12), 16) <= tonumber(string.sub(redis.sha1hex(old), 1, 12), 16) then return 0 end
end
redis.call('HSET', KEYS[1], 'json', ARGV[1], 'waves', ARGV[2], 'seq', seq)
redis.call('XADD', KEYS[2], 'MAXLEN', '~', '100000', '*', 'config', '1')
return seq
`)

// SetRolloutConfig writes the fleet's waves (raw is package fleet's
// JSON, waves their count: 0 turns staging off), tells the agents
// through the events stream (ahead of any publish made after it), and
// returns the new change number. seq 0 is a new change; another is a
// rebuild's copy, written only when newer (then 0 means it was not).
func (s *Shared) SetRolloutConfig(ctx context.Context, raw []byte, waves int, seq int64) (int64, error) {
	return s.ChangeRolloutConfig(ctx, raw, waves, seq, 0)
}

// ChangeRolloutConfig is SetRolloutConfig; a new change (seq 0) is
// numbered above floor too.
func (s *Shared) ChangeRolloutConfig(ctx context.Context, raw []byte, waves int, seq, floor int64) (int64, error) {
	n, err := setConfigScript.Run(ctx, s.c, []string{s.k("rollout"), s.k("events")}, raw, waves, seq, floor).Int64()
	return n, s.unavailable(err)
}

// Rollouts lists the lineages with a rollout on its way.
func (s *Shared) Rollouts(ctx context.Context) ([]string, error) {
	n, err := s.c.SMembers(ctx, s.k("rollouts")).Result()
	return n, s.unavailable(err)
}

// RolloutRecords reads the records of names, pipelined; a name with
// none is left out.
func (s *Shared) RolloutRecords(ctx context.Context, names []string) (map[string]map[string]string, error) {
	out := make(map[string]map[string]string, len(names))
	if len(names) == 0 {
		return out, nil
	}
	p := s.c.Pipeline()
	cmds := make([]*goredis.MapStringStringCmd, len(names))
	for i, n := range names {
		cmds[i] = p.HGetAll(ctx, s.k("rollout", n))
	}
	if _, err := p.Exec(ctx); err != nil && !errors.Is(err, goredis.Nil) {
		return nil, s.unavailable(err)
	}
	for i, n := range names {
		if m := cmds[i].Val(); len(m) > 0 {
			out[n] = m
		}
	}
	return out, nil
}

// moveScript is the one way a record changes: only from the version and
// seq the caller read (compare-and-set), so two nodes judging the same
// wave at once move it once. It ends the rollout (done: the record and
// the previous bundle go) or sets fields and counts the change, and
// tells every agent through the events stream.
var moveScript = goredis.NewScript(`
if tonumber(redis.call('HGET', KEYS[1], 'version') or '0') ~= tonumber(ARGV[2]) then return 0 end
if tonumber(redis.call('HGET', KEYS[1], 'seq') or '0') ~= tonumber(ARGV[3]) then return 0 end
if ARGV[4] == '1' then
  redis.call('DEL', KEYS[1], KEYS[3])
  redis.call('SREM', KEYS[2], ARGV[1])
else
  for i = 5, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i+1]) end
  redis.call('HINCRBY', KEYS[1], 'seq', 1)
end
redis.call('XADD', KEYS[4], 'MAXLEN', '~', '100000', '*', 'name', ARGV[1], 'version', ARGV[2], 'rollout', '1')
return 1
`)

// MoveRollout changes name's record if it is still at (version, seq):
// done ends the rollout, otherwise kv are set. false: it moved meanwhile.
func (s *Shared) MoveRollout(ctx context.Context, name string, version int, seq int64, done bool, kv ...string) (bool, error) {
	args := []any{name, version, seq, boolArg(done)}
	for _, v := range kv {
		args = append(args, v)
	}
	keys := []string{s.k("rollout", name), s.k("rollouts"), s.k("prev", name), s.k("events")}
	n, err := moveScript.Run(ctx, s.c, keys, args...).Int()
	return n == 1, s.unavailable(err)
}

func boolArg(b bool) string {
	if b {
		return "1"
	}
	return "0"
}

// noteScript sets fields that record an observation, not a move (the
// expiry override's start), once, if the record is still at version. A
// first field that is there but 0 or empty was never noted: a record a
// rebuild put back from a node's copy carries every field.
var noteScript = goredis.NewScript(`
if tonumber(redis.call('HGET', KEYS[1], 'version') or '0') ~= tonumber(ARGV[1]) then return 0 end
local cur = redis.call('HGET', KEYS[1], ARGV[2])
if cur and cur ~= '' and cur ~= '0' then return 0 end
for i = 2, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i+1]) end
return 1
`)

// NoteRollout sets kv on name's record if it is at version and its
// first field is not set yet.
func (s *Shared) NoteRollout(ctx context.Context, name string, version int, kv ...string) (bool, error) {
	args := []any{version}
	for _, v := range kv {
		args = append(args, v)
	}
	n, err := noteScript.Run(ctx, s.c, []string{s.k("rollout", name)}, args...).Int()
	return n == 1, s.unavailable(err)
}

// seedRecordScript puts back a record a node kept, into a Redis that
// lost it: only for a lineage not deleted since, whose head (if Redis
// has one yet) is not newer than the record's version, and only over an
// older record (version, then seq).
var seedRecordScript = goredis.NewScript(`
if redis.call('HEXISTS', KEYS[3], ARGV[1]) == 1 then return 0 end
local v, seq = tonumber(ARGV[2]), tonumber(ARGV[3])
if tonumber(redis.call('HGET', KEYS[2], 'version') or '0') > v then return 0 end
local cv = tonumber(redis.call('HGET', KEYS[1], 'version') or '0')
local cs = tonumber(redis.call('HGET', KEYS[1], 'seq') or '0')
if cv > v or (cv == v and cs >= seq) then return 0 end
redis.call('DEL', KEYS[1])
for i = 4, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i+1]) end
redis.call('HSET', KEYS[1], 'version', v, 'seq', seq)
redis.call('SADD', KEYS[4], ARGV[1])
return 1
`)

// SeedRollout puts back a record node kept (kv without version and
// seq); true when it was put back.
func (s *Shared) SeedRollout(ctx context.Context, name string, version int, seq int64, kv ...string) (bool, error) {
	args := []any{name, version, seq}
	for _, v := range kv {
		args = append(args, v)
	}
	keys := []string{s.k("rollout", name), s.k("bundle", name), s.k("deleted"), s.k("rollouts")}
	n, err := seedRecordScript.Run(ctx, s.c, keys, args...).Int()
	return n == 1, s.unavailable(err)
}

// seedPrevScript puts back the previous bundle of a rollout from a node
// that holds it, only where the record names that version.
var seedPrevScript = goredis.NewScript(`
if redis.call('HGET', KEYS[2], 'previous') ~= ARGV[2] then return 0 end
if redis.call('HGET', KEYS[1], 'version') == ARGV[2] then return 0 end
redis.call('DEL', KEYS[1])
for i = 3, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i+1]) end
return 1
`)

// SeedPrev puts back b as the previous bundle of its lineage's rollout,
// if the record names b's version.
func (s *Shared) SeedPrev(ctx context.Context, b *Bundle) (bool, error) {
	args := append([]any{b.Name, b.Version}, b.fields()...)
	n, err := seedPrevScript.Run(ctx, s.c, []string{s.k("prev", b.Name), s.k("rollout", b.Name)}, args...).Int()
	return n == 1, s.unavailable(err)
}

// Prev reads the previous bundle of name's rollout.
func (s *Shared) Prev(ctx context.Context, name string) (*Bundle, error) {
	m, err := s.c.HGetAll(ctx, s.k("prev", name)).Result()
	if err != nil {
		return nil, s.unavailable(err)
	}
	if len(m) == 0 {
		return nil, ErrNoBundle
	}
	return bundleOf(name, m), nil
}

// PrevNames lists the lineages that have a previous bundle, for a key
// rotation.
func (s *Shared) PrevNames(ctx context.Context) ([]string, error) {
	var out []string
	prefix := s.k("prev", "")
	iter := s.c.Scan(ctx, 0, prefix+"*", 1000).Iterator()
	for iter.Next(ctx) {
		out = append(out, iter.Val()[len(prefix):])
	}
	return out, s.unavailable(iter.Err())
}

// DropPrev removes name's previous bundle: one sealed by a node no
// longer a member, which the members' copies give back.
func (s *Shared) DropPrev(ctx context.Context, name string) error {
	return s.unavailable(s.c.Del(ctx, s.k("prev", name)).Err())
}

// ResealPrev replaces the sealed key of name's previous bundle, if it is
// still at version, after a data key rotation.
func (s *Shared) ResealPrev(ctx context.Context, name string, version, epoch int, sealed []byte) (bool, error) {
	n, err := resealScript.Run(ctx, s.c, []string{s.k("prev", name)}, version, epoch, sealed).Int()
	return n == 1, s.unavailable(err)
}

// ServedOf reads what each of nodes reported serving of names, one
// pipelined HMGET per node: node -> name -> JSON.
func (s *Shared) ServedOf(ctx context.Context, nodes, names []string) (map[string]map[string]string, error) {
	out := make(map[string]map[string]string, len(nodes))
	if len(nodes) == 0 || len(names) == 0 {
		return out, nil
	}
	p := s.c.Pipeline()
	cmds := make([]*goredis.SliceCmd, len(nodes))
	for i, n := range nodes {
		cmds[i] = p.HMGet(ctx, s.k("served", n), names...)
	}
	if _, err := p.Exec(ctx); err != nil && !errors.Is(err, goredis.Nil) {
		return nil, s.unavailable(err)
	}
	for i, n := range nodes {
		m := map[string]string{}
		for j, v := range cmds[i].Val() {
			if str, ok := v.(string); ok {
				m[names[j]] = str
			}
		}
		out[n] = m
	}
	return out, nil
}
