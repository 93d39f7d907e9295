package main

import (
	"bytes"
	"cmp"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/lbcert/lbcert/internal/testenv"
)

// certmagicVersion is the certmagic the peer is built with, pinned by
// internal/bench/certmagic/go.mod.
const certmagicVersion = "v0.25.6"

// buildCertmagic builds the certmagic peer (internal/bench/certmagic, a
// module of its own) from the Go module proxy into work.
func buildCertmagic(work string) (string, error) {
	root, err := testenv.ModuleRoot()
	if err != nil {
		return "", err
	}
	mod := filepath.Join(root, "internal", "bench", "certmagic")
	if data, err := os.ReadFile(filepath.Join(mod, "go.mod")); err != nil || !strings.Contains(string(data), "github.com/caddyserver/certmagic "+certmagicVersion) {
		return "", fmt.Errorf("internal/bench/certmagic/go.mod does not require certmagic %s (%v)", certmagicVersion, err)
	}
	bin := filepath.Join(work, "certmagic-bench")
	build := exec.Command("go", "build", "-trimpath", "-o", bin, ".")
	build.Dir = mod
	build.Env = append(os.Environ(), "GOWORK=off", "GOFLAGS=-mod=readonly")
	if out, err := build.CombinedOutput(); err != nil {
		return "", fmt.Errorf("build the certmagic peer: %v: %s", err, bytes.TrimSpace(out))
	}
	return bin, nil
}

// peerRun is one timed issuance of n new names by one client.
type peerRun struct {
	label        string
	r            result
	ca           time.Duration // Pebble's CPU over the run
	orders, errs int
}

// benchCertmagic is lbcert beside certmagic (#29): the same n new names
// on the same Pebble in the same run, with each client's own limits off
// (lbcert at certmagic's concurrency: every name in flight; repeats runs
// of each, alternating, compared by their medians) and again at each
// one's defaults, then one order of each through a tracing front,
// then lbcert's batch at each concurrency of sweep.
func benchCertmagic(n, repeats int, sweep []int, traceRuns int, bin, work string) error {
	work = filepath.Join(work, "certmagic")
	os.RemoveAll(work)
	os.MkdirAll(work, 0o755)
	cm, err := buildCertmagic(work)
	if err != nil {
		return err
	}
	os.MkdirAll(filepath.Join(work, "pebble"), 0o755)
	p, err := testenv.StartPebble(testenv.PebbleOptions{Dir: filepath.Join(work, "pebble")})
	if err != nil {
		return err
	}
	defer p.Stop()
	fmt.Printf("\nbench: lbcert beside certmagic %s, %d new names each run, one Pebble\n", certmagicVersion, n)
	lb := lbcertRunner{bin: bin, p: p, work: work, dir: filepath.Join(work, "lbcert")}
	cmr := certmagicRunner{bin: cm, p: p, work: work, storage: filepath.Join(work, "certmagic-storage")}
	// Each client's account is registered by one untimed certificate.
	if _, err := lb.batch("warm", 1, []string{"--concurrency", "1"}); err != nil {
		return err
	}
	if _, err := cmr.run("warm", 1, "off"); err != nil {
		return err
	}
	off := []string{"--rate-orders", "off", "--rate-domain", "off"}
	type step struct {
		label string
		run   func() (peerRun, error)
	}
	lbRuns, cmRuns, err := headToHead(n, repeats, lb, cmr, off)
	if err != nil {
		return err
	}
	steps := []step{
		{"lbcert batch at its default concurrency, pre-flight on, budget off", func() (peerRun, error) { return lb.batch("c", n, off) }},
		{"lbcert batch, every default (budget on: names in their own registered domains)", func() (peerRun, error) { return lb.batch("d", n, nil) }},
		{"certmagic `ManageAsync`, its default limiter (10 orders per 10 s)", func() (peerRun, error) { return cmr.run("e", n, "default") }},
	}
	lbMid, cmMid := median(lbRuns), median(cmRuns)
	lbMid.label = fmt.Sprintf("lbcert batch `--concurrency %d --preflight=false`, budget off (median of %d)", n, len(lbRuns))
	cmMid.label = fmt.Sprintf("certmagic `ManageAsync`, limiter off, every name in flight (median of %d)", len(cmRuns))
	runs := []peerRun{lbMid, cmMid}
	for _, s := range steps {
		r, err := s.run()
		if err != nil {
			return err
		}
		r.label = s.label
		fmt.Printf("  %s: %.2f s wall, %.2f s CPU\n", r.label, r.r.wall.Seconds(), r.r.cpu.Seconds())
		runs = append(runs, r)
	}
	reportPeers(n, runs)
	if traceRuns > 0 {
		if err := traceOneOrder(bin, cm, work, traceRuns); err != nil {
			return err
		}
	}
	return sweepConcurrency(n, sweep, lb, off)
}

