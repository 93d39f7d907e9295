package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/lbcert/lbcert/internal/deploy"
)

// The defects of issue 25 ("Fleet mode as one system"), each tried as
// an operator meets it: the built binary, Pebble, Redis, and each node's
// own HAProxy, asserting what the load balancers serve, what is in
// their PEM directories, what list and fleet status say, and what Redis
// holds. Each fails on 144d1fb for the reason the issue gives.

// converge is the issue's I1 bound: within 30 s of quiet, every node
// serves the fleet's newest version.
const converge = 30 * time.Second

// checkServed waits up to converge for every node's load balancer to
// serve the fleet's current certificate of name, and reports each node
// that does not, with what it serves, what its PEM directory holds and
// whether fleet status admits it is behind (it must, exactly then).
func (f *fleetEnv) checkServed(t *testing.T, what, name string, lbs map[string]nodeLB) bool {
	t.Helper()
	ok := true
	for _, n := range f.order {
		lb, has := lbs[n]
		if !has {
			continue
		}
		var want string
		if poll(converge, func() bool {
			_, want = f.head(name)
			return want != "" && servesName(lb.addr, name) == want
		}) {
			continue
		}
		ok = false
		served := servesName(lb.addr, name)
		t.Errorf("%s: after %s %s's HAProxy serves %q for %s, want the fleet's %s; its PEM %s holds %q",
			what, converge, n, served, name, want, deploy.PEMPath(lb.certs, name), fileSerial(deploy.PEMPath(lb.certs, name)))
		if _, st := f.status(n, "--max-lag", "1s"); served != want && !st.behindSaid(n) {
			t.Errorf("%s: fleet status does not say %s is behind, while its HAProxy serves %q for %s and the fleet's is %s", what, n, served, name, want)
		}
	}
	return ok
}

// Defect 1: the node that orders a certificate deploys it, whichever
// node it is, with its own agent's deploy settings; and an agent
// restarted with new --deploy settings deploys what it already has.
// Cron's line is the README's: renew -q with no deploy flags.
func TestFleetDefectOrdererDeploys(t *testing.T) {
	t.Parallel()
	f := newFleet(t, "lb1", "lb2")
	f.form()
	lbs := map[string]nodeLB{"lb1": f.nodeHAProxy("lb1"), "lb2": f.nodeHAProxy("lb2")}
	f.startAgent("lb1", lbs["lb1"].flags...)
	// lb2's agent starts with no deploy settings: it only answers tokens
	// and installs into its --dir.
	f.startAgent("lb2", "--reconcile", "2s")
	f.validateVia("lb1", "lb2")
	const name = "fb.example.com"

	f.mustOn("lb1", "issue", "-d", name, "--agree-tos")
	f.checkServed(t, "lb1 ordered v1", name, map[string]nodeLB{"lb1": lbs["lb1"]})

	// lb2 has v1 live in its --dir; its agent restarted with deploy
	// settings must deploy it.
	f.waitInstalled("lb2", name)
	f.stopAgent("lb2")
	f.startAgent("lb2", lbs["lb2"].flags...)
	f.checkServed(t, "lb2's agent restarted with --deploy haproxy", name, map[string]nodeLB{"lb2": lbs["lb2"]})

	// Now lb2 orders (cron's renew on lb2): both nodes serve the new one.
	f.mustOn("lb2", "renew", "--force", "--name", name, "--no-random-sleep", "-q")
	if !f.checkServed(t, "lb2 renewed", name, lbs) {
		return
	}
	// A node serves a certificate a moment before it reports it.
	var r result
	var st fleetStatusJSON
	if !poll(10*time.Second, func() bool { r, st = f.status("lb1", "--max-lag", "1s"); return r.code == 0 && st.Lineages == 1 }) {
		t.Errorf("fleet status once every node serves the newest: exit %d\n%s%s", r.code, r.stdout, r.stderr)
	}
}

