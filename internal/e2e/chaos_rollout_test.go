package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"maps"
	"math/rand/v2"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	goredis "github.com/redis/go-redis/v9"

	"github.com/lbcert/lbcert/internal/fleet"
	"github.com/lbcert/lbcert/internal/store"
)

// Staged rollouts in TestFleetRandomFaults. In two seeds of three the
// schedule sets waves early on and then, at random, sets them again
// (other waves, another soak), turns staging off, and resumes or
// aborts the rollouts on their way; it breaks the canary's load
// balancer, with a renew just after, so that a canary's deploy fails
// and its rollout is held, and resumes or aborts it once the load
// balancer is fixed. The observer checks R1 and R3 of package
// catalog (checkRolloutInvariants) on what every member's load
// balancer serves, once a second and after quiet; I1 expects, of a
// name whose rollout is held or aborted, the version the rollout
// keeps (rolloutState.want).

// Rollout operations, run as an operator would, from a member's --dir.
const (
	opRolloutSet    = "rollout-set"    // fleet rollout set: waves, a short soak, the seed's probe
	opRolloutOff    = "rollout-off"    // fleet rollout off
	opRolloutResume = "rollout-resume" // fleet rollout resume NAME [--skip-wave]
	opRolloutAbort  = "rollout-abort"  // fleet rollout abort NAME
)

var rolloutOps = []string{opRolloutSet, opRolloutOff, opRolloutResume, opRolloutAbort}

// The weights of the rollout operations after the mandatory ones.
var rolloutWeights = map[string]int{opRolloutSet: 20, opRolloutOff: 10, opRolloutResume: 40, opRolloutAbort: 25}

// rolloutPlan is a seed's staged rollouts.
type rolloutPlan struct {
	// Probe: every 'rollout set' has --probe, and every agent checks
	// what its load balancer serves (--verify-addr) against Pebble's
	// root (--verify-roots), which the probe needs.
	Probe bool
}

func (rp *rolloutPlan) describe() string {
	switch {
	case rp == nil:
		return "no staged rollouts"
	case rp.Probe:
		return "staged rollouts with a probe"
	}
	return "staged rollouts without a probe"
}

// addRollouts adds a staged seed's rollout events. They are drawn from
// a stream of their own, so the seed's other events stay what they
// were before rollouts were added (the short mode's seeds were chosen
// for their shape).
func (p *chaosPlan) addRollouts() {
	rng := rand.New(rand.NewPCG(p.Seed, 0x726f6c6c6f7574))
	if rng.IntN(3) == 0 {
		return
	}
	p.Rollout = &rolloutPlan{Probe: rng.IntN(2) == 0}
	d := p.Duration
	at := func(lo, hi float64) time.Duration {
		return time.Duration((lo + rng.Float64()*(hi-lo)) * float64(d))
	}
	ev := func(kind string, t time.Duration) chaosEvent {
		// Variant: the waves a set sets, or a resume with --skip-wave
		// (0); Dur: the soak a set sets, 0 to 4 s, so that the run
		// converges.
		return chaosEvent{At: t, Kind: kind, Pick: rng.Uint32(), Variant: rng.IntN(3), Dur: time.Duration(rng.IntN(5)) * time.Second}
	}
	p.Events = append(p.Events, ev(opRolloutSet, at(0, 0.05)), ev(opRolloutAbort, at(0.3, 0.8)), ev(opRolloutResume, at(0.5, 0.9)))
	// The canary's load balancer broken, and a renew while it is: the
	// canary's deploy fails and the rollout is held. The renew is of a
	// lineage the operations issued, or of the one the setup did. Once
	// the load balancer is fixed, the operator resumes the rollout, or
	// aborts it. One such hold per 40 s of schedule.
	for range 1 + int(d/(40*time.Second)) {
		brk := chaosEvent{At: at(0.1, 0.7), Kind: fLBBreak, Canary: true, Pick: rng.Uint32()}
		brk.Dur = min(10*time.Second, max(4*time.Second, d/6))
		renew := chaosEvent{At: brk.At + time.Second, Kind: opRenew, Pick: rng.Uint32(), Lineages: []int{0}}
		then := ev(opRolloutResume, brk.At+brk.Dur+time.Second)
		if rng.IntN(3) == 0 {
			then.Kind = opRolloutAbort
		}
		p.Events = append(p.Events, brk, renew, then)
	}
	for t := at(0.05, 0.1) + expGap(rng, 6*time.Second); t < d; t += expGap(rng, 6*time.Second) {
		p.Events = append(p.Events, ev(pickWeighted(rng, rolloutOps, rolloutWeights), t))
	}
}

