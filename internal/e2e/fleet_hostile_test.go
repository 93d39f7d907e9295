package e2e

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/lbcert/lbcert/internal/testenv"
)

// Findings of a hostile review of fleet mode as main stands after issue
// 25, each tried first by hand as an operator would (the built binary,
// Pebble, a real redis-server, each node's own HAProxy), then reduced to
// the shortest sequence here. Each asserts a promise of README's "What
// the fleet promises" or "Creating a fleet, joining, approving,
// removing", as the load balancers serve it, as Redis holds it and as
// the nodes' own commands report it.

// holdWrites makes Redis hold every write (CLIENT PAUSE WRITE), reads
// still answered, and returns a function that waits until want clients
// wait on a write named in cmds, then lets them all go at once. Fleet
// commands started in between read the same state and then write, as
// two operators' commands run at the same moment would. The pause is
// renewed every few seconds, below the clients' read timeout.
func (f *fleetEnv) holdWrites() (releaseWhen func(want int, cmds ...string)) {
	f.t.Helper()
	c := f.rdb()
	ctx := context.Background()
	pause := func() {
		if err := c.Do(ctx, "CLIENT", "PAUSE", 4000, "WRITE").Err(); err != nil {
			f.t.Fatalf("CLIENT PAUSE: %v", err)
		}
	}
	pause()
	return func(want int, cmds ...string) {
		f.t.Helper()
		defer c.Close()
		paused := time.Now()
		for deadline := time.Now().Add(time.Minute); time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
			if waiting(c.ClientList(ctx).Val(), cmds) >= want {
				break
			}
			if time.Since(paused) > 3*time.Second {
				pause()
				paused = time.Now()
			}
		}
		if err := c.Do(ctx, "CLIENT", "UNPAUSE").Err(); err != nil {
			f.t.Fatalf("CLIENT UNPAUSE: %v", err)
		}
	}
}

// waiting counts the clients in a CLIENT LIST that a pause holds on one
// of cmds (flags b, the command they wait to run).
func waiting(list string, cmds []string) int {
	n := 0
	for _, line := range strings.Split(list, "\n") {
		var blocked, match bool
		for _, field := range strings.Fields(line) {
			k, v, _ := strings.Cut(field, "=")
			switch k {
			case "flags":
				blocked = strings.Contains(v, "b")
			case "cmd":
				for _, c := range cmds {
					match = match || v == c
				}
			}
		}
		if blocked && match {
			n++
		}
	}
	return n
}

// issuedEverywhere has the first node issue name and waits until every
// other node installed it.
func (f *fleetEnv) issuedEverywhere(name string) {
	f.t.Helper()
	f.mustOn(f.order[0], "issue", "-d", name, "--agree-tos")
	for _, n := range f.order[1:] {
		f.waitInstalled(n, name)
	}
}

// servedPair is a fleet of two nodes, each with its own HAProxy, that
// both serve name, issued on lb1.
func servedPair(t *testing.T, name string) (*fleetEnv, map[string]nodeLB) {
	t.Helper()
	f := newFleet(t, "lb1", "lb2")
	lbs := f.haproxyPool()
	f.mustOn("lb1", "issue", "-d", name, "--agree-tos")
	if !f.checkServed(t, "lb1 issued", name, lbs) {
		t.FailNow()
	}
	return f, lbs
}

// opensName lists the sealed keys of name in Redis that a removed
// node's outsider view opens.
func (f *fleetEnv) opensName(o *outsider, name string) []string {
	var out []string
	for _, s := range f.openedBy(o) {
		if strings.HasPrefix(s, name+" ") {
			out = append(out, s)
		}
	}
	return out
}