// Defect 2: from the moment 'fleet remove lb3' returns, nothing is
// sealed under a key lb3 can unwrap, even by a batch that opened the
// fleet before the removal. The batch is paced (one order per 10 s), so
// its first row is published before the removal and the others after.
func TestFleetDefectRemovedNodeOpensNothingNew(t *testing.T) {
	t.Parallel()
	f := newFleet(t, "lb1", "lb2", "lb3")
	f.pool()
	f.openOnce("lb3")
	csv := f.writeCSV("rm.csv", 0, 3)
	batch := f.bg("lb1", "batch", csv, "--preflight=false", "--agree-tos", "--rate-orders", "1/10s")
	if !poll(time.Minute, func() bool { return len(f.fleetNames()) >= 1 }) {
		t.Fatalf("the batch published nothing in a minute:\n%s", batch.cmd.stderr())
	}
	if len(f.fleetNames()) == 3 {
		t.Fatal("the batch published every row before the removal: the pacing did not hold it")
	}
	f.mustOn("lb2", "fleet", "remove", "lb3")
	orders := f.pebble.Orders()
	batch.wait(t, "lb1 batch "+csv, 2*time.Minute)
	// The batch obtained certificates after the removal (whether it
	// then published them, re-sealed, or refused).
	if f.pebble.Orders() == orders {
		t.Fatal("the batch placed no order after the removal: the pacing did not hold it")
	}
	lb3 := f.outsiderOf(f.nodes["lb3"].dir)
	if opened := f.openedBy(lb3); len(opened) > 0 {
		t.Errorf("removed lb3's identity and data keys open %d sealed keys in Redis after 'fleet remove lb3' returned: %v", len(opened), opened)
	}
}

// versionsAgree checks that each version of name names one certificate
// across Redis and every node's archive.
func (f *fleetEnv) versionsAgree(t *testing.T, name string) {
	t.Helper()
	seen := map[int]map[string][]string{} // version -> serial -> where
	note := func(v int, serial, where string) {
		if seen[v] == nil {
			seen[v] = map[string][]string{}
		}
		seen[v][serial] = append(seen[v][serial], where)
	}
	if v, s := f.head(name); v > 0 {
		note(v, s, "redis")
	}
	for _, n := range f.order {
		for v, s := range archiveSerials(f.nodes[n].dir, name) {
			note(v, s, n+"'s archive")
		}
	}
	for v, serials := range seen {
		if len(serials) > 1 {
			t.Errorf("%s version %d names %d certificates: %v", name, v, len(serials), serials)
		}
	}
}

// Defect 3: a version number names one certificate fleet-wide, even when
// Redis does not answer while a node saves a new certificate (here
// CLIENT PAUSE WRITE, sent as lb1's order is finalized), and every node
// then serves the fleet's newest.
func TestFleetDefectOneVersionOneCertificate(t *testing.T) {
	t.Parallel()
	f := newFleet(t, "lb1", "lb2")
	fr := f.startFront()
	lbs := f.haproxyPool()
	const name = "fv.example.com"
	f.mustOn("lb2", "issue", "-d", name, "--agree-tos")
	// lb1 serves v1 (its agent has deployed it, not only installed it).
	if !f.checkServed(t, "lb2 issued", name, map[string]nodeLB{"lb1": lbs["lb1"]}) {
		t.FailNow()
	}
	// lb1's agent is down while lb2 makes version 2.
	f.stopAgent("lb1")
	f.validateVia("lb2")
	f.mustOn("lb2", "renew", "--force", "--name", name, "--no-random-sleep", "-q")
	// lb1 renews too; Redis takes no writes for 15 s from its finalize.
	paused := make(chan struct{})
	var once sync.Once
	fr.onPost(func(path string) {
		if strings.HasPrefix(path, "/finalize-order/") {
			once.Do(func() {
				c := f.rdb()
				defer c.Close()
				if err := c.Do(context.Background(), "CLIENT", "PAUSE", "15000", "WRITE").Err(); err != nil {
					t.Errorf("CLIENT PAUSE: %v", err)
				}
				close(paused)
			})
		}
	})
	r := f.on("lb1", "renew", "--force", "--name", name, "--no-random-sleep")
	select {
	case <-paused:
	default:
		t.Fatalf("lb1's renew finalized no order:\n%s", r.stderr)
	}
	fr.onPost(nil)
	f.startAgent("lb1", lbs["lb1"].flags...)
	f.validateVia("lb1", "lb2")
	// Quiet: every node serves the fleet's newest, and no version was
	// given to two certificates.
	f.checkServed(t, "after the pause", name, lbs)
	f.versionsAgree(t, name)
}

