package rdb

import (
	"context"
	"strconv"
	"strings"
	"time"

	goredis "github.com/redis/go-redis/v9"
)

// The lease of one name is the key lease:<name> holding "<holder>/<token>",
// with a TTL; fence:<name> is the counter tokens come from. Acquire
// creates the lease and takes the next token in one script, so there is
// no moment where a lease exists without its token or two holders both
// see the name free. The counter outlives leases, so a token only grows.
// Every lease a node's processes take is also listed in the node's set
// leases:<node> (the holder is "<node>/<pid>"), so that node's agent
// can find the leases its exited processes left (LeasesOf).
var acquireScript = goredis.NewScript(`
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local t = redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], ARGV[1] .. '/' .. t, 'PX', ARGV[2])
redis.call('SADD', KEYS[3], ARGV[3])
return t
`)

// Extend and release compare the whole value, holder and token: a
// holder that stalled past its TTL and woke up after someone else took
// the name must not extend or delete the new holder's lease.
var extendScript = goredis.NewScript(`
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
`)

// The name leaves the node's list (KEYS[2]) only when no process of the
// node (ARGV[3], "<node>/") holds it after the release: a process whose
// lease expired and was taken by another of the same node's must not
// drop that one's from the list, or its agent could not free it once
// that process died.
var releaseScript = goredis.NewScript(`
local v = redis.call('GET', KEYS[1])
local r = 0
if v == ARGV[1] then redis.call('DEL', KEYS[1]); v = false; r = 1 end
if not v or string.sub(v, 1, #ARGV[3]) ~= ARGV[3] then redis.call('SREM', KEYS[2], ARGV[2]) end
return r
`)

// forgetScript drops from node's list (KEYS[1]) each name (ARGV[2..])
// whose lease (KEYS[2..]) no process of the node (ARGV[1], "<node>/")
// holds now: checked and dropped at once, so a name a process of the
// node took again since LeasesOf read it stays listed.
var forgetScript = goredis.NewScript(`
for i = 2, #KEYS do
  local v = redis.call('GET', KEYS[i])
  if not v or string.sub(v, 1, #ARGV[1]) ~= ARGV[1] then redis.call('SREM', KEYS[1], ARGV[i]) end
end
return 0
`)

// releaseLockScript releases a fleet lock (Shared.Lock), which no
// node's lease list names.
var releaseLockScript = goredis.NewScript(`
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
`)

// nodeOf is the node of a holder "<node>/<pid>".
func nodeOf(holder string) string {
	node, _, _ := strings.Cut(holder, "/")
	return node
}

// Acquire takes the lease of name for holder, for ttl. It returns the
// fencing token, or 0 when someone holds the name.
func (s *Shared) Acquire(ctx context.Context, name, holder string, ttl time.Duration) (int64, error) {
	t, err := acquireScript.Run(ctx, s.c, []string{s.k("lease", name), s.k("fence", name), s.k("leases", nodeOf(holder))}, holder, ttl.Milliseconds(), name).Int64()
	return t, s.unavailable(err)
}

// Extend pushes the lease's expiry to ttl from now; false means the
// lease is no longer holder's (it expired and was taken, or Redis lost it).
func (s *Shared) Extend(ctx context.Context, name, holder string, token int64, ttl time.Duration) (bool, error) {
	n, err := extendScript.Run(ctx, s.c, []string{s.k("lease", name)}, leaseValue(holder, token), ttl.Milliseconds()).Int64()
	return n == 1, s.unavailable(err)
}

// Release deletes the lease if it is still holder's.
func (s *Shared) Release(ctx context.Context, name, holder string, token int64) error {
	node := nodeOf(holder)
	return s.unavailable(releaseScript.Run(ctx, s.c, []string{s.k("lease", name), s.k("leases", node)}, leaseValue(holder, token), name, node+"/").Err())
}

// Fence is the newest token handed out for name (0 for none).
func (s *Shared) Fence(ctx context.Context, name string) (int64, error) {
	n, err := s.c.Get(ctx, s.k("fence", name)).Int64()
	if err == goredis.Nil {
		return 0, nil
	}
	return n, s.unavailable(err)
}

func leaseValue(holder string, token int64) string {
	return holder + "/" + itoa(token)
}

// Holder reads who holds name's lease ("" when free) and its token.
func (s *Shared) Holder(ctx context.Context, name string) (holder string, token int64, err error) {
	v, err := s.c.Get(ctx, s.k("lease", name)).Result()
	if err == goredis.Nil {
		return "", 0, nil
	}
	if err != nil {
		return "", 0, s.unavailable(err)
	}
	i := strings.LastIndexByte(v, '/')
	if i < 0 {
		return v, 0, nil
	}
	t, _ := strconv.ParseInt(v[i+1:], 10, 64)
	return v[:i], t, nil
}

// LeasesOf lists the leases node's processes took and have not
// released, with each one's holder and token as Redis holds it now
// ("" when it expired or another node's process holds it since); the
// names that no process of node holds any more leave the list.
func (s *Shared) LeasesOf(ctx context.Context, node string) (map[string]Held, error) {
	names, err := s.c.SMembers(ctx, s.k("leases", node)).Result()
	if err != nil || len(names) == 0 {
		return nil, s.unavailable(err)
	}
	p := s.c.Pipeline()
	cmds := make([]*goredis.StringCmd, len(names))
	for i, n := range names {
		cmds[i] = p.Get(ctx, s.k("lease", n))
	}
	p.Exec(ctx)
	out := map[string]Held{}
	var gone []string
	for i, n := range names {
		v, err := cmds[i].Result()
		if err != nil && err != goredis.Nil {
			return nil, s.unavailable(err)
		}
		j := strings.LastIndexByte(v, '/')
		if j < 0 || nodeOf(v[:j]) != node {
			gone = append(gone, n)
			continue
		}
		t, _ := strconv.ParseInt(v[j+1:], 10, 64)
		out[n] = Held{Holder: v[:j], Token: t}
	}
	if len(gone) > 0 {
		keys, args := []string{s.k("leases", node)}, []any{node + "/"}
		for _, n := range gone {
			keys, args = append(keys, s.k("lease", n)), append(args, n)
		}
		if err := forgetScript.Run(ctx, s.c, keys, args...).Err(); err != nil {
			return nil, s.unavailable(err)
		}
	}
	return out, nil
}

// Held is a lease's holder and token.
type Held struct {
	Holder string
	Token  int64
}

// Break deletes name's lease if holder still has it with token: for a
// holder known to be dead.
func (s *Shared) Break(ctx context.Context, name, holder string, token int64) error {
	return s.Release(ctx, name, holder, token)
}
