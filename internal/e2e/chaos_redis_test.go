package e2e

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	goredis "github.com/redis/go-redis/v9"

	"github.com/lbcert/lbcert/internal/testenv"
)

// chaosRedis is the fleet's Redis as the schedule sees it: one
// redis-server, or a primary, a replica and a Sentinel; which instance
// is the primary changes with every failover.
type chaosRedis struct {
	f         *fleetEnv
	instances []*testenv.Redis
	sentinel  *testenv.Sentinel
	aof       map[*testenv.Redis]bool // the running instance keeps an AOF
	down      map[*testenv.Redis]bool
	mu        sync.Mutex // one Redis fault at a time

	// The primary as the harness last set or saw it, and whether the
	// harness is changing it now (a failover or a kill it injected):
	// a change outside those is Sentinel's own (watchPrimary).
	knownMu   sync.Mutex
	known     *testenv.Redis
	switching int
}

// harnessSwitch marks a primary change the harness makes; done takes
// the new primary as known.
func (r *chaosRedis) harnessSwitch() (done func()) {
	r.knownMu.Lock()
	r.switching++
	r.knownMu.Unlock()
	return func() {
		p, err := r.primary()
		r.knownMu.Lock()
		if err == nil {
			r.known = p
		}
		r.switching--
		r.knownMu.Unlock()
	}
}

// unexpected reports whether p is a primary no fault of the harness
// made, and the one before it; p is known from then on.
func (r *chaosRedis) unexpected(p *testenv.Redis) (bool, *testenv.Redis) {
	r.knownMu.Lock()
	defer r.knownMu.Unlock()
	old := r.known
	if r.switching > 0 || p == old {
		return false, old
	}
	r.known = p
	return old != nil, old
}

// Redis keys the checks read: the catalog as lbcert writes it today.
// They are named here once, so a change of layout is one edit.
const (
	rkPrefix   = "lbcert:"
	rkLineages = rkPrefix + "lineages"
	rkBundle   = rkPrefix + "bundle:"  // hash: version, cert, key (sealed), epoch, published_at, meta
	rkMembers  = rkPrefix + "members"  // hash: node -> member record
	rkMeta     = rkPrefix + "meta"     // hash: id, epoch
	rkWrapped  = rkPrefix + "wrapped:" // hash per epoch: node -> data key wrapped for it
	rkAccount  = rkPrefix + "account:" // hash: server, email, key (sealed), reg
	rkToken    = rkPrefix + "token:"   // string: HOST:TOKEN -> key authorization
	rkAgent    = rkPrefix + "agent:"   // string: the agent's heartbeat
	rkRollouts = rkPrefix + "rollouts" // set: the lineages with a staged rollout on its way
	rkRollout  = rkPrefix + "rollout:" // hash: one lineage's rollout (version, serial, previous, prev_serial, wave, state, node, override_at)
)

func newChaosRedis(f *fleetEnv, sentinel bool) (*chaosRedis, error) {
	r := &chaosRedis{f: f, instances: []*testenv.Redis{f.redis}, aof: map[*testenv.Redis]bool{f.redis: true}, down: map[*testenv.Redis]bool{}}
	if !sentinel {
		return r, nil
	}
	replica, err := testenv.StartRedis(filepath.Join(f.work, "replica"), fleetPassword, f.redis)
	if err != nil {
		return nil, err
	}
	r.instances = append(r.instances, replica)
	r.aof[replica] = true
	s, err := testenv.StartSentinel(filepath.Join(f.work, "sentinel"), "lbmaster", f.redis)
	if err != nil {
		return nil, err
	}
	rc := goredis.NewClient(&goredis.Options{Addr: replica.Addr(), Password: fleetPassword})
	defer rc.Close()
	for deadline := time.Now().Add(20 * time.Second); !strings.Contains(rc.Info(context.Background(), "replication").Val(), "master_link_status:up"); {
		if time.Now().After(deadline) {
			return nil, fmt.Errorf("the replica never synced:\n%s", replica.Log())
		}
		time.Sleep(100 * time.Millisecond)
	}
	r.sentinel = s
	f.sentinel = s
	f.url = fmt.Sprintf("redis-sentinel://%s/lbmaster/0", s.Addr())
	return r, nil
}

// primary is the instance Sentinel names the primary (or the only one).
func (r *chaosRedis) primary() (*testenv.Redis, error) {
	if r.sentinel == nil {
		return r.instances[0], nil
	}
	sc := goredis.NewSentinelClient(&goredis.Options{Addr: r.sentinel.Addr(), Password: fleetPassword})
	defer sc.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	addr, err := sc.GetMasterAddrByName(ctx, r.sentinel.Master).Result()
	if err != nil {
		return nil, err
	}
	port, _ := strconv.Atoi(addr[1])
	for _, in := range r.instances {
		if in.Port == port {
			return in, nil
		}
	}
	return nil, fmt.Errorf("sentinel names %v, no instance of ours", addr)
}