// Two members remove two different nodes at the same moment (two
// operators, or automation replacing two instances). 'fleet remove'
// takes only its own node's write lock, so both rotate the data key to
// the same epoch number with two different keys. On main both print
// "removed", the members hash still lists both removed nodes, one of
// them holds the epoch's key (it opens every key re-sealed since), the
// remover whose key lost can no longer run any command ("data key of
// epoch 2 does not match its id"), and the other remover's agent
// refuses the epoch ("not linked to epoch 1's key").
func TestFleetHostileConcurrentRemoves(t *testing.T) {
	t.Parallel()
	f := newFleet(t, "lb1", "lb2", "lb3", "lb4")
	lbs := f.haproxyPool()
	const name = "cr.example.com"
	f.issuedEverywhere(name)
	// Both commands open the fleet and read its key while Redis holds
	// writes (their first write is HDEL of the removed member), then
	// both write.
	release := f.holdWrites()
	rm3 := f.bg("lb1", "fleet", "remove", "lb3")
	rm4 := f.bg("lb2", "fleet", "remove", "lb4")
	// Their first write is the fleet's membership lock (set NX) now, or
	// the removed member's HDEL before there was one.
	release(2, "hdel", "set")
	r3 := rm3.wait(t, "lb1: fleet remove lb3", 2*time.Minute)
	r4 := rm4.wait(t, "lb2: fleet remove lb4", 2*time.Minute)
	removed := map[string]bool{"lb3": r3.code == 0, "lb4": r4.code == 0}
	if !removed["lb3"] && !removed["lb4"] {
		t.Fatalf("neither removal succeeded:\n%s\n%s", r3.stderr, r4.stderr)
	}
	// The operator takes the removed nodes out of the pool the CA
	// validates through, as the README says (a removed node's agent
	// answers no token).
	pool := []string{"lb1", "lb2"}
	for _, n := range []string{"lb3", "lb4"} {
		if !removed[n] {
			pool = append(pool, n)
		}
	}
	f.validateVia(pool...)
	// The members that remain keep working: their commands open the
	// fleet, and a renewal from either is served by both.
	for _, n := range []string{"lb1", "lb2"} {
		if r := f.on(n, "fleet", "status"); r.code != 0 && r.code != 2 {
			t.Errorf("after the two removals, 'fleet status' on member %s exits %d: %s", n, r.code, strings.TrimSpace(r.stderr))
		}
	}
	if r := f.on("lb1", "renew", "--force", "--name", name, "--no-random-sleep", "--agree-tos"); r.code != 0 {
		t.Errorf("after the two removals, lb1's renewal of %s exits %d: %s", name, r.code, strings.TrimSpace(r.stderr))
	} else {
		f.checkServed(t, "lb1 renewed after the removals", name, map[string]nodeLB{"lb1": lbs["lb1"], "lb2": lbs["lb2"]})
	}
	// A node whose removal returned opens nothing in Redis any more:
	// every key was re-sealed under a key it cannot unwrap.
	for n, ok := range removed {
		if !ok {
			continue
		}
		if opened := f.openedBy(f.outsiderOf(f.nodes[n].dir)); len(opened) > 0 {
			t.Errorf("'fleet remove %s' returned 0, yet %s's identity opens %d sealed keys in Redis: %v", n, n, len(opened), opened)
		}
		c := f.rdb()
		if c.HExists(context.Background(), "lbcert:members", n).Val() {
			t.Errorf("'fleet remove %s' returned 0, yet Redis still lists %s among the members", n, n)
		}
		c.Close()
	}
}

