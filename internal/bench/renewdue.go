package main

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/lbcert/lbcert/internal/testenv"
)

// benchRenewDue measures renew with n due lineages against one Pebble,
// beside batch issuing n new names at the same concurrency, and each
// run's CPU beside Pebble's. before, when set, is an lbcert binary from
// before the engine (renew one lineage at a time), run over the same
// kind of lineages for the "before" figure.
func benchRenewDue(n, concurrency int, bin, before, work string) error {
	work = filepath.Join(work, "renewdue")
	os.RemoveAll(work)
	os.MkdirAll(work, 0o755)
	p, err := testenv.StartPebble(testenv.PebbleOptions{Dir: work})
	if err != nil {
		return err
	}
	defer p.Stop()
	fmt.Printf("\nbench: renew of %d due lineages beside batch issuing %d, --concurrency %d, against Pebble\n", n, n, concurrency)
	common := func(dir string) []string {
		return []string{"--server", p.DirectoryURL, "--ca-bundle", p.CABundle, "--dir", dir, "-q"}
	}
	pace := []string{"--rate-orders", "off", "--rate-domain", "off"}
	issue := func(b, dir, prefix string) (result, time.Duration, error) {
		var csv strings.Builder
		for i := range n {
			fmt.Fprintf(&csv, "%s%04d.renew.bench.example,,%d\n", prefix, i, p.HTTPPort)
		}
		path := filepath.Join(work, prefix+".csv")
		os.WriteFile(path, []byte(csv.String()), 0o644)
		args := append(append(common(dir), "batch", path, "--agree-tos", "--http-addr", "127.0.0.1:1", "--preflight=false",
			"--concurrency", strconv.Itoa(concurrency)), pace...)
		return measureWithCA(p, "lbcert batch, "+strconv.Itoa(n)+" new names", n, append([]string{b}, args...)...)
	}
	renew := func(b, dir, label string, conc bool) (result, time.Duration, error) {
		args := append(append(common(dir), "renew", "--days", "100", "--no-random-sleep"), pace...)
		if conc {
			args = append(args, "--concurrency", strconv.Itoa(concurrency))
		}
		return measureWithCA(p, label, n, append([]string{b}, args...)...)
	}
	dir := filepath.Join(work, "state")
	bres, bca, err := issue(bin, dir, "b")
	if err != nil {
		return err
	}
	if got := countFiles(filepath.Join(dir, "live", "*", "cert.pem")); got != n {
		return fmt.Errorf("batch issued %d of %d", got, n)
	}
	rres, rca, err := renew(bin, dir, fmt.Sprintf("lbcert renew, %d due lineages", n), true)
	if err != nil {
		return err
	}
	rows := [][3]any{{bres, bca, ""}, {rres, rca, fmt.Sprintf("%.2fx batch", float64(rres.wall)/float64(bres.wall))}}
	if before != "" {
		// The binary from before the engine renews the same kind of
		// lineages (issued by today's batch: the on-disk format is the
		// same), one at a time.
		od := filepath.Join(work, "before")
		if _, _, err := issue(bin, od, "o"); err != nil {
			return err
		}
		ores, oca, err := renew(before, od, fmt.Sprintf("lbcert renew before the engine (one at a time), %d due", n), false)
		if err != nil {
			return err
		}
		rows = append(rows, [3]any{ores, oca, fmt.Sprintf("%.2fx batch", float64(ores.wall)/float64(bres.wall))})
	}
	fmt.Printf("\nRenew vs batch, %d certificates each, %s, %d cores\n\n", n, time.Now().UTC().Format(time.DateOnly), numCPU())
	fmt.Println("| run | wall | lbcert CPU per certificate | Pebble CPU per certificate | lbcert peak RSS | wall vs batch |")
	fmt.Println("|---|---:|---:|---:|---:|---:|")
	for _, row := range rows {
		r, ca, vs := row[0].(result), row[1].(time.Duration), row[2].(string)
		fmt.Printf("| %s | %.1f s | %.1f ms | %.1f ms | %.1f MiB | %s |\n", r.tool, r.wall.Seconds(),
			perCert(r.cpu, n), perCert(ca, n), float64(r.rssKB)/1024, vs)
	}
	ok := float64(rres.wall) <= 1.2*float64(bres.wall)
	fmt.Printf("\nrenew target (wall within 1.2x of batch's): %s; client CPU at most the CA's: %s\n",
		map[bool]string{true: "met", false: "NOT met"}[ok], map[bool]string{true: "met", false: "NOT met"}[rres.cpu <= rca && bres.cpu <= bca])
	return nil
}

func perCert(d time.Duration, n int) float64 { return float64(d.Microseconds()) / 1000 / float64(n) }

// measureWithCA is measureOnce plus the CPU Pebble spent meanwhile, read
// from /proc: the CA's cost beside the client's, in the same run.
func measureWithCA(p *testenv.Pebble, tool string, n int, argv ...string) (r result, ca time.Duration, err error) {
	defer func() {
		if err == nil { // each phase's figure as it comes: a later hang loses nothing
			fmt.Printf("  %s: %.1f s wall, lbcert CPU %.1f ms/cert, Pebble CPU %.1f ms/cert, %.1f MiB\n",
				tool, r.wall.Seconds(), perCert(r.cpu, n), perCert(ca, n), float64(r.rssKB)/1024)
		}
	}()
	return measureCA(p, tool, n, argv...)
}

func measureCA(p *testenv.Pebble, tool string, n int, argv ...string) (result, time.Duration, error) {
	before, err := procCPU(p.PID())
	if err != nil {
		return result{}, 0, err
	}
	r, err := measureOnce(tool, n, argv...)
	if err != nil {
		// A hung order is not always lbcert's: say whether Pebble's own
		// lock-order cycle was the cause.
		if d := p.Dump(); strings.HasPrefix(d, "PEBBLE DEADLOCK") {
			return r, 0, fmt.Errorf("%v\n%s", err, strings.SplitN(d, "\n", 2)[0])
		}
		return r, 0, err
	}
	after, err := procCPU(p.PID())
	return r, after - before, err
}

// procCPU is a process's user+system time from /proc/PID/stat.
func procCPU(pid int) (time.Duration, error) {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, err
	}
	// Fields after the command name, which is in parentheses.
	f := strings.Fields(string(data[strings.LastIndexByte(string(data), ')')+2:]))
	utime, _ := strconv.ParseInt(f[11], 10, 64)
	stime, _ := strconv.ParseInt(f[12], 10, 64)
	const hz = 100 // USER_HZ on Linux
	return time.Duration(utime+stime) * time.Second / hz, nil
}
