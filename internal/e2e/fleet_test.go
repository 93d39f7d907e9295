package e2e

import (
	"bytes"
	"context"
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"filippo.io/age"
	goredis "github.com/redis/go-redis/v9"

	"github.com/lbcert/lbcert/internal/testenv"
)

// fleetPassword is the test Redis's password: it must appear in no argv,
// output, or Redis value.
const fleetPassword = "fleet-redis-pw-7c1e"

// fleetEnv is a pool of nodes on one machine: one Pebble whose
// validation port is an HAProxy frontend with "balance random" over the
// nodes' agents, one Redis, and per node its own --dir and agent.
type fleetEnv struct {
	*env
	redis    *testenv.Redis
	sentinel *testenv.Sentinel
	url      string // --redis
	nodes    map[string]*fleetNode
	order    []string
	haproxy  *testenv.HAProxy
	hdir     string
}

type fleetNode struct {
	name   string
	dir    string
	port   int // agent
	agent  *exec.Cmd
	log    *bytes.Buffer
	logMu  *sync.Mutex
	cancel context.CancelFunc
}

func newFleet(t *testing.T, nodes ...string) *fleetEnv {
	t.Helper()
	return newFleetWith(t, testenv.PebbleOptions{}, nodes...)
}

// newFleetWith is newFleet with Pebble's options (its HTTP port is the
// fleet's).
func newFleetWith(t *testing.T, o testenv.PebbleOptions, nodes ...string) *fleetEnv {
	t.Helper()
	httpPort, err := testenv.FreePort()
	if err != nil {
		t.Fatal(err)
	}
	o.HTTPPort = httpPort
	e := newEnv(t, o)
	r, err := testenv.StartRedis(filepath.Join(e.work, "redis"), fleetPassword, nil)
	if err != nil {
		t.Fatalf("start redis: %v", err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("redis log:\n%s", r.Log())
		}
		r.Stop()
	})
	f := &fleetEnv{env: e, redis: r, url: r.URL(), nodes: map[string]*fleetNode{}, hdir: filepath.Join(e.work, "haproxy")}
	for _, n := range nodes {
		port, err := testenv.FreePort()
		if err != nil {
			t.Fatal(err)
		}
		f.nodes[n] = &fleetNode{name: n, dir: filepath.Join(e.work, n), port: port, log: &bytes.Buffer{}, logMu: &sync.Mutex{}}
		f.order = append(f.order, n)
	}
	return f
}

// on runs lbcert on node n, in fleet mode.
func (f *fleetEnv) on(n string, args ...string) result {
	f.t.Helper()
	full := append([]string{"--dir", f.nodes[n].dir, "--redis", f.url}, args...)
	return f.runEnv([]string{"LBCERT_REDIS_PASSWORD=" + fleetPassword}, full...)
}

func (f *fleetEnv) mustOn(n string, args ...string) result {
	f.t.Helper()
	r := f.on(n, args...)
	if r.code != 0 {
		f.t.Fatalf("%s: lbcert %s: exit %d\n%s", n, strings.Join(args, " "), r.code, r.stderr)
	}
	return r
}

var fingerprintRe = regexp.MustCompile(`fingerprint: (age1[0-9a-z]+)`)

// form makes the fleet: init on the first node, join and approve the rest.
func (f *fleetEnv) form() {
	f.t.Helper()
	first := f.order[0]
	f.mustOn(first, "fleet", "init", "--node", first)
	for _, n := range f.order[1:] {
		r := f.mustOn(n, "fleet", "join", "--node", n)
		m := fingerprintRe.FindStringSubmatch(r.stdout)
		if m == nil {
			f.t.Fatalf("join printed no fingerprint:\n%s", r.stdout)
		}
		f.mustOn(first, "fleet", "approve", n, "--fingerprint", m[1])
	}
}

// startAgent starts node n's agent and waits for its heartbeat.
func (f *fleetEnv) startAgent(n string, extra ...string) {
	f.t.Helper()
	f.spawnAgent(n, extra...)
	f.waitHeartbeat(n, 15*time.Second)
}