// goneEverywhere checks that name is nowhere in the fleet for limit:
// not in Redis, not in any node's list, not served by any node's load
// balancer, and not in any node's HAProxy PEM directory.
func (f *fleetEnv) goneEverywhere(t *testing.T, what, name string, lbs map[string]nodeLB, limit time.Duration) {
	t.Helper()
	deadline := time.Now().Add(limit)
	for {
		if f.inFleet(name) {
			v, s := f.head(name)
			t.Errorf("%s: %s is in the fleet's lineages again (version %d, serial %s)", what, name, v, s)
			break
		}
		if time.Now().After(deadline) {
			break
		}
		time.Sleep(500 * time.Millisecond)
	}
	for _, n := range f.order {
		if f.listed(n, name) {
			t.Errorf("%s: 'list' on %s shows %s", what, n, name)
		}
		lb, ok := lbs[n]
		if !ok {
			continue
		}
		pemPath := deploy.PEMPath(lb.certs, name)
		if !poll(10*time.Second, func() bool {
			_, err := os.Stat(pemPath)
			return servesName(lb.addr, name) == "" && os.IsNotExist(err)
		}) {
			t.Errorf("%s: %s's HAProxy serves %q for %s, and its PEM directory holds %s (serial %q)", what, n, servesName(lb.addr, name), name, pemPath, fileSerial(pemPath))
		}
	}
}

// Defect 4: a delete made while another node's run holds the name's
// lease sticks: that run publishes nothing afterwards. The run holds
// the lease while its new order waits at a front before Pebble (as it
// would through the random sleep or a slow CA), and the delete is made
// from another node.
func TestFleetDefectDeleteDuringRenewSticks(t *testing.T) {
	t.Parallel()
	f := newFleet(t, "lb1", "lb2")
	fr := f.startFront()
	lbs := f.haproxyPool()
	const name = "rot1.example.com"
	f.mustOn("lb1", "issue", "-d", name, "--agree-tos")
	// The other node serves it before anything else happens.
	if !f.checkServed(t, "lb1 issued", name, map[string]nodeLB{"lb2": lbs["lb2"]}) {
		t.FailNow()
	}

	ordering := make(chan struct{})
	release := make(chan struct{})
	var once sync.Once
	fr.onPost(func(path string) {
		if path == "/order-plz" {
			once.Do(func() { close(ordering) })
			select {
			case <-release:
			case <-time.After(time.Minute):
			}
		}
	})
	renew := f.bg("lb1", "renew", "--force", "--name", name, "--no-random-sleep")
	select {
	case <-ordering:
	case <-time.After(time.Minute):
		t.Fatalf("lb1's renew placed no order:\n%s", renew.cmd.stderr())
	}
	if h := f.leaseHolder(name); !strings.HasPrefix(h, "lb1/") {
		t.Fatalf("lb1's renew is ordering without holding the lease (holder %q)", h)
	}
	del := f.bg("lb2", "delete", "--name", name, "--yes")
	// The order goes on once the delete returned, or after 5 s if the
	// delete waits for the lease holder.
	var dr result
	select {
	case dr = <-del.done:
		close(release)
	case <-time.After(5 * time.Second):
		close(release)
		dr = del.wait(t, "lb2 delete", time.Minute)
	}
	t.Logf("$ lbcert delete --name %s --yes (on lb2)\n%s%s(exit %d)", name, dr.stdout, dr.stderr, dr.code)
	if dr.code != 0 {
		t.Fatalf("delete on lb2: exit %d", dr.code)
	}
	renew.wait(t, "lb1 renew", 2*time.Minute)
	fr.onPost(nil)
	f.goneEverywhere(t, "after lb1's renew ended", name, lbs, 10*time.Second)
}

// Defect 5: a deleted lineage stays deleted when Redis loses its data
// (FLUSHALL) and the nodes rebuild it from their disks.
func TestFleetDefectDeleteSurvivesFlushall(t *testing.T) {
	t.Parallel()
	f := newFleet(t, "lb1", "lb2")
	lbs := f.haproxyPool()
	const gone, kept = "fa.example.com", "fk.example.com"
	f.mustOn("lb1", "issue", "-d", gone, "--agree-tos")
	f.mustOn("lb1", "issue", "-d", kept, "--agree-tos")
	// lb2 holds both before the delete, as a node of the fleet does.
	for _, name := range []string{gone, kept} {
		if !f.checkServed(t, "lb1 issued", name, map[string]nodeLB{"lb2": lbs["lb2"]}) {
			t.FailNow()
		}
	}
	f.mustOn("lb1", "delete", "--name", gone, "--yes")
	f.flushAll()
	// The agents rebuild the fleet from their disks: the kept lineage
	// comes back, the deleted one must not.
	if !poll(time.Minute, func() bool { return f.inFleet(kept) }) {
		t.Fatalf("the fleet was not rebuilt after FLUSHALL:\n%s", f.nodes["lb2"].agentLog())
	}
	f.goneEverywhere(t, "after FLUSHALL and the rebuild", gone, lbs, 15*time.Second)
}

