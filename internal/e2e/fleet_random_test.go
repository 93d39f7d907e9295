package e2e

// TestFleetRandomFaults is fleet mode under a seeded random schedule of
// operations and faults, then checked against the invariants of issue
// 25 as the load balancers really serve it.
//
// Each seed builds its own fleet on loopback: Pebble behind a recording
// front (testenv.RateFront with no limits), a redis-server (with a
// replica and redis-sentinel in some seeds), 3 or 4 nodes each with its
// own --dir, agent and nginx or HAProxy (both kinds in every seed), and
// an HAProxy that spreads the CA's validation over the agents. Then,
// for the schedule's duration, random operations from random nodes
// (issue, batch, renew --force, delete, a node's deploy settings
// changed, a node removed and another joined) interleaved with random
// faults (kill -9 of redis-server restarted with or without AOF,
// FLUSHALL, CLIENT PAUSE n WRITE, a Sentinel failover, kill -9 of an
// agent or of a running lbcert command, a load balancer's config broken
// and fixed). In two seeds of three the fleet stages rollouts: waves
// set early (a canary then the rest, with a short soak, with or
// without a probe), set again, turned off, rollouts resumed or aborted
// at random, and the canary's load balancer broken while a renew's
// version reaches it, so that a rollout is held (chaos_rollout_test.go).
// A command a fault makes fail is allowed to fail. While the schedule
// runs, the observer checks the rollout invariants R1 and R3 on what
// every member's load balancer serves, once a second. Then quiet: every
// fault healed, every member's agent running, and the invariants
// (chaos_check_test.go): I1 convergence (to the version a held or
// aborted rollout keeps, where it keeps one) and fleet status, I2 one
// version one certificate, I3 deletes stick, I4 the ledger, I5 key
// custody, I6 one order per name at a time, I7 no key in clear in Redis
// and every disk consistent, one ACME account, R1 and R3 once more, and
// a renew --force that succeeds after all the faults.
//
// The schedule is derived from the seed alone (timing noise aside);
// the seed is printed at the start and on failure. Flags, after the
// package (go test ./internal/e2e/ -run TestFleetRandomFaults -seed 7):
//
//	-seed N        run seed N only (replays a failing seed)
//	-seeds N       run seeds 1..N (with -seed-from F: F..F+N-1)
//	-duration D    each seed's schedule (default 15s; make torture: 5m)
//	-chaos-table F append the per-seed results (Markdown) to file F
//	-chaos-keep D  on failure, write every log in full under D/seed-N
//
// With neither -seed nor -seeds it runs the short mode of make test:
// the seeds in shortSeeds, 15 s each.

import (
	"flag"
	"fmt"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/lbcert/lbcert/internal/testenv"
)

var (
	chaosSeed     = flag.Uint64("seed", 0, "TestFleetRandomFaults: run this seed only")
	chaosSeeds    = flag.Int("seeds", 0, "TestFleetRandomFaults: run seeds 1..N (or from -seed-from)")
	chaosFrom     = flag.Uint64("seed-from", 1, "TestFleetRandomFaults: the first seed -seeds runs")
	chaosDuration = flag.Duration("duration", 0, "TestFleetRandomFaults: each seed's schedule (default 15s)")
	chaosTable    = flag.String("chaos-table", "", "TestFleetRandomFaults: append the results table to this file")
	chaosKeep     = flag.String("chaos-keep", "", "TestFleetRandomFaults: on failure, write every log in full under this directory")
)

// shortSeeds are make test's seeds: together three and four nodes, a
// Sentinel seed, redis-server restarted with and without AOF, and each
// load balancer on the node that orders first (TestChaosPlan logs each
// seed's shape).
var shortSeeds = []uint64{1, 3, 11}

func TestFleetRandomFaults(t *testing.T) {
	seeds, d := shortSeeds, 15*time.Second
	switch {
	case *chaosSeed != 0:
		seeds = []uint64{*chaosSeed}
	case *chaosSeeds > 0:
		seeds = nil
		for i := range uint64(*chaosSeeds) {
			seeds = append(seeds, *chaosFrom+i)
		}
	}
	if *chaosDuration > 0 {
		d = *chaosDuration
	}
	var rows []chaosSummary
	for _, seed := range seeds {
		t.Run(fmt.Sprintf("seed=%d", seed), func(t *testing.T) {
			rows = append(rows, runChaosSeed(t, seed, d))
		})
	}
	table := chaosTableOf(rows)
	t.Logf("results:\n%s", table)
	if *chaosTable != "" {
		f, err := os.OpenFile(*chaosTable, os.O_APPEND|os.O_CREATE|os.O_WRONLY, 0o644)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		fmt.Fprintf(f, "%s (%s, %s per seed)\n\n%s\n", time.Now().UTC().Format("2006-01-02 15:04 MST"), gitDescribe(), d, table)
	}
}