// spawnAgent starts node n's agent without waiting for it (Redis may be
// down).
func (f *fleetEnv) spawnAgent(n string, extra ...string) {
	f.t.Helper()
	node := f.nodes[n]
	ctx, cancel := context.WithCancel(context.Background())
	args := append([]string{"-v", "--dir", node.dir, "--redis", f.url, "agent", "--http-addr", fmt.Sprintf("127.0.0.1:%d", node.port)}, extra...)
	cmd := exec.CommandContext(ctx, lbcertBin, args...)
	cmd.Cancel = func() error { return cmd.Process.Signal(syscall.SIGTERM) }
	cmd.WaitDelay = 10 * time.Second
	cmd.Env = append(os.Environ(), "LBCERT_CONFIG=", "LBCERT_REDIS_PASSWORD="+fleetPassword)
	w := &lockedWriter{b: node.log, mu: node.logMu}
	cmd.Stdout, cmd.Stderr = w, w
	if err := cmd.Start(); err != nil {
		f.t.Fatal(err)
	}
	node.agent, node.cancel = cmd, cancel
	f.t.Cleanup(func() {
		if f.t.Failed() {
			// Where each goroutine of the agent waits, in its log.
			cmd.Process.Signal(syscall.SIGQUIT)
			time.Sleep(500 * time.Millisecond)
		}
		cancel()
		cmd.Wait()
		if f.t.Failed() {
			f.t.Logf("agent %s log:\n%s", n, node.agentLog())
		}
	})
}

// waitHeartbeat waits until node n's agent heartbeats in Redis.
func (f *fleetEnv) waitHeartbeat(n string, limit time.Duration) {
	f.t.Helper()
	node := f.nodes[n]
	c := f.rdb()
	defer c.Close()
	deadline := time.Now().Add(limit)
	for time.Now().Before(deadline) {
		if v, _ := c.Exists(context.Background(), "lbcert:agent:"+n).Result(); v == 1 {
			return
		}
		time.Sleep(100 * time.Millisecond)
	}
	f.t.Fatalf("agent %s sent no heartbeat in %s:\n%s", n, limit, node.agentLog())
}

type lockedWriter struct {
	b  *bytes.Buffer
	mu *sync.Mutex
}

func (w *lockedWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.b.Write(p)
}

func (n *fleetNode) agentLog() string {
	n.logMu.Lock()
	defer n.logMu.Unlock()
	return n.b().String()
}

func (n *fleetNode) b() *bytes.Buffer { return n.log }

// caAnswers counts the HTTP-01 requests node n's agent answered for the
// CA (not the orderers' own checks).
func (n *fleetNode) caAnswers() int {
	c := 0
	for _, l := range strings.Split(n.agentLog(), "\n") {
		if strings.Contains(l, "answered HTTP-01") && !strings.Contains(l, "lbcert-fleet-check") {
			c++
		}
	}
	return c
}

// validateVia points Pebble's validation port at the given nodes'
// agents, through HAProxy with "balance random".
func (f *fleetEnv) validateVia(nodes ...string) {
	f.t.Helper()
	os.MkdirAll(f.hdir, 0o755)
	var servers strings.Builder
	for _, n := range nodes {
		fmt.Fprintf(&servers, "    server %s 127.0.0.1:%d\n", n, f.nodes[n].port)
	}
	listen := fmt.Sprintf("127.0.0.1:%d", f.pebble.HTTPPort)
	path := filepath.Join(f.hdir, "haproxy.cfg")
	if err := os.WriteFile(path, []byte(agentsFrontConf(listen, servers.String())), 0o644); err != nil {
		f.t.Fatal(err)
	}
	if f.haproxy != nil {
		f.haproxy.Stop()
	}
	h, err := testenv.StartHAProxy(f.hdir, path, listen)
	if err != nil {
		f.t.Fatalf("start haproxy: %v", err)
	}
	f.haproxy = h
	f.t.Cleanup(h.Stop)
}

// agentsFrontConf is the HAProxy config of the front on the port Pebble
// validates HTTP-01 on: "balance random" over the agents' server lines,
// as a real pool's front spreads the CA's requests.
func agentsFrontConf(listen, servers string) string {
	return fmt.Sprintf(`global
    maxconn 500
defaults
    mode http
    timeout connect 2s
    timeout client 10s
    timeout server 10s
frontend acme
    bind %s
    default_backend agents
backend agents
    balance random
%s`, listen, servers)
}

