package e2e

import (
	"reflect"
	"slices"
	"testing"
	"time"
)

// TestChaosPlan: a seed's plan is its own (the same seed gives the same
// schedule, another seed another), every kind of operation and fault is
// in every seed, and no two Redis faults overlap.
func TestChaosPlan(t *testing.T) {
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
}
