package e2e

import (
	"reflect"
	"slices"
	"testing"
	"time"
)

// TestChaosPlan: a seed's plan is its own (the same seed gives the same
// schedule, another seed another), every kind of operation and fault is
// in every seed, every rollout operation and a canary's broken load
// balancer in every seed with staged rollouts, and no two Redis faults
// overlap. Seeds with and without rollouts, with and without a probe,
// are among the first few and in make test's.
func TestChaosPlan(t *testing.T) {
	shapes := map[string][]uint64{}
	for seed := uint64(1); seed <= 20; seed++ {
		p := newChaosPlan(seed, 15*time.Second)
		if !reflect.DeepEqual(p, newChaosPlan(seed, 15*time.Second)) {
			t.Fatalf("seed %d: two plans differ", seed)
		}
		if reflect.DeepEqual(p.Events, newChaosPlan(seed+100, 15*time.Second).Events) {
			t.Fatalf("seeds %d and %d have the same schedule", seed, seed+100)
		}
		t.Logf("seed %d: %s", seed, p.describe())
		kinds := map[string]int{}
		for _, e := range p.Events {
			kinds[e.Kind]++
		}
		for _, k := range append(slices.Clone(chaosOps), chaosFaults...) {
			if kinds[k] == 0 && (k != fFailover || p.Sentinel) {
				t.Errorf("seed %d: no %s", seed, k)
			}
		}
		shapes[p.Rollout.describe()] = append(shapes[p.Rollout.describe()], seed)
		canary := slices.ContainsFunc(p.Events, func(e chaosEvent) bool { return e.Canary })
		for _, k := range rolloutOps {
			if p.Rollout == nil && kinds[k] > 0 || p.Rollout != nil && k != opRolloutOff && kinds[k] == 0 {
				t.Errorf("seed %d (%s): %d %s", seed, p.Rollout.describe(), kinds[k], k)
			}
		}
		if canary != (p.Rollout != nil) {
			t.Errorf("seed %d (%s): a canary's load balancer broken: %v", seed, p.Rollout.describe(), canary)
		}
		var free time.Duration
		for _, e := range p.Events {
			if !redisFault(e.Kind) {
				continue
			}
			if e.At < free {
				t.Errorf("seed %d: %s at %s overlaps the Redis fault before it (healed at %s)", seed, e.Kind, e.At, free)
			}
			free = e.At + e.Dur
		}
	}
	short := map[string]bool{}
	for _, seed := range shortSeeds {
		short[newChaosPlan(seed, 15*time.Second).Rollout.describe()] = true
	}
	for _, shape := range []string{"no staged rollouts", "staged rollouts with a probe", "staged rollouts without a probe"} {
		t.Logf("%s: seeds %v", shape, shapes[shape])
		if len(shapes[shape]) == 0 {
			t.Errorf("no seed of 1 to 20 has %s", shape)
		}
	}
	if !short["staged rollouts with a probe"] || !short["staged rollouts without a probe"] {
		t.Errorf("make test's seeds %v have only %v", shortSeeds, short)
	}
}