// rolloutWaves are the waves a rollout-set sets, by its variant: the
// first member as the canary then the rest, one node then the rest, or
// both. Each keeps the canary in the first wave whatever joins, and a
// removal only moves a node into an earlier wave, never a later one,
// so that a sample's waves read after it excuse no less than those it
// was taken under.
func rolloutWaves(variant int, first string) []string {
	switch variant {
	case 1:
		return []string{"1", "rest"}
	case 2:
		return []string{first, "1", "rest"}
	}
	return []string{first, "rest"}
}

// canary is the first member in the order waves take nodes in (lb2
// before lb10): the first wave's node in every set of waves the
// schedule sets, while it stays a member.
func (r *chaosRun) canary() *chaosNode {
	return slices.MinFunc(r.members(), func(a, b *chaosNode) int {
		switch {
		case store.NaturalLess(a.name, b.name):
			return -1
		case store.NaturalLess(b.name, a.name):
			return 1
		}
		return 0
	})
}

// waveSet is waves the schedule set ('fleet rollout off': none), and
// when the command that set them started.
type waveSet struct {
	cfg fleet.RolloutConfig
	at  time.Time
}

// rolloutGrace is how long after new waves, once no fault stands in
// the way, every agent has followed them: it takes a node a staged
// rollout no longer lets serve a version back to the previous one.
const rolloutGrace = 20 * time.Second

// recentWaves are the waves set before the ones in force that nodes may
// still follow at a sample taken at (R1's excuse, checkRolloutInvariants):
// those replaced less than rolloutGrace before, counted from the end of
// the last fault in effect since (a killed agent, a broken load
// balancer or Redis away delay the agents). The schedule's are the only
// waves ever set, so this is all of them; a set that failed is counted
// too, which excuses more, never less.
func (r *chaosRun) recentWaves(at time.Time) []fleet.RolloutConfig {
	r.mu.Lock()
	sets := slices.Clone(r.waveSets)
	r.mu.Unlock()
	var out []fleet.RolloutConfig
	for i, ws := range sets {
		if i+1 == len(sets) {
			out = append(out, ws.cfg) // the last set: in force, or in flight
			continue
		}
		replaced := sets[i+1].at
		settled := replaced
		for _, f := range r.activeFaultRecs(replaced, at) {
			settled = later(settled, f)
		}
		if at.Before(settled.Add(rolloutGrace)) {
			out = append(out, ws.cfg)
		}
	}
	return out
}

func later(a, b time.Time) time.Time {
	if b.After(a) {
		return b
	}
	return a
}

// activeFaultRecs are the ends of the faults in effect at some time in
// [from, to] (now, for one still in effect).
func (r *chaosRun) activeFaultRecs(from, to time.Time) []time.Time {
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []time.Time
	for _, f := range r.faults {
		end := f.End
		if end.IsZero() {
			end = time.Now()
		}
		if f.Skipped == "" && !f.Start.After(to) && !end.Before(from) {
			out = append(out, end)
		}
	}
	return out
}

// rolloutOp runs one rollout operation on n.
func (r *chaosRun) rolloutOp(op *chaosOp, n *chaosNode, ev chaosEvent) {
	args := []string{"fleet", "rollout"}
	switch ev.Kind {
	case opRolloutSet:
		args = append(args, "set")
		waves := rolloutWaves(ev.Variant, r.canary().name)
		for _, w := range waves {
			args = append(args, "--wave", w)
		}
		args = append(args, "--soak", ev.Dur.String())
		if r.plan.Rollout.Probe {
			args = append(args, "--probe", "https://{name}/")
		}
		r.setWaves(fleet.RolloutConfig{Waves: waves})
	case opRolloutOff:
		args = append(args, "off")
		r.setWaves(fleet.RolloutConfig{})
	case opRolloutResume, opRolloutAbort:
		verb := strings.TrimPrefix(ev.Kind, "rollout-")
		name := r.rolloutTarget(ev)
		op.Names = []string{name}
		args = append(args, verb, name)
		if ev.Kind == opRolloutResume && ev.Variant == 0 {
			args = append(args, "--skip-wave")
		}
	}
	r.command(op, n, args...)
}

