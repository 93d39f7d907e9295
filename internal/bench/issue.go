package main

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"github.com/lbcert/lbcert/internal/testenv"
)

// benchIssue issues n single-name certificates from one local Pebble
// (validation on, PEBBLE_VA_NOSLEEP=1): with one "lbcert batch", then
// with a loop of certbot and a loop of the lego CLI, each name new to
// Pebble so no authorization is reused. Then it checks a 100,000-row CSV
// with "lbcert batch --check" for peak RSS.
func benchIssue(n, concurrency int, bin, work string) error {
	work = filepath.Join(work, "issue")
	os.MkdirAll(work, 0o755)
	p, err := testenv.StartPebble(testenv.PebbleOptions{Dir: work})
	if err != nil {
		return err
	}
	defer p.Stop()
	httpAddr := fmt.Sprintf("127.0.0.1:%d", p.HTTPPort)
	names := func(prefix string) []string {
		out := make([]string, n)
		for i := range out {
			out[i] = fmt.Sprintf("%s%04d.issue.bench.example", prefix, i)
		}
		return out
	}
	fmt.Printf("\nbench: issuing %d certificates each with lbcert batch, certbot and lego against Pebble\n", n)

	// lbcert: one batch, pre-flight on (it costs one more HTTP request per
	// name, through Pebble's DNS server), client pacing off because the
	// peers have none and every name shares one registered domain.
	var csv strings.Builder
	csv.WriteString("DOMAIN,VIPPort,ACMEPort,FROMAddr,TOAddr,RELAYAddr,RELAYPort\n")
	for _, d := range names("lb") {
		fmt.Fprintf(&csv, "%s,,%d\n", d, p.HTTPPort)
	}
	csvPath := filepath.Join(work, "import.csv")
	os.WriteFile(csvPath, []byte(csv.String()), 0o644)
	lbDir := filepath.Join(work, "lbcert")
	var results []result
	r, err := measureOnce("lbcert batch", n, bin, "--server", p.DirectoryURL, "--ca-bundle", p.CABundle, "--dir", lbDir, "-q",
		"batch", csvPath, "--agree-tos", "--http-addr", "127.0.0.1:1", "--concurrency", fmt.Sprint(concurrency),
		"--http-port", fmt.Sprint(p.HTTPPort), "--resolver", p.DNSAddr, "--rate-orders", "off", "--rate-domain", "off")
	if err != nil {
		return err
	}
	if got := countFiles(filepath.Join(lbDir, "live", "*", "cert.pem")); got != n {
		return fmt.Errorf("lbcert batch issued %d of %d", got, n)
	}
	results = append(results, r)

	// certbot: one process per certificate, its standalone listener on
	// Pebble's validation port. The account is registered first, untimed.
	cb := filepath.Join(work, "certbot")
	cbArgs := fmt.Sprintf("--config-dir %s/cfg --work-dir %s/work --logs-dir %s/logs --server %s -n", cb, cb, cb, p.DirectoryURL)
	reg := exec.Command("sh", "-c", "certbot register --agree-tos --register-unsafely-without-email "+cbArgs)
	reg.Env = append(os.Environ(), "REQUESTS_CA_BUNDLE="+p.CABundle)
	if out, err := reg.CombinedOutput(); err != nil {
		return fmt.Errorf("certbot register: %v\n%s", err, tail(string(out)))
	}
	var loop strings.Builder
	fmt.Fprintf(&loop, "set -e\nexport REQUESTS_CA_BUNDLE=%s\n", p.CABundle)
	for _, d := range names("cb") {
		fmt.Fprintf(&loop, "certbot certonly --standalone --http-01-address 127.0.0.1 --http-01-port %d -d %s %s >/dev/null 2>&1\n", p.HTTPPort, d, cbArgs)
	}
	sh := filepath.Join(work, "certbot-loop.sh")
	os.WriteFile(sh, []byte(loop.String()), 0o755)
	if r, err = measureOnce("certbot 2.1 (Debian), one run per certificate", n, "sh", sh); err != nil {
		return err
	}
	if got := countFiles(filepath.Join(cb, "cfg", "live", "*", "cert.pem")); got != n {
		return fmt.Errorf("certbot issued %d of %d", got, n)
	}
	results = append(results, r)

	// lego: the same, with its account registered by a first, untimed run.
	lg := filepath.Join(work, "lego")
	legoRun := func(d string) string {
		return fmt.Sprintf("lego --server %s --path %s --email bench@lbcert.test --accept-tos --http --http.port %s --domains %s run >/dev/null 2>&1\n",
			p.DirectoryURL, lg, httpAddr, d)
	}
	warm := exec.Command("sh", "-c", legoRun("warmup.issue.bench.example"))
	warm.Env = append(os.Environ(), "LEGO_CA_CERTIFICATES="+p.CABundle)
	if out, err := warm.CombinedOutput(); err != nil {
		return fmt.Errorf("lego warm-up: %v\n%s", err, tail(string(out)))
	}
	loop.Reset()
	fmt.Fprintf(&loop, "set -e\nexport LEGO_CA_CERTIFICATES=%s\n", p.CABundle)
	for _, d := range names("lg") {
		loop.WriteString(legoRun(d))
	}
	sh = filepath.Join(work, "lego-loop.sh")
	os.WriteFile(sh, []byte(loop.String()), 0o755)
	if r, err = measureOnce("lego 4.9 CLI (Debian), one run per certificate", n, "sh", sh); err != nil {
		return err
	}
	if got := countFiles(filepath.Join(lg, "certificates", "lg*.crt")) - countFiles(filepath.Join(lg, "certificates", "lg*.issuer.crt")); got != n {
		return fmt.Errorf("lego issued %d of %d", got, n)
	}
	results = append(results, r)
	reportIssue(results, concurrency)

	return benchCheck(bin, work)
}

