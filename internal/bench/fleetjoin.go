package main

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	goredis "github.com/redis/go-redis/v9"

	"github.com/lbcert/lbcert/internal/testenv"
)

// benchFleetJoin is T7: a node joins a fleet of n lineages (the bundles
// benchFleet published) and its agent gets, installs and deploys all of
// them to its own nginx, which then serves each over TLS. The clock runs
// from the agent's start to the last name served with the fleet's
// serial; the CA is a listener that counts what reaches it.
func benchFleetJoin(n int, bin, work string, r *testenv.Redis) error {
	var caHits atomic.Int64
	ca, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return err
	}
	go http.Serve(ca, http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		caHits.Add(1)
		http.Error(w, "the join benchmark's CA: nothing should ask it", http.StatusServiceUnavailable)
	}))
	defer ca.Close()
	env := append(os.Environ(), "LBCERT_REDIS_PASSWORD=bench-pw", "LBCERT_CONFIG=")
	run := func(dir string, args ...string) (string, error) {
		cmd := exec.Command(bin, append([]string{"--dir", dir, "--redis", r.URL(), "--server", "http://" + ca.Addr().String() + "/dir"}, args...)...)
		cmd.Env = env
		out, err := cmd.CombinedOutput()
		return string(out), err
	}
	lb1, lb2 := filepath.Join(work, "lb1"), filepath.Join(work, "lb2")
	out, err := run(lb2, "fleet", "join", "--node", "lb2")
	if err != nil {
		return fmt.Errorf("fleet join: %v\n%s", err, out)
	}
	m := regexp.MustCompile(`fingerprint: (age1[0-9a-z]+)`).FindStringSubmatch(out)
	if m == nil {
		return fmt.Errorf("fleet join printed no fingerprint:\n%s", out)
	}
	if out, err := run(lb1, "fleet", "approve", "lb2", "--fingerprint", m[1]); err != nil {
		return fmt.Errorf("fleet approve: %v\n%s", err, out)
	}

	// lb2's nginx serves every lineage of its --dir by SNI.
	prefix := filepath.Join(work, "nginx-lb2")
	os.MkdirAll(prefix, 0o755)
	tlsAddr, err := freeLoopback()
	if err != nil {
		return err
	}
	ng, err := testenv.StartNginx(prefix, testenv.NginxConfig(prefix, testenv.SNIServer(tlsAddr, filepath.Join(lb2, "live"))), tlsAddr)
	if err != nil {
		return err
	}
	defer ng.Stop()

	fmt.Printf("\nbench: node lb2 joins a fleet of %d lineages; its agent installs and deploys them to its nginx\n", n)
	httpAddr, err := freeLoopback()
	if err != nil {
		return err
	}
	t0 := time.Now()
	agent := exec.Command(bin, "--dir", lb2, "--redis", r.URL(), "--server", "http://"+ca.Addr().String()+"/dir",
		"agent", "--http-addr", httpAddr, "--deploy", "nginx", "--nginx-conf", ng.Conf, "--nginx-bin", ng.Bin)
	agent.Env = env
	agentLog := &syncLog{}
	agent.Stdout, agent.Stderr = agentLog, agentLog
	if err := agent.Start(); err != nil {
		return err
	}
	defer func() { agent.Process.Signal(os.Interrupt); agent.Wait() }()

	// Installed and deployed: the agent has reported all n served.
	c := goredis.NewClient(&goredis.Options{Addr: r.Addr(), Password: "bench-pw"})
	defer c.Close()
	ctx := context.Background()
	var peak int
	for {
		peak = max(peak, rssKB(agent.Process.Pid))
		if got, _ := c.HLen(ctx, "lbcert:served:lb2").Result(); got >= int64(n) {
			break
		}
		if time.Since(t0) > 10*time.Minute {
			return fmt.Errorf("after 10 minutes lb2 reports %d of %d served:\n%s", c.HLen(ctx, "lbcert:served:lb2").Val(), n, tail(agentLog.String()))
		}
		time.Sleep(100 * time.Millisecond)
	}
	reported := time.Since(t0)
	served, err := c.HGetAll(ctx, "lbcert:served:lb2").Result()
	if err != nil {
		return err
	}
	bad := 0
	for _, raw := range served {
		var s struct {
			OK bool `json:"ok"`
		}
		if json.Unmarshal([]byte(raw), &s) != nil || !s.OK {
			bad++
		}
	}
	if bad > 0 {
		return fmt.Errorf("lb2 reports %d of %d lineages not served:\n%s", bad, n, tail(agentLog.String()))
	}

	// Served: every name's TLS handshake at lb2's nginx returns the
	// fleet's certificate (benchFleet gave lineage i serial i+1).
	var wrong atomic.Int64
	err = parallel(n, func(i int) error {
		conn, err := tls.DialWithDialer(&net.Dialer{Timeout: 5 * time.Second}, "tcp", tlsAddr, &tls.Config{ServerName: domain(i), InsecureSkipVerify: true})
		if err != nil {
			wrong.Add(1)
			return nil
		}
		defer conn.Close()
		if conn.ConnectionState().PeerCertificates[0].SerialNumber.Int64() != int64(i+1) {
			wrong.Add(1)
		}
		return nil
	})
	if err != nil {
		return err
	}
	checked := time.Since(t0) - reported
	if wrong.Load() > 0 {
		return fmt.Errorf("lb2's nginx serves the wrong certificate (or none) for %d of %d names", wrong.Load(), n)
	}
	reloads := strings.Count(agentLog.String(), "nginx tested and reloaded")
	// The clock stops when the agent has reported every lineage
	// deployed: from then on nginx serves each (the check that follows
	// proves it, one handshake at a time, and is not the agent's time).
	verdict := "holds"
	if reported > 60*time.Second || caHits.Load() != 0 {
		verdict = "FAILS"
	}
	fmt.Printf("\nT7: a node joins a fleet of %d lineages, %s, %d cores, redis-server 7.0 and nginx 1.22 on loopback\n\n", n, time.Now().UTC().Format(time.DateOnly), numCPU())
	fmt.Println("| measure | figure |")
	fmt.Println("|---|---:|")
	fmt.Printf("| agent start to all %d installed, deployed and reported served | %.1f s |\n", n, reported.Seconds())
	fmt.Printf("| then all %d checked over TLS at nginx, each with the fleet's serial (8 handshakes at a time) | %d of %d, in %.1f s |\n", n, n-int(wrong.Load()), n, checked.Seconds())
	fmt.Printf("| nginx config tests and reloads | %d |\n", reloads)
	fmt.Printf("| requests to the CA | %d |\n", caHits.Load())
	fmt.Printf("| agent peak RSS | %d MB |\n", peak/1024)
	fmt.Printf("| T7 (all served within 60 s, 0 CA requests) | %s |\n", verdict)
	if verdict != "holds" {
		return fmt.Errorf("T7 does not hold: %.1f s, %d CA requests", reported.Seconds(), caHits.Load())
	}
	return nil
}

// syncLog is the agent's output, written by exec's copying goroutine
// and read while the agent runs.
type syncLog struct {
	mu sync.Mutex
	b  strings.Builder
}

func (l *syncLog) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *syncLog) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

func freeLoopback() (string, error) {
	p, err := testenv.FreePort()
	return "127.0.0.1:" + strconv.Itoa(p), err
}

// rssKB is a process's peak resident set (VmHWM), in KiB.
func rssKB(pid int) int {
	data, _ := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	for _, l := range strings.Split(string(data), "\n") {
		if v, ok := strings.CutPrefix(l, "VmHWM:"); ok {
			kb, _ := strconv.Atoi(strings.TrimSuffix(strings.TrimSpace(v), " kB"))
			return kb
		}
	}
	return 0
}
