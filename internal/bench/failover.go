package main

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/lbcert/lbcert/internal/testenv"
)

// benchFailover issues one n-name batch with Pebble as the primary and
// step-ca as the fallback, three ways, each with fresh CAs: the primary
// up throughout; the primary killed (SIGKILL) once it has issued after
// certificates; and the primary answering 503 to everything (a front,
// as a load balancer in front of a dead CA) from that moment. It
// reports the time to finish and, per CA, the new orders it received
// (with the front, counted there, the refused ones too) and the
// certificates it issued. Both CAs validate on one port, where
// the batch's standalone listener answers for either.
func benchFailover(n, after, concurrency int, bin, work string) error {
	work = filepath.Join(work, "failover")
	os.RemoveAll(work)
	fmt.Printf("\nbench: a batch of %d, Pebble primary, step-ca fallback, the primary failing after %d, --concurrency %d\n", n, after, concurrency)
	var rows []failoverResult
	for i, how := range []string{"up throughout", "killed", "503 from a front"} {
		dir := filepath.Join(work, strconv.Itoa(i))
		r, err := failoverOnce(n, after, concurrency, bin, dir, how)
		if err != nil {
			return fmt.Errorf("%s: %v", how, err)
		}
		r.how = how
		rows = append(rows, r)
	}
	fmt.Printf("\nA batch of %d new names, Pebble primary and step-ca %s fallback, %s, %d cores, --concurrency %d, pre-flight on, client pacing off\n\n",
		n, testenv.StepCAVersion, time.Now().UTC().Format(time.DateOnly), numCPU(), concurrency)
	fmt.Println("| the primary | wall | new orders at Pebble | at step-ca | certificates from Pebble | from step-ca |")
	fmt.Println("|---|---:|---:|---:|---:|---:|")
	for _, r := range rows {
		fmt.Printf("| %s | %.1f s | %d | %d | %d | %d |\n", r.how, r.wall.Seconds(), r.pebbleOrders, r.stepOrders, r.fromPebble, r.fromStep)
	}
	return nil
}

// failoverResult is one batch of benchFailover.
type failoverResult struct {
	how                      string
	wall                     time.Duration
	pebbleOrders, stepOrders int
	fromPebble, fromStep     int
}

// failoverCAs are one failover run's CAs, validating on one port.
type failoverCAs struct {
	p     *testenv.Pebble
	s     *testenv.StepCA
	front *testenv.CAFront
	port  int
}

func startFailoverCAs(dir string) (*failoverCAs, error) {
	for _, d := range []string{"pebble", "step-ca"} {
		os.MkdirAll(filepath.Join(dir, d), 0o755)
	}
	c := &failoverCAs{}
	var err error
	if c.port, err = testenv.FreePort(); err != nil {
		return nil, err
	}
	if c.p, err = testenv.StartPebble(testenv.PebbleOptions{Dir: filepath.Join(dir, "pebble"), HTTPPort: c.port}); err != nil {
		return nil, err
	}
	if c.s, err = testenv.StartStepCA(testenv.StepCAOptions{Dir: filepath.Join(dir, "step-ca"), HTTPPort: c.port}); err != nil {
		c.stop()
		return nil, err
	}
	if c.front, err = testenv.StartCAFront(c.p); err != nil {
		c.stop()
		return nil, err
	}
	return c, nil
}

func (c *failoverCAs) stop() {
	if c.front != nil {
		c.front.Stop()
	}
	if c.s != nil {
		c.s.Stop()
	}
	c.p.Stop()
}

// breakAfter fails the primary as how says once it has issued after
// more certificates, until stop; done closes when it has or never will.
func (c *failoverCAs) breakAfter(how string, after int, stop <-chan struct{}) <-chan struct{} {
	done := make(chan struct{})
	issued := c.p.Issued()
	go func() {
		defer close(done)
		for how != "up throughout" {
			select {
			case <-stop:
				return
			case <-time.After(20 * time.Millisecond):
			}
			if c.p.Issued()-issued >= after {
				if how == "killed" {
					c.p.Kill()
				} else {
					c.front.Set(testenv.Unavailable, 0)
				}
				return
			}
		}
	}()
	return done
}

