package fleet

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	goredis "github.com/redis/go-redis/v9"

	"github.com/lbcert/lbcert/internal/fleet/rdb"
	"github.com/lbcert/lbcert/internal/pace"
	"github.com/lbcert/lbcert/internal/store"
	"github.com/lbcert/lbcert/internal/testenv"
)

func startRedis(t *testing.T) (*testenv.Redis, *rdb.Shared) {
	t.Helper()
	r, err := testenv.StartRedis(t.TempDir(), "pw-for-tests", nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(r.Stop)
	sh, err := rdb.Dial(context.Background(), rdb.Options{URL: r.URL(), Password: "pw-for-tests"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { sh.Close() })
	return r, sh
}

func TestSealBindsFleetNameAndVersion(t *testing.T) {
	key, _ := newDataKey()
	other, _ := newDataKey()
	pem := []byte("-----BEGIN PRIVATE KEY-----\nsecret\n-----END PRIVATE KEY-----\n")
	sealed, err := seal(key, bundleAD("f1", "foo.com", 3), pem)
	if err != nil {
		t.Fatal(err)
	}
	if bytes.Contains(sealed, []byte("secret")) {
		t.Fatal("sealed blob holds the plaintext")
	}
	if got, err := open(key, bundleAD("f1", "foo.com", 3), sealed); err != nil || !bytes.Equal(got, pem) {
		t.Fatalf("open: %v", err)
	}
	for name, ad := range map[string][]byte{
		"other name":    bundleAD("f1", "bar.com", 3),
		"other version": bundleAD("f1", "foo.com", 4),
		"other fleet":   bundleAD("f2", "foo.com", 3),
	} {
		if _, err := open(key, ad, sealed); !errors.Is(err, ErrOpen) {
			t.Errorf("%s: %v, want ErrOpen", name, err)
		}
	}
	if _, err := open(other, bundleAD("f1", "foo.com", 3), sealed); !errors.Is(err, ErrOpen) {
		t.Errorf("other key: %v", err)
	}
	if _, err := seal(nil, nil, pem); err == nil {
		t.Error("sealed with no key: there must be no default key")
	}
}

// A fleet of three nodes: join, approve (a wrong fingerprint refused),
// remove with rotation, and a re-seed after FLUSHALL.
func TestMembership(t *testing.T) {
	_, sh := startRedis(t)
	ctx := context.Background()
	dir := t.TempDir()
	st := func(n string) *store.Store { return store.New(filepath.Join(dir, n)) }

	lb1, err := Init(ctx, sh, st("lb1"), "lb1")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := Init(ctx, sh, st("lbx"), "lbx"); err == nil || !strings.Contains(err.Error(), "already holds fleet") {
		t.Errorf("second init: %v", err)
	}
	fp2, _, err := Join(ctx, sh, st("lb2"), "lb2")
	if err != nil {
		t.Fatal(err)
	}
	fp3, _, err := Join(ctx, sh, st("lb3"), "lb3")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := Open(ctx, sh, st("lb2")); err == nil || !strings.Contains(err.Error(), "not approved yet") {
		t.Errorf("open before approval: %v", err)
	}
	if err := lb1.Approve(ctx, "lb2", fp3); err == nil || !strings.Contains(err.Error(), "refusing") {
		t.Errorf("approve with lb3's fingerprint: %v", err)
	}
	if err := lb1.Approve(ctx, "lb2", fp2); err != nil {
		t.Fatal(err)
	}
	if err := lb1.Approve(ctx, "lb3", fp3); err != nil {
		t.Fatal(err)
	}
	lb2, err := Open(ctx, sh, st("lb2"))
	if err != nil {
		t.Fatal(err)
	}
	lb3, err := Open(ctx, sh, st("lb3"))
	if err != nil {
		t.Fatal(err)
	}
	if len(lb2.Members()) != 3 {
		t.Fatalf("members %v", lb2.Members())
	}
	// A planted member (no MAC under the key) is not trusted.
	sh.HSet(ctx, "members", "evil", `{"node":"evil","recipient":"age1qqq","mac":"00"}`)
	if err := lb2.loadMembers(ctx, false); err != nil || len(lb2.Members()) != 3 {
		t.Errorf("planted member: %v %v", err, lb2.Members())
	}
	sh.HDel(ctx, "members", "evil")

	// Everyone opens a bundle sealed before the removal.
	ep, sealed, _ := lb1.SealBundleKey("foo.com", 1, []byte("KEY-1"))
	before := &rdb.Bundle{Name: "foo.com", Version: 1, Epoch: ep, SealedKey: sealed}
	for _, n := range []*Node{lb2, lb3} {
		if got, err := n.OpenBundleKey(ctx, before); err != nil || string(got) != "KEY-1" {
			t.Fatalf("%s opens the old bundle: %v", n.Name, err)
		}
	}
	if _, err := lb1.Remove(ctx, "lb3"); err != nil {
		t.Fatal(err)
	}
	// lb2 follows the rotation; lb3 is refused the new key.
	lb2, err = Open(ctx, sh, st("lb2"))
	if err != nil {
		t.Fatal(err)
	}
	if lb2.Epoch() != 2 {
		t.Fatalf("lb2 epoch %d after rotation", lb2.Epoch())
	}
	if _, err := Open(ctx, sh, st("lb3")); err == nil || !strings.Contains(err.Error(), "removed") {
		t.Errorf("removed node opens: %v", err)
	}
	ep2, sealed2, _ := lb1.SealBundleKey("foo.com", 2, []byte("KEY-2"))
	after := &rdb.Bundle{Name: "foo.com", Version: 2, Epoch: ep2, SealedKey: sealed2}
	if got, err := lb2.OpenBundleKey(ctx, after); err != nil || string(got) != "KEY-2" {
		t.Fatalf("lb2 opens the new bundle: %v", err)
	}
	if _, err := lb3.OpenBundleKey(ctx, after); err == nil {
		t.Fatal("lb3 opened a bundle published after its removal")
	}

	// A rotation not linked to the old key is refused.
	sh.HSet(ctx, "meta", "epoch", "3")
	sh.HSet(ctx, "epochs", "3", `{"n":3,"key_id":"abcd","link":"00"}`)
	if _, err := Open(ctx, sh, st("lb2")); err == nil {
		t.Error("accepted an epoch with no valid link")
	}
	sh.HSet(ctx, "meta", "epoch", "2")
	sh.HDel(ctx, "epochs", "3")

	// FLUSHALL: lb2 re-seeds the fleet, and lb1 opens it with its own key.
	sh.Client().FlushAll(ctx)
	if _, err := Open(ctx, sh, st("lb2")); err != nil {
		t.Fatalf("re-seed: %v", err)
	}
	lb1, err = Open(ctx, sh, st("lb1"))
	if err != nil {
		t.Fatalf("lb1 after re-seed: %v", err)
	}
	if len(lb1.Members()) != 2 {
		t.Errorf("members after re-seed: %v", lb1.Members())
	}
	// An outsider's fleet in an empty Redis is not this fleet.
	sh.Client().FlushAll(ctx)
	if _, err := Init(ctx, sh, st("outsider"), "mallory"); err != nil {
		t.Fatal(err)
	}
	if _, err := Open(ctx, sh, st("lb1")); err == nil || !strings.Contains(err.Error(), "refusing") {
		t.Errorf("member trusted an outsider's fleet: %v", err)
	}
}

func TestAgentAnswersByHostAndPresentChecksEveryAgent(t *testing.T) {
	r, sh := startRedis(t)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	dir := t.TempDir()
	n1, err := Init(ctx, sh, store.New(filepath.Join(dir, "lb1")), "lb1")
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	// Redis "away" for the first two tries: the agent serves (503, not
	// a refused connection) and connects on a later try.
	var tries atomic.Int32
	connect := func(context.Context) (*Node, error) {
		if tries.Add(1) <= 2 {
			return nil, &rdb.Unavailable{Addr: "test", Err: errors.New("connection refused")}
		}
		return n1, nil
	}
	a := &Agent{Connect: connect, Listener: ln, Advertise: ln.Addr().String(), Beat: 200 * time.Millisecond}
	go a.Run(ctx)
	if resp, err := http.Get("http://" + ln.Addr().String() + "/.well-known/acme-challenge/x"); err != nil || resp.StatusCode != http.StatusServiceUnavailable {
		t.Fatalf("before Redis answers: %v %v, want 503", resp, err)
	}
	waitFor(t, func() bool { ag, _ := n1.LiveAgents(ctx); return len(ag) == 1 })
	if n := tries.Load(); n != 3 {
		t.Errorf("connected after %d tries, want 3", n)
	}

	tok := &Tokens{N: n1}
	if err := tok.Present("Foo.COM", "tok1", "tok1.thumb"); err != nil {
		t.Fatal(err)
	}
	get := func(host, token string) (int, string) {
		req, _ := http.NewRequest("GET", "http://"+ln.Addr().String()+"/.well-known/acme-challenge/"+token, nil)
		req.Host = host
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		var b bytes.Buffer
		b.ReadFrom(resp.Body)
		return resp.StatusCode, b.String()
	}
	if code, body := get("foo.com:80", "tok1"); code != 200 || body != "tok1.thumb" {
		t.Errorf("matching host: %d %q", code, body)
	}
	if code, _ := get("bar.com", "tok1"); code != 404 {
		t.Errorf("other host got the token: %d", code)
	}
	// Redis away: the cached token is still answered.
	r.Kill()
	if code, body := get("foo.com", "tok1"); code != 200 || body != "tok1.thumb" {
		t.Errorf("cached token with Redis down: %d %q", code, body)
	}
	if err := r.Start(); err != nil {
		t.Fatal(err)
	}
	// A member whose agent is not answering makes Present fail before
	// the CA is asked, naming the node.
	fp, _, _ := Join(ctx, sh, store.New(filepath.Join(dir, "lb2")), "lb2")
	if err := n1.Approve(ctx, "lb2", fp); err != nil {
		t.Fatal(err)
	}
	dead, _ := net.Listen("tcp", "127.0.0.1:0")
	deadAddr := dead.Addr().String()
	dead.Close()
	sh.Heartbeat(ctx, "lb2", []byte(`{"addr":"`+deadAddr+`"}`), time.Minute)
	tok = &Tokens{N: n1} // the next run: a run reuses its list of agents for a second
	err = tok.Present("foo.com", "tok2", "tok2.thumb")
	var ace *AgentCheckError
	if !errors.As(err, &ace) || ace.Node != "lb2" {
		t.Fatalf("Present with a dead agent: %v", err)
	}
	if v, _, _, _ := sh.Token(ctx, "foo.com", "tok2"); v != "" {
		t.Error("the abandoned token stayed in Redis")
	}
}

func waitFor(t *testing.T, ok func() bool) {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
		if ok() {
			return
		}
	}
	t.Fatal("condition not met within 10s")
}

// Two nodes' budgets over one Redis are one budget: 40 racing reserves
// against a limit of 10 new orders get exactly 10, and a refund or a
// rateLimited block one node records is seen by the other.
func TestSharedPaceBudget(t *testing.T) {
	_, sh := startRedis(t)
	limits := pace.Limits{Orders: pace.Limit{N: 10, Per: time.Hour}, Domain: pace.Limit{N: 50, Per: 7 * 24 * time.Hour}}
	now := time.Now
	a := pace.OpenShared(PaceStore{sh}, limits, now)
	b := pace.OpenShared(PaceStore{sh}, limits, now)
	k := pace.Key{Server: "https://ca.test/dir", Email: "ops@example.com"}
	var mu sync.Mutex
	granted := 0
	var wg sync.WaitGroup
	for i := range 40 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			bud := a
			if i%2 == 1 {
				bud = b
			}
			err := bud.Reserve(k, pace.Order{Names: []string{fmt.Sprintf("n%d.example.com", i)}})
			var d *pace.Denied
			switch {
			case err == nil:
				mu.Lock()
				granted++
				mu.Unlock()
			case !errors.As(err, &d):
				t.Error(err)
			}
		}()
	}
	wg.Wait()
	if granted != 10 {
		t.Fatalf("%d orders granted across two nodes, want 10", granted)
	}
	// A block recorded by one node stops the other.
	k2 := pace.Key{Server: "https://ca.test/dir", Email: "other@example.com"}
	if err := a.Block(k2, time.Now().Add(time.Hour)); err != nil {
		t.Fatal(err)
	}
	var d *pace.Denied
	if err := b.Reserve(k2, pace.Order{Names: []string{"x.example.com"}}); !errors.As(err, &d) || d.Wait < 50*time.Minute {
		t.Errorf("the other node ignored the block: %v", err)
	}
}