// Defect 8: after delete, no node serves the name, the node that ran
// delete included, and the PEMs the agents wrote are gone from every
// node's HAProxy directory.
func TestFleetDefectDeleteUnservesEverywhere(t *testing.T) {
	t.Parallel()
	f := newFleet(t, "lb1", "lb2")
	lbs := f.haproxyPool()
	const name = "fd.example.com"
	f.mustOn("lb1", "issue", "-d", name, "--agree-tos")
	// lb2's agent deploys it to lb2's HAProxy; then lb2 deletes it.
	if !f.checkServed(t, "lb1 issued", name, map[string]nodeLB{"lb2": lbs["lb2"]}) {
		t.FailNow()
	}
	f.mustOn("lb2", "delete", "--name", name, "--yes")
	f.goneEverywhere(t, "after delete on lb2", name, lbs, 5*time.Second)
}

// Defect 6: the duplicate-certificate ledger survives Redis losing its
// data: with --ledger-cap 4, at most 4 certificates for one exact set,
// one more across one Redis loss, never more than Let's Encrypt's 5 in
// 7 days. Here all of them are issued within the test.
func TestFleetDefectLedgerSurvivesFlushall(t *testing.T) {
	t.Parallel()
	f := newFleet(t, "lb1", "lb2")
	f.pool()
	const name = "fc.example.com"
	issue := func(force bool) {
		args := []string{"--ledger-cap", "4", "issue", "-d", name, "--agree-tos"}
		if force {
			args = append(args, "--force")
		}
		f.on("lb1", args...)
	}
	issue(false)
	for range 4 {
		issue(true)
	}
	if got := f.pebble.Issued(); got != 4 {
		t.Fatalf("before the Redis loss the fleet issued %d certificates for %s with --ledger-cap 4, want 4", got, name)
	}
	// lb2 holds the lineage too before Redis loses everything.
	f.waitInstalled("lb2", name)
	f.flushAll()
	if !poll(time.Minute, func() bool { return f.inFleet(name) }) {
		t.Fatalf("the fleet was not rebuilt after FLUSHALL:\n%s", f.nodes["lb1"].agentLog())
	}
	for range 4 {
		issue(true)
	}
	if got := f.pebble.Issued(); got > 5 {
		t.Errorf("%d certificates issued for exactly %s within minutes with --ledger-cap 4 across one FLUSHALL, want at most 5", got, name)
	}
}

// Defect 7: one ACME account per CA fleet-wide through a Redis loss,
// and a renewal after it succeeds. lb1 registered the account; lb2 only
// ran its agent. Redis loses its data while lb1 is down; lb2's agent
// rebuilds the fleet and lb2's cron renews.
func TestFleetDefectOneAccountAfterRedisLoss(t *testing.T) {
	t.Parallel()
	f := newFleet(t, "lb1", "lb2")
	f.pool()
	const name = "fa7.example.com"
	f.mustOn("lb1", "issue", "-d", name, "--agree-tos")
	f.waitInstalled("lb2", name)
	f.stopAgent("lb1")
	f.validateVia("lb2")
	f.flushAll()
	if !poll(time.Minute, func() bool { return f.inFleet(name) }) {
		t.Fatalf("lb2's agent did not rebuild the fleet after FLUSHALL:\n%s", f.nodes["lb2"].agentLog())
	}
	f.waitHeartbeat("lb2", 20*time.Second)
	// --agree-tos as in an operator's config: without it lb2 stops at
	// the terms instead, having no account to renew with.
	if r := f.on("lb2", "renew", "--force", "--name", name, "--no-random-sleep", "--agree-tos"); r.code != 0 {
		t.Errorf("lb2's renewal of %s after the Redis loss: exit %d", name, r.code)
	}
	// lb1 comes back and renews too.
	f.startAgent("lb1")
	f.validateVia("lb1", "lb2")
	if r := f.on("lb1", "renew", "--force", "--name", name, "--no-random-sleep", "--agree-tos"); r.code != 0 {
		t.Errorf("lb1's renewal of %s after the Redis loss: exit %d", name, r.code)
	}
	if uris := f.accountURIs(); len(uris) != 1 {
		t.Errorf("the fleet holds %d ACME accounts at one CA, want 1: %v", len(uris), uris)
	}
}

