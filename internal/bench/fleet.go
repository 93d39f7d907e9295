package main

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	goredis "github.com/redis/go-redis/v9"

	"github.com/lbcert/lbcert/internal/fleet"
	"github.com/lbcert/lbcert/internal/fleet/rdb"
	"github.com/lbcert/lbcert/internal/store"
	"github.com/lbcert/lbcert/internal/testenv"
)

// benchFleet measures fleet mode's own costs against a real redis-server:
// opening n sealed bundles as a node that joins does (fetch from Redis,
// unseal, in parallel), the cost of sealing and unsealing one key alone,
// and, over a real batch of orders against Pebble through an agent, the
// Redis round trips per order and how many of them are the lease's.
func benchFleet(n, orders int, bin, work string) error {
	work = filepath.Join(work, "fleet")
	fl, err := startFleet(work)
	if err != nil {
		return err
	}
	defer fl.stop()
	ctx, sh, node, r := context.Background(), fl.sh, fl.node, fl.r
	sealTotal, bytesTotal, err := fl.publish(n)
	if err != nil {
		return err
	}
	used, _ := sh.Client().Info(ctx, "memory").Result()

	// A joining node's load: every bundle fetched and opened, by
	// parallel's 8 workers.
	workers := 8
	var openTotal atomic.Int64
	t0 := time.Now()
	err = parallel(n, func(i int) error {
		b, err := sh.Bundle(ctx, domain(i))
		if err != nil {
			return err
		}
		t := time.Now()
		key, err := node.OpenBundleKey(ctx, b)
		openTotal.Add(int64(time.Since(t)))
		if err != nil {
			return err
		}
		if !strings.Contains(string(key), "PRIVATE KEY") {
			return fmt.Errorf("%s: opened key is not a PEM key", b.Name)
		}
		return nil
	})
	wall := time.Since(t0)
	if err != nil {
		return err
	}

	// One key, sealed and opened alone, many times.
	k, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	der, _ := x509.MarshalPKCS8PrivateKey(k)
	keyPEM := pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der})
	const reps = 100000
	ep, sealed, _ := node.SealBundleKey("one.example", 1, keyPEM)
	b := &rdb.Bundle{Name: "one.example", Version: 1, Epoch: ep, SealedKey: sealed}
	t1 := time.Now()
	for range reps {
		if _, err := node.OpenBundleKey(ctx, b); err != nil {
			return err
		}
	}
	openOne := time.Since(t1) / reps

	fmt.Printf("\nFleet bundles, %s, %d cores, one redis-server 7.0 on loopback\n\n", time.Now().UTC().Format(time.DateOnly), numCPU())
	fmt.Println("| measure | figure |")
	fmt.Println("|---|---:|")
	fmt.Printf("| bundles | %d |\n", n)
	fmt.Printf("| bytes per bundle (metadata, certificate, chain, full chain, sealed key) | %d |\n", bytesTotal/int64(n))
	fmt.Printf("| Redis memory with %d bundles | %s |\n", n, infoField(used, "used_memory_human"))
	fmt.Printf("| fetch and open all %d (%d workers), wall | %.2f s |\n", n, workers, wall.Seconds())
	fmt.Printf("| ... per bundle, wall | %.1f µs |\n", float64(wall.Microseconds())/float64(n))
	fmt.Printf("| ... of which unsealing, CPU per key (AES-256-GCM) | %.1f µs |\n", float64(openTotal.Load())/float64(n)/1e3)
	fmt.Printf("| sealing, CPU per key | %.1f µs |\n", float64(sealTotal)/float64(n)/1e3)
	fmt.Printf("| unsealing one key alone, %d times | %.2f µs per key |\n", reps, float64(openOne.Nanoseconds())/1e3)

	if err := benchFleetJoin(n, "nginx-sni", n, 40*time.Second, bin, work, r); err != nil {
		return err
	}
	return benchFleetOrders(orders, bin, work, r)
}

func infoField(info, field string) string {
	for _, l := range strings.Split(info, "\n") {
		if v, ok := strings.CutPrefix(strings.TrimSpace(l), field+":"); ok {
			return v
		}
	}
	return "?"
}