func (r *chaosRun) setWaves(cfg fleet.RolloutConfig) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if len(r.waveSets) == 0 {
		r.waveSets = []waveSet{{}} // before the first set: no waves
	}
	r.waveSets = append(r.waveSets, waveSet{cfg: cfg, at: time.Now()})
}

// rolloutTarget picks the rollout a resume or abort acts on among those
// on their way that it can move (a resume: held or aborted ones; an
// abort: rolling or held ones), else among all on their way, else a
// name of the pool (which has none: the command says so).
func (r *chaosRun) rolloutTarget(ev chaosEvent) string {
	c := r.redis.client()
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	names, _ := c.SMembers(ctx, rkRollouts).Result()
	sort.Strings(names)
	var movable []string
	for _, name := range names {
		state := c.HGet(ctx, rkRollout+name, "state").Val()
		if ev.Kind == opRolloutResume && state != fleet.Rolling || ev.Kind == opRolloutAbort && state != fleet.Aborted {
			movable = append(movable, name)
		}
	}
	for _, l := range [][]string{movable, names} {
		if len(l) > 0 {
			return l[int(ev.Pick)%len(l)]
		}
	}
	return r.plan.Pool[int(ev.Pick)%len(r.plan.Pool)].Name
}

// verifyFlags are what every agent of a seed whose rollouts probe gets:
// the probe goes through the node's own load balancer, at --verify-addr,
// and verifies the chain against Pebble's root.
func (n *chaosNode) verifyFlags() []string {
	if n.roots == "" {
		return nil
	}
	f := []string{"--verify-roots", n.roots}
	if n.lb == "haproxy" || n.ngVariant != 1 {
		f = append(f, "--verify-addr", n.tlsAddr)
	}
	return f
}

// sampleServing checks R1 and R3 once a second until the observer
// stops.
func (o *chaosObserver) sampleServing() {
	c := o.r.redis.client()
	defer c.Close()
	for {
		select {
		case <-o.stop:
			return
		case <-time.After(time.Second):
		}
		o.checkServing(c)
	}
}

// checkServing takes one sample of what every member's load balancer
// serves for every live lineage and checks the rollout invariants on
// it (checkRolloutInvariants reads Redis after the sample). A Redis
// that does not answer (a fault) gives no verdict; each violation is
// reported once however many samples show it.
func (o *chaosObserver) checkServing(c goredis.UniversalClient) {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	start := time.Now()
	names, err := c.SMembers(ctx, rkLineages).Result()
	if err != nil {
		return
	}
	sort.Strings(names)
	serving := map[string]map[string]servedCert{}
	var mu sync.Mutex
	var wg sync.WaitGroup
	for _, n := range o.r.members() {
		wg.Add(1)
		go func() {
			defer wg.Done()
			m := map[string]servedCert{}
			for _, name := range names {
				if leaf := servedLeaf(n.tlsAddr, name); leaf != nil && leaf.VerifyHostname(name) == nil {
					m[name] = servedCert{Serial: fmt.Sprintf("%x", leaf.SerialNumber), NotAfter: leaf.NotAfter}
				}
			}
			mu.Lock()
			serving[n.name] = m
			mu.Unlock()
		}()
	}
	wg.Wait()
	onWay, err := c.SCard(ctx, rkRollouts).Result()
	if err != nil {
		return
	}
	v, err := checkRolloutInvariants(c, rkPrefix, serving, time.Now(), o.r.recentWaves(start))
	if err != nil {
		return
	}
	o.mu.Lock()
	o.servingSamples++
	if onWay > 0 {
		o.rolloutSamples++
	}
	o.mu.Unlock()
	for _, line := range v {
		inv, msg, _ := strings.Cut(line, ": ")
		o.once("rollout "+line, func() { o.r.violate(inv, "%s (sample at %s)", msg, o.r.since()) })
	}
}