// An agent that reads the membership of an emptied Redis before anyone
// rebuilt it keeps its copy, so the rebuild restores every member.
func TestEmptiedRedisKeepsTheMembership(t *testing.T) {
	_, sh := startRedis(t)
	ctx := context.Background()
	dir := t.TempDir()
	lb1 := firstNode(t, sh, dir)
	fp, _, _ := Join(ctx, sh, store.New(filepath.Join(dir, "lb2")), "lb2")
	if err := lb1.Approve(ctx, "lb2", fp); err != nil {
		t.Fatal(err)
	}
	sh.Client().FlushAll(ctx)
	if err := lb1.loadMembers(ctx, false); err != nil {
		t.Fatal(err)
	}
	if err := lb1.CheckSeeded(ctx); err != nil {
		t.Fatal(err)
	}
	if m, _ := sh.HGetAll(ctx, "members"); len(m) != 2 {
		t.Fatalf("members after the rebuild: %v", m)
	}
	if _, err := Open(ctx, sh, store.New(filepath.Join(dir, "lb2"))); err != nil {
		t.Fatalf("lb2 after the rebuild: %v", err)
	}
}

// A Redis that lost the writes of a 'fleet remove' (a Sentinel failover
// that dropped the old primary's last writes) holds the older epoch and
// member records no longer verifiable under the new key. A member that
// reads the members then (an agent's heartbeat) keeps its verified copy
// instead of emptying it, so it can put the newer membership back: the
// removed node is no member again (invariant I5).
func TestRegressedRedisKeepsTheMembershipCopy(t *testing.T) {
	_, sh := startRedis(t)
	ctx := context.Background()
	dir := t.TempDir()
	st := func(n string) *store.Store { return store.New(filepath.Join(dir, n)) }
	lb1, err := Init(ctx, sh, st("lb1"), "lb1")
	if err != nil {
		t.Fatal(err)
	}
	for _, n := range []string{"lb2", "lb3"} {
		fp, _, err := Join(ctx, sh, st(n), n)
		if err != nil {
			t.Fatal(err)
		}
		if err := lb1.Approve(ctx, n, fp); err != nil {
			t.Fatal(err)
		}
	}
	lb2, err := Open(ctx, sh, st("lb2"))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := Open(ctx, sh, st("lb3")); err != nil {
		t.Fatal(err)
	}
	before := map[string]map[string]string{}
	for _, h := range []string{"meta", "members", "wrapped:1"} {
		before[h], _ = sh.HGetAll(ctx, h)
	}
	if _, err := lb1.Remove(ctx, "lb3"); err != nil {
		t.Fatal(err)
	}
	if err := lb2.Refresh(ctx); err != nil || lb2.Epoch() != 2 {
		t.Fatalf("lb2 follows the rotation: epoch %d, %v", lb2.Epoch(), err)
	}
	if err := lb2.loadMembers(ctx, false); err != nil || len(lb2.Members()) != 2 {
		t.Fatalf("members after the remove: %v %v", lb2.Members(), err)
	}
	// The remove's writes are lost: Redis is back at epoch 1, lb3 a member.
	sh.HDel(ctx, "epochs", "2")
	sh.HDel(ctx, "wrapped:2", "lb1", "lb2")
	for h, m := range before {
		for f, v := range m {
			sh.HSet(ctx, h, f, v)
		}
	}
	if err := lb2.loadMembers(ctx, false); err != nil {
		t.Fatal(err)
	}
	if err := lb2.CheckSeeded(ctx); err != nil {
		t.Fatalf("lb2 puts its membership back: %v", err)
	}
	if m, _ := sh.HGetAll(ctx, "members"); len(m) != 2 || m["lb3"] != "" {
		t.Fatalf("members after the repair: %v", m)
	}
	if e, _ := sh.HGet(ctx, "meta", "epoch"); e != "2" {
		t.Fatalf("epoch after the repair: %s", e)
	}
	if _, err := Open(ctx, sh, st("lb3")); err == nil || !strings.Contains(err.Error(), "removed") {
		t.Errorf("removed lb3 opens the repaired fleet: %v", err)
	}
}

