package main

import (
	"fmt"
	"os"
	"path/filepath"
	"time"
)

// benchScale measures the nothing-due renew pass where the WebPKI is
// heading (#18): 10,000 lineages of 6-day certificates (issued an hour
// ago, so none is due), and 100,000 lineages of 90-day ones, as a large
// hosting platform holds. Wall time and peak RSS, median of runs.
func benchScale(shortN, bigN, runs int, bin, work string) error {
	work = filepath.Join(work, "scale")
	os.RemoveAll(work)
	os.MkdirAll(work, 0o755)
	c, err := newCA()
	if err != nil {
		return err
	}
	c.age, c.life = time.Hour, 6*24*time.Hour
	short := filepath.Join(work, "short")
	fmt.Printf("\nbench: generating %d lineages of 6-day certificates and %d of 90-day ones\n", shortN, bigN)
	if err := genLbcert(short, shortN, c); err != nil {
		return err
	}
	rs, err := measure(runs, "lbcert, 6-day certificates", shortN, bin, "--dir", short, "renew", "--no-random-sleep")
	if err != nil {
		return err
	}
	os.RemoveAll(short) // room for the big one
	c.age, c.life = 24*time.Hour, 90*24*time.Hour
	big := filepath.Join(work, "big")
	if err := genLbcert(big, bigN, c); err != nil {
		return err
	}
	rb, err := measure(runs, "lbcert, 90-day certificates", bigN, bin, "--dir", big, "renew", "--no-random-sleep")
	if err != nil {
		return err
	}
	if os.Getenv("LBCERT_BENCH_KEEP") == "" {
		os.RemoveAll(big)
	}
	fmt.Printf("\nNothing-due renew pass at scale, %s, %d cores, median of %d runs\n\n", time.Now().UTC().Format(time.DateOnly), numCPU(), runs)
	fmt.Println("| lineages | wall | per lineage | CPU (user+sys) | peak RSS | target |")
	fmt.Println("|---|---:|---:|---:|---:|---|")
	for _, x := range []struct {
		r          result
		wall       time.Duration
		rssMiB     int
		targetText string
	}{{rs, time.Second, 150, "under 1 s and 150 MiB"}, {rb, 3 * time.Second, 200, "under 3 s and 200 MiB"}} {
		met := x.r.wall < x.wall && x.r.rssKB < x.rssMiB*1024
		fmt.Printf("| %d (%s) | %.2f s | %.1f µs | %.2f s | %.1f MiB | %s: %s |\n", x.r.lineages, x.r.tool, x.r.wall.Seconds(),
			float64(x.r.wall.Microseconds())/float64(x.r.lineages), x.r.cpu.Seconds(), float64(x.r.rssKB)/1024, x.targetText,
			map[bool]string{true: "met", false: "NOT met"}[met])
	}
	return nil
}
