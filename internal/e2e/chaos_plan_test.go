package e2e

import (
	"fmt"
	"math/rand/v2"
	"slices"
	"time"
)

// A chaos plan is everything TestFleetRandomFaults does, derived from
// the seed alone: the fleet's shape and the timed schedule of
// operations and faults. Which node an event lands on is a pick index
// taken modulo the members present when it runs, so the schedule stays
// the seed's even though removals and joins change the membership.

// Operations, run as an operator would, from a node's --dir.
const (
	opIssue   = "issue"   // issue -d NAME [-d www.NAME]
	opBatch   = "batch"   // batch of a few rows
	opRenew   = "renew"   // renew --force --name NAME
	opDelete  = "delete"  // delete --name NAME --yes
	opDeploy  = "deploy"  // the node's agent restarted with other --deploy settings
	opReplace = "replace" // fleet remove of a node, then another joins and is approved
)

// Faults, each healed after its duration.
const (
	fRedisKill = "redis-kill" // kill -9 of redis-server (the primary), restarted with or without AOF
	fFlushAll  = "flushall"
	fPause     = "pause"      // CLIENT PAUSE n WRITE
	fFailover  = "failover"   // SENTINEL FAILOVER (seeds with Sentinel)
	fAgentKill = "agent-kill" // kill -9 of a node's agent, restarted later
	fRunKill   = "run-kill"   // kill -9 of a running lbcert command
	fLBBreak   = "lb-break"   // a node's load balancer config broken, then fixed
)

var chaosOps = []string{opIssue, opBatch, opRenew, opDelete, opDeploy, opReplace}
var chaosFaults = []string{fRedisKill, fFlushAll, fPause, fFailover, fAgentKill, fRunKill, fLBBreak}

// lineageSpec is one lineage the schedule may issue: its name and the
// exact set of names it covers. Specs never share a name, so an exact
// set always belongs to one lineage.
type lineageSpec struct {
	Name    string
	Domains []string
}

type chaosNodeSpec struct {
	Name string
	LB   string // "nginx" or "haproxy"
}

type chaosEvent struct {
	At   time.Duration
	Kind string
	// Pick and Pick2 choose a node (or a running command) among those
	// present when the event runs.
	Pick, Pick2 uint32
	Lineages    []int // indexes into the pool
	Dur         time.Duration
	// AOF: the restarted redis-server keeps an append-only file. A kill
	// loses the data when the killed or the restarted instance has none.
	AOF bool
	// LB is the load balancer of the node a replace joins; Variant the
	// deploy change (deploy) to make, or the waves a rollout-set sets
	// (rolloutWaves), or for a rollout-resume whether it skips the wave.
	LB      string
	Variant int
	// Canary: an lb-break of the first member, the first wave's node in
	// every set of waves the schedule sets (chaos_rollout_test.go).
	Canary bool
}

type chaosPlan struct {
	Seed     uint64
	Duration time.Duration
	Nodes    []chaosNodeSpec
	Sentinel bool
	Pool     []lineageSpec
	Events   []chaosEvent
	// Rollout is the seed's staged rollouts, nil in a seed without.
	Rollout *rolloutPlan
}

// The weights of the extra events after the mandatory one of each kind.
var opWeights = map[string]int{opIssue: 30, opBatch: 12, opRenew: 25, opDelete: 15, opDeploy: 8, opReplace: 4}
var faultWeights = map[string]int{fRedisKill: 20, fFlushAll: 8, fPause: 15, fFailover: 10, fAgentKill: 20, fRunKill: 15, fLBBreak: 15}

func pickWeighted(rng *rand.Rand, kinds []string, w map[string]int) string {
	total := 0
	for _, k := range kinds {
		total += w[k]
	}
	n := rng.IntN(total)
	for _, k := range kinds {
		if n < w[k] {
			return k
		}
		n -= w[k]
	}
	return kinds[0]
}

func lbName(rng *rand.Rand) string {
	if rng.IntN(2) == 0 {
		return "nginx"
	}
	return "haproxy"
}