// A rebuild names its epoch in meta last, once every member's data key
// is wrapped under it: a member that follows rotations meanwhile (an
// agent that had not seen the last one before Redis was emptied) would
// otherwise find the new epoch without its own wrapped key and take
// itself for removed, for good. It holds the membership lock from its
// claim of the empty Redis on: a node that finds no epoch named waits,
// instead of putting back its own (older) membership.
func TestRebuildNamesTheEpochLast(t *testing.T) {
	_, sh := startRedis(t)
	ctx := context.Background()
	dir := t.TempDir()
	st := func(n string) *store.Store { return store.New(filepath.Join(dir, n)) }
	lb1, err := Init(ctx, sh, st("lb1"), "lb1")
	if err != nil {
		t.Fatal(err)
	}
	for _, n := range []string{"lb2", "lb3"} {
		fp, _, err := Join(ctx, sh, st(n), n)
		if err != nil {
			t.Fatal(err)
		}
		if err := lb1.Approve(ctx, n, fp); err != nil {
			t.Fatal(err)
		}
	}
	for _, n := range []string{"lb2", "lb3"} {
		if _, err := Open(ctx, sh, st(n)); err != nil {
			t.Fatal(err)
		}
	}
	sh.Client().FlushAll(ctx)
	rec := &cmdLog{}
	sh.Client().AddHook(rec)
	if _, err := Open(ctx, sh, st("lb2")); err != nil {
		t.Fatalf("rebuild: %v", err)
	}
	cmds := rec.all()
	locked, created, named, lastWrap, released := -1, -1, -1, -1, -1
	for i, c := range cmds {
		switch {
		case locked < 0 && strings.HasPrefix(c, "set lbcert:lock:membership "):
			locked = i
		case created < 0 && strings.Contains(c, " lbcert:meta id "):
			created = i
		case named < 0 && strings.HasPrefix(c, "evalsha ") && strings.Contains(c, " lbcert:meta lbcert:epochs "): // NameEpoch
			named = i
		case strings.HasPrefix(c, "hset lbcert:wrapped:1 "):
			lastWrap = i
		case released < 0 && strings.HasPrefix(c, "evalsha ") && strings.Contains(c, " lbcert:lock:membership "):
			released = i
		}
	}
	// The lock is held from the claim of the empty Redis until the epoch
	// is named, so no other node puts its own membership back meanwhile.
	if !(0 <= locked && locked < created && created < lastWrap && lastWrap < named && named < released) {
		t.Fatalf("lock %d, claim %d, last wrapped key %d, epoch named %d, unlock %d:\n%s", locked, created, lastWrap, named, released, strings.Join(cmds, "\n"))
	}
	if m, _ := sh.HGetAll(ctx, "members"); len(m) != 3 {
		t.Fatalf("members after the rebuild: %v", m)
	}
	// A member that finds meta without its epoch (the rebuild under way,
	// or its rebuilder killed) waits for it, or puts its own back.
	sh.HDel(ctx, "meta", "epoch")
	lb3, err := Open(ctx, sh, st("lb3"))
	if err != nil {
		t.Fatal(err)
	}
	if e, _ := sh.HGet(ctx, "meta", "epoch"); e != "1" {
		t.Fatalf("meta's epoch after a member opened the fleet: %q", e)
	}
	sh.HDel(ctx, "meta", "epoch")
	if err := lb3.CheckSeeded(ctx); err != nil {
		t.Fatal(err)
	}
	if e, _ := sh.HGet(ctx, "meta", "epoch"); e != "1" {
		t.Fatalf("meta's epoch after a member's check: %q", e)
	}
}