func gitDescribe() string {
	out, err := exec.Command("git", "describe", "--always", "--dirty").Output()
	if err != nil {
		return "unknown commit"
	}
	return strings.TrimSpace(string(out))
}

// runChaosSeed builds seed's fleet, runs its schedule, quiets it and
// checks every invariant.
func runChaosSeed(t *testing.T, seed uint64, d time.Duration) chaosSummary {
	plan := newChaosPlan(seed, d)
	replay := fmt.Sprintf("go test -count=1 -run 'TestFleetRandomFaults$' ./internal/e2e/ -seed %d -duration %s", seed, d)
	t.Logf("seed %d: %s\nreplay: %s", seed, plan.describe(), replay)
	r := setupChaos(t, plan)
	t.Cleanup(func() {
		if t.Failed() {
			r.dump()
			t.Logf("seed %d failed; replay: %s", seed, replay)
		}
	})
	r.runSchedule()
	r.quietAndCheck()
	sum := r.summary()
	for _, inv := range slices.Sorted(maps.Keys(sum.Viol)) {
		var msgs []string
		for _, v := range r.viol {
			if v.Inv == inv {
				msgs = append(msgs, v.Msg)
			}
		}
		t.Errorf("seed %d: %s violated %d times:\n  %s", seed, inv, len(msgs), strings.Join(capList(msgs, 10), "\n  "))
	}
	return sum
}

// setupChaos starts the seed's servers, forms the fleet, starts every
// agent and checks that a first certificate reaches the other nodes: a
// harness that fails here says so, and no invariant is blamed.
func setupChaos(t *testing.T, plan *chaosPlan) *chaosRun {
	f := newFleet(t)
	front := f.withFront(t, testenv.FrontLimits{})
	rd, err := newChaosRedis(f, plan.Sentinel)
	if err != nil {
		t.Fatalf("setup: %v", err)
	}
	t.Cleanup(rd.stop)
	r := &chaosRun{t: t, plan: plan, f: f, redis: rd, front: front, start: time.Now(),
		inflight: map[*chaosCmd]*chaosOp{}, sem: make(chan struct{}, 3)}
	r.obs = newObserver(r)
	if r.def, err = newDefaultCert(f.work); err != nil {
		t.Fatal(err)
	}
	if plan.Rollout != nil && plan.Rollout.Probe {
		r.roots = f.pebbleRoots()
	}
	r.vf = &validationFront{dir: filepath.Join(f.work, "validation"), port: f.pebble.HTTPPort}
	t.Cleanup(r.vf.stop)
	for _, spec := range plan.Nodes {
		if _, err := r.newNode(spec.Name, spec.LB); err != nil {
			t.Fatalf("setup: %v", err)
		}
	}
	setup := &chaosOp{ID: 0, Kind: "setup"}
	first := r.nodes[0]
	if c := r.lbcert(setup, first, "fleet", "init", "--node", first.name); c.Code != 0 {
		t.Fatalf("setup: fleet init: exit %d\n%s", c.Code, c.Stderr)
	}
	first.member = true
	for _, n := range r.nodes[1:] {
		if !r.joinNode(setup, n, func() *chaosNode { return first }) {
			t.Fatalf("setup: %s could not join", n.name)
		}
		n.member = true
	}
	for _, n := range r.nodes {
		if err := n.startAgent(f.url); err != nil {
			t.Fatal(err)
		}
	}
	if missing := r.heartbeats(r.nodes, 30*time.Second); len(missing) > 0 {
		t.Fatalf("setup: no heartbeat from %v", missing)
	}
	if err := r.setPool(); err != nil {
		t.Fatalf("setup: validation front: %v", err)
	}
	// A first certificate, so the fleet has its account before the
	// faults start, and a check of the harness: every node but the one
	// that ordered (issue 25, defect 1) serves it.
	spec := plan.Pool[0]
	args := []string{"issue"}
	for _, d := range spec.Domains {
		args = append(args, "-d", d)
	}
	if c := r.lbcert(setup, first, append(args, orderFlags...)...); c.Code != 0 {
		t.Fatalf("setup: first issue: exit %d\n%s", c.Code, c.Stderr)
	}
	want := r.catalogSerial(spec.Name)
	for _, n := range r.nodes[1:] {
		for deadline := time.Now().Add(30 * time.Second); n.served(spec.Name, r.def) != want; time.Sleep(200 * time.Millisecond) {
			if time.Now().After(deadline) {
				t.Fatalf("setup: %s's %s does not serve %s's %s after 30 s (serves %q):\n%s\n%s", n.name, n.lb, spec.Name, want, n.served(spec.Name, r.def), tailOf(n.log.String(), 5000), n.lbLog())
			}
		}
	}
	r.logf("setup: fleet of %d formed, agents heartbeat, %s served by the other nodes", len(r.nodes), spec.Name)
	return r
}