func (f *fleetEnv) rdb() *goredis.Client {
	if f.sentinel != nil {
		return goredis.NewFailoverClient(&goredis.FailoverOptions{MasterName: f.sentinel.Master,
			SentinelAddrs: []string{f.sentinel.Addr()}, Password: fleetPassword, SentinelPassword: fleetPassword})
	}
	return goredis.NewClient(&goredis.Options{Addr: f.redis.Addr(), Password: fleetPassword})
}

// fleetNames are the lineages in Redis.
func (f *fleetEnv) fleetNames() []string {
	c := f.rdb()
	defer c.Close()
	n, err := c.SMembers(context.Background(), "lbcert:lineages").Result()
	if err != nil {
		f.t.Fatalf("read lineages from redis: %v", err)
	}
	return n
}

// failedValidations counts authorizations Pebble set invalid.
func (f *fleetEnv) failedValidations() int {
	return strings.Count(f.pebble.FullLog(), "set INVALID by completed challenge")
}

// writeCSV writes a header-format batch file of names fleetNNN.example.com.
func (f *fleetEnv) writeCSV(name string, from, to int) string {
	var b strings.Builder
	b.WriteString("domains\n")
	for i := from; i < to; i++ {
		fmt.Fprintf(&b, "fleet%03d.example.com\n", i)
	}
	path := filepath.Join(f.work, name)
	if err := os.WriteFile(path, []byte(b.String()), 0o644); err != nil {
		f.t.Fatal(err)
	}
	return path
}

// batchAll runs the same batch on every node at the same moment.
func (f *fleetEnv) batchAll(csv string, extra ...string) map[string]result {
	var wg sync.WaitGroup
	var mu sync.Mutex
	out := map[string]result{}
	start := make(chan struct{})
	for _, n := range f.order {
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-start
			// The budget is the fleet's: one per registered domain, so 100
			// names under example.com need the per-domain limit off.
			r := f.on(n, append([]string{"batch", csv, "--preflight=false", "--agree-tos", "--rate-domain", "off"}, extra...)...)
			mu.Lock()
			out[n] = r
			mu.Unlock()
		}()
	}
	close(start)
	wg.Wait()
	return out
}

// scanRedis returns every key and value (hash fields too) in Redis.
func (f *fleetEnv) scanRedis() map[string][]byte {
	c := f.rdb()
	defer c.Close()
	out, err := dumpRedis(c)
	if err != nil {
		f.t.Fatal(err)
	}
	return out
}