// headToHead runs lbcert and certmagic with every name in flight,
// repeats times each, alternating which goes first: one run of each
// differs from the next by more than the two clients differ (10 % in
// wall within one run on 2026-12-05), so the verdict is on medians.
func headToHead(n, repeats int, lb lbcertRunner, cmr certmagicRunner, off []string) (lbRuns, cmRuns []peerRun, err error) {
	for i := 1; i <= max(repeats, 1); i++ {
		lbRun := func() error {
			r, err := lb.batch(fmt.Sprintf("r%dl", i), n, append([]string{"--concurrency", strconv.Itoa(n), "--preflight=false"}, off...))
			lbRuns = append(lbRuns, r)
			return err
		}
		cmRun := func() error {
			r, err := cmr.run(fmt.Sprintf("r%dc", i), n, "off")
			cmRuns = append(cmRuns, r)
			return err
		}
		first, second := lbRun, cmRun
		if i%2 == 0 {
			first, second = cmRun, lbRun
		}
		if err := first(); err != nil {
			return nil, nil, err
		}
		if err := second(); err != nil {
			return nil, nil, err
		}
		l, c := lbRuns[i-1], cmRuns[i-1]
		fmt.Printf("  every name in flight, pair %d: lbcert %.2f s wall, %.2f s CPU; certmagic %.2f s wall, %.2f s CPU\n",
			i, l.r.wall.Seconds(), l.r.cpu.Seconds(), c.r.wall.Seconds(), c.r.cpu.Seconds())
	}
	return lbRuns, cmRuns, nil
}

// median is runs' median of each measure on its own.
func median(runs []peerRun) peerRun {
	m := runs[0]
	m.r.wall = medianOf(runs, func(r peerRun) time.Duration { return r.r.wall })
	m.r.cpu = medianOf(runs, func(r peerRun) time.Duration { return r.r.cpu })
	m.ca = medianOf(runs, func(r peerRun) time.Duration { return r.ca })
	m.r.rssKB = medianOf(runs, func(r peerRun) int { return r.r.rssKB })
	return m
}

// medianOf is the median of one measure over runs, each measure sorted
// on its own.
func medianOf[T cmp.Ordered](runs []peerRun, f func(peerRun) T) T {
	v := make([]T, len(runs))
	for i, r := range runs {
		v[i] = f(r)
	}
	slices.Sort(v)
	return v[len(v)/2]
}

func reportPeers(n int, runs []peerRun) {
	fmt.Printf("\nlbcert beside certmagic %s, %d new names per run, one Pebble, %s, %d cores, load average %s\n\n", certmagicVersion, n,
		time.Now().UTC().Format(time.DateOnly), numCPU(), loadAverage())
	fmt.Println("| client | wall | client CPU (user+sys) | client CPU per certificate | Pebble CPU per certificate | peak RSS |")
	fmt.Println("|---|---:|---:|---:|---:|---:|")
	for _, r := range runs {
		fmt.Printf("| %s | %.2f s | %.2f s | %.1f ms | %.1f ms | %.1f MiB |\n", r.label, r.r.wall.Seconds(), r.r.cpu.Seconds(),
			perCert(r.r.cpu, n), perCert(r.ca, n), float64(r.r.rssKB)/1024)
	}
	a, b := runs[0], runs[1]
	fmt.Printf("\ngoal, at equal concurrency lbcert's wall at most certmagic's: %s (%.2f s against %.2f s); CPU per certificate at most certmagic's: %s (%.1f ms against %.1f ms)\n",
		metText(a.r.wall <= b.r.wall), a.r.wall.Seconds(), b.r.wall.Seconds(), metText(a.r.cpu <= b.r.cpu), perCert(a.r.cpu, n), perCert(b.r.cpu, n))
}

