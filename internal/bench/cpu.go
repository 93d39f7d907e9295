package main

import (
	"bufio"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/lbcert/lbcert/internal/testenv"
)

// benchCPU answers "does the client cost more than the CA?" for the
// case the engine issue measured: one batch of n new names at
// --concurrency c with pre-flight on. A first batch runs untraced under
// /usr/bin/time, user and system CPU apart, with Pebble's CPU read from
// /proc over the same interval. A second batch of n other names runs
// under strace -f -c, which slows it, so it gives counts and the split
// of system time between calls, never the CPU figure.
func benchCPU(n, concurrency int, perf bool, bin, work string) error {
	work = filepath.Join(work, "cpu")
	os.RemoveAll(work)
	os.MkdirAll(work, 0o755)
	p, err := testenv.StartPebble(testenv.PebbleOptions{Dir: work})
	if err != nil {
		return err
	}
	defer p.Stop()
	fmt.Printf("\nbench: lbcert's CPU per certificate beside Pebble's, batch of %d, --concurrency %d, pre-flight on\n", n, concurrency)
	dir := filepath.Join(work, "state")
	batch := func(prefix string, count int) []string {
		var csv strings.Builder
		for i := range count {
			fmt.Fprintf(&csv, "%s%04d.cpu.bench.example,,%d\n", prefix, i, p.HTTPPort)
		}
		path := filepath.Join(work, prefix+".csv")
		os.WriteFile(path, []byte(csv.String()), 0o644)
		return []string{bin, "--server", p.DirectoryURL, "--ca-bundle", p.CABundle, "--dir", dir, "-q",
			"batch", path, "--agree-tos", "--http-addr", "127.0.0.1:1", "--concurrency", strconv.Itoa(concurrency),
			"--http-port", strconv.Itoa(p.HTTPPort), "--resolver", p.DNSAddr, "--rate-orders", "off", "--rate-domain", "off"}
	}
	// The account is registered by one untimed certificate first, as
	// the figure was for a batch on an existing account.
	warm := batch("warm", 1)
	if out, err := exec.Command(warm[0], warm[1:]...).CombinedOutput(); err != nil {
		return fmt.Errorf("warm-up: %v\n%s", err, tail(string(out)))
	}

	before, err := procCPU(p.PID())
	if err != nil {
		return err
	}
	start := time.Now()
	cmd := exec.Command("/usr/bin/time", append([]string{"-v"}, batch("c", n)...)...)
	var errb strings.Builder
	cmd.Stderr = &errb
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("batch: %v\n%s", err, tail(errb.String()))
	}
	wall := time.Since(start)
	after, _ := procCPU(p.PID())
	if got := countFiles(filepath.Join(dir, "live", "c*", "cert.pem")); got != n {
		return fmt.Errorf("batch issued %d of %d", got, n)
	}
	user, sys := timeField(errb.String(), "User time (seconds)"), timeField(errb.String(), "System time (seconds)")
	ms := func(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 / float64(n) }

	trace := filepath.Join(work, "strace.txt")
	st := exec.Command("strace", append([]string{"-f", "-c", "-o", trace}, batch("s", n)...)...)
	if out, err := st.CombinedOutput(); err != nil {
		return fmt.Errorf("strace batch: %v\n%s", err, tail(string(out)))
	}
	calls, err := parseStrace(trace)
	if err != nil {
		return err
	}
	var hot []string
	if perf {
		// A third batch under perf: where lbcert's CPU goes, by function.
		data := filepath.Join(work, "perf.data")
		rec := exec.Command("perf", append([]string{"record", "-F", "2000", "-g", "-o", data, "--"}, batch("p", n)...)...)
		if out, err := rec.CombinedOutput(); err != nil {
			return fmt.Errorf("perf record: %v\n%s", err, tail(string(out)))
		}
		rep, err := exec.Command("perf", "report", "-i", data, "--no-children", "--sort", "dso,symbol", "--stdio", "-g", "none", "--percent-limit", "1.5").Output()
		if err != nil {
			return fmt.Errorf("perf report: %v", err)
		}
		for _, line := range strings.Split(string(rep), "\n") {
			if l := strings.TrimSpace(line); l != "" && !strings.HasPrefix(l, "#") {
				hot = append(hot, l)
			}
		}
	}

	fmt.Printf("\nlbcert CPU per certificate, %s, %d cores, %d certificates, --concurrency %d, pre-flight on (wall %.1f s)\n\n",
		time.Now().UTC().Format(time.DateOnly), numCPU(), n, concurrency, wall.Seconds())
	fmt.Println("| | user | system | total |")
	fmt.Println("|---|---:|---:|---:|")
	fmt.Printf("| lbcert, per certificate | %.1f ms | %.1f ms | %.1f ms |\n", ms(user), ms(sys), ms(user+sys))
	fmt.Printf("| Pebble, per certificate | | | %.1f ms |\n", ms(after-before))
	fmt.Printf("\nclient CPU at most the CA's: %s\n", map[bool]string{true: "met", false: "NOT met"}[user+sys <= after-before])
	fmt.Printf("\nSystem calls per certificate (strace -f -c of a second batch of %d; strace slows the run, so counts only):\n\n", n)
	fmt.Println("| call | per certificate | share of traced system time |")
	fmt.Println("|---|---:|---:|")
	for i, c := range calls {
		if i == 14 {
			break
		}
		fmt.Printf("| %s | %.1f | %.1f%% |\n", c.name, float64(c.calls)/float64(n), c.pct)
	}
	for _, want := range []string{"fsync", "fdatasync", "setsockopt", "renameat", "rename"} {
		for i, c := range calls {
			if c.name == want && i >= 14 {
				fmt.Printf("| %s | %.1f | %.1f%% |\n", c.name, float64(c.calls)/float64(n), c.pct)
			}
		}
	}
	if len(hot) > 0 {
		fmt.Printf("\nWhere lbcert's CPU goes (perf record of a third batch of %d; functions over 1.5%% of samples):\n\n", n)
		for _, l := range hot {
			fmt.Println("    " + l)
		}
	}
	return nil
}

// timeField reads one "Name: seconds" line of /usr/bin/time -v.
func timeField(out, name string) time.Duration {
	for _, line := range strings.Split(out, "\n") {
		if v, ok := strings.CutPrefix(strings.TrimSpace(line), name+": "); ok {
			f, _ := strconv.ParseFloat(v, 64)
			return time.Duration(f * float64(time.Second))
		}
	}
	return 0
}

type syscallCount struct {
	name  string
	calls int
	pct   float64
}

// parseStrace reads strace -c's table ("% time seconds usecs/call calls
// errors syscall"), busiest first by share of system time.
func parseStrace(path string) ([]syscallCount, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var out []syscallCount
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fs := strings.Fields(sc.Text())
		if len(fs) < 5 || fs[len(fs)-1] == "total" || fs[len(fs)-1] == "syscall" {
			continue
		}
		pct, err1 := strconv.ParseFloat(fs[0], 64)
		calls, err2 := strconv.Atoi(fs[3])
		if err1 != nil || err2 != nil {
			continue
		}
		out = append(out, syscallCount{name: fs[len(fs)-1], calls: calls, pct: pct})
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("%s: no strace table", path)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].pct > out[j].pct })
	return out, sc.Err()
}
