package main

import (
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"github.com/lbcert/lbcert/internal/testenv"
)

// Pacing benchmark: Pebble behind a front that enforces Let's Encrypt's
// limits (testenv.RateFront) on a clock 600 times fast, the new-orders
// limit lowered to 30 per 3 hours, so 30 orders per 18 s of wall clock:
// a burst of 30, then one every 0.6 s. n names, each in its own
// registered domain, so the orders limit is the one that binds.
const (
	paceSpeed  = 600
	paceOrders = 30
	pacePeriod = 3 * time.Hour
)

// benchPacing runs one lbcert batch with its budget set to the front's
// scaled limits, then the same batch with --rate-orders off, then a
// naive loop of the lego CLI, 8 at a time as a script would run it, and
// reports the rateLimited answers each provoked and how close lbcert
// came to the throughput the limits allow.
func benchPacing(n, concurrency int, bin, work string) error {
	work = filepath.Join(work, "pacing")
	os.RemoveAll(work)
	os.MkdirAll(work, 0o755)
	p, err := testenv.StartPebble(testenv.PebbleOptions{Dir: work})
	if err != nil {
		return err
	}
	defer p.Stop()
	limits := testenv.LetsEncryptLimits()
	limits.Orders.N, limits.Orders.Per = paceOrders, pacePeriod
	wallPer := pacePeriod / paceSpeed
	budget := []string{
		"--rate-orders", fmt.Sprintf("%d/%s", paceOrders, wallPer),
		"--rate-domain", fmt.Sprintf("%d/%s", limits.Domain.N, limits.Domain.Per/paceSpeed),
		"--rate-names", fmt.Sprintf("%d/%s", limits.ExactSet.N, limits.ExactSet.Per/paceSpeed),
		"--rate-failed-authz", fmt.Sprintf("%d/%s", limits.FailedAuthz.N, limits.FailedAuthz.Per/paceSpeed),
	}
	fmt.Printf("\nbench: %d names through a rate-limiting front (orders %d per %s of wall clock), lbcert --concurrency %d\n",
		n, paceOrders, wallPer, concurrency)

	batch := func(prefix string, extra ...string) (result, *testenv.RateFront, error) {
		f, err := testenv.StartRateFront(p, limits, paceSpeed)
		if err != nil {
			return result{}, nil, err
		}
		var csv strings.Builder
		for i := range n {
			fmt.Fprintf(&csv, "%s%04d.site%04d.example,,%d\n", prefix, i, i, p.HTTPPort)
		}
		path := filepath.Join(work, prefix+".csv")
		os.WriteFile(path, []byte(csv.String()), 0o644)
		args := append([]string{"--server", f.DirectoryURL, "--ca-bundle", p.CABundle, "--dir", filepath.Join(work, prefix), "-q",
			"batch", path, "--agree-tos", "--concurrency", fmt.Sprint(concurrency), "--http-port", fmt.Sprint(p.HTTPPort),
			"--resolver", p.DNSAddr, "--max-wait", "10m"}, extra...)
		cmd := exec.Command("/usr/bin/time", append([]string{"-v", bin}, args...)...)
		var errb strings.Builder
		cmd.Stderr = &errb
		cmd.Run() // exit 2 is an outcome here (the naive run's deferred rows), not an error
		r, err := parseTime(errb.String())
		r.lineages = countFiles(filepath.Join(work, prefix, "live", "*", "cert.pem"))
		return r, f, err
	}

	paced, front, err := batch("paced", budget...)
	if err != nil {
		return err
	}
	front.Stop()
	first, last, accepted := acceptedSpan(front.Events())
	// The limits allow a burst, then one order per period/N: the last of
	// n orders cannot be sent sooner than this after the first.
	minSpan := time.Duration(max(accepted-paceOrders, 0)) * wallPer / paceOrders
	span := last.Sub(first)

	naive, nfront, err := batch("naive", append(budget, "--rate-orders", "off")...)
	if err != nil {
		return err
	}
	nfront.Stop()

	lego, lfront, err := legoPaced(p, limits, n, work)
	if err != nil {
		return err
	}

	fmt.Printf("\nPacing against a rate-limiting CA, %d names, %s, %d cores\n\n", n, time.Now().UTC().Format(time.DateOnly), numCPU())
	fmt.Println("| run | issued | rateLimited answers | wall | last order sent after the first |")
	fmt.Println("|---|---:|---:|---:|---:|")
	fmt.Printf("| lbcert batch, budget = the CA's limits | %d | %d | %.1f s | %.1f s (minimum the limits allow: %.1f s) |\n",
		paced.lineages, front.RateLimited(), paced.wall.Seconds(), span.Seconds(), minSpan.Seconds())
	fmt.Printf("| lbcert batch, --rate-orders off | %d | %d | %.1f s | - |\n", naive.lineages, nfront.RateLimited(), naive.wall.Seconds())
	fmt.Printf("| lego 4.9 CLI, 8 runs at a time (xargs -P 8) | %d | %d | %.1f s | - |\n", lego.lineages, lfront.RateLimited(), lego.wall.Seconds())
	ratio := float64(span) / float64(minSpan)
	ok := front.RateLimited() == 0 && paced.lineages == n && ratio <= 1.05
	fmt.Printf("\nlbcert target (0 rateLimited answers, and the last order within 1.05x of the earliest moment the limits allow): %s (%d answers, %.3fx)\n",
		map[bool]string{true: "met", false: "NOT met"}[ok], front.RateLimited(), ratio)
	return nil
}