// Defect 9a: a batch running across a key rotation ('fleet remove' on
// another node) still succeeds. Its first order waits for the pace
// budget (spent by the run before it), so it reads the fleet's account
// only after the rotation.
func TestFleetDefectBatchAcrossKeyRotation(t *testing.T) {
	t.Parallel()
	f := newFleet(t, "lb1", "lb2", "lb3")
	f.pool()
	f.openOnce("lb3")
	f.mustOn("lb1", "issue", "-d", "first.example.com", "--agree-tos", "--rate-orders", "1/15s")
	csv := f.writeCSV("rot.csv", 0, 2)
	batch := f.bg("lb1", "batch", csv, "--preflight=false", "--agree-tos", "--rate-orders", "1/15s")
	if !poll(time.Minute, func() bool { return strings.HasPrefix(f.leaseHolder("fleet000.example.com"), "lb1/") }) {
		t.Fatalf("the batch took no lease:\n%s", batch.cmd.stderr())
	}
	f.mustOn("lb2", "fleet", "remove", "lb3")
	if f.inFleet("fleet000.example.com") {
		t.Fatal("the batch ordered before the rotation: the pacing did not hold it")
	}
	r := batch.wait(t, "lb1 batch "+csv, 2*time.Minute)
	if r.code != 0 || strings.Contains(r.stderr, "no data key") {
		t.Errorf("the batch across the key rotation: exit %d, want 0\n%s", r.code, r.stderr)
	}
	for _, name := range []string{"fleet000.example.com", "fleet001.example.com"} {
		if !f.inFleet(name) {
			t.Errorf("%s is not in the fleet after the batch", name)
		}
	}
}

// Defect 9b: a node whose agent died is not the CA being unreachable.
// The batch's rows fail or are deferred naming the agent, every row is
// tried, and the CA is not declared unreachable. lb2's agent is killed
// (its heartbeat has not expired yet); the CA validates through lb1.
func TestFleetDefectDeadAgentIsNotCADown(t *testing.T) {
	t.Parallel()
	f := newFleet(t, "lb1", "lb2")
	f.form()
	f.startAgent("lb1")
	f.startAgent("lb2")
	f.validateVia("lb1")
	f.nodes["lb2"].agent.Process.Kill()
	csv := f.writeCSV("dead.csv", 0, 6)
	r := f.on("lb1", "batch", csv, "--preflight=false", "--agree-tos", "--concurrency", "1")
	out := r.stdout + r.stderr
	if strings.Contains(out, "CA unreachable") || strings.Contains(out, "did not answer several orders") {
		t.Errorf("the batch took lb2's dead agent for the CA being unreachable: exit %d\n%s", r.code, out)
	}
	for i := range 6 {
		name := fmt.Sprintf("fleet%03d.example.com", i)
		var line string
		for _, l := range strings.Split(r.stdout, "\n") {
			if strings.Contains(l, name) {
				line = l
				break
			}
		}
		if !f.inFleet(name) && !strings.Contains(line, "lb2") {
			t.Errorf("row %s: neither issued nor failed naming lb2's agent: %q", name, line)
		}
	}
}