// T1, T2 and T8 over one fleet of three nodes.
func TestFleetOneOrderPerName(t *testing.T) {
	f := newFleet(t, "lb1", "lb2", "lb3")
	f.form()
	for _, n := range f.order {
		f.startAgent(n)
	}

	// Bad input in fleet mode: one line naming the agent, nothing ordered.
	if r := f.on("lb1", "issue", "-d", "x.example.com", "--standalone", "--agree-tos"); r.code != 1 || !strings.Contains(r.stderr, "agent") {
		t.Errorf("issue --standalone in fleet mode: exit %d\n%s", r.code, r.stderr)
	}

	// T2: the node that orders is not behind the validation address.
	f.validateVia("lb2", "lb3")
	before := f.pebble.Orders()
	f.mustOn("lb1", "issue", "-d", "peer0.example.com", "-d", "peer1.example.com", "--agree-tos")
	r := f.mustOn("lb1", "batch", f.writeCSV("peers.csv", 900, 905), "--preflight=false")
	if got := f.pebble.Orders() - before; got != 6 {
		t.Errorf("T2: %d orders, want 6\n%s", got, r.stdout)
	}
	if n := f.failedValidations(); n != 0 {
		t.Errorf("T2: %d failed validations", n)
	}
	if a := f.nodes["lb1"].caAnswers(); a != 0 {
		t.Errorf("T2: lb1 is out of the pool but answered %d CA requests", a)
	}
	if a := f.nodes["lb2"].caAnswers() + f.nodes["lb3"].caAnswers(); a < 7 {
		t.Errorf("T2: the peers answered %d CA requests, want at least 7 (one per name)", a)
	}

	// T1: three nodes start the same 100-row batch at the same moment.
	f.validateVia("lb1", "lb2", "lb3")
	before = f.pebble.Orders()
	csv := f.writeCSV("t1.csv", 0, 100)
	res := f.batchAll(csv)
	for n, r := range res {
		if r.code != 0 && r.code != 2 {
			t.Errorf("T1: %s exit %d\n%s", n, r.code, r.stderr)
		}
	}
	if got := f.settledOrders() - before; got != 100 {
		t.Errorf("T1: %d orders at Pebble, want exactly 100", got)
	}
	if n := f.failedValidations(); n != 0 {
		t.Errorf("T1: %d failed validations", n)
	}
	if got := len(f.fleetNames()); got != 100+6 {
		t.Errorf("T1: %d lineages in Redis, want 106", got)
	}
	// The same batch again, from any node, orders nothing.
	before = f.pebble.Orders()
	if r := f.mustOn("lb3", "batch", csv, "--preflight=false", "--rate-domain", "off"); f.pebble.Orders() != before {
		t.Errorf("re-run ordered %d\n%s", f.pebble.Orders()-before, r.stdout)
	}

	// T8: no private key in Redis, in any form.
	values := f.scanRedis()
	var keysDER [][]byte
	for _, n := range f.order {
		paths, _ := filepath.Glob(filepath.Join(f.nodes[n].dir, "archive", "*", "*", "privkey.pem"))
		for _, p := range paths {
			data, _ := os.ReadFile(p)
			b, _ := pem.Decode(data)
			if b == nil {
				t.Fatalf("%s: no PEM", p)
			}
			if _, err := x509.ParsePKCS8PrivateKey(b.Bytes); err != nil {
				if _, err := x509.ParseECPrivateKey(b.Bytes); err != nil {
					t.Fatalf("%s: %v", p, err)
				}
			}
			keysDER = append(keysDER, b.Bytes)
		}
	}
	if len(keysDER) < 106 {
		t.Fatalf("found %d private keys on the nodes, want at least 106", len(keysDER))
	}
	for k, v := range values {
		if bytes.Contains(v, []byte("PRIVATE KEY")) {
			t.Errorf("T8: %s holds a PEM private key", k)
		}
		if bytes.Contains(v, []byte(fleetPassword)) {
			t.Errorf("T8: %s holds the Redis password", k)
		}
		for _, d := range keysDER {
			if bytes.Contains(v, d[len(d)-32:]) {
				t.Errorf("T8: %s holds raw private key bytes", k)
			}
		}
	}

	// T5: Redis comes back empty; renew on one node orders nothing, and
	// the nodes (their agents) rebuild the fleet from their disks.
	ctx := context.Background()
	c := f.rdb()
	defer c.Close()
	c.FlushAll(ctx)
	before = f.pebble.Orders()
	f.mustOn("lb2", "renew", "--no-random-sleep")
	deadline := time.Now().Add(30 * time.Second)
	for len(f.fleetNames()) < 106 && time.Now().Before(deadline) {
		time.Sleep(200 * time.Millisecond)
	}
	if got := len(f.fleetNames()); got != 106 {
		t.Errorf("T5: %d lineages in Redis after the rebuild, want 106", got)
	}
	if got := f.pebble.Orders() - before; got != 0 {
		t.Errorf("T5: renew after FLUSHALL placed %d orders", got)
	}
	f.mustOn("lb1", "renew", "--no-random-sleep")
	if got := f.pebble.Orders() - before; got != 0 {
		t.Errorf("T5: renew on the rebuilt fleet placed %d orders", got)
	}

	// T8: approve with a wrong fingerprint is refused.
	j := f.mustOn("lb1", "--dir", filepath.Join(f.work, "lb4"), "fleet", "join", "--node", "lb4")
	fp2 := fingerprintRe.FindStringSubmatch(f.mustOn("lb1", "--dir", filepath.Join(f.work, "lb5"), "fleet", "join", "--node", "lb5").stdout)[1]
	if r := f.on("lb1", "fleet", "approve", "lb4", "--fingerprint", fp2); r.code != 1 || !strings.Contains(r.stderr, "refusing") {
		t.Errorf("T8: approve with another node's fingerprint: exit %d\n%s", r.code, r.stderr)
	}
	if r := f.on("lb1", "--dir", filepath.Join(f.work, "lb4"), "renew"); r.code == 0 {
		t.Errorf("T8: an unapproved node ran renew:\n%s", r.stderr)
	}
	_ = j

	// T8: a bundle moved to another name does not open: the rotation
	// refuses to start, naming it, and changes nothing.
	saved, err := c.Dump(ctx, "lbcert:bundle:fleet001.example.com").Result()
	if err != nil {
		t.Fatal(err)
	}
	moved, err := c.Dump(ctx, "lbcert:bundle:fleet000.example.com").Result()
	if err != nil {
		t.Fatal(err)
	}
	if err := c.RestoreReplace(ctx, "lbcert:bundle:fleet001.example.com", 0, moved).Err(); err != nil {
		t.Fatal(err)
	}
	if r := f.on("lb1", "fleet", "remove", "lb3"); r.code != 1 || !strings.Contains(r.stderr, "fleet001.example.com") || !strings.Contains(r.stderr, "does not open") {
		t.Errorf("T8: rotation over a moved bundle: exit %d\n%s", r.code, r.stderr)
	}
	if ep := c.HGet(ctx, "lbcert:meta", "epoch").Val(); ep != "1" {
		t.Errorf("T8: the refused rotation changed the epoch to %s", ep)
	}
	if err := c.RestoreReplace(ctx, "lbcert:bundle:fleet001.example.com", 0, saved).Err(); err != nil {
		t.Fatal(err)
	}

	// T8: after fleet remove lb3, lb3 can open nothing published later,
	// and its agent answers no token (invariant I5): the operator takes
	// it out of the pool the CA validates through, as the README says.
	f.mustOn("lb1", "fleet", "remove", "lb3")
	f.validateVia("lb1", "lb2")
	if r := f.on("lb1", "renew", "--force", "--name", "fleet002.example.com", "--no-random-sleep"); r.code != 0 {
		keys, _ := c.Keys(ctx, "lbcert:agent:*").Result()
		// Why no heartbeat, if none: expired (expired_keys, Redis's
		// clock against ours) or never written.
		stats, _ := c.Info(ctx, "stats").Result()
		var expired string
		for _, l := range strings.Split(stats, "\n") {
			if strings.HasPrefix(l, "expired_keys:") {
				expired = strings.TrimSpace(l)
			}
		}
		rt, _ := c.Time(ctx).Result()
		t.Fatalf("renew after the rotation: exit %d; members %v; agents %v; meta %v; redis %s, its clock %s ahead of ours", r.code, c.HKeys(ctx, "lbcert:members").Val(), keys, c.HGetAll(ctx, "lbcert:meta").Val(), expired, rt.Sub(time.Now()))
	}
	if ep := c.HGet(ctx, "lbcert:bundle:fleet002.example.com", "epoch").Val(); ep != "2" {
		t.Errorf("T8: bundle published after the removal is sealed under epoch %s, want 2", ep)
	}
	idData, err := os.ReadFile(filepath.Join(f.nodes["lb3"].dir, "fleet", "identity.txt"))
	if err != nil {
		t.Fatal(err)
	}
	ids, err := age.ParseIdentities(bytes.NewReader(idData))
	if err != nil {
		t.Fatal(err)
	}
	wrapped := c.HGetAll(ctx, "lbcert:wrapped:2").Val()
	if len(wrapped) != 2 {
		t.Errorf("T8: epoch 2 is wrapped for %d nodes, want lb1 and lb2", len(wrapped))
	}
	for node, w := range wrapped {
		if _, err := age.Decrypt(strings.NewReader(w), ids...); err == nil {
			t.Errorf("T8: lb3's identity opens the epoch-2 data key wrapped for %s", node)
		}
	}
	if r := f.on("lb3", "renew", "--no-random-sleep"); r.code != 1 || !strings.Contains(r.stderr, "removed") {
		t.Errorf("T8: removed lb3 ran renew: exit %d\n%s", r.code, r.stderr)
	}
	// lb2 follows the rotation and keeps working.
	f.mustOn("lb2", "renew", "--no-random-sleep")
	// delete on one node deletes for the fleet, even a lineage another
	// node ordered, and the node that holds it does not bring it back.
	f.mustOn("lb2", "delete", "--name", "peer0.example.com", "--yes")
	f.mustOn("lb1", "renew", "--no-random-sleep")
	for _, n := range f.fleetNames() {
		if n == "peer0.example.com" {
			t.Error("the deleted lineage is still in the fleet")
		}
	}
	if r := f.on("lb1", "delete", "--name", "peer0.example.com", "--yes"); r.code != 1 || !strings.Contains(r.stderr, "no lineage") {
		t.Errorf("deleting it again: exit %d\n%s", r.code, r.stderr)
	}

	// A node whose agent died (its heartbeat not yet expired): the order
	// is abandoned before the CA validates, no failed validation is
	// spent, the report names the node, and the name gets no backoff.
	f.nodes["lb2"].agent.Process.Kill()
	failed := f.failedValidations()
	r = f.on("lb1", "issue", "-d", "deadagent.example.com", "--agree-tos")
	if r.code != 1 || !strings.Contains(r.stderr, "node lb2's agent at 127.0.0.1:") || !strings.Contains(r.stderr, "no failed validation was spent") {
		t.Errorf("order with lb2's agent dead: exit %d\n%s", r.code, r.stderr)
	}
	if n := f.failedValidations(); n != failed {
		t.Errorf("the dead agent cost %d failed validations", n-failed)
	}
	if st := c.Get(ctx, "lbcert:status:deadagent.example.com").Val(); strings.Contains(st, "next_attempt") {
		t.Errorf("the name was put into backoff for a dead agent: %s", st)
	}
	for k, v := range f.scanRedis() {
		if bytes.Contains(v, []byte("PRIVATE KEY")) {
			t.Errorf("T8: after rotation %s holds a PEM private key", k)
		}
	}
}

