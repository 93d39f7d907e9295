// Command bench is "make bench": it measures a nothing-due "renew" pass
// over N stored lineages for lbcert, and side by side for certbot and the
// lego CLI (Debian packages) over their own lineages, in the same run.
// Then it issues 200 certificates with "lbcert batch" and with loops of
// certbot and lego against one Pebble (issue.go), checks a 100,000-row
// CSV for peak memory, and issues the same batch against step-ca beside
// Pebble (stepca.go).
//
// Every lineage holds a real ECDSA certificate from a local test CA,
// valid for 90 days from yesterday, so none is due. Each tool is timed
// with /usr/bin/time -v (wall clock, user+system CPU, peak RSS). certbot
// and lego get fewer lineages (they are slow) and are compared per
// lineage. lego fetches the ACME directory on every run even when nothing
// is due, so it runs against a local Pebble.
package main

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"flag"
	"fmt"
	"math/big"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/lbcert/lbcert/internal/store"
	"github.com/lbcert/lbcert/internal/testenv"
)

func main() {
	n := flag.Int("n", 10000, "lineages for lbcert")
	certbotN := flag.Int("certbot-n", 1000, "lineages for certbot")
	legoN := flag.Int("lego-n", 100, "lineages for lego (one process each)")
	runs := flag.Int("runs", 3, "timed runs per tool; the median is reported")
	bin := flag.String("lbcert", "bin/lbcert", "lbcert binary")
	work := flag.String("work", ".bench", "scratch directory")
	issueN := flag.Int("issue-n", 200, "certificates each tool issues in the issuance benchmark")
	conc := flag.Int("concurrency", 50, "lbcert batch --concurrency in the issuance benchmark")
	only := flag.String("only", "all", "benchmarks to run, comma-separated: renew, issue, certmagic, renew-due, cpu, stepca, failover, pacing, scale, million, deploy, nginx-include, fleet, join, rollout, or all")
	peerN := flag.Int("certmagic-n", 200, "new names per run in the certmagic benchmark")
	// 9, not 5: within one run either client's wall for the same 200
	// names spans 0.4 s and more (1.91 to 2.33 s for lbcert, 1.98 to
	// 3.24 s for certmagic in one run of 16 pairs), and a median of 5
	// turned on one pair.
	peerRepeats := flag.Int("certmagic-repeats", 9, "runs of each client with every name in flight in the certmagic benchmark (alternating; the medians are compared)")
	sweepList := flag.String("sweep", "1,2,4,8,16,32,64,128,200", "lbcert batch and renew --concurrency values the certmagic benchmark sweeps (empty: none)")
	traceRuns := flag.Int("trace-runs", 5, "orders of each client traced in the certmagic benchmark (the median is shown)")
	shortN := flag.Int("short-n", 10000, "lineages of 6-day certificates in the scale benchmark")
	bigN := flag.Int("big-n", 100000, "lineages of 90-day certificates in the scale benchmark")
	millionN := flag.Int("million-n", 1000000, "lineages in the million-lineage benchmark")
	paceN := flag.Int("pace-n", 200, "names in the pacing benchmark")
	paceC := flag.Int("pace-concurrency", 8, "lbcert batch --concurrency in the pacing benchmark")
	deployN := flag.Int("deploy-n", 1000, "renewed lineages in the deploy-step benchmark")
	includeN := flag.String("nginx-include-n", "1000,10000", "live lineages in the nginx include benchmark, comma-separated sizes")
	renewDueN := flag.Int("renew-due-n", 200, "due lineages in the renew-vs-batch benchmark")
	renewDueC := flag.Int("renew-due-concurrency", 8, "--concurrency of both batch and renew in the renew-vs-batch benchmark (renew's default before it became 64; kept so the figures compare)")
	fleetN := flag.Int("fleet-n", 10000, "sealed bundles a joining node opens in the fleet benchmark")
	fleetOrders := flag.Int("fleet-orders", 50, "orders whose Redis round trips the fleet benchmark counts")
	joinN := flag.Int("join-n", 100000, "lineages of the fleet a node joins in the join benchmark")
	joinSetups := flag.String("join-setups", "nginx-sni,nginx-include,haproxy", "load balancer setups of the join benchmark, comma-separated")
	joinCheck := flag.Int("join-check", 10000, "names the join benchmark checks over TLS after the join")
	rolloutN := flag.Int("rollout-n", 20, "renewals timed with and without waves in the rollout benchmark")
	cpuPerf := flag.Bool("cpu-perf", false, "the CPU benchmark also runs a batch under perf record and prints where lbcert's CPU goes")
	before := flag.String("before", "", "an lbcert binary from before the engine, for the renew-due 'before' figure")
	failN := flag.Int("failover-n", 200, "names in the failover benchmark")
	failAfter := flag.Int("failover-after", 50, "certificates the primary issues before it fails, in the failover benchmark")
	failC := flag.Int("failover-concurrency", 8, "lbcert batch --concurrency in the failover benchmark (the default when it was first measured)")
	flag.Parse()
	w, _ := filepath.Abs(*work)
	b, _ := filepath.Abs(*bin)
	if *before != "" {
		*before, _ = filepath.Abs(*before)
	}
	os.MkdirAll(w, 0o755)
	// Each benchmark in the order make bench runs them; -only picks some.
	benches := []struct {
		name string
		run  func() error
	}{
		{"renew", func() error { return run(*n, *certbotN, *legoN, *runs, *bin, *work) }},
		{"issue", func() error { return benchIssue(*issueN, *conc, b, w) }},
		{"certmagic", func() error {
			sweep, err := sizes("-sweep", *sweepList)
			if err != nil {
				return err
			}
			return benchCertmagic(*peerN, *peerRepeats, sweep, *traceRuns, b, w)
		}},
		{"renew-due", func() error { return benchRenewDue(*renewDueN, *renewDueC, b, *before, w) }},
		{"cpu", func() error { return benchCPU(*issueN, *conc, *cpuPerf, b, w) }},
		{"stepca", func() error { return benchStepCA(*issueN, *conc, b, w) }},
		{"failover", func() error { return benchFailover(*failN, *failAfter, *failC, b, w) }},
		{"pacing", func() error { return benchPacing(*paceN, *paceC, b, w) }},
		{"scale", func() error { return benchScale(*shortN, *bigN, *runs, b, w) }},
		{"million", func() error { return benchMillion(*millionN, *runs, b, w) }},
		{"deploy", func() error { return benchDeploy(*deployN, w) }},
		{"nginx-include", func() error {
			ns, err := sizes("-nginx-include-n", *includeN)
			if err != nil {
				return err
			}
			return benchNginxInclude(ns, w)
		}},
		{"fleet", func() error { return benchFleet(*fleetN, *fleetOrders, b, w) }},
		{"join", func() error { return benchJoin(*joinN, strings.Split(*joinSetups, ","), *joinCheck, b, w) }},
		{"rollout", func() error { return benchRollout(*rolloutN, b, w) }},
	}
	want := map[string]bool{}
	for _, o := range strings.Split(*only, ",") {
		want[strings.TrimSpace(o)] = true
	}
	known := want["all"]
	// A benchmark that fails is said and the others still run: a whole
	// run takes hours, and one failure should not cost the rest's figures.
	var failed []string
	for _, bm := range benches {
		if !want["all"] && !want[bm.name] {
			continue
		}
		known = true
		if err := bm.run(); err != nil {
			fmt.Fprintln(os.Stderr, "bench:", bm.name+":", err)
			failed = append(failed, bm.name)
		}
	}
	if !known {
		fmt.Fprintf(os.Stderr, "bench: -only %q names no benchmark\n", *only)
		os.Exit(2)
	}
	if len(failed) > 0 {
		fmt.Fprintf(os.Stderr, "bench: failed: %s\n", strings.Join(failed, ", "))
		os.Exit(1)
	}
}