// Defect 9c: while a run holds a node's state directory (here a batch
// waiting for the pace budget), fleet status and list on that node read
// without the exclusive lock and keep their exit codes, and delete,
// fleet approve and fleet remove wait for it with --wait-lock.
func TestFleetDefectReadersDoNotWaitForRuns(t *testing.T) {
	t.Parallel()
	f := newFleet(t, "lb1", "lb2", "lb3")
	f.pool()
	f.mustOn("lb1", "issue", "-d", "held.example.com", "--agree-tos", "--rate-orders", "1/20s")
	// lb4 asks to join, for approve.
	j := f.mustOn("lb1", "--dir", filepath.Join(f.work, "lb4"), "fleet", "join", "--node", "lb4")
	fp := fingerprintRe.FindStringSubmatch(j.stdout)[1]
	batch := f.bg("lb1", "batch", f.writeCSV("held.csv", 0, 1), "--preflight=false", "--agree-tos", "--rate-orders", "1/20s")
	if !poll(time.Minute, func() bool { return strings.HasPrefix(f.leaseHolder("fleet000.example.com"), "lb1/") }) {
		t.Fatalf("the batch took no lease:\n%s", batch.cmd.stderr())
	}
	if r := f.on("lb1", "fleet", "status"); r.code != 0 && r.code != 2 {
		t.Errorf("fleet status while a batch runs on the node: exit %d, want 0 or 2\n%s", r.code, r.stderr)
	}
	if r := f.on("lb1", "list"); r.code != 0 || !strings.Contains(r.stdout, "held.example.com") {
		t.Errorf("list while a batch runs on the node: exit %d\n%s%s", r.code, r.stdout, r.stderr)
	}
	if f.inFleet("fleet000.example.com") {
		t.Fatal("the batch finished before the readers ran: the pacing did not hold it")
	}
	for _, args := range [][]string{
		{"delete", "--name", "held.example.com", "--yes", "--wait-lock", "2m"},
		{"fleet", "approve", "lb4", "--fingerprint", fp, "--wait-lock", "2m"},
		{"fleet", "remove", "lb3", "--wait-lock", "2m"},
	} {
		if r := f.on("lb1", args...); r.code != 0 {
			t.Errorf("%s while a batch runs on the node: exit %d, want 0 once the batch is done\n%s", strings.Join(args, " "), r.code, r.stderr)
		}
	}
	batch.wait(t, "lb1 batch", 2*time.Minute)
}

// sleepRe is renew's line before its random sleep.
var sleepRe = regexp.MustCompile(`sleeping before contacting the CA.* for=(\S+)`)

// Also found: fleet status keeps its exit code while a renew from cron
// (no terminal, so with its random sleep of up to 8 minutes) sleeps on
// the same node.
func TestFleetDefectStatusDuringRandomSleep(t *testing.T) {
	t.Parallel()
	f := newFleet(t, "lb1")
	f.form()
	f.startAgent("lb1")
	f.validateVia("lb1")
	const name = "sleep.example.com"
	f.mustOn("lb1", "issue", "-d", name, "--agree-tos")
	// The sleep is random: a renew whose sleep is too short to look at
	// is let finish, and another started, a few times at most.
	for try := 0; ; try++ {
		if try == 5 {
			t.Fatal("five random sleeps in a row were under 6 s")
		}
		renew := f.bg("lb1", "renew", "--force", "--name", name)
		var m []string
		if !poll(time.Minute, func() bool { m = sleepRe.FindStringSubmatch(renew.cmd.stderr()); return m != nil }) {
			t.Fatalf("renew from cron did not sleep:\n%s", renew.cmd.stderr())
		}
		d, err := time.ParseDuration(m[1])
		if err != nil {
			t.Fatalf("sleep %q: %v", m[1], err)
		}
		if d < 6*time.Second {
			renew.wait(t, "lb1 renew", runDeadline)
			continue
		}
		r := f.on("lb1", "fleet", "status")
		renew.stop()
		renew.wait(t, "lb1 renew (stopped)", time.Minute)
		if r.code != 0 && r.code != 2 {
			t.Errorf("fleet status during renew's random sleep of %s on the node: exit %d, want 0 or 2\n%s", d, r.code, r.stderr)
		}
		return
	}
}

// Also found: an agent advertising a loopback address, in a fleet whose
// other agents advertise addresses other hosts reach, is refused or
// warned about loudly. (The other agents advertise TEST-NET addresses,
// RFC 5737, which nothing here ever dials: no order is placed.)
func TestFleetDefectLoopbackAgentWarned(t *testing.T) {
	t.Parallel()
	f := newFleet(t, "lb1", "lb2", "lb3")
	f.form()
	f.startAgent("lb1", "--advertise-addr", fmt.Sprintf("192.0.2.1:%d", f.nodes["lb1"].port))
	f.startAgent("lb2", "--advertise-addr", fmt.Sprintf("192.0.2.2:%d", f.nodes["lb2"].port))
	// lb3 as the README shows it: --http-addr 127.0.0.1:PORT, advertised.
	f.spawnAgent("lb3")
	loud := regexp.MustCompile(`(?im)^lbcert: (error|warning): .*loopback`)
	if !poll(15*time.Second, func() bool { return loud.MatchString(f.nodes["lb3"].agentLog()) }) {
		t.Errorf("lb3's agent advertises 127.0.0.1 to a fleet whose other agents are on other hosts, and says nothing of it:\n%s", f.nodes["lb3"].agentLog())
	}
}