// ordersPerName counts "requesting certificate" lines per lineage name
// in the runs' output: how many orders lbcert placed for each.
func ordersPerName(outputs ...string) map[string]int {
	re := regexp.MustCompile(`requesting certificate name=(\S+)`)
	out := map[string]int{}
	for _, o := range outputs {
		for _, m := range re.FindAllStringSubmatch(o, -1) {
			out[m[1]]++
		}
	}
	return out
}

// T6: the lease holder stalls (SIGSTOP) for twice the lease while it
// orders; another node takes the name over. At most one extra order, no
// third, and the stalled holder's certificate is refused.
func TestFleetStalledLeaseHolder(t *testing.T) {
	f := newFleet(t, "lb1", "lb2")
	f.pool()
	const ttl = 3 * time.Second
	before := f.pebble.Orders()

	ctx, cancel := context.WithTimeout(context.Background(), runDeadline)
	defer cancel()
	cmd := f.command(ctx, "--dir", f.nodes["lb1"].dir, "--redis", f.url, "--lease-ttl", ttl.String(), "issue", "-d", "stall.example.com", "--agree-tos")
	cmd.Env = append(cmd.Env, "LBCERT_REDIS_PASSWORD="+fleetPassword)
	stderr, _ := cmd.StderrPipe()
	var stalledOut bytes.Buffer
	cmd.Stdout = &stalledOut
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	stopped := make(chan struct{})
	var errOut bytes.Buffer
	go func() {
		buf := make([]byte, 4096)
		once := sync.Once{}
		for {
			n, err := stderr.Read(buf)
			errOut.Write(buf[:n])
			if strings.Contains(errOut.String(), "requesting certificate") {
				once.Do(func() {
					cmd.Process.Signal(syscall.SIGSTOP)
					close(stopped)
				})
			}
			if err != nil {
				return
			}
		}
	}()
	select {
	case <-stopped:
	case <-time.After(time.Minute):
		t.Fatalf("lb1 never started ordering:\n%s", errOut.String())
	}
	time.Sleep(2 * ttl)
	r := f.on("lb2", "--lease-ttl", ttl.String(), "issue", "-d", "stall.example.com", "--agree-tos")
	if r.code != 0 {
		t.Fatalf("lb2 could not take over the stalled name: exit %d\n%s", r.code, r.stderr)
	}
	published := f.rdb().HGet(context.Background(), "lbcert:bundle:stall.example.com", "cert").Val()
	cmd.Process.Signal(syscall.SIGCONT)
	err := cmd.Wait()
	t.Logf("stalled lb1:\n%s%s(%v)", stalledOut.String(), errOut.String(), err)
	if err == nil {
		t.Error("the stalled holder's run succeeded; its certificate must be refused")
	}
	if !strings.Contains(errOut.String(), "refused this certificate") {
		t.Errorf("the stalled holder did not say its certificate was refused:\n%s", errOut.String())
	}
	if got := f.rdb().HGet(context.Background(), "lbcert:bundle:stall.example.com", "cert").Val(); got != published || got == "" {
		t.Error("the stalled holder replaced the newer certificate in the fleet")
	}
	if got := f.settledOrders() - before; got > 2 {
		t.Errorf("%d orders for one name, want at most 2", got)
	}
	// No third: both nodes see the name as done.
	mid := f.pebble.Orders()
	f.mustOn("lb1", "renew", "--no-random-sleep")
	f.mustOn("lb2", "renew", "--no-random-sleep")
	f.mustOn("lb1", "issue", "-d", "stall.example.com", "--agree-tos")
	if got := f.pebble.Orders() - mid; got != 0 {
		t.Errorf("a third order: %d more after the take-over", got)
	}
}