// A member approves a joining node while another member removes a node
// (key rotation). On main the approval prints "approved lb4" but wraps
// only the old epoch's key, under a member record the new key does not
// verify: lb4 stays "not approved yet", 'fleet approve lb4' finds no
// join request, 'fleet join --node lb4' says the fleet already has a
// member lb4 and to 'fleet remove lb4' first, and 'fleet remove lb4'
// says the fleet has no member lb4. The name is stuck for good.
func TestFleetHostileApproveDuringRemove(t *testing.T) {
	t.Parallel()
	f := newFleet(t, "lb1", "lb2", "lb3", "lb4")
	first := f.order[:3]
	f.order = first
	f.form()
	f.order = append(first, "lb4")
	// Both members have opened the fleet since they were approved, as
	// any run or agent of theirs does: their next command's first write
	// is its own (approve: HSET of the wrapped key; remove: HDEL).
	f.openOnce("lb1")
	f.openOnce("lb2")
	r := f.mustOn("lb4", "fleet", "join", "--node", "lb4")
	m := fingerprintRe.FindStringSubmatch(r.stdout)
	if m == nil {
		t.Fatalf("join printed no fingerprint:\n%s", r.stdout)
	}
	release := f.holdWrites()
	rm := f.bg("lb1", "fleet", "remove", "lb3")
	ap := f.bg("lb2", "fleet", "approve", "lb4", "--fingerprint", m[1])
	release(2, "hdel", "hset", "set")
	rmr := rm.wait(t, "lb1: fleet remove lb3", 2*time.Minute)
	apr := ap.wait(t, "lb2: fleet approve lb4", 2*time.Minute)
	if rmr.code != 0 {
		t.Fatalf("fleet remove lb3: exit %d", rmr.code)
	}
	if apr.code == 0 {
		if st := f.on("lb4", "fleet", "status"); st.code != 0 && st.code != 2 {
			t.Errorf("'fleet approve lb4' returned 0, yet lb4 cannot open the fleet: exit %d: %s", st.code, strings.TrimSpace(st.stderr))
		} else {
			return
		}
	}
	// However the approval ended, the operator's way in must still work:
	// approve again, or join again and approve.
	if again := f.on("lb1", "fleet", "approve", "lb4", "--fingerprint", m[1]); again.code == 0 {
		if st := f.on("lb4", "fleet", "status"); st.code == 0 || st.code == 2 {
			return
		}
	}
	if j := f.on("lb4", "fleet", "join", "--node", "lb4"); j.code != 0 {
		rmv := f.on("lb1", "fleet", "remove", "lb4")
		t.Errorf("lb4 cannot get into the fleet after an approval that raced a removal: 'fleet join' exits %d (%s); 'fleet remove lb4' exits %d (%s)",
			j.code, strings.TrimSpace(j.stderr), rmv.code, strings.TrimSpace(rmv.stderr))
		return
	}
	if a := f.on("lb1", "fleet", "approve", "lb4", "--fingerprint", m[1]); a.code != 0 {
		t.Errorf("lb4 joined again, but 'fleet approve lb4' exits %d: %s", a.code, strings.TrimSpace(a.stderr))
	}
}

// rdbOnlyRedis replaces the fleet's Redis, before the fleet is formed,
// with one that persists the way Debian's redis.conf does by default:
// RDB snapshots only, no append-only file. A kill -9 then loses every
// write since the last snapshot, as a crash (or a Sentinel failover to
// a replica that lagged) does.
func (f *fleetEnv) rdbOnlyRedis() {
	f.t.Helper()
	f.redis.Stop()
	port, err := testenv.FreePort()
	if err != nil {
		f.t.Fatal(err)
	}
	r := &testenv.Redis{Port: port, Password: fleetPassword, Dir: filepath.Join(f.work, "redis-rdb"), Conf: "appendonly no\n"}
	if err := os.MkdirAll(r.Dir, 0o700); err != nil {
		f.t.Fatal(err)
	}
	if err := r.Start(); err != nil {
		f.t.Fatalf("start redis: %v", err)
	}
	f.t.Cleanup(r.Stop)
	f.redis, f.url = r, r.URL()
}