func metText(ok bool) string { return map[bool]string{true: "met", false: "NOT met"}[ok] }

// loadAverage is /proc/loadavg's first three fields: the benchmark page
// says how busy the machine was.
func loadAverage() string {
	data, _ := os.ReadFile("/proc/loadavg")
	f := strings.Fields(string(data))
	if len(f) < 3 {
		return "?"
	}
	return strings.Join(f[:3], " ")
}

// lbcertRunner runs lbcert batches against one Pebble into one state
// directory.
type lbcertRunner struct {
	bin, work, dir string
	p              *testenv.Pebble
}

// batch issues count new names with prefix, each in its own registered
// domain (so that the default budget's 50 per registered domain does
// not bind: a hosting platform's names are its customers' domains),
// with extra flags after the batch's own.
func (l lbcertRunner) batch(prefix string, count int, extra []string) (peerRun, error) {
	var csv strings.Builder
	for i := range count {
		fmt.Fprintf(&csv, "%s%04d-lb.example,,%d\n", prefix, i, l.p.HTTPPort)
	}
	path := filepath.Join(l.work, "lb-"+prefix+".csv")
	os.WriteFile(path, []byte(csv.String()), 0o644)
	argv := append([]string{l.bin, "--server", l.p.DirectoryURL, "--ca-bundle", l.p.CABundle, "--dir", l.dir, "-q",
		"batch", path, "--agree-tos", "--http-addr", "127.0.0.1:1", "--http-port", strconv.Itoa(l.p.HTTPPort), "--resolver", l.p.DNSAddr}, extra...)
	orders := l.p.Orders()
	r, ca, err := measureCA(l.p, "lbcert batch", count, argv...)
	if err != nil {
		return peerRun{}, err
	}
	if got := countFiles(filepath.Join(l.dir, "live", prefix+"*", "cert.pem")); got != count {
		return peerRun{}, fmt.Errorf("lbcert batch %s issued %d of %d", prefix, got, count)
	}
	return peerRun{r: r, ca: ca, orders: l.p.Orders() - orders}, nil
}

// certmagicRunner runs the certmagic peer against one Pebble with one
// storage.
type certmagicRunner struct {
	bin, work, storage string
	p                  *testenv.Pebble
}

func (c certmagicRunner) run(prefix string, count int, limit string) (peerRun, error) {
	var names strings.Builder
	for i := range count {
		fmt.Fprintf(&names, "%s%04d-cm.example\n", prefix, i)
	}
	path := filepath.Join(c.work, "cm-"+prefix+".txt")
	os.WriteFile(path, []byte(names.String()), 0o644)
	argv := []string{c.bin, "-server", c.p.DirectoryURL, "-ca-bundle", c.p.CABundle, "-http-port", strconv.Itoa(c.p.HTTPPort),
		"-storage", c.storage, "-names", path, "-limit", limit}
	orders := c.p.Orders()
	r, ca, err := measureCA(c.p, "certmagic", count, argv...)
	if err != nil {
		return peerRun{}, err
	}
	certs, _ := filepath.Glob(filepath.Join(c.storage, "certificates", "*", prefix+"*", "*.crt"))
	if len(certs) != count {
		return peerRun{}, fmt.Errorf("certmagic %s stored %d certificates of %d", prefix, len(certs), count)
	}
	return peerRun{r: r, ca: ca, orders: c.p.Orders() - orders}, nil
}