// pool forms a fleet of two nodes, starts their agents, and lets the
// CA validate through both.
func (f *fleetEnv) pool() {
	f.t.Helper()
	f.form()
	f.startAgent("lb1")
	f.startAgent("lb2")
	f.validateVia("lb1", "lb2")
}

// batchUntil starts the same batch on every node and returns once Pebble
// has received n more orders; the channel gives the runs' results.
func (f *fleetEnv) batchUntil(csv string, n int) <-chan map[string]result {
	before := f.pebble.Orders()
	done := make(chan map[string]result, 1)
	go func() { done <- f.batchAll(csv) }()
	for f.pebble.Orders()-before < n {
		time.Sleep(20 * time.Millisecond)
	}
	return done
}

// T4: redis-server is killed with SIGKILL mid-batch and restarted 5 s
// later. No name is ordered twice, no validation fails, and the batch
// finishes on a re-run with nothing lost.
func TestFleetRedisKilledMidBatch(t *testing.T) {
	f := newFleet(t, "lb1", "lb2")
	f.pool()
	csv := f.writeCSV("t4.csv", 0, 30)
	before := f.pebble.Orders()
	done := f.batchUntil(csv, 8)
	f.redis.Kill()
	killed := time.Now()
	// A run that starts while Redis is away: one line naming Redis, exit
	// 4, and the mailed report says so.
	smtp, err := testenv.StartSMTP(f.work, "lbcert", smtpSecret)
	if err != nil {
		t.Fatal(err)
	}
	defer smtp.Stop()
	mailEnv := []string{"LBCERT_REDIS_PASSWORD=" + fleetPassword,
		"LBCERT_SMTP_HOST=" + smtp.Host, fmt.Sprintf("LBCERT_SMTP_PORT=%d", smtp.Port),
		"LBCERT_SMTP_USER=lbcert", "LBCERT_SMTP_PASSWORD=" + smtpSecret,
		"LBCERT_SMTP_CA_BUNDLE=" + smtp.CABundle, "LBCERT_MAIL_FROM=lbcert@lb1.example.com", "LBCERT_MAIL_TO=ops@example.com"}
	down := f.runEnv(mailEnv, "--dir", f.nodes["lb1"].dir, "--redis", f.url, "renew", "--no-random-sleep")
	if down.code != 4 || !strings.Contains(down.stderr, "\nlbcert: error: the fleet's Redis at "+f.url+" is unreachable") || strings.Count(down.stderr, "lbcert: error:") != 1 {
		t.Errorf("renew with Redis down: exit %d, want 4 and one line naming Redis:\n%s", down.code, down.stderr)
	}
	if msgs := smtp.Messages(); len(msgs) != 1 || !strings.Contains(msgs[0].Data, "unreachable") || strings.Contains(msgs[0].Data, fleetPassword) {
		t.Errorf("the report of the run with Redis down: %d messages %+v", len(msgs), msgs)
	}
	time.Sleep(time.Until(killed.Add(5 * time.Second)))
	if err := f.redis.Start(); err != nil {
		t.Fatal(err)
	}
	first := <-done
	noticed := false
	for _, n := range f.order {
		noticed = noticed || strings.Contains(f.nodes[n].agentLog(), "heartbeat failed")
	}
	if !noticed {
		t.Error("no agent saw Redis go away: the kill did not happen while the fleet ran")
	}
	var outs []string
	for _, r := range first {
		outs = append(outs, r.stderr)
	}
	// The re-run finishes the batch: every row in place, from any node.
	r := f.on("lb1", "batch", csv, "--preflight=false", "--agree-tos")
	outs = append(outs, r.stderr)
	if r.code != 0 {
		r = f.on("lb2", "batch", csv, "--preflight=false", "--agree-tos")
		outs = append(outs, r.stderr)
	}
	if r.code != 0 {
		t.Errorf("the batch did not finish on re-run: exit %d\n%s", r.code, r.stdout)
	}
	for name, n := range ordersPerName(outs...) {
		if n > 1 {
			t.Errorf("%s was ordered %d times", name, n)
		}
	}
	if got := f.settledOrders() - before; got != 30 {
		t.Errorf("%d orders at Pebble for 30 names", got)
	}
	if n := f.failedValidations(); n != 0 {
		t.Errorf("%d failed validations", n)
	}
	if got := len(f.fleetNames()); got != 30 {
		t.Errorf("%d lineages in Redis, want 30", got)
	}
}