// Redis comes back from a snapshot taken before 'fleet remove lb3'
// (a crash of a Redis that persists by RDB, Debian's default, or a
// failover to a replica that had not yet received the rotation). The
// README promises the fleet holds through restarts with or without data
// and lost writes, that the removed node's agent installs nothing new,
// and that a renewal after any fault succeeds. On main the members
// refuse every command ("holds data key epoch 1 ..., older than this
// node's 2; refusing") while the removed lb3, back in the restored
// members hash, renews and publishes under the old key, and the
// members' agents install and serve lb3's certificate.
func TestFleetHostileRolledBackRotation(t *testing.T) {
	t.Parallel()
	f := newFleet(t, "lb1", "lb2", "lb3")
	f.rdbOnlyRedis()
	lbs := f.haproxyPool()
	const name = "rb.example.com"
	f.issuedEverywhere(name)
	_, before := f.head(name)
	c := f.rdb()
	if err := c.Save(context.Background()).Err(); err != nil {
		t.Fatal(err)
	}
	c.Close()
	f.mustOn("lb1", "fleet", "remove", "lb3")
	f.validateVia("lb1", "lb2")
	f.redis.Kill()
	if err := f.redis.Start(); err != nil {
		t.Fatalf("restart redis: %v", err)
	}
	// The members' agents see Redis again; give them the chance to put
	// back what it lost before anyone orders.
	poll(20*time.Second, func() bool {
		r := f.on("lb1", "fleet", "status")
		return r.code == 0 || r.code == 2
	})
	// lb3's agent is restarted (its unit's Restart=on-failure, or a
	// reboot), and lb3's cron renews, as it did before the removal.
	f.stopAgent("lb3")
	f.spawnAgent("lb3", lbs["lb3"].flags...)
	if r := f.on("lb3", "renew", "--force", "--name", name, "--no-random-sleep", "--agree-tos"); r.code == 0 {
		if _, s := f.head(name); s != before {
			t.Errorf("removed lb3 renewed %s after the restart and the fleet took its certificate %s", name, s)
			for _, n := range []string{"lb1", "lb2"} {
				if poll(converge, func() bool { return servesName(lbs[n].addr, name) == s }) {
					t.Errorf("member %s's HAProxy serves %s %s, ordered by the removed lb3", n, name, s)
				}
			}
		}
	}
	// A member's renewal after the fault succeeds, is served by the
	// members, and the removed node cannot open it.
	if r := f.on("lb2", "renew", "--force", "--name", name, "--no-random-sleep", "--agree-tos"); r.code != 0 {
		t.Errorf("member lb2's renewal of %s after Redis came back from an older snapshot: exit %d: %s", name, r.code, strings.TrimSpace(r.stderr))
	}
	if _, s := f.head(name); s != before {
		if opened := f.opensName(f.outsiderOf(f.nodes["lb3"].dir), name); len(opened) > 0 {
			t.Errorf("after 'fleet remove lb3' and a Redis restart from an older snapshot, lb3 opens the key of %s %s, issued after its removal: %v", name, s, opened)
		}
	}
	for _, n := range []string{"lb1", "lb2"} {
		if r := f.on(n, "fleet", "status"); r.code != 0 && r.code != 2 {
			t.Errorf("'fleet status' on member %s after the restart exits %d: %s", n, r.code, strings.TrimSpace(r.stderr))
		}
	}
}

// A name deleted on lb1 and issued again on lb2 while lb1's agent was
// down (lb1 keeps its tombstone: nothing installed the new certificate
// there) is lost when Redis is emptied and lb1 is the first member to
// rebuild it (any command on lb1 does): the tombstone goes in first, and
// every unfenced republish of the newer certificate is refused
// ("deleted"), whatever its issue time. On main the fleet then lists no
// such lineage, 'list' shows nothing, 'renew --name' says "no such
// lineage in the fleet" and 'fleet status' says all is well, while lb2's
// HAProxy serves the certificate until it expires, never renewed.
func TestFleetHostileReissueSurvivesRebuild(t *testing.T) {
	t.Parallel()
	const name = "ri.example.com"
	f, lbs := servedPair(t, name)
	f.mustOn("lb1", "delete", "--name", name, "--yes")
	f.stopAgent("lb1")
	f.validateVia("lb2")
	f.mustOn("lb2", "issue", "-d", name, "--agree-tos")
	if !f.checkServed(t, "lb2 issued it again", name, map[string]nodeLB{"lb2": lbs["lb2"]}) {
		t.FailNow()
	}
	_, serial := f.head(name)
	f.stopAgent("lb2")
	f.flushAll()
	f.openOnce("lb1") // lb1 notices first and rebuilds
	f.startAgent("lb2", lbs["lb2"].flags...)
	f.startAgent("lb1", lbs["lb1"].flags...)
	if !poll(converge, func() bool { return f.inFleet(name) }) {
		t.Errorf("%s, issued again after its delete, is not in the fleet %s after the rebuild, while lb2's HAProxy serves %q (issued %s)",
			name, converge, servesName(lbs["lb2"].addr, name), serial)
	}
	if !f.listed("lb2", name) {
		t.Errorf("'list' on lb2 does not show %s after the rebuild", name)
	}
}

// A Redis password put in the URL's query (redis://HOST:PORT/0?password=...)
// is neither refused nor used, and the URL is printed back with it:
// on stderr when Redis refuses, on stdout in 'fleet status' and in
// --json. The README: "A user name may go before the host; a password
// may not"; secrets never in output.
func TestFleetHostileRedisPasswordInQuery(t *testing.T) {
	t.Parallel()
	f := newFleet(t, "lb1")
	f.form()
	withPW := f.url + "?password=" + fleetPassword
	for _, args := range [][]string{{"fleet", "status"}, {"fleet", "status", "--json"}} {
		full := append([]string{"--dir", f.nodes["lb1"].dir, "--redis", withPW}, args...)
		for _, env := range [][]string{nil, {"LBCERT_REDIS_PASSWORD=" + fleetPassword}} {
			r := f.runEnv(env, full...)
			if strings.Contains(r.stdout+r.stderr, fleetPassword) {
				t.Errorf("lbcert --redis URL?password=... %s (password in environment: %v) prints the password", strings.Join(args, " "), env != nil)
			}
			if r.code != 1 {
				t.Errorf("lbcert --redis URL?password=... %s (password in environment: %v): exit %d, want 1 (a password in the URL is refused)", strings.Join(args, " "), env != nil, r.code)
			}
		}
	}
}

