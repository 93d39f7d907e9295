package main

import (
	"testing"
	"time"
)

// The head-to-head compares medians, each measure on its own: the run
// with the median wall need not be the run with the median CPU.
func TestMedianTakesEachMeasureOnItsOwn(t *testing.T) {
	run := func(wall, cpu, ca time.Duration, rss int) peerRun {
		var p peerRun
		p.label = "lbcert"
		p.r.wall, p.r.cpu, p.ca, p.r.rssKB = wall, cpu, ca, rss
		return p
	}
	runs := []peerRun{
		run(3*time.Second, 10*time.Millisecond, 7*time.Millisecond, 500),
		run(1*time.Second, 30*time.Millisecond, 9*time.Millisecond, 100),
		run(2*time.Second, 20*time.Millisecond, 8*time.Millisecond, 900),
		run(5*time.Second, 50*time.Millisecond, 1*time.Millisecond, 300),
		run(4*time.Second, 40*time.Millisecond, 2*time.Millisecond, 700),
	}
	m := median(runs)
	if m.r.wall != 3*time.Second || m.r.cpu != 30*time.Millisecond || m.ca != 7*time.Millisecond || m.r.rssKB != 500 || m.label != "lbcert" {
		t.Fatalf("median = wall %v, cpu %v, ca %v, rss %d, label %q; want 3s, 30ms, 7ms, 500, lbcert",
			m.r.wall, m.r.cpu, m.ca, m.r.rssKB, m.label)
	}
	// The input keeps its order: the pairs are printed from it.
	if runs[0].r.wall != 3*time.Second || runs[1].r.rssKB != 100 {
		t.Fatal("median reordered its input")
	}
}