// An agent that had not followed a rotation its own node made ('fleet
// remove' run beside it) before Redis lost it takes the newer epoch from
// its node's disk: when the removed node, not knowing it yet, rebuilds
// the emptied Redis with its older key, the agent puts the newer
// membership back instead of going on under the key the removed node
// holds (invariant I5).
func TestAgentTakesTheRotationItsNodeMade(t *testing.T) {
	_, sh := startRedis(t)
	ctx := context.Background()
	dir := t.TempDir()
	st := func(n string) *store.Store { return store.New(filepath.Join(dir, n)) }
	lb1, err := Init(ctx, sh, st("lb1"), "lb1")
	if err != nil {
		t.Fatal(err)
	}
	for _, n := range []string{"lb2", "lb3"} {
		fp, _, err := Join(ctx, sh, st(n), n)
		if err != nil {
			t.Fatal(err)
		}
		if err := lb1.Approve(ctx, n, fp); err != nil {
			t.Fatal(err)
		}
	}
	agent, err := Open(ctx, sh, st("lb2"))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := Open(ctx, sh, st("lb3")); err != nil {
		t.Fatal(err)
	}
	cli, err := Open(ctx, sh, st("lb2"))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := cli.Remove(ctx, "lb3"); err != nil {
		t.Fatal(err)
	}
	sh.Client().FlushAll(ctx)
	if _, err := Open(ctx, sh, st("lb3")); err != nil {
		t.Fatalf("the removed node's rebuild: %v", err)
	}
	if e, _ := sh.HGet(ctx, "meta", "epoch"); e != "1" {
		t.Fatalf("epoch after the removed node's rebuild: %q", e)
	}
	if err := agent.Refresh(ctx); err != nil {
		t.Fatal(err)
	}
	if err := agent.CheckSeeded(ctx); err != nil {
		t.Fatal(err)
	}
	if e, _ := sh.HGet(ctx, "meta", "epoch"); e != "2" || agent.Epoch() != 2 {
		t.Fatalf("epoch after the agent's check: Redis %q, the agent %d", e, agent.Epoch())
	}
	if m, _ := sh.HGetAll(ctx, "members"); len(m) != 2 || m["lb3"] != "" {
		t.Fatalf("members after the agent's check: %v", m)
	}
}