// From the last fleet work's notes: an order the fleet's ledger refuses
// is never sent to the CA, so it spends no new-order token. With two
// orders per hour, one order and any number of refused renewals must
// leave room for a new name. (The first renewal carries ARI "replaces",
// which the budget exempts once per certificate; the second does not.)
func TestFleetDefectLedgerRefusalSpendsNoOrder(t *testing.T) {
	t.Parallel()
	f := newFleet(t, "lb1")
	f.form()
	f.startAgent("lb1")
	f.validateVia("lb1")
	issue := func(args ...string) result {
		return f.on("lb1", append([]string{"--ledger-cap", "1", "issue", "--agree-tos", "--rate-orders", "3/1h"}, args...)...)
	}
	if r := issue("-d", "l1.example.com"); r.code != 0 {
		t.Fatalf("the first order: exit %d", r.code)
	}
	orders := f.pebble.Orders()
	for range 2 {
		r := issue("-d", "l1.example.com", "--force")
		if r.code == 0 || !strings.Contains(r.stderr, "ledger") {
			t.Fatalf("another certificate for l1.example.com with --ledger-cap 1: exit %d, want the ledger's refusal\n%s", r.code, r.stderr)
		}
		// What to do names the ledger's own flag, not the --rate-* ones,
		// and the refusal is said once.
		if !strings.Contains(r.stderr, "hint: a place frees 7 days after it was taken") || !strings.Contains(r.stderr, "ledger already holds its cap (--ledger-cap 1)") || !strings.Contains(r.stderr, "--ledger-cap raises the cap") ||
			!strings.Contains(r.stderr, "hint: next attempt after ") || strings.Contains(r.stderr, "--rate-names") || strings.Contains(r.stderr, "not ordered:") {
			t.Fatalf("the ledger's refusal does not say what to do about the ledger:\n%s", r.stderr)
		}
	}
	if got := f.pebble.Orders() - orders; got != 0 {
		t.Fatalf("the ledger's refusals still sent %d orders to the CA", got)
	}
	if r := issue("-d", "l2.example.com"); r.code != 0 {
		t.Errorf("a new name after one order and two refused by the ledger, with 2 orders per hour: exit %d, want 0\n%s", r.code, r.stderr)
	}
}

// From the last fleet work's notes: list, show and --json in fleet mode
// show the fleet's lineages, whatever this node holds, and the version
// each node serves.
func TestFleetDefectListShowsTheFleet(t *testing.T) {
	t.Parallel()
	f := newFleet(t, "lb1", "lb2")
	f.form()
	f.startAgent("lb1")
	f.validateVia("lb1")
	const name = "listed.example.com"
	f.mustOn("lb1", "issue", "-d", name, "--agree-tos")
	// lb2's agent is not running: lb2 holds nothing yet.
	if r := f.on("lb2", "list"); r.code != 0 || !strings.Contains(r.stdout, name) {
		t.Errorf("list on lb2 does not show the fleet's %s: exit %d\n%s%s", name, r.code, r.stdout, r.stderr)
	}
	if r := f.on("lb2", "show", name); r.code != 0 || !strings.Contains(r.stdout, name) {
		t.Errorf("show %s on lb2: exit %d\n%s%s", name, r.code, r.stdout, r.stderr)
	}
	f.startAgent("lb2")
	f.waitInstalled("lb2", name)
	r := f.on("lb1", "list", "--json")
	var out struct {
		Lineages []map[string]any `json:"lineages"`
	}
	if err := json.Unmarshal([]byte(r.stdout), &out); err != nil {
		t.Fatalf("list --json: %v\n%s", err, r.stdout)
	}
	found := false
	for _, l := range out.Lineages {
		if l["name"] != name {
			continue
		}
		found = true
		raw, _ := json.Marshal(l)
		for _, n := range f.order {
			if !strings.Contains(string(raw), `"`+n+`"`) {
				t.Errorf("list --json says nothing of what node %s serves of %s: %s", n, name, raw)
			}
		}
	}
	if !found {
		t.Errorf("list --json on lb1 lacks %s:\n%s", name, r.stdout)
	}
}