// rolloutState is what a staged rollout lets each member serve, as
// Redis holds it: the waves resolved over the members, and the record
// of each rollout of a lineage's current head.
type rolloutState struct {
	waves [][]string
	recs  map[string]map[string]string
}

// readRolloutState reads the rollouts of cat's heads. Without waves
// set, nothing is staged: a record left over ends at the agents' next
// look, and every node serves the head.
func readRolloutState(c goredis.UniversalClient, cat map[string]catalogEntry) (*rolloutState, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	s := &rolloutState{recs: map[string]map[string]string{}}
	var cfg fleet.RolloutConfig
	raw, err := c.HGet(ctx, rkPrefix+"rollout", "json").Result()
	if err == goredis.Nil {
		return s, nil
	} else if err != nil {
		return nil, err
	}
	if err := json.Unmarshal([]byte(raw), &cfg); err != nil || !cfg.Staged() {
		return s, nil
	}
	members, err := c.HKeys(ctx, rkMembers).Result()
	if err != nil {
		return nil, err
	}
	s.waves = cfg.Resolve(members)
	names, err := c.SMembers(ctx, rkRollouts).Result()
	if err != nil {
		return nil, err
	}
	for _, name := range names {
		rec, err := c.HGetAll(ctx, rkRollout+name).Result()
		if err != nil {
			return nil, err
		}
		if e, ok := cat[name]; ok && rec["version"] == strconv.Itoa(e.version) && rec["serial"] == e.serial {
			s.recs[name] = rec
		}
	}
	return s, nil
}

// want is what node may serve of name, whose head is e, after quiet
// (package fleet's decideTarget): a rolling rollout is expected to be
// done, so the head; a held one keeps the previous version on the
// nodes of the waves it did not release and on the node whose check
// failed, and a node of a released wave keeps whichever of the two it
// served (the new one if it passed its own check before the hold); an
// aborted one keeps the previous version everywhere; an expiry
// override lets the head through. It returns the serials allowed and,
// when that is not the head alone, why.
func (s *rolloutState) want(node, name string, e catalogEntry) ([]string, string) {
	rec := s.recs[name]
	if rec == nil || rec["state"] == fleet.Rolling || rec["prev_serial"] == "" {
		return []string{e.serial}, ""
	}
	wave, _ := strconv.Atoi(rec["wave"])
	w := slices.IndexFunc(s.waves, func(nodes []string) bool { return slices.Contains(nodes, node) })
	if w < 0 {
		w = len(s.waves) - 1
	}
	ok := []string{rec["prev_serial"]}
	why := fmt.Sprintf("its rollout is %s at wave %d of %d, and %s is in wave %d: it keeps version %s", rec["state"], wave+1, len(s.waves), node, w+1, rec["previous"])
	if rec["state"] == fleet.Held && w <= wave && node != rec["node"] {
		ok = append(ok, e.serial)
		why = fmt.Sprintf("its rollout is held at wave %d of %d, and %s, in wave %d, keeps version %s or the new one", wave+1, len(s.waves), node, w+1, rec["previous"])
	}
	if o, _ := strconv.ParseInt(rec["override_at"], 10, 64); o > 0 && !slices.Contains(ok, e.serial) {
		ok = append(ok, e.serial)
		why += ", or the new one by the expiry override"
	}
	return ok, why
}

// problem says whether fleet status must call the fleet not fine for
// the rollouts: one is held or aborted, or overridden near expiry.
func (s *rolloutState) problem() string {
	for _, name := range slices.Sorted(maps.Keys(s.recs)) {
		rec := s.recs[name]
		if o, _ := strconv.ParseInt(rec["override_at"], 10, 64); rec["state"] != fleet.Rolling || o > 0 {
			return fmt.Sprintf("the rollout of %s version %s is %s", name, rec["version"], rec["state"])
		}
	}
	return ""
}