// runSchedule launches every event at its time, then waits for the
// operations to end and the faults to heal.
func (r *chaosRun) runSchedule() {
	go r.obs.run()
	stop, stopped := make(chan struct{}), make(chan struct{})
	watched := make(chan struct{})
	go func() { r.supervise(stop); close(stopped) }()
	go func() { r.watchPrimary(stop); close(watched) }()
	r.t.Cleanup(func() { close(stop); <-stopped; <-watched })
	r.sched = time.Now()
	r.logf("schedule: %d events over %s", len(r.plan.Events), r.plan.Duration)
	for i, ev := range r.plan.Events {
		time.Sleep(time.Until(r.sched.Add(ev.At)))
		if slices.Contains(chaosOps, ev.Kind) || slices.Contains(rolloutOps, ev.Kind) {
			r.opsWG.Add(1)
			go r.runOp(i+1, ev)
		} else {
			r.faultsWG.Add(1)
			go r.runFault(ev)
		}
	}
	time.Sleep(time.Until(r.sched.Add(r.plan.Duration)))
	r.faultsWG.Wait()
	r.opsWG.Wait()
}

// quietAndCheck heals whatever is still broken, waits out quiet and
// checks every invariant.
func (r *chaosRun) quietAndCheck() {
	r.logf("quiet: the schedule is over; healing what is left")
	if err := r.redis.healAll(); err != nil {
		r.violate("HARNESS", "heal Redis: %v", err)
	}
	for _, n := range r.nodes {
		n.mu.Lock()
		if n.broken {
			n.setBroken(false, r.def)
		}
		n.mu.Unlock()
	}
	members := r.members()
	for _, n := range members {
		n.mu.Lock()
		if !n.agentRunning() {
			if n.agent != nil && !n.killed && n.exitCode == 0 {
				r.violate("LIVE", "%s's agent, a member's, exited by itself with status 0 (systemd does not restart it): %s", n.name, lastError(n.log.String()))
			}
			n.startAgent(r.f.url)
		}
		n.mu.Unlock()
	}
	quietAt := time.Now()
	r.logf("quiet: every fault healed; the fleet has 30 s to converge")
	if missing := r.heartbeats(members, 30*time.Second); len(missing) > 0 {
		r.violate("I1", "no heartbeat from %v 30 s after quiet", missing)
	}
	cat, _ := r.checkConvergence(quietAt)
	check := &chaosOp{ID: -1, Kind: "check"}
	r.checkStatus(check)
	r.obs.finish()
	if r.obs.servingSamples < 3 {
		r.violate("HARNESS", "only %d samples of what the load balancers serve were checked for R1 and R3", r.obs.servingSamples)
	}
	r.checkVersions()
	r.checkDeletes(check, cat)
	r.mostPerSet = r.checkLedger()
	r.checkCustody()
	r.checkOrders()
	r.checkRedisKeys()
	r.checkDisks()
	r.checkAccounts()
	r.finalRenew(check, cat)
}

// chaosSummary is one row of the results table.
type chaosSummary struct {
	Seed       uint64
	Shape      string
	Ops        map[string][2]int // kind -> succeeded, run
	Faults     map[string][2]int // kind -> injected, skipped
	RunTime    time.Duration
	Viol       map[string]int
	MostPerSet int
	// Samples: of what the load balancers serve, checked for R1 and R3,
	// and how many of them with a staged rollout on its way.
	Samples [2]int
}

func (r *chaosRun) summary() chaosSummary {
	s := chaosSummary{Seed: r.plan.Seed, Ops: map[string][2]int{}, Faults: map[string][2]int{}, Viol: map[string]int{}, RunTime: time.Since(r.start), MostPerSet: r.mostPerSet}
	var lbs []string
	for _, n := range r.plan.Nodes {
		lbs = append(lbs, n.LB)
	}
	s.Shape = fmt.Sprintf("%d (%s)", len(r.plan.Nodes), strings.Join(lbs, ", "))
	if r.plan.Sentinel {
		s.Shape += ", Sentinel"
	}
	if r.plan.Rollout != nil {
		s.Shape += ", " + r.plan.Rollout.describe()
	}
	for _, op := range r.ops {
		c := s.Ops[op.Kind]
		c[1]++
		if op.OK {
			c[0]++
		}
		s.Ops[op.Kind] = c
	}
	for _, f := range r.faults {
		c := s.Faults[f.Kind]
		if f.Skipped != "" {
			c[1]++
		} else {
			c[0]++
		}
		s.Faults[f.Kind] = c
	}
	for _, v := range r.viol {
		s.Viol[v.Inv]++
	}
	r.obs.mu.Lock()
	s.Samples = [2]int{r.obs.servingSamples, r.obs.rolloutSamples}
	r.obs.mu.Unlock()
	return s
}