// The node that orders deploys each certificate once. Its run deploys
// at once with the agent's saved settings; its own agent, woken by the
// publish, planned the same version before the run recorded the deploy
// and installs it again after the run (engine.Node's prepare does not
// check again under the lock whether the node still owes it): a second
// runtime-API update, and the deploy hook runs twice (or three times)
// for one certificate. On main most issues on the ordering node do
// this; a hook that takes a second (a CDN upload, a notification) makes
// it every time: the agent plans while the run deploys.
func TestFleetHostileOrdererDeploysOnce(t *testing.T) {
	t.Parallel()
	f := newFleet(t, "lb1", "lb2")
	f.form()
	lb1 := f.nodeHAProxy("lb1")
	hooks := filepath.Join(f.work, "hook-runs")
	f.startAgent("lb1", append(lb1.flags, "--deploy-hook", "echo $LBCERT_NAME $LBCERT_SERIAL >> "+hooks+"; sleep 1")...)
	f.startAgent("lb2")
	f.validateVia("lb1", "lb2")
	names := []string{"once1.example.com", "once2.example.com", "once3.example.com", "once4.example.com"}
	for _, name := range names {
		f.mustOn("lb1", "issue", "-d", name, "--agree-tos")
	}
	for _, name := range names {
		f.checkServed(t, "lb1 issued", name, map[string]nodeLB{"lb1": lb1})
	}
	f.waitStatusOK(converge)
	// The agent's second install comes within a second or two of the
	// publish; wait for one, or for a few reconciles without one.
	var data []byte
	runs := map[string]int{}
	poll(10*time.Second, func() bool {
		data, _ = os.ReadFile(hooks)
		runs = map[string]int{}
		for _, line := range strings.Split(strings.TrimSpace(string(data)), "\n") {
			if fields := strings.Fields(line); len(fields) == 2 {
				runs[fields[0]]++
			}
		}
		for _, n := range runs {
			if n > 1 {
				return true
			}
		}
		return false
	})
	for _, name := range names {
		if runs[name] != 1 {
			t.Errorf("lb1's deploy hook ran %d times for %s, ordered once on lb1; want 1:\n%s\n%s", runs[name], name, data, f.nodes["lb1"].agentLog())
		}
	}
}

// An agent whose --haproxy-certs is not the directory its HAProxy loads
// (the operator moved the crt directory in haproxy.cfg and the unit still
// names the old one). The runtime API says so ("HAProxy has no
// crt-list for DIR"), the agent falls back to 'haproxy -c' and a reload,
// both succeed, and the agent reports the node serving the newest
// version: 'fleet status' exits 0 while the node's HAProxy serves none of
// it. The README: "fleet status says a node is behind exactly when it is"
// and convergence "as its load balancer really serves it".
func TestFleetHostileStatusSeesWhatIsServed(t *testing.T) {
	t.Parallel()
	f := newFleet(t, "lb1", "lb2")
	f.form()
	lb1 := f.nodeHAProxy("lb1")
	lb2 := f.nodeHAProxy("lb2")
	elsewhere := filepath.Join(f.work, "lb2-old-certs")
	if err := os.MkdirAll(elsewhere, 0o700); err != nil {
		t.Fatal(err)
	}
	flags := append(append([]string{}, lb2.flags...), "--haproxy-certs", elsewhere)
	f.startAgent("lb1", lb1.flags...)
	f.startAgent("lb2", flags...)
	f.validateVia("lb1", "lb2")
	const name = "mis.example.com"
	f.mustOn("lb1", "issue", "-d", name, "--agree-tos")
	// No wait for lb2's live files: its deploy fails and puts them back,
	// so they hold the new certificate only for a moment, which a poll
	// on a loaded machine misses.
	_, want := f.head(name)
	if want == "" {
		t.Fatalf("the fleet holds no certificate for %s after lb1 issued it", name)
	}
	if poll(converge, func() bool { return servesName(lb2.addr, name) == want }) {
		return
	}
	var r result
	var st fleetStatusJSON
	if !poll(converge, func() bool { r, st = f.status("lb1", "--max-lag", "1s"); return r.code != 0 && st.behindSaid("lb2") }) {
		t.Errorf("lb2's HAProxy serves %q for %s after %s, the fleet's is %s, yet 'fleet status' exits %d and does not say lb2 is behind:\n%s",
			servesName(lb2.addr, name), name, converge, want, r.code, r.stdout)
	}
}