// benchCheck validates a 100,000-row CSV and reports peak RSS.
func benchCheck(bin, work string) error {
	var b strings.Builder
	b.WriteString("DOMAIN,VIPPort,ACMEPort,FROMAddr,TOAddr,RELAYAddr,RELAYPort\n")
	for i := range 100_000 {
		fmt.Fprintf(&b, "host%06d.customer%03d.example.com,443,8888,lb1@example.com,ops%03d@example.net,mx.example.com,25\n", i, i%997, i%100)
	}
	path := filepath.Join(work, "big.csv")
	os.WriteFile(path, []byte(b.String()), 0o644)
	r, err := measureOnce("lbcert batch --check", 100_000, bin, "--dir", filepath.Join(work, "check"), "batch", path, "--check")
	if err != nil {
		return err
	}
	ok := r.rssKB < 100*1024
	fmt.Printf("\nValidating a 100,000-row CSV (%.1f MiB) with lbcert batch --check: %.2f s wall, %.1f MiB peak RSS (target under 100 MiB: %s)\n",
		float64(b.Len())/(1<<20), r.wall.Seconds(), float64(r.rssKB)/1024, map[bool]string{true: "met", false: "NOT met"}[ok])
	return nil
}

// measureOnce times one run of argv with /usr/bin/time -v. Issuing
// is not repeatable against the same names, so there is no median here.
func measureOnce(tool string, n int, argv ...string) (result, error) {
	cmd := exec.Command("/usr/bin/time", append([]string{"-v"}, argv...)...)
	var errb strings.Builder
	cmd.Stderr = &errb
	if err := cmd.Run(); err != nil {
		return result{}, fmt.Errorf("%s: %v\n%s", tool, err, tail(errb.String()))
	}
	r, err := parseTime(errb.String())
	r.tool, r.lineages = tool, n
	return r, err
}

func countFiles(glob string) int {
	m, _ := filepath.Glob(glob)
	return len(m)
}

func reportIssue(rs []result, concurrency int) {
	lb := rs[0]
	fmt.Printf("\nIssuing %d certificates against Pebble, %s, %d cores (lbcert --concurrency %d)\n\n", lb.lineages, time.Now().UTC().Format(time.DateOnly), numCPU(), concurrency)
	fmt.Println("| tool | certificates | wall | wall per certificate | CPU (user+sys) | peak RSS | lbcert is faster by |")
	fmt.Println("|---|---:|---:|---:|---:|---:|---:|")
	fastestPeer := time.Duration(0)
	for _, r := range rs {
		ratio := "-"
		if r.tool != lb.tool {
			ratio = fmt.Sprintf("%.1fx", float64(r.wall)/float64(lb.wall))
			if fastestPeer == 0 || r.wall < fastestPeer {
				fastestPeer = r.wall
			}
		}
		fmt.Printf("| %s | %d | %.1f s | %.0f ms | %.1f s | %.1f MiB | %s |\n", r.tool, r.lineages, r.wall.Seconds(),
			float64(r.wall.Milliseconds())/float64(r.lineages), r.cpu.Seconds(), float64(r.rssKB)/1024, ratio)
	}
	ok := fastestPeer >= 20*lb.wall
	fmt.Printf("\nlbcert target (wall time at least 20x lower than the faster peer loop): %s (%.1fx)\n",
		map[bool]string{true: "met", false: "NOT met"}[ok], float64(fastestPeer)/float64(lb.wall))
}
