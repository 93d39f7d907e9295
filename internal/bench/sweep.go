package main

import (
	"fmt"
	"path/filepath"
	"strconv"
	"time"
)

// sweepConcurrency measures lbcert batch issuing n new names at each
// concurrency of sweep, pre-flight on and budget off, and then renew of
// those n lineages (due by --days) at the same concurrency: the figures
// the defaults of --concurrency are chosen from.
func sweepConcurrency(n int, sweep []int, lb lbcertRunner, off []string) error {
	if len(sweep) == 0 {
		return nil
	}
	type point struct {
		c            int
		batch, renew peerRun
	}
	var pts []point
	for _, c := range sweep {
		l := lb
		l.dir = filepath.Join(lb.work, "sweep-"+strconv.Itoa(c))
		conc := []string{"--concurrency", strconv.Itoa(c)}
		b, err := l.batch(fmt.Sprintf("s%d-", c), n, append(conc, off...))
		if err != nil {
			return err
		}
		argv := append([]string{l.bin, "--server", l.p.DirectoryURL, "--ca-bundle", l.p.CABundle, "--dir", l.dir, "-q",
			"renew", "--days", "100", "--no-random-sleep"}, append(conc, off...)...)
		r, ca, err := measureCA(l.p, "lbcert renew", n, argv...)
		if err != nil {
			return err
		}
		pts = append(pts, point{c, b, peerRun{r: r, ca: ca}})
		fmt.Printf("  --concurrency %d: batch %.2f s, renew %.2f s\n", c, b.r.wall.Seconds(), r.wall.Seconds())
	}
	fmt.Printf("\nlbcert batch of %d new names, then renew of those %d, at each --concurrency (pre-flight on, budget off), %s, %d cores, load average %s\n\n",
		n, n, time.Now().UTC().Format(time.DateOnly), numCPU(), loadAverage())
	fmt.Println("| --concurrency | batch wall | batch CPU per certificate | Pebble CPU per certificate | renew wall | renew CPU per certificate | Pebble CPU per certificate |")
	fmt.Println("|---:|---:|---:|---:|---:|---:|---:|")
	for _, p := range pts {
		fmt.Printf("| %d | %.2f s | %.1f ms | %.1f ms | %.2f s | %.1f ms | %.1f ms |\n", p.c, p.batch.r.wall.Seconds(), perCert(p.batch.r.cpu, n),
			perCert(p.batch.ca, n), p.renew.r.wall.Seconds(), perCert(p.renew.r.cpu, n), perCert(p.renew.ca, n))
	}
	return nil
}