// sizes reads a comma-separated list of positive counts.
func sizes(flagName, list string) ([]int, error) {
	var out []int
	for _, f := range strings.Split(list, ",") {
		if strings.TrimSpace(f) == "" {
			continue
		}
		n, err := strconv.Atoi(strings.TrimSpace(f))
		if err != nil || n < 1 {
			return nil, fmt.Errorf("%s %q: want counts like 1000,10000", flagName, list)
		}
		out = append(out, n)
	}
	return out, nil
}

type result struct {
	tool     string
	lineages int
	wall     time.Duration
	cpu      time.Duration
	rssKB    int
}

func run(n, certbotN, legoN, runs int, bin, work string) error {
	work, _ = filepath.Abs(work)
	bin, _ = filepath.Abs(bin)
	os.RemoveAll(work)
	if err := os.MkdirAll(work, 0o755); err != nil {
		return err
	}
	ca, err := newCA()
	if err != nil {
		return err
	}
	fmt.Printf("bench: generating %d lbcert, %d certbot and %d lego lineages\n", n, certbotN, legoN)
	lbDir := filepath.Join(work, "lbcert")
	if err := genLbcert(lbDir, n, ca); err != nil {
		return err
	}
	cbDir := filepath.Join(work, "certbot")
	if err := genCertbot(cbDir, certbotN, ca); err != nil {
		return err
	}
	p, err := testenv.StartPebble(testenv.PebbleOptions{Dir: work})
	if err != nil {
		return err
	}
	defer p.Stop()
	legoDir := filepath.Join(work, "lego")
	legoDomains, err := genLego(legoDir, legoN, ca)
	if err != nil {
		return err
	}

	var results []result
	r, err := measure(runs, "lbcert", n, bin, "--dir", lbDir, "renew", "--no-random-sleep")
	if err != nil {
		return err
	}
	results = append(results, r)

	r, err = measure(runs, "certbot 2.1 (Debian)", certbotN, "certbot", "renew", "--config-dir", filepath.Join(cbDir, "cfg"),
		"--work-dir", filepath.Join(cbDir, "work"), "--logs-dir", filepath.Join(cbDir, "logs"), "--no-random-sleep-on-renew")
	if err != nil {
		return err
	}
	results = append(results, r)

	// lego renews one domain per process; a loop is how it is run for
	// many certificates. The first run registers the account.
	var script strings.Builder
	script.WriteString("set -e\n")
	for _, d := range legoDomains {
		fmt.Fprintf(&script, "LEGO_CA_CERTIFICATES=%s lego --server %s --path %s --email bench@lbcert.test --accept-tos --http --domains %s renew --days 30 --no-random-sleep >/dev/null 2>&1\n",
			p.CABundle, p.DirectoryURL, legoDir, d)
	}
	sh := filepath.Join(work, "lego-loop.sh")
	os.WriteFile(sh, []byte(script.String()), 0o755)
	// lego's renew refuses an unregistered account: register it with one
	// real issuance for a throwaway name, outside the timed runs.
	warm := exec.Command("lego", "--server", p.DirectoryURL, "--path", legoDir, "--email", "bench@lbcert.test", "--accept-tos",
		"--http", "--http.port", fmt.Sprintf("127.0.0.1:%d", p.HTTPPort), "--domains", "warmup.bench.example", "run")
	warm.Env = append(os.Environ(), "LEGO_CA_CERTIFICATES="+p.CABundle)
	if out, err := warm.CombinedOutput(); err != nil {
		return fmt.Errorf("lego warm-up: %v\n%s", err, tail(string(out)))
	}
	if out, err := exec.Command("sh", sh).CombinedOutput(); err != nil {
		return fmt.Errorf("lego loop: %v\n%s", err, out)
	}
	r, err = measure(runs, "lego 4.9 CLI (Debian), one run per lineage", legoN, "sh", sh)
	if err != nil {
		return err
	}
	results = append(results, r)
	report(results)
	return nil
}