func failoverOnce(n, after, concurrency int, bin, dir, how string) (failoverResult, error) {
	var out failoverResult
	c, err := startFailoverCAs(dir)
	if err != nil {
		return out, err
	}
	defer c.stop()
	p, s, port := c.p, c.s, c.port
	// A killed CA refuses connections; a front in front of it would
	// answer 502 instead, so the front is in the way only for the 503s.
	server, orders := p.DirectoryURL, p.Orders
	if how == "503 from a front" {
		server, orders = c.front.DirectoryURL, c.front.Orders
	}
	state := filepath.Join(dir, "state")
	base := []string{"--server", server, "--ca-bundle", p.CABundle, "--dir", state,
		"--fallback-ca", fmt.Sprintf("stepca %s ca-bundle=%s", s.DirectoryURL, s.CABundle)}
	batch := func(prefix string, count int, extra ...string) []string {
		var csv strings.Builder
		for j := range count {
			fmt.Fprintf(&csv, "%s%04d.failover.bench.example,,%d\n", prefix, j, port)
		}
		path := filepath.Join(dir, prefix+".csv")
		os.WriteFile(path, []byte(csv.String()), 0o644)
		return append(append(append([]string{}, base...), "batch", path, "--agree-tos", "--concurrency", strconv.Itoa(concurrency),
			"--http-port", strconv.Itoa(port), "--resolver", p.DNSAddr, "--rate-orders", "off", "--rate-domain", "off"), extra...)
	}
	// Both accounts registered, untimed: one name at each CA.
	if o, err := exec.Command(bin, append(batch("warm", 1), "-q")...).CombinedOutput(); err != nil {
		return out, fmt.Errorf("warm-up at Pebble: %v\n%s", err, tail(string(o)))
	}
	warmStep := []string{"--server", s.DirectoryURL, "--ca-bundle", s.CABundle, "--dir", state, "-q", "issue", "-d", "warm.step.bench.example",
		"--standalone", "--http-addr", fmt.Sprintf("127.0.0.1:%d", port), "--agree-tos"}
	if o, err := exec.Command(bin, warmStep...).CombinedOutput(); err != nil {
		return out, fmt.Errorf("warm-up at step-ca: %v\n%s", err, tail(string(o)))
	}
	pebbleOrders, stepOrders := orders(), s.Orders()
	stop := make(chan struct{})
	done := c.breakAfter(how, after, stop)
	cmd := exec.Command(bin, batch("b", n, "--json")...)
	var stdout, stderr strings.Builder
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	start := time.Now()
	err = cmd.Run()
	out.wall = time.Since(start)
	close(stop)
	<-done
	if err != nil {
		return out, fmt.Errorf("batch: %v\n%s", err, tail(stderr.String()))
	}
	if out.fromPebble, out.fromStep, err = countByCA(stdout.String()); err != nil {
		return out, err
	}
	out.stepOrders = s.Orders() - stepOrders
	out.pebbleOrders = orders() - pebbleOrders
	return out, nil
}

// countByCA counts a batch's certificates from Pebble and from step-ca.
func countByCA(report string) (pebble, step int, err error) {
	var rep struct {
		Items []struct{ Outcome, CA string }
	}
	if err := json.Unmarshal([]byte(report), &rep); err != nil {
		return 0, 0, err
	}
	for _, it := range rep.Items {
		switch {
		case it.Outcome != "issued":
			return 0, 0, fmt.Errorf("an item %s", it.Outcome)
		case it.CA == "stepca":
			step++
		default:
			pebble++
		}
	}
	return pebble, step, nil
}
