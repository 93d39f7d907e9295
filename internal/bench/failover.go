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

func failoverOnce(n, after, concurrency int, bin, dir, how string) (failoverResult, error) {
	var out failoverResult
	for _, d := range []string{"pebble", "step-ca"} {
		os.MkdirAll(filepath.Join(dir, d), 0o755)
	}
	port, err := testenv.FreePort()
	if err != nil {
		return out, err
	}
	p, err := testenv.StartPebble(testenv.PebbleOptions{Dir: filepath.Join(dir, "pebble"), HTTPPort: port})
	if err != nil {
		return out, err
	}
	defer p.Stop()
	s, err := testenv.StartStepCA(testenv.StepCAOptions{Dir: filepath.Join(dir, "step-ca"), HTTPPort: port})
	if err != nil {
		return out, err
	}
	defer s.Stop()
	front, err := testenv.StartCAFront(p)
	if err != nil {
		return out, err
	}
	defer front.Stop()
	// A killed CA refuses connections; a front in front of it would
	// answer 502 instead, so the front is in the way only for the 503s.
	server, orders := p.DirectoryURL, p.Orders
	if how == "503 from a front" {
		server, orders = front.DirectoryURL, front.Orders
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
	pebbleOrders, stepOrders, issued := orders(), s.Orders(), p.Issued()
	stop := make(chan struct{})
	done := make(chan struct{})
	go func() {
		defer close(done)
		if how == "up throughout" {
			return
		}
		for {
			select {
			case <-stop:
				return
			case <-time.After(20 * time.Millisecond):
			}
			if p.Issued()-issued >= after {
				if how == "killed" {
					p.Kill()
				} else {
					front.Set(testenv.Unavailable, 0)
				}
				return
			}
		}
	}()
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
	var rep struct {
		Items []struct{ Outcome, CA string }
	}
	if err := json.Unmarshal([]byte(stdout.String()), &rep); err != nil {
		return out, err
	}
	for _, it := range rep.Items {
		switch {
		case it.Outcome != "issued":
			return out, fmt.Errorf("an item %s", it.Outcome)
		case it.CA == "stepca":
			out.fromStep++
		default:
			out.fromPebble++
		}
	}
	out.stepOrders = s.Orders() - stepOrders
	out.pebbleOrders = orders() - pebbleOrders
	return out, nil
}