// benchFleetOrders runs a batch of orders names through one fleet node
// and its agent against Pebble, and counts the Redis commands it cost.
func benchFleetOrders(orders int, bin, work string, r *testenv.Redis) error {
	httpPort, err := testenv.FreePort()
	if err != nil {
		return err
	}
	os.MkdirAll(filepath.Join(work, "pebble"), 0o755)
	p, err := testenv.StartPebble(testenv.PebbleOptions{Dir: filepath.Join(work, "pebble"), HTTPPort: httpPort})
	if err != nil {
		return err
	}
	defer p.Stop()
	// The agent answers on Pebble's validation port itself: one node.
	c := goredis.NewClient(&goredis.Options{Addr: r.Addr(), Password: "bench-pw"})
	defer c.Close()
	c.FlushAll(context.Background()) // the bundles above are not this fleet's
	dir := filepath.Join(work, "node")
	env := append(os.Environ(), "LBCERT_REDIS_PASSWORD=bench-pw", "LBCERT_CONFIG=")
	base := []string{"--dir", dir, "--redis", r.URL(), "--server", p.DirectoryURL, "--ca-bundle", p.CABundle}
	run := func(args ...string) (string, error) {
		cmd := exec.Command(bin, append(base, args...)...)
		cmd.Env = env
		out, err := cmd.CombinedOutput()
		return string(out), err
	}
	if out, err := run("fleet", "init", "--node", "lb1"); err != nil {
		return fmt.Errorf("fleet init: %v\n%s", err, out)
	}
	agent := exec.Command(bin, append(base, "agent", "--http-addr", fmt.Sprintf("127.0.0.1:%d", httpPort))...)
	agent.Env = env
	if err := agent.Start(); err != nil {
		return err
	}
	defer func() { agent.Process.Signal(os.Interrupt); agent.Wait() }()
	time.Sleep(time.Second)
	var csv strings.Builder
	csv.WriteString("domains\n")
	for i := range orders {
		fmt.Fprintf(&csv, "fleet%04d.bench.example\n", i)
	}
	path := filepath.Join(work, "orders.csv")
	os.WriteFile(path, []byte(csv.String()), 0o644)
	// Every command Redis runs is seen through MONITOR: those a client
	// sent (one round trip each, pipelined ones aside) and those a Lua
	// script ran inside the one round trip of its EVALSHA. The agent's
	// idle heartbeats are measured alone first and taken out.
	mon := exec.Command("redis-cli", "-p", strconv.Itoa(r.Port), "--no-auth-warning", "monitor")
	mon.Env = append(os.Environ(), "REDISCLI_AUTH=bench-pw")
	var monOut strings.Builder
	mon.Stdout = &monOut
	if err := mon.Start(); err != nil {
		return fmt.Errorf("redis-cli monitor: %v", err)
	}
	// Round trips are counted by Redis itself: every request a client
	// sends, one command or a pipeline of several (a MULTI/EXEC
	// transaction, the token lookup's GET, PTTL and HGET), is one read
	// event (total_reads_processed). MONITOR shows the commands.
	reads0 := readsProcessed(c)
	time.Sleep(3 * time.Second)
	idle := clientCommands(monOut.String())
	idleReads := readsProcessed(c) - reads0 - 1 // this INFO's own read
	mark := len(monOut.String())
	reads1 := readsProcessed(c)
	t0 := time.Now()
	if out, err := run("batch", path, "--preflight=false", "--agree-tos", "--concurrency", "4", "--rate-domain", "off"); err != nil {
		mon.Process.Kill()
		return fmt.Errorf("batch: %v\n%s", err, out)
	}
	elapsed := time.Since(t0)
	time.Sleep(500 * time.Millisecond)
	reads2 := readsProcessed(c)
	mon.Process.Kill()
	mon.Wait()
	during := monOut.String()[mark:]
	os.WriteFile(filepath.Join(work, "monitor.txt"), []byte(during), 0o644) // what each order cost, command by command
	span := elapsed.Seconds() + 0.5
	trips := float64(reads2-reads1-1) - float64(idleReads)/3*span
	calls := float64(clientCommands(during)) - float64(idle)/3*span
	scripted := strings.Count(during, " lua] ")
	var lease int
	for _, l := range strings.Split(during, "\n") {
		if !strings.Contains(l, " lua] ") && strings.Contains(l, `"evalsha"`) && strings.Contains(l, `"lbcert:lease:`) {
			lease++
		}
	}
	fmt.Printf("\nRedis round trips per order, %d orders through `lbcert batch --concurrency 4` and one agent, against Pebble\n\n", orders)
	fmt.Println("| measure | per order |")
	fmt.Println("|---|---:|")
	fmt.Printf("| round trips to Redis, the orderer's and the agent's (idle heartbeats taken out) | %.1f |\n", trips/float64(orders))
	fmt.Printf("| ... the commands they carried (a pipeline or transaction carries several) | %.1f |\n", calls/float64(orders))
	fmt.Printf("| ... of them the lease's (acquire, heartbeat every --lease-ttl/3, release) | %.1f |\n", float64(lease)/float64(orders))
	fmt.Printf("| commands Lua scripts ran inside those round trips | %.1f |\n", float64(scripted)/float64(orders))
	fmt.Printf("| wall per order (Pebble validating, 4 at a time) | %.0f ms |\n", float64(elapsed.Milliseconds())/float64(orders))
	perCmd := map[string]int{}
	for _, l := range strings.Split(during, "\n") {
		if f := strings.Fields(l); len(f) >= 4 && !strings.Contains(l, " lua] ") {
			perCmd[strings.Trim(f[3], `"`)]++
		}
	}
	var top []string
	for k, v := range perCmd {
		top = append(top, fmt.Sprintf("%s %.1f", k, float64(v)/float64(orders)))
	}
	sort.Strings(top)
	fmt.Printf("\ncommands per order: %s\n", strings.Join(top, ", "))
	return nil
}