// cmdLog records every command sent to Redis, as "name key args...".
type cmdLog struct {
	mu   sync.Mutex
	cmds []string
}

func (l *cmdLog) DialHook(next goredis.DialHook) goredis.DialHook { return next }

func (l *cmdLog) ProcessHook(next goredis.ProcessHook) goredis.ProcessHook {
	return func(ctx context.Context, cmd goredis.Cmder) error {
		l.add(cmd)
		return next(ctx, cmd)
	}
}

func (l *cmdLog) ProcessPipelineHook(next goredis.ProcessPipelineHook) goredis.ProcessPipelineHook {
	return func(ctx context.Context, cmds []goredis.Cmder) error {
		for _, c := range cmds {
			l.add(c)
		}
		return next(ctx, cmds)
	}
}

func (l *cmdLog) add(c goredis.Cmder) {
	var parts []string
	for _, a := range c.Args() {
		parts = append(parts, fmt.Sprint(a))
	}
	l.mu.Lock()
	l.cmds = append(l.cmds, strings.ToLower(parts[0])+" "+strings.Join(parts[1:], " "))
	l.mu.Unlock()
}

func (l *cmdLog) all() []string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return slices.Clone(l.cmds)
}

// The shared budget's fields go when they hold nothing any more, and
// the ones still counting stay.
func TestSweepPaceBudget(t *testing.T) {
	_, sh := startRedis(t)
	clock := time.Date(2026, 12, 1, 0, 0, 0, 0, time.UTC)
	now := func() time.Time { return clock }
	b := pace.OpenShared(PaceStore{sh}, pace.LetsEncrypt, now)
	k := pace.Key{Server: "https://ca.test/dir", Email: "ops@example.com"}
	for i := range 5 {
		if err := b.Reserve(k, pace.Order{Names: []string{fmt.Sprintf("s%d.example.com", i)}}); err != nil {
			t.Fatal(err)
		}
	}
	before, _ := PaceStore{sh}.Fields()
	if len(before) == 0 {
		t.Fatal("no pace fields after five orders")
	}
	if n, err := pace.Sweep(PaceStore{sh}, pace.LetsEncrypt, now); err != nil || n != 0 {
		t.Fatalf("sweep right after the orders removed %d fields (%v); every bucket still counts", n, err)
	}
	clock = clock.Add(8 * 24 * time.Hour) // every window refilled
	n, err := pace.Sweep(PaceStore{sh}, pace.LetsEncrypt, now)
	after, _ := PaceStore{sh}.Fields()
	if err != nil || n == 0 || len(after) != 0 {
		t.Fatalf("sweep a week later: removed %d, left %v, %v", n, after, err)
	}
}

// I5: from the moment 'fleet remove' returns, the removed node's agent
// answers no token, even before its next heartbeat would tell it; a
// member's agent follows the rotation and goes on answering. Found by
// TestFleetRandomFaults seeds 3 and 11: a removed agent answered the
// token of an order placed 1.5 s after its removal.
func TestRemovedAgentAnswersNoTokenOnceRemoveReturns(t *testing.T) {
	removedAgentAnswersNoToken(t, false)
}

// Two removals in a row, the second of a node whose agent had not yet
// followed the first's rotation (torture seed 5: 0.4 s apart): the
// removed node finds no key of the first rotation wrapped for it, and
// must still learn it was removed, not take the key for one Redis lost
// and go on answering tokens (I5).
func TestRemovedAgentBehindARotationAnswersNoToken(t *testing.T) {
	removedAgentAnswersNoToken(t, true)
}

