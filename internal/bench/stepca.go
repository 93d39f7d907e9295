package main

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/lbcert/lbcert/internal/testenv"
)

// acmeCA is what the step-ca benchmark needs of a CA: Pebble or step-ca.
type acmeCA struct {
	name                    string
	dirURL, bundle, dnsAddr string
	httpPort, pid           int
	orders                  func() int
}

// benchStepCA issues the same n-name batch against step-ca and against
// Pebble, in the same run, each CA fresh and started here: one untimed
// certificate registers the account, then one "lbcert batch" of n new
// names at --concurrency c with pre-flight on and client pacing off,
// under /usr/bin/time, with the CA's CPU read from /proc over the same
// interval. Pebble validates at once (PEBBLE_VA_NOSLEEP) and keeps
// everything in memory; step-ca validates in the challenge request and
// writes every account, order, authorization, challenge and certificate
// to its bbolt database.
func benchStepCA(n, concurrency int, bin, work string) error {
	work = filepath.Join(work, "stepca")
	os.RemoveAll(work)
	os.MkdirAll(work, 0o755)
	fmt.Printf("\nbench: the same batch of %d against step-ca %s and Pebble, --concurrency %d\n", n, testenv.StepCAVersion, concurrency)
	for _, d := range []string{"pebble", "step-ca"} {
		os.MkdirAll(filepath.Join(work, d), 0o755)
	}
	p, err := testenv.StartPebble(testenv.PebbleOptions{Dir: filepath.Join(work, "pebble")})
	if err != nil {
		return err
	}
	defer p.Stop()
	s, err := testenv.StartStepCA(testenv.StepCAOptions{Dir: filepath.Join(work, "step-ca")})
	if err != nil {
		return err
	}
	defer s.Stop()
	cas := []acmeCA{
		{"step-ca " + testenv.StepCAVersion, s.DirectoryURL, s.CABundle, s.DNSAddr, s.HTTPPort, s.PID(), s.Orders},
		{"Pebble", p.DirectoryURL, p.CABundle, p.DNSAddr, p.HTTPPort, p.PID(), p.Orders},
	}
	type row struct {
		ca            string
		wall, lb, cpu time.Duration
		orders        int
	}
	var rows []row
	for i, ca := range cas {
		dir := filepath.Join(work, fmt.Sprintf("state%d", i))
		batch := func(prefix string, count int) []string {
			var csv strings.Builder
			for j := range count {
				fmt.Fprintf(&csv, "%s%04d.ca%d.bench.example,,%d\n", prefix, j, i, ca.httpPort)
			}
			path := filepath.Join(work, fmt.Sprintf("%s%d.csv", prefix, i))
			os.WriteFile(path, []byte(csv.String()), 0o644)
			return []string{bin, "--server", ca.dirURL, "--ca-bundle", ca.bundle, "--dir", dir, "-q",
				"batch", path, "--agree-tos", "--http-addr", "127.0.0.1:1", "--concurrency", strconv.Itoa(concurrency),
				"--http-port", strconv.Itoa(ca.httpPort), "--resolver", ca.dnsAddr, "--rate-orders", "off", "--rate-domain", "off"}
		}
		warm := batch("warm", 1)
		if out, err := exec.Command(warm[0], warm[1:]...).CombinedOutput(); err != nil {
			return fmt.Errorf("%s warm-up: %v\n%s", ca.name, err, tail(string(out)))
		}
		orders := ca.orders()
		before, err := procCPU(ca.pid)
		if err != nil {
			return err
		}
		r, err := measureOnce("lbcert batch against "+ca.name, n, batch("b", n)...)
		if err != nil {
			return err
		}
		after, _ := procCPU(ca.pid)
		if got := countFiles(filepath.Join(dir, "live", "b*", "cert.pem")); got != n {
			return fmt.Errorf("%s: batch issued %d of %d", ca.name, got, n)
		}
		rows = append(rows, row{ca.name, r.wall, r.cpu, after - before, ca.orders() - orders})
	}
	fmt.Printf("\nThe same batch of %d new names against step-ca and Pebble, %s, %d cores, --concurrency %d, pre-flight on\n\n",
		n, time.Now().UTC().Format(time.DateOnly), numCPU(), concurrency)
	fmt.Println("| CA | certificates | orders | wall | wall per certificate | lbcert CPU per certificate | CA CPU per certificate |")
	fmt.Println("|---|---:|---:|---:|---:|---:|---:|")
	per := func(d time.Duration) string { return fmt.Sprintf("%.1f ms", float64(d.Microseconds())/1000/float64(n)) }
	for _, r := range rows {
		fmt.Printf("| %s | %d | %d | %.1f s | %s | %s | %s |\n", r.ca, n, r.orders, r.wall.Seconds(), per(r.wall), per(r.lb), per(r.cpu))
	}
	fmt.Printf("\nOrders beyond one per certificate were placed again after a 5xx answer (step-ca answered %d requests with one).\n", s.ServerErrors())
	return nil
}