// newChaosPlan derives the plan of seed for a schedule of d.
func newChaosPlan(seed uint64, d time.Duration) *chaosPlan {
	rng := rand.New(rand.NewPCG(seed, 0x6c6263657274))
	p := &chaosPlan{Seed: seed, Duration: d}
	n := 3 + rng.IntN(2)
	for i := range n {
		p.Nodes = append(p.Nodes, chaosNodeSpec{Name: fmt.Sprintf("lb%d", i+1), LB: lbName(rng)})
	}
	if !slices.ContainsFunc(p.Nodes, func(s chaosNodeSpec) bool { return s.LB != p.Nodes[0].LB }) {
		// Mixed: both load balancers in every seed.
		p.Nodes[n-1].LB = map[string]string{"nginx": "haproxy", "haproxy": "nginx"}[p.Nodes[0].LB]
	}
	p.Sentinel = rng.IntN(3) == 0
	pool := min(30, max(6, 4+int(d/(10*time.Second))))
	for i := range pool {
		name := fmt.Sprintf("c%d-%02d.example.com", seed, i)
		spec := lineageSpec{Name: name, Domains: []string{name}}
		if rng.IntN(3) == 0 {
			spec.Domains = append(spec.Domains, "www."+name)
		}
		p.Pool = append(p.Pool, spec)
	}
	at := func(lo, hi float64) time.Duration {
		return time.Duration((lo + rng.Float64()*(hi-lo)) * float64(d))
	}
	// One of each kind, so that even a short seed meets every fault.
	for _, k := range chaosOps {
		p.Events = append(p.Events, p.event(rng, k, at(0.02, 0.8)))
	}
	for _, k := range chaosFaults {
		if k == fFailover && !p.Sentinel {
			continue
		}
		p.Events = append(p.Events, p.event(rng, k, at(0.05, 0.85)))
	}
	opGap, faultGap := 3*time.Second, 8*time.Second
	for t := expGap(rng, opGap); t < d; t += expGap(rng, opGap) {
		p.Events = append(p.Events, p.event(rng, pickWeighted(rng, chaosOps, opWeights), t))
	}
	faults := chaosFaults
	if !p.Sentinel {
		faults = slices.DeleteFunc(slices.Clone(faults), func(k string) bool { return k == fFailover })
	}
	for t := expGap(rng, faultGap); t < d; t += expGap(rng, faultGap) {
		p.Events = append(p.Events, p.event(rng, pickWeighted(rng, faults, faultWeights), t))
	}
	p.addRollouts()
	slices.SortStableFunc(p.Events, func(a, b chaosEvent) int { return int(a.At - b.At) })
	p.spaceRedisFaults()
	return p
}

func expGap(rng *rand.Rand, mean time.Duration) time.Duration {
	return time.Duration(rng.ExpFloat64() * float64(mean))
}

// event draws one event's parameters; the draws are the same in number
// for every kind, so adding a kind's parameter never shifts the others.
func (p *chaosPlan) event(rng *rand.Rand, kind string, at time.Duration) chaosEvent {
	e := chaosEvent{At: at, Kind: kind, Pick: rng.Uint32(), Pick2: rng.Uint32(), AOF: rng.IntN(2) == 0, LB: lbName(rng), Variant: rng.IntN(2)}
	rows := 1 + rng.IntN(4)
	for range rows {
		e.Lineages = append(e.Lineages, rng.IntN(len(p.Pool)))
	}
	slices.Sort(e.Lineages)
	e.Lineages = slices.Compact(e.Lineages)
	frac := rng.Float64()
	// Fault durations grow with the schedule, within bounds.
	span := func(lo, hi time.Duration) time.Duration {
		hi = min(hi, max(lo, p.Duration/6))
		return lo + time.Duration(frac*float64(hi-lo))
	}
	switch kind {
	case fRedisKill:
		e.Dur = span(time.Second, 6*time.Second)
	case fPause:
		e.Dur = span(time.Second, 12*time.Second)
	case fAgentKill:
		e.Dur = span(2*time.Second, 10*time.Second)
	case fLBBreak:
		e.Dur = span(2*time.Second, 12*time.Second)
	}
	return e
}

// redisFault says whether a fault acts on Redis: one at a time.
func redisFault(kind string) bool {
	return kind == fRedisKill || kind == fFlushAll || kind == fPause || kind == fFailover
}

// spaceRedisFaults moves each Redis fault after the previous one has
// healed (a failover needs a few seconds to settle), so two never
// overlap; the events stay sorted.
func (p *chaosPlan) spaceRedisFaults() {
	var free time.Duration
	for i := range p.Events {
		e := &p.Events[i]
		if !redisFault(e.Kind) {
			continue
		}
		e.At = max(e.At, free)
		settle := 500 * time.Millisecond
		if p.Sentinel && (e.Kind == fRedisKill || e.Kind == fFailover) {
			settle = 5 * time.Second
		}
		free = e.At + e.Dur + settle
	}
	slices.SortStableFunc(p.Events, func(a, b chaosEvent) int { return int(a.At - b.At) })
}

// describe is the plan's shape in one line.
func (p *chaosPlan) describe() string {
	var lbs []string
	for _, n := range p.Nodes {
		lbs = append(lbs, n.Name+"="+n.LB)
	}
	redis := "redis"
	if p.Sentinel {
		redis = "redis+replica+sentinel"
	}
	var kills []string
	for _, e := range p.Events {
		if e.Kind == fRedisKill {
			kills = append(kills, map[bool]string{true: "AOF", false: "no AOF"}[e.AOF])
		}
	}
	return fmt.Sprintf("%d nodes %v, %s, %d lineages in the pool, %d events over %s, redis-kill restarts %v, %s", len(p.Nodes), lbs, redis, len(p.Pool), len(p.Events), p.Duration, kills, p.Rollout.describe())
}