// removedAgentAnswersNoToken removes lb2 (after lb4, when behind) and
// checks that its agent answers no token published afterwards while
// lb3's does.
func removedAgentAnswersNoToken(t *testing.T, behind bool) {
	_, sh := startRedis(t)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	dir := t.TempDir()
	lb1 := firstNode(t, sh, dir)
	get := map[string]func(token string) int{}
	for _, name := range []string{"lb2", "lb3", "lb4"} {
		st := store.New(filepath.Join(dir, name))
		fp, _, err := Join(ctx, sh, st, name)
		if err != nil {
			t.Fatal(err)
		}
		if err := lb1.Approve(ctx, name, fp); err != nil {
			t.Fatal(err)
		}
		n, err := Open(ctx, sh, st)
		if err != nil {
			t.Fatal(err)
		}
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		// A heartbeat an hour away: only the first, at connect, runs.
		a := &Agent{Connect: func(context.Context) (*Node, error) { return n, nil }, Listener: ln, Advertise: ln.Addr().String(), Beat: time.Hour}
		go a.Run(ctx)
		get[name] = func(token string) int {
			req, _ := http.NewRequest("GET", "http://"+ln.Addr().String()+"/.well-known/acme-challenge/"+token, nil)
			req.Host = "foo.com"
			resp, err := http.DefaultClient.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			resp.Body.Close()
			return resp.StatusCode
		}
	}
	waitFor(t, func() bool { ag, _ := lb1.LiveAgents(ctx); return len(ag) == 3 })
	sh.PutToken(ctx, "foo.com", "before", "before.thumb", time.Minute)
	for name, g := range get {
		if code := g("before"); code != http.StatusOK {
			t.Fatalf("%s's agent before the removal: %d, want 200", name, code)
		}
	}
	if behind {
		// The agents beat once an hour: lb2's stays at the epoch before.
		if _, err := lb1.Remove(ctx, "lb4"); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := lb1.Remove(ctx, "lb2"); err != nil {
		t.Fatal(err)
	}
	sh.PutToken(ctx, "foo.com", "after", "after.thumb", time.Minute)
	if code := get["lb2"]("after"); code != http.StatusNotFound {
		t.Errorf("removed lb2's agent answered a token published after 'fleet remove' returned: %d, want 404", code)
	}
	if code := get["lb3"]("after"); code != http.StatusOK {
		t.Errorf("member lb3's agent after the rotation: %d, want 200", code)
	}
}

// A member approved after another member last read the membership, then
// Redis emptied and rebuilt from that member's older copy: the member
// approved last is missing from Redis, at the same epoch. Seed 2 of
// TestFleetRandomFaults: the next 'fleet remove' then rotated the key
// to the members Redis listed, and the missing one lost the fleet
// without anyone removing it. Its own heartbeat (or any member holding
// the record) puts the record back; a removed node's older record is
// never put back.
func TestLostMemberRecordIsPutBack(t *testing.T) {
	_, sh := startRedis(t)
	ctx := context.Background()
	dir := t.TempDir()
	st := func(n string) *store.Store { return store.New(filepath.Join(dir, n)) }
	lb1, err := Init(ctx, sh, st("lb1"), "lb1")
	if err != nil {
		t.Fatal(err)
	}
	lb2 := joinApproved(t, sh, lb1, dir, "lb2")
	lb3 := joinApproved(t, sh, lb1, dir, "lb3") // lb2's copy on disk does not list lb3
	lb4 := joinApproved(t, sh, lb1, dir, "lb4")
	if len(lb2.st.Members) != 2 {
		t.Fatalf("lb2's copy: %v", lb2.st.Members)
	}
	sh.Client().FlushAll(ctx)
	if err := lb2.CheckSeeded(ctx); err != nil {
		t.Fatal(err)
	}
	if m, _ := sh.HGetAll(ctx, "members"); m["lb3"] != "" || m["lb4"] != "" {
		t.Fatalf("the rebuild from lb2's copy should lack lb3 and lb4: %v", m)
	}
	// lb3's heartbeat puts its own record back, with its wrapped key.
	if err := lb3.loadMembers(ctx, false); err != nil {
		t.Fatal(err)
	}
	if m, _ := sh.HGetAll(ctx, "members"); m["lb3"] == "" {
		t.Fatalf("lb3 did not put its record back: %v", m)
	}
	if w, _ := sh.HGet(ctx, "wrapped:1", "lb3"); w == "" {
		t.Fatal("lb3's wrapped key was not put back")
	}
	// lb1 (which approved lb4) puts lb4 back as it removes lb2: the
	// rotation reaches lb3 and lb4, not lb2.
	if _, err := lb1.Remove(ctx, "lb2"); err != nil {
		t.Fatal(err)
	}
	for _, n := range []*Node{lb3, lb4} {
		if err := n.Refresh(ctx); err != nil || n.Epoch() != 2 {
			t.Fatalf("%s follows the rotation: epoch %d, %v", n.Name, n.Epoch(), err)
		}
	}
	if err := lb2.Refresh(ctx); !errors.As(err, new(*Removed)) {
		t.Fatalf("lb2 after its removal: %v", err)
	}
	// lb2's copy (epoch 1, lb1 and lb2) puts nothing back under epoch 2.
	if err := lb2.loadMembers(ctx, false); err != nil {
		t.Log(err)
	}
	m, _ := sh.HGetAll(ctx, "members")
	if len(m) != 3 || m["lb2"] != "" {
		t.Fatalf("members after the removal: %v", m)
	}
	if w, _ := sh.HGet(ctx, "wrapped:2", "lb2"); w != "" {
		t.Fatal("the removed node has a key of epoch 2")
	}
}

// Only a rotation that names a node removed makes it take itself for
// removed: a member that finds no key wrapped for it (Redis lost it,
// seed 2 of the fault test) waits, and a member holding its record puts
// the key back. Naming an epoch into a Redis emptied meanwhile is
// refused, so no fleet record is left without its ID or its epoch.
func TestMissingWrappedKeyIsNotARemoval(t *testing.T) {
	_, sh := startRedis(t)
	ctx := context.Background()
	dir := t.TempDir()
	st := func(n string) *store.Store { return store.New(filepath.Join(dir, n)) }
	lb1, err := Init(ctx, sh, st("lb1"), "lb1")
	if err != nil {
		t.Fatal(err)
	}
	lb2, lb3 := joinApproved(t, sh, lb1, dir, "lb2"), joinApproved(t, sh, lb1, dir, "lb3")
	if _, err := lb1.Remove(ctx, "lb3"); err != nil {
		t.Fatal(err)
	}
	sh.HDel(ctx, "wrapped:2", "lb2") // lost
	var nw *NotWrapped
	if err := lb2.Refresh(ctx); !errors.As(err, &nw) {
		t.Fatalf("lb2 without its key: %v, want NotWrapped", err)
	}
	if l, _ := readLocal(lb2.Local); l.Removed != 0 {
		t.Fatal("lb2 took itself for removed")
	}
	if err := lb3.Refresh(ctx); !errors.As(err, new(*Removed)) {
		t.Fatalf("lb3, which the rotation names: %v, want Removed", err)
	}
	if err := lb1.loadMembers(ctx, false); err != nil {
		t.Fatal(err)
	}
	if err := lb2.Refresh(ctx); err != nil || lb2.Epoch() != 2 {
		t.Fatalf("lb2 once lb1 put its key back: epoch %d, %v", lb2.Epoch(), err)
	}
	// An epoch is named only beside its record and the fleet's ID.
	sh.Client().FlushAll(ctx)
	if err := sh.NameEpoch(ctx, 2); !errors.Is(err, rdb.ErrLostWrites) {
		t.Fatalf("naming an epoch into an emptied Redis: %v", err)
	}
	if m, _ := sh.HGetAll(ctx, "meta"); len(m) != 0 {
		t.Fatalf("meta after a refused naming: %v", m)
	}
	// A fleet record left without its ID (by an earlier release) is
	// replaced by the rebuild, not refused.
	sh.HSet(ctx, "meta", "epoch", "2")
	if err := lb2.CheckSeeded(ctx); err != nil {
		t.Fatal(err)
	}
	if e, _ := sh.HGet(ctx, "meta", "epoch"); e != "2" {
		t.Fatalf("epoch after the rebuild: %q", e)
	}
	if rec, _ := sh.HGet(ctx, "epochs", "2"); rec == "" {
		t.Fatal("the rebuild named epoch 2 without its record")
	}
}

// A node that joined after epoch 1 repairs a Redis a lagging node
// rebuilt at epoch 1 (seed 2 of the fault test): what is sealed under
// the key it never had is dropped for the members to give back, never
// left readable by the node removed at epoch 2, and the repair does not
// stop on it.
func TestLateJoinerRepairsAnOlderEpoch(t *testing.T) {
	_, sh := startRedis(t)
	ctx := context.Background()
	dir := t.TempDir()
	st := func(n string) *store.Store { return store.New(filepath.Join(dir, n)) }
	lb1, err := Init(ctx, sh, st("lb1"), "lb1")
	if err != nil {
		t.Fatal(err)
	}
	joinApproved(t, sh, lb1, dir, "lb2")
	if _, err := lb1.Remove(ctx, "lb2"); err != nil {
		t.Fatal(err)
	}
	lb3 := joinApproved(t, sh, lb1, dir, "lb3") // joins at epoch 2: never had key 1
	key1, _ := lb1.key(1)
	sh.HSet(ctx, "meta", "epoch", "1") // rebuilt at epoch 1 by a node that had not followed
	for _, by := range []string{"lb1", "lb2"} {
		name := by + ".example"
		sealed, err := seal(key1, bundleAD(lb1.ID, name, 1), []byte("KEY"))
		if err != nil {
			t.Fatal(err)
		}
		if err := sh.Publish(ctx, &rdb.Bundle{Name: name, Version: 1, Epoch: 1, Node: by, NotBefore: time.Now(), SealedKey: sealed}); err != nil {
			t.Fatal(err)
		}
	}
	if err := lb3.CheckSeeded(ctx); err != nil {
		t.Fatalf("lb3's repair: %v", err)
	}
	if e, _ := sh.HGet(ctx, "meta", "epoch"); e != "2" {
		t.Fatalf("epoch after the repair: %s", e)
	}
	names, _ := sh.Names(ctx)
	for _, name := range names {
		if b, err := sh.Bundle(ctx, name); err == nil && b.Epoch != 2 {
			t.Errorf("%s still sealed under epoch %d", name, b.Epoch)
		}
	}
}

// joinApproved joins name (its state under dir) to by's fleet, has by
// approve it, and opens it.
// firstNode starts a fleet on sh with lb1, its state under dir/lb1.
func firstNode(t *testing.T, sh *rdb.Shared, dir string) *Node {
	t.Helper()
	lb1, err := Init(context.Background(), sh, store.New(filepath.Join(dir, "lb1")), "lb1")
	if err != nil {
		t.Fatal(err)
	}
	return lb1
}

func joinApproved(t *testing.T, sh *rdb.Shared, by *Node, dir, name string) *Node {
	t.Helper()
	ctx := context.Background()
	st := store.New(filepath.Join(dir, name))
	fp, _, err := Join(ctx, sh, st, name)
	if err != nil {
		t.Fatal(err)
	}
	if err := by.Approve(ctx, name, fp); err != nil {
		t.Fatal(err)
	}
	n, err := Open(ctx, sh, st)
	if err != nil {
		t.Fatal(err)
	}
	return n
}

func TestMain(m *testing.M) {
	if dir := os.Getenv("LBCERT_TEST_LEDGER_WRITER"); dir != "" {
		ledgerWriter(dir, os.Getenv("LBCERT_TEST_LEDGER_PREFIX"))
		return
	}
	// No agent runs beside these tests' nodes to look at a rebuilt Redis
	// (awaitLooked): a rebuild would wait its whole bound each time.
	// TestLaggingRebuilderSealsUnderTheNewerEpoch sets it back.
	lookWait = 0
	deleteWait = 0 // nor to take a delete
	os.Exit(m.Run())
}

// A node that had not followed a rotation rebuilds an emptied Redis
// (seed 2 of the fault test: FLUSHALL right after 'fleet remove'
// returned): before it seals anything, the member that made the
// rotation looks, puts its epoch back, and the lagging node seals under
// the newer key, never under the one the removed node holds (I5).
func TestLaggingRebuilderSealsUnderTheNewerEpoch(t *testing.T) {
	lookWait = 10 * time.Second
	defer func() { lookWait = 0 }()
	_, sh := startRedis(t)
	ctx := context.Background()
	dir := t.TempDir()
	lb1 := firstNode(t, sh, dir)
	lb2 := joinApproved(t, sh, lb1, dir, "lb2")
	joinApproved(t, sh, lb1, dir, "lb3")
	lb2.loadMembers(ctx, false) // lb2's copy lists lb3
	if _, err := lb1.Remove(ctx, "lb3"); err != nil {
		t.Fatal(err)
	}
	// lb2 holds a certificate, and has not followed epoch 2.
	st2 := lb2.Local
	if _, _, err := st2.Save(&store.Lineage{Name: "a.example", Domains: []string{"a.example"}, IssuedAt: time.Now(), Cert: store.CertInfo{Serial: "0a", NotBefore: time.Now(), NotAfter: time.Now().Add(time.Hour)}},
		store.Files{Cert: []byte("C"), Chain: []byte("CH"), Fullchain: []byte("F"), Key: []byte("K")}); err != nil {
		t.Fatal(err)
	}
	sh.Client().FlushAll(ctx)
	done := make(chan error, 1)
	go func() { done <- lb2.CheckSeeded(ctx) }() // rebuilds at epoch 1, then waits for lb1 to look
	time.Sleep(time.Second)
	if err := lb1.CheckSeeded(ctx); err != nil { // lb1 looks: puts epoch 2 back
		t.Fatal(err)
	}
	if err := <-done; err != nil {
		t.Fatalf("lb2's rebuild: %v", err)
	}
	if lb2.Epoch() != 2 {
		t.Fatalf("lb2 after the rebuild: epoch %d, want 2", lb2.Epoch())
	}
	b, err := sh.Bundle(ctx, "a.example")
	if err != nil || b.Epoch != 2 {
		t.Fatalf("lb2's certificate in the rebuilt Redis: %+v, %v; want it sealed under epoch 2", b, err)
	}
}

// An agent gives a lost version back only to a Redis generation its node
// has caught up with (seed 1 of the fault test: right after a FLUSHALL,
// an agent that had not followed the latest rotation republished its
// certificates under the removed node's key before any member looked).
func TestGiveBackWaitsForTheCatchUp(t *testing.T) {
	_, sh := startRedis(t)
	ctx := context.Background()
	st := store.New(t.TempDir())
	lb1, err := Init(ctx, sh, st, "lb1")
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := st.Save(&store.Lineage{Name: "a.example", Domains: []string{"a.example"}, IssuedAt: time.Now(), Cert: store.CertInfo{Serial: "0a", NotBefore: time.Now(), NotAfter: time.Now().Add(time.Hour)}},
		store.Files{Cert: []byte("C"), Chain: []byte("CH"), Fullchain: []byte("F"), Key: []byte("K")}); err != nil {
		t.Fatal(err)
	}
	s := &Syncer{N: lb1, Local: st}
	sh.HSet(ctx, "meta", "gen", "rebuilt-meanwhile")
	if err := s.giveBack(ctx, nil); err != nil {
		t.Fatal(err)
	}
	if names, _ := sh.Names(ctx); len(names) != 0 {
		t.Fatalf("given back before the catch-up: %v", names)
	}
	lb1.save(func(l *local) { l.Gen = "rebuilt-meanwhile" })
	if err := s.giveBack(ctx, nil); err != nil {
		t.Fatal(err)
	}
	if names, _ := sh.Names(ctx); len(names) != 1 {
		t.Fatalf("after the catch-up: %v, want a.example given back", names)
	}
}
