package renewal

import (
	"fmt"
	"math/rand/v2"
	"testing"
	"time"

	"github.com/lbcert/lbcert/internal/store"
)

// spreadRun is what one simulated year of scheduled renew runs did.
type spreadRun struct {
	runs   int
	cycles []cycleLoad // cycles[k]: the (k+1)th renewal of every lineage
	peak   int         // the most renewals in one run, all cycles, from the second cycle on
}

// cycleLoad is one renewal cycle: how its renewals fell over the runs.
type cycleLoad struct {
	first, last int // runs that held its first and last renewal
	total, peak int
	complete    bool // every lineage renewed in it within the year
}

func (c cycleLoad) mean() float64 { return float64(c.total) / float64(c.last-c.first+1) }

// simulateSpread issues n certificates of lifetime life within one day,
// then runs renew every `every` for `span`, renewing what Decide says is
// due (no ARI, no --days, as a CA without ARI leaves it), and counts the
// renewals per run and per cycle. name gives each lineage its name; a
// constant name is the old rule, where every lineage has the same moment.
func simulateSpread(n int, life, every, span time.Duration, name func(i int) string) spreadRun {
	rng := rand.New(rand.NewPCG(1, 2))
	start := time.Date(2026, 3, 1, 0, 0, 0, 0, time.UTC)
	certs := make([]store.CertInfo, n)
	cycle := make([]int, n)
	for i := range certs {
		nb := start.Add(time.Duration(rng.Int64N(int64(24 * time.Hour))))
		certs[i] = store.CertInfo{NotBefore: nb, NotAfter: nb.Add(life)}
	}
	var out spreadRun
	perRun := map[int]map[int]int{} // cycle -> run -> renewals
	totals := map[int]int{}         // run -> renewals from the second cycle on
	out.runs = int(span / every)
	for r := 1; r <= out.runs; r++ {
		now := start.Add(time.Duration(r)*every + 2*time.Hour + 17*time.Minute) // 17 2 * * *
		for i := range certs {
			if !Decide(certs[i], store.Status{}, now, Options{Name: name(i)}).Due {
				continue
			}
			certs[i] = store.CertInfo{NotBefore: now, NotAfter: now.Add(life)}
			c := cycle[i]
			cycle[i]++
			if perRun[c] == nil {
				perRun[c] = map[int]int{}
			}
			perRun[c][r]++
			if c >= 1 {
				totals[r]++
			}
		}
	}
	for c := 0; perRun[c] != nil; c++ {
		l := cycleLoad{first: out.runs + 1}
		for r, k := range perRun[c] {
			l.first, l.last = min(l.first, r), max(l.last, r)
			l.total += k
			l.peak = max(l.peak, k)
		}
		l.complete = l.total == n && perRun[c+1] != nil // the next one began: this one is over
		out.cycles = append(out.cycles, l)
	}
	for _, k := range totals {
		out.peak = max(out.peak, k)
	}
	return out
}

// TestRenewalSpread: 10,000 lineages bulk-issued within one day, a year
// of scheduled renew runs with no ARI. Under the old rule (one moment for
// all) every cycle is the burst of 10,000 again, within a day. With each lineage's own moment,
// every cycle from the second on spreads so that its busiest run holds at
// most 1.5 times the cycle's mean per run. The figures are on the
// benchmark page (internal/bench/README.md, "Renewal spread").
//
// 90 days is Let's Encrypt's lifetime today, 47 days the CA/B Forum's for
// 2029. Six-day certificates are left out on purpose: their window is one
// day, no wider than an import spread over a day already is, and the CAs
// that issue them offer ARI, whose window the policy keeps.
func TestRenewalSpread(t *testing.T) {
	const n = 10000
	year := 365 * 24 * time.Hour
	for _, tc := range []struct {
		what        string
		life, every time.Duration
	}{
		{"90-day certificates, daily renew", 90 * 24 * time.Hour, 24 * time.Hour},
		{"47-day certificates, daily renew", 47 * 24 * time.Hour, 24 * time.Hour},
	} {
		t.Run(tc.what, func(t *testing.T) {
			// One moment for all: each cycle is the import day again, the
			// whole burst within a day's runs.
			old := simulateSpread(n, tc.life, tc.every, year, func(int) string { return "same" })
			perDay := int(24*time.Hour/tc.every) + 1
			if c := old.cycles[1]; c.last-c.first+1 > perDay {
				t.Fatalf("one moment for all: the second cycle took runs %d-%d, want at most %d runs", c.first, c.last, perDay)
			}
			got := simulateSpread(n, tc.life, tc.every, year, func(i int) string { return fmt.Sprintf("c%05d.example.net", i) })
			checked := 0
			for k, c := range got.cycles {
				if !c.complete {
					continue
				}
				ratio := float64(c.peak) / c.mean()
				t.Logf("cycle %d: runs %d-%d, %d renewals, peak %d per run, mean %.0f, peak/mean %.2f",
					k+1, c.first, c.last, c.total, c.peak, c.mean(), ratio)
				if k >= 1 {
					checked++
					if ratio > 1.5 {
						t.Errorf("cycle %d: peak %d per run is %.2f times its mean %.0f; want at most 1.5", k+1, c.peak, ratio, c.mean())
					}
				}
			}
			if checked < 2 {
				t.Fatalf("only %d complete cycles after the first in a year", checked)
			}
			t.Logf("busiest run from the second cycle on: %d renewals; with one moment for all: %d", got.peak, old.peak)
			if got.peak*4 > old.peak {
				t.Errorf("the spread cut the busiest run only from %d to %d", old.peak, got.peak)
			}
		})
	}
}