// readsProcessed is Redis's count of read events: one per request a
// client sent, however many commands it pipelined.
func readsProcessed(c *goredis.Client) int64 {
	info, err := c.Info(context.Background(), "stats").Result()
	if err != nil {
		return 0
	}
	for _, l := range strings.Split(info, "\n") {
		if v, ok := strings.CutPrefix(strings.TrimSpace(l), "total_reads_processed:"); ok {
			n, _ := strconv.ParseInt(v, 10, 64)
			return n
		}
	}
	return 0
}

// clientCommands counts MONITOR lines of commands a client sent (not a
// script).
func clientCommands(mon string) int {
	n := 0
	for _, l := range strings.Split(mon, "\n") {
		if strings.HasPrefix(l, "1") && !strings.Contains(l, " lua] ") {
			n++
		}
	}
	return n
}

// benchFleet's fleet: a redis-server and node lb1, which holds the keys.
type benchFleetState struct {
	r    *testenv.Redis
	sh   *rdb.Shared
	node *fleet.Node
	c    *ca
}

func startFleet(work string) (*benchFleetState, error) {
	os.RemoveAll(work)
	os.MkdirAll(work, 0o755)
	r, err := testenv.StartRedis(filepath.Join(work, "redis"), "bench-pw", nil)
	if err != nil {
		return nil, err
	}
	fl := &benchFleetState{r: r}
	ctx := context.Background()
	if fl.sh, err = rdb.Dial(ctx, rdb.Options{URL: r.URL(), Password: "bench-pw"}); err != nil {
		fl.stop()
		return nil, err
	}
	if fl.node, err = fleet.Init(ctx, fl.sh, store.New(filepath.Join(work, "lb1")), "lb1"); err != nil {
		fl.stop()
		return nil, err
	}
	if fl.c, err = newCA(); err != nil {
		fl.stop()
		return nil, err
	}
	return fl, nil
}

func (fl *benchFleetState) stop() {
	if fl.sh != nil {
		fl.sh.Close()
	}
	fl.r.Stop()
}

// publish puts n bundles in the fleet, each with its own P-256 key,
// sealed as publishing does (lineage i gets serial i+1). It returns the
// CPU spent sealing and the bundles' bytes.
func (fl *benchFleetState) publish(n int) (seal time.Duration, bytes int64, err error) {
	fmt.Printf("\nbench: publishing %d sealed bundles to Redis\n", n)
	ctx, c, node := context.Background(), fl.c, fl.node
	var sealTotal, bytesTotal atomic.Int64
	err = parallel(n, func(i int) error {
		name := domain(i)
		certPEM, keyPEM, cert, err := c.leaf(name, int64(i+1))
		if err != nil {
			return err
		}
		t0 := time.Now()
		epoch, sealed, err := node.SealBundleKey(name, 1, keyPEM)
		sealTotal.Add(int64(time.Since(t0)))
		if err != nil {
			return err
		}
		meta := []byte(fmt.Sprintf(`{"format":1,"name":%q,"version":1,"domains":[%q],"server":"https://acme.example/directory","key_type":"ec256","challenge":{"mode":"fleet"},"deploy":{},"cert":{"serial":"%x","not_before":%q,"not_after":%q},"issued_at":%q}`,
			name, name, cert.SerialNumber, cert.NotBefore.Format(time.RFC3339), cert.NotAfter.Format(time.RFC3339), cert.NotBefore.Format(time.RFC3339)))
		chain := c.pem
		b := &rdb.Bundle{Name: name, Version: 1, NotBefore: cert.NotBefore, Epoch: epoch, Node: "lb1", Meta: meta,
			Cert: certPEM, Chain: chain, Fullchain: append(append([]byte{}, certPEM...), chain...), SealedKey: sealed}
		bytesTotal.Add(int64(len(meta) + len(certPEM) + 2*len(chain) + len(certPEM) + len(sealed)))
		return fl.sh.Publish(ctx, b)
	})
	return time.Duration(sealTotal.Load()), bytesTotal.Load(), err
}