// measure runs argv under /usr/bin/time -v, runs times, and keeps the run
// with the median wall time.
// medianByWall is the run with the median wall time, whole (its CPU and
// memory are that run's, not medians of their own). It sorts rs.
func medianByWall(rs []result) result {
	sort.Slice(rs, func(i, j int) bool { return rs[i].wall < rs[j].wall })
	return rs[len(rs)/2]
}

func measure(runs int, tool string, lineages int, argv ...string) (result, error) {
	var rs []result
	for range max(runs, 1) {
		cmd := exec.Command("/usr/bin/time", append([]string{"-v"}, argv...)...)
		var out, errb bytes.Buffer
		cmd.Stdout, cmd.Stderr = &out, &errb
		if err := cmd.Run(); err != nil {
			return result{}, fmt.Errorf("%s: %v\n%s", tool, err, tail(errb.String()))
		}
		r, err := parseTime(errb.String())
		if err != nil {
			return result{}, fmt.Errorf("%s: %v", tool, err)
		}
		r.tool, r.lineages = tool, lineages
		if tool == "lbcert" && (out.Len() > 0 || strings.Contains(errb.String(), "lbcert:")) {
			return result{}, fmt.Errorf("lbcert printed something on a nothing-due run:\n%s%s", out.String(), tail(errb.String()))
		}
		rs = append(rs, r)
	}
	return medianByWall(rs), nil
}

var (
	reUser = regexp.MustCompile(`User time \(seconds\): ([\d.]+)`)
	reSys  = regexp.MustCompile(`System time \(seconds\): ([\d.]+)`)
	reWall = regexp.MustCompile(`Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)`)
	reRSS  = regexp.MustCompile(`Maximum resident set size \(kbytes\): (\d+)`)
)