func chaosTableOf(rows []chaosSummary) string {
	var b strings.Builder
	b.WriteString("| seed | nodes | operations (succeeded/run) | faults (injected) | run time | most certs per set | R1/R3 samples (with a rollout on its way) | violations |\n")
	b.WriteString("|---|---|---|---|---|---|---|---|\n")
	for _, s := range rows {
		var ops, faults, viol []string
		for _, k := range append(slices.Clone(chaosOps), rolloutOps...) {
			if c, ok := s.Ops[k]; ok {
				ops = append(ops, fmt.Sprintf("%s %d/%d", k, c[0], c[1]))
			}
		}
		for _, k := range chaosFaults {
			if c, ok := s.Faults[k]; ok {
				f := fmt.Sprintf("%s %d", k, c[0])
				if c[1] > 0 {
					f += fmt.Sprintf(" (+%d skipped)", c[1])
				}
				faults = append(faults, f)
			}
		}
		keys := slices.Sorted(maps.Keys(s.Viol))
		for _, k := range keys {
			viol = append(viol, fmt.Sprintf("%s %d", k, s.Viol[k]))
		}
		if len(viol) == 0 {
			viol = []string{"0"}
		}
		fmt.Fprintf(&b, "| %d | %s | %s | %s | %s | %d | %d (%d) | %s |\n", s.Seed, s.Shape, strings.Join(ops, ", "), strings.Join(faults, ", "),
			s.RunTime.Round(time.Second), s.MostPerSet, s.Samples[0], s.Samples[1], strings.Join(viol, ", "))
	}
	return b.String()
}

// dump logs what a failing seed needs looked at: every failed command's
// stderr, the agents', load balancers' and Redis's logs; with
// -chaos-keep, all of it in full on disk.
func (r *chaosRun) dump() {
	var b strings.Builder
	for _, op := range r.ops {
		for _, c := range op.Cmds {
			if c.Code != 0 {
				fmt.Fprintf(&b, "--- op#%d %s on %s: lbcert %s: exit %d%s (%s .. %s)\n%s%s\n", op.ID, op.Kind, c.Node, strings.Join(c.Args, " "), c.Code, killedNote(c),
					r.rel(c.Start), r.rel(c.End), tailOf(c.Stdout, 1000), tailOf(c.Stderr, 2000))
			}
		}
	}
	r.t.Logf("failed commands:\n%s", tailOf(b.String(), 60000))
	names := make([]string, 0, len(r.nodes))
	for _, n := range r.nodes {
		names = append(names, n.name)
		r.t.Logf("--- %s's agent (%s):\n%s", n.name, n.variant(), tailOf(n.log.String(), 12000))
		r.t.Logf("--- %s's %s:\n%s", n.name, n.lb, n.lbLog())
	}
	r.t.Logf("--- redis:\n%s", r.redis.logs())
	if *chaosKeep == "" {
		return
	}
	dir := filepath.Join(*chaosKeep, fmt.Sprintf("seed-%d", r.plan.Seed))
	os.RemoveAll(dir)
	os.MkdirAll(dir, 0o755)
	os.WriteFile(filepath.Join(dir, "timeline.txt"), []byte(strings.Join(r.timeline, "\n")+"\n"), 0o644)
	os.WriteFile(filepath.Join(dir, "failed-commands.txt"), []byte(b.String()), 0o644)
	for _, n := range r.nodes {
		os.WriteFile(filepath.Join(dir, "agent-"+n.name+".log"), []byte(n.log.String()), 0o644)
	}
	os.WriteFile(filepath.Join(dir, "redis.log"), []byte(r.redis.logs()), 0o644)
	os.WriteFile(filepath.Join(dir, "pebble.log"), []byte(r.f.pebble.FullLog()), 0o644)
	var orders strings.Builder
	for _, o := range r.front.Orders() {
		start, end := o.Span()
		fmt.Fprintf(&orders, "%s %v account=%s %s..%s final=%q\n", o.ID, o.Names, o.Account, r.rel(start), r.rel(end), o.Final)
	}
	os.WriteFile(filepath.Join(dir, "orders.txt"), []byte(orders.String()), 0o644)
	sort.Strings(names)
	r.t.Logf("all logs of seed %d (nodes %v) are in %s", r.plan.Seed, names, dir)
}