// An agent's report of what its node serves is lost: a Sentinel
// failover dropped the write (seen with two failovers during two nodes'
// batches), or Redis held writes past the report's 10 s deadline
// ('renew --force' on lb1, then at once 'CLIENT PAUSE 15000 WRITE': the
// other agents log "could not report to the fleet what this node serves;
// the next reconcile does"). The agent keeps what it reported in memory,
// marked before the write, and re-sends a lineage's report only when
// that changes, so no reconcile ever does: 'fleet status' says the node
// is behind, its lag growing until it exits 2, while its load balancer
// serves the newest version. Here the lost write is one HDEL of the
// node's report.
func TestFleetHostileLostServedReport(t *testing.T) {
	t.Parallel()
	const name = "lost.example.com"
	f, lbs := servedPair(t, name)
	f.waitStatusOK(converge)
	c := f.rdb()
	err := c.HDel(context.Background(), "lbcert:served:lb2", name).Err()
	c.Close()
	if err != nil {
		t.Fatal(err)
	}
	var st fleetStatusJSON
	var r result
	if !poll(converge, func() bool { r, st = f.status("lb1", "--max-lag", "1s"); return r.code == 0 && !st.behindSaid("lb2") }) {
		t.Errorf("lb2's HAProxy serves %q for %s (the fleet's %s), yet %s after its report was lost 'fleet status' still says lb2 is behind (exit %d):\n%s",
			servesName(lbs["lb2"].addr, name), name, f.fleetSerial(name), converge, r.code, r.stdout)
	}
}

// Redis is emptied (FLUSHALL, a new instance) after 'fleet remove lb3',
// and the removed lb3 is the first node to notice: its cron's renew
// (removal stops nothing on lb3) rebuilds the fleet from lb3's disk,
// with the data key and member list lb3 knew before its removal, lb3
// among the members. The README: "A process that never was a member
// cannot create a fleet the members trust"; key custody; and an empty
// Redis is rebuilt "whichever node rebuilds first". On main every
// member then refuses every command and its agent syncs nothing
// ("holds data key epoch 1 ..., older than this node's 2; refusing"),
// for good: members rebuild only an empty Redis, and this one now holds
// lb3's fleet.
func TestFleetHostileRemovedNodeRebuilds(t *testing.T) {
	t.Parallel()
	f := newFleet(t, "lb1", "lb2", "lb3")
	lbs := f.haproxyPool()
	const name = "rr.example.com"
	f.issuedEverywhere(name)
	f.mustOn("lb1", "fleet", "remove", "lb3")
	f.validateVia("lb1", "lb2")
	// The members' agents are down when Redis loses its data (a restart
	// of every host); lb3's cron runs first.
	f.stopAgent("lb1")
	f.stopAgent("lb2")
	f.flushAll()
	t.Logf("removed lb3's cron renew after the FLUSHALL: exit %d", f.on("lb3", "renew", "-q", "--no-random-sleep").code)
	f.spawnAgent("lb1", lbs["lb1"].flags...)
	f.spawnAgent("lb2", lbs["lb2"].flags...)
	var r result
	if !poll(converge, func() bool { r = f.on("lb1", "fleet", "status"); return r.code == 0 || r.code == 2 }) {
		t.Errorf("%s after the members' agents started again, 'fleet status' on member lb1 still exits %d: %s", converge, r.code, strings.TrimSpace(r.stderr))
	}
	c := f.rdb()
	if c.HExists(context.Background(), "lbcert:members", "lb3").Val() {
		t.Errorf("removed lb3 is a member of the fleet again after it rebuilt an emptied Redis")
	}
	c.Close()
	// The renewal's token is validated through the members' agents:
	// both answer once they heartbeat ('fleet status' exiting 2 above
	// may only mean one has not yet).
	f.waitHeartbeat("lb1", converge)
	f.waitHeartbeat("lb2", converge)
	if r := f.on("lb2", "renew", "--force", "--name", name, "--no-random-sleep", "--agree-tos"); r.code != 0 {
		t.Errorf("member lb2's renewal of %s after the rebuild: exit %d: %s", name, r.code, strings.TrimSpace(r.stderr))
	} else if opened := f.opensName(f.outsiderOf(f.nodes["lb3"].dir), name); len(opened) > 0 {
		t.Errorf("removed lb3 opens the key of %s renewed after its removal: %v", name, opened)
	}
}