func parseTime(s string) (result, error) {
	var r result
	u, s1 := reUser.FindStringSubmatch(s), reSys.FindStringSubmatch(s)
	w, m := reWall.FindStringSubmatch(s), reRSS.FindStringSubmatch(s)
	if u == nil || s1 == nil || w == nil || m == nil {
		return r, fmt.Errorf("cannot read /usr/bin/time output:\n%s", tail(s))
	}
	uf, _ := strconv.ParseFloat(u[1], 64)
	sf, _ := strconv.ParseFloat(s1[1], 64)
	r.cpu = time.Duration((uf + sf) * float64(time.Second))
	var secs float64
	for _, part := range strings.Split(w[1], ":") {
		f, _ := strconv.ParseFloat(part, 64)
		secs = secs*60 + f
	}
	r.wall = time.Duration(secs * float64(time.Second))
	r.rssKB, _ = strconv.Atoi(m[1])
	return r, nil
}

func report(rs []result) {
	lb := rs[0]
	lbPer := float64(lb.cpu) / float64(lb.lineages)
	fmt.Printf("\nNothing-due renew pass, %s, %d cores\n\n", time.Now().UTC().Format(time.DateOnly), numCPU())
	fmt.Println("| tool | lineages | wall | CPU (user+sys) | peak RSS | CPU per lineage | wall per lineage | lbcert is cheaper by |")
	fmt.Println("|---|---:|---:|---:|---:|---:|---:|---:|")
	for _, r := range rs {
		per := float64(r.cpu) / float64(r.lineages)
		ratio := "-"
		if r.tool != lb.tool && lbPer > 0 {
			ratio = fmt.Sprintf("%.0fx", per/lbPer)
		}
		fmt.Printf("| %s | %d | %.3f s | %.3f s | %.1f MiB | %s | %s | %s |\n", r.tool, r.lineages, r.wall.Seconds(), r.cpu.Seconds(),
			float64(r.rssKB)/1024, time.Duration(per).Round(time.Microsecond), (r.wall / time.Duration(r.lineages)).Round(time.Microsecond), ratio)
	}
	ok := lb.wall < time.Second && lb.rssKB < 150*1024
	fmt.Printf("\nlbcert target (10,000 lineages: under 1 s wall and 150 MiB peak RSS): %v\n", map[bool]string{true: "met", false: "NOT met"}[ok])
}

func numCPU() int {
	out, _ := exec.Command("nproc").Output()
	n, _ := strconv.Atoi(strings.TrimSpace(string(out)))
	return n
}

func tail(s string) string {
	if len(s) > 2000 {
		return s[len(s)-2000:]
	}
	return s
}

// ca is a local test CA that signs the generated certificates.
type ca struct {
	key  *ecdsa.PrivateKey
	cert *x509.Certificate
	pem  []byte
	// age and life shape every leaf: issued age ago, valid for life.
	// Zero means a day ago and 90 days, so that none is due.
	age, life time.Duration
}

func newCA() (*ca, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "lbcert bench CA"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(365 * 24 * time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return nil, err
	}
	cert, _ := x509.ParseCertificate(der)
	return &ca{key: key, cert: cert, pem: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})}, nil
}

// leaf returns cert PEM, key PEM and the parsed certificate for name.
func (c *ca) leaf(name string, serial int64) ([]byte, []byte, *x509.Certificate, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, nil, err
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(serial), DNSNames: []string{name},
		NotBefore: time.Now().Add(-c.ageOr()), NotAfter: time.Now().Add(-c.ageOr() + c.lifeOr()),
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, c.cert, &key.PublicKey, c.key)
	if err != nil {
		return nil, nil, nil, err
	}
	kder, _ := x509.MarshalECPrivateKey(key)
	cert, _ := x509.ParseCertificate(der)
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}),
		pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kder}), cert, nil
}

func (c *ca) ageOr() time.Duration {
	if c.age == 0 {
		return 24 * time.Hour
	}
	return c.age
}

func (c *ca) lifeOr() time.Duration {
	if c.life == 0 {
		return 90 * 24 * time.Hour
	}
	return c.life
}

func domain(i int) string { return fmt.Sprintf("site%05d.bench.example", i) }

// parallel runs f(0..n-1) on a few goroutines and returns the first error.
func parallel(n int, f func(i int) error) error {
	var wg sync.WaitGroup
	errs := make(chan error, n)
	next := make(chan int)
	for w := 0; w < 8; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range next {
				if err := f(i); err != nil {
					errs <- err
				}
			}
		}()
	}
	for i := 0; i < n; i++ {
		next <- i
	}
	close(next)
	wg.Wait()
	close(errs)
	return <-errs
}