// T10: Redis with a replica and Sentinel; the primary is killed
// mid-batch. The batch completes after the failover, no name is ordered
// more than twice, and no exact set is over the ledger's cap.
func TestFleetSentinelFailover(t *testing.T) {
	f := newFleet(t, "lb1", "lb2")
	replica, err := testenv.StartRedis(filepath.Join(f.work, "replica"), fleetPassword, f.redis)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(replica.Stop)
	s, err := testenv.StartSentinel(filepath.Join(f.work, "sentinel"), "lbmaster", f.redis)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("sentinel log:\n%s", s.Log())
		}
		s.Stop()
	})
	rc := goredis.NewClient(&goredis.Options{Addr: replica.Addr(), Password: fleetPassword})
	defer rc.Close()
	deadline := time.Now().Add(20 * time.Second)
	for !strings.Contains(rc.Info(context.Background(), "replication").Val(), "master_link_status:up") {
		if time.Now().After(deadline) {
			t.Fatalf("the replica never synced:\n%s", replica.Log())
		}
		time.Sleep(100 * time.Millisecond)
	}
	f.sentinel = s
	f.url = fmt.Sprintf("redis-sentinel://%s/lbmaster/0", s.Addr())
	f.pool()
	csv := f.writeCSV("t10.csv", 0, 30)
	done := f.batchUntil(csv, 8)
	f.redis.Kill()
	first := <-done
	var outs []string
	for _, r := range first {
		outs = append(outs, r.stderr)
	}
	// The failover happened: the replica is the primary now.
	if !strings.Contains(rc.Info(context.Background(), "replication").Val(), "role:master") {
		t.Fatalf("Sentinel did not promote the replica:\n%s", s.Log())
	}
	var r result
	for range 3 {
		r = f.on("lb1", "batch", csv, "--preflight=false", "--agree-tos")
		outs = append(outs, r.stderr)
		if r.code == 0 {
			break
		}
	}
	if r.code != 0 {
		t.Fatalf("the batch did not complete after the failover: exit %d\n%s", r.code, r.stdout)
	}
	for name, n := range ordersPerName(outs...) {
		if n > 2 {
			t.Errorf("%s was ordered %d times, want at most 2", name, n)
		}
	}
	if got := len(f.fleetNames()); got != 30 {
		t.Errorf("%d lineages in Redis after the failover, want 30", got)
	}
	ctx := context.Background()
	c := f.rdb()
	defer c.Close()
	keys, _ := c.Keys(ctx, "lbcert:ledger:*").Result()
	if len(keys) == 0 {
		t.Error("no ledger entries after the failover")
	}
	for _, k := range keys {
		if n := c.ZCard(ctx, k).Val(); n > 3 {
			t.Errorf("ledger %s holds %d certificates, over its cap of 3", k, n)
		}
	}
}