// A load balancer that served its sites alone joins the fleet (the
// README's way to grow a pool). Its --dir holds its own lineage of a name
// the fleet also holds, with fewer names, renewed more often (a higher
// version number) and issued later. Once approved, the new node adds
// "the certificates it had before joining" as a rebuild would: unfenced,
// and the version and notBefore rules let its certificate replace the
// fleet's. On main every node then serves the joiner's certificate: the
// fleet's other name (www) is served by no node at all, and the fleet's
// lineage now lists one name. Nothing is said.
func TestFleetHostileJoinKeepsTheFleetsNames(t *testing.T) {
	t.Parallel()
	f := newFleet(t, "lb1", "lb2")
	const name, www = "jn.example.com", "www.jn.example.com"
	// lb2 alone, before the fleet: its own lineage of name, issued twice,
	// validated through its own listener (where its agent will listen).
	alone := []string{"--dir", f.nodes["lb2"].dir, "issue", "-d", name, "--standalone", "--http-addr", fmt.Sprintf("127.0.0.1:%d", f.nodes["lb2"].port), "--agree-tos", "--force"}
	f.validateVia("lb2")
	f.mustRun(alone...)
	f.mustRun(alone...)
	// The fleet of lb1 holds name with both names.
	f.mustOn("lb1", "fleet", "init", "--node", "lb1")
	lb1 := f.nodeHAProxy("lb1")
	f.startAgent("lb1", lb1.flags...)
	f.validateVia("lb1")
	f.mustOn("lb1", "issue", "-d", name, "-d", www, "--agree-tos")
	if !poll(converge, func() bool { return servesName(lb1.addr, www) != "" }) {
		t.Fatalf("lb1 does not serve %s before the join", www)
	}
	// lb2's own certificate is renewed once more, after the fleet's.
	f.validateVia("lb2")
	f.mustRun(alone...)
	r := f.mustOn("lb2", "fleet", "join", "--node", "lb2")
	m := fingerprintRe.FindStringSubmatch(r.stdout)
	if m == nil {
		t.Fatalf("join printed no fingerprint:\n%s", r.stdout)
	}
	f.mustOn("lb1", "fleet", "approve", "lb2", "--fingerprint", m[1])
	lb2 := f.nodeHAProxy("lb2")
	f.startAgent("lb2", lb2.flags...)
	f.validateVia("lb1", "lb2")
	// lb2 has added what it held (on main it marks itself caught up with
	// the fleet's Redis generation), and every node serves the fleet's
	// newest version, whichever it is.
	c := f.rdb()
	poll(converge, func() bool {
		gen := c.HGet(context.Background(), "lbcert:meta", "gen").Val()
		return c.SIsMember(context.Background(), "lbcert:caughtup:"+gen, "lb2").Val()
	})
	c.Close()
	lbs := map[string]nodeLB{"lb1": lb1, "lb2": lb2}
	f.checkServed(t, "lb2 joined", name, lbs)
	c = f.rdb()
	meta := c.HGet(context.Background(), "lbcert:bundle:"+name, "meta").Val()
	c.Close()
	if !strings.Contains(meta, www) {
		t.Errorf("after lb2 joined, the fleet's lineage %s no longer names %s: %s", name, www, meta)
	}
	for _, n := range []string{"lb1", "lb2"} {
		lb := lbs[n]
		if servesName(lb.addr, www) == "" {
			var sans []string
			if l := servedLeaf(lb.addr, name); l != nil {
				sans = l.DNSNames
			}
			t.Errorf("after lb2 joined, %s's HAProxy serves no certificate for %s (the fleet's lineage %s had it; it serves %v for %s)", n, www, name, sans, name)
		}
	}
}