// genLbcert writes n lineages through lbcert's own store, as issue would.
//
// Each also gets the record issue leaves: the journal of its deploy
// (this node deployed version 1 with the lineage's own settings). Without
// it renew takes the lineage for one deployed by a release that kept no
// journal, and reads its metadata a second time to check it.
func genLbcert(dir string, n int, c *ca) error {
	st := store.New(dir)
	at := time.Now().UTC()
	return parallel(n, func(i int) error {
		l, err := saveLineage(st, domain(i), int64(i+2), c)
		if err != nil {
			return err
		}
		return st.SetJournal(l.Name, store.Journal{Deployed: &store.Deployed{Version: 1, Serial: l.Cert.Serial, With: store.DeployDigest(l.Deploy), At: at}})
	})
}

// saveLineage writes lineage name, one version with a certificate of
// serial from c, through the store, as issue would.
func saveLineage(st *store.Store, name string, serial int64, c *ca) (*store.Lineage, error) {
	certPEM, keyPEM, cert, err := c.leaf(name, serial)
	if err != nil {
		return nil, err
	}
	l := &store.Lineage{
		Name: name, Domains: []string{name}, Server: "https://127.0.0.1:1/dir", KeyType: "ec256",
		Challenge: store.Challenge{Mode: "webroot", Webroot: "/var/www/acme"},
		Cert:      store.CertInfo{Serial: fmt.Sprintf("%x", cert.SerialNumber), NotBefore: cert.NotBefore.UTC(), NotAfter: cert.NotAfter.UTC()},
	}
	_, _, err = st.Save(l, store.Files{Cert: certPEM, Chain: c.pem, Fullchain: append(append([]byte{}, certPEM...), c.pem...), Key: keyPEM})
	return l, err
}

// genCertbot writes n lineages in certbot's layout: renewal/<name>.conf,
// live/<name>/*.pem symlinks into archive/<name>/*1.pem.
func genCertbot(dir string, n int, c *ca) error {
	cfg := filepath.Join(dir, "cfg")
	for _, d := range []string{"live", "archive", "renewal"} {
		os.MkdirAll(filepath.Join(cfg, d), 0o700)
	}
	os.MkdirAll(filepath.Join(dir, "work"), 0o700)
	os.MkdirAll(filepath.Join(dir, "logs"), 0o700)
	return parallel(n, func(i int) error {
		name := domain(i)
		certPEM, keyPEM, _, err := c.leaf(name, int64(i+2))
		if err != nil {
			return err
		}
		arch, live := filepath.Join(cfg, "archive", name), filepath.Join(cfg, "live", name)
		os.MkdirAll(arch, 0o700)
		os.MkdirAll(live, 0o700)
		files := map[string][]byte{"cert": certPEM, "chain": c.pem, "fullchain": append(append([]byte{}, certPEM...), c.pem...), "privkey": keyPEM}
		for f, data := range files {
			if err := os.WriteFile(filepath.Join(arch, f+"1.pem"), data, 0o600); err != nil {
				return err
			}
			if err := os.Symlink(filepath.Join("..", "..", "archive", name, f+"1.pem"), filepath.Join(live, f+".pem")); err != nil {
				return err
			}
		}
		conf := fmt.Sprintf("version = 2.1.0\narchive_dir = %s\ncert = %s/cert.pem\nprivkey = %s/privkey.pem\nchain = %s/chain.pem\nfullchain = %s/fullchain.pem\n\n[renewalparams]\naccount = 0123456789abcdef0123456789abcdef\nauthenticator = webroot\nwebroot_path = /var/www/acme,\nserver = https://127.0.0.1:1/dir\nkey_type = ecdsa\n",
			arch, live, live, live, live)
		return os.WriteFile(filepath.Join(cfg, "renewal", name+".conf"), []byte(conf), 0o600)
	})
}

// genLego writes n certificates in lego's layout: certificates/<d>.crt,
// .key, .issuer.crt and .json.
func genLego(dir string, n int, c *ca) ([]string, error) {
	certs := filepath.Join(dir, "certificates")
	os.MkdirAll(certs, 0o700)
	ds := make([]string, n)
	err := parallel(n, func(i int) error {
		name := domain(i)
		ds[i] = name
		certPEM, keyPEM, _, err := c.leaf(name, int64(i+2))
		if err != nil {
			return err
		}
		meta, _ := json.Marshal(map[string]string{"domain": name, "certUrl": "", "certStableUrl": ""})
		for ext, data := range map[string][]byte{".crt": append(append([]byte{}, certPEM...), c.pem...), ".key": keyPEM, ".issuer.crt": c.pem, ".json": meta} {
			if err := os.WriteFile(filepath.Join(certs, name+ext), data, 0o600); err != nil {
				return err
			}
		}
		return nil
	})
	return ds, err
}