// client is a client of the current primary. The harness resolves the
// primary itself rather than through go-redis's failover client, which
// logs every resolution on the test's stderr.
func (r *chaosRedis) client() *goredis.Client {
	addr := r.instances[0].Addr()
	if p, err := r.primary(); err == nil {
		addr = p.Addr()
	}
	return goredis.NewClient(&goredis.Options{Addr: addr, Password: fleetPassword, MaxRetries: -1})
}

func (r *chaosRedis) other(in *testenv.Redis) *testenv.Redis {
	for _, o := range r.instances {
		if o != in {
			return o
		}
	}
	return nil
}

// errNoFailover is a failover Sentinel did not make (it aborts one when
// it finds no replica in sync, as after a replica's own restart): a
// fault that did not happen, not a finding.
var errNoFailover = errors.New("sentinel made no failover")

// waitNewPrimary waits until Sentinel names another primary than old.
func (r *chaosRedis) waitNewPrimary(old *testenv.Redis, limit time.Duration) error {
	deadline := time.Now().Add(limit)
	for {
		p, err := r.primary()
		if err == nil && p != old {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%w: it still names %v after %s (%v)", errNoFailover, old.Addr(), limit, err)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// kill is kill -9 of the primary. With Sentinel it waits for the
// failover before it returns the killed instance.
func (r *chaosRedis) kill() (*testenv.Redis, error) {
	defer r.harnessSwitch()()
	p, err := r.primary()
	if err != nil {
		return nil, err
	}
	p.Kill()
	r.down[p] = true
	if r.sentinel != nil {
		return p, r.waitNewPrimary(p, 20*time.Second)
	}
	return p, nil
}

// restart starts a killed instance again, with an AOF or not. Its data
// survives only when it had an AOF and gets one again; otherwise it
// starts empty (a replica then resyncs from the primary).
func (r *chaosRedis) restart(in *testenv.Redis, aof bool) error {
	if !r.aof[in] || !aof {
		if err := os.RemoveAll(filepath.Join(in.Dir, "appendonlydir")); err != nil {
			return err
		}
	}
	in.Conf = ""
	if !aof {
		in.Conf = "appendonly no\n"
	}
	if r.sentinel != nil {
		in.ReplicaOf = r.other(in)
	}
	r.aof[in] = aof
	if err := in.Start(); err != nil {
		return err
	}
	delete(r.down, in)
	return nil
}

func (r *chaosRedis) do(args ...any) error {
	c := r.client()
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	return c.Do(ctx, args...).Err()
}

func (r *chaosRedis) failover() error {
	defer r.harnessSwitch()()
	old, err := r.primary()
	if err != nil {
		return err
	}
	sc := goredis.NewSentinelClient(&goredis.Options{Addr: r.sentinel.Addr(), Password: fleetPassword})
	defer sc.Close()
	// Sentinel names the new primary before it has finished the last
	// failover (it still reconfigures the replicas), and refuses another
	// until then with INPROG; with the replica killed by an earlier fault
	// or not yet in sync, it refuses with NOGOODSLAVE. The fault waits,
	// as an operator would, and is skipped if Sentinel still refuses.
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(250 * time.Millisecond) {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		err = sc.Failover(ctx, r.sentinel.Master).Err()
		cancel()
		if err == nil {
			break
		}
		if !strings.Contains(err.Error(), "INPROG") && !strings.Contains(err.Error(), "NOGOODSLAVE") {
			return err
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%w: Sentinel still refused after 30 s (%v)", errNoFailover, err)
		}
	}
	return r.waitNewPrimary(old, 20*time.Second)
}

// healAll starts every instance that is down (with an AOF) and ends any
// pause: the start of quiet.
func (r *chaosRedis) healAll() error {
	r.mu.Lock()
	defer r.mu.Unlock()
	var errs []error
	for _, in := range r.instances {
		if r.down[in] {
			errs = append(errs, r.restart(in, true))
		}
	}
	if err := r.do("CLIENT", "UNPAUSE"); err != nil {
		errs = append(errs, fmt.Errorf("client unpause: %w", err))
	}
	return errors.Join(errs...)
}

func (r *chaosRedis) logs() string {
	var b strings.Builder
	for i, in := range r.instances {
		fmt.Fprintf(&b, "--- redis instance %d (%s):\n%s\n", i, in.Addr(), in.Log())
	}
	if r.sentinel != nil {
		fmt.Fprintf(&b, "--- sentinel:\n%s\n", r.sentinel.Log())
	}
	return b.String()
}

func (r *chaosRedis) stop() {
	for _, in := range r.instances[1:] {
		in.Stop()
	}
	r.sentinel.Stop()
}