// acceptedSpan is when the first and the last accepted new order came,
// and how many were accepted.
func acceptedSpan(evs []testenv.FrontEvent) (first, last time.Time, n int) {
	var at []time.Time
	for _, e := range evs {
		if e.Limited == "" {
			at = append(at, e.At)
		}
	}
	if len(at) == 0 {
		return
	}
	sort.Slice(at, func(i, j int) bool { return at[i].Before(at[j]) })
	return at[0], at[len(at)-1], len(at)
}

// legoPaced issues n names with the lego CLI through a fresh front, 8
// processes at a time, each solving HTTP-01 through one shared webroot
// that a small file server publishes on Pebble's validation port (eight
// standalone listeners cannot share it).
func legoPaced(p *testenv.Pebble, limits testenv.FrontLimits, n int, work string) (result, *testenv.RateFront, error) {
	f, err := testenv.StartRateFront(p, limits, paceSpeed)
	if err != nil {
		return result{}, nil, err
	}
	defer f.Stop()
	webroot := filepath.Join(work, "lego-webroot")
	os.MkdirAll(webroot, 0o755)
	ln, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", p.HTTPPort))
	if err != nil {
		return result{}, nil, err
	}
	srv := &http.Server{Handler: http.FileServer(http.Dir(webroot))}
	go srv.Serve(ln)
	defer srv.Close()
	dir := filepath.Join(work, "lego")
	var names strings.Builder
	for i := range n {
		fmt.Fprintf(&names, "lg%04d.site%04d.example\n", i, i)
	}
	list := filepath.Join(work, "lego-names.txt")
	os.WriteFile(list, []byte(names.String()), 0o644)
	// Register first, untimed, so the eight do not race to create it.
	reg := exec.Command("lego", "--server", f.DirectoryURL, "--path", dir, "--email", "bench@lbcert.test", "--accept-tos", "--http",
		"--http.webroot", webroot, "--domains", "warmup.lego.example", "run")
	reg.Env = append(os.Environ(), "LEGO_CA_CERTIFICATES="+p.CABundle)
	if out, err := reg.CombinedOutput(); err != nil {
		return result{}, nil, fmt.Errorf("lego warm-up: %v\n%s", err, tail(string(out)))
	}
	script := fmt.Sprintf("export LEGO_CA_CERTIFICATES=%s\nxargs -P 8 -I{} sh -c 'lego --server %s --path %s --email bench@lbcert.test --accept-tos --http --http.webroot %s --domains {} run >/dev/null 2>&1 || true' < %s\n",
		p.CABundle, f.DirectoryURL, dir, webroot, list)
	sh := filepath.Join(work, "lego-pace.sh")
	os.WriteFile(sh, []byte(script), 0o755)
	r, err := measureOnce("lego", n, "sh", sh)
	if err != nil {
		return result{}, nil, err
	}
	r.lineages = countFiles(filepath.Join(dir, "certificates", "lg*.crt")) - countFiles(filepath.Join(dir, "certificates", "lg*.issuer.crt"))
	return r, f, nil
}
