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

	"github.com/lbcert/lbcert/internal/deploy"
	"github.com/lbcert/lbcert/internal/testenv"
)

// benchFleetJoin is T7: a node joins a fleet of n lineages (the bundles
// benchFleet published) and its agent gets, installs and deploys all of
// them to its own load balancer, which then serves each over TLS. The
// clock runs from the agent's start until it has reported every lineage
// served; the CA is a listener that counts what reaches it. setup is the
// load balancer: nginx-sni (one server block whose certificate is
// $ssl_server_name's live file), nginx-include (--nginx-include: a
// server block per lineage, every name), or haproxy (a crt directory,
// updated over HAProxy's runtime API). check is how many names, spread
// over the n, are then checked with a TLS handshake for the fleet's
// serial; goal is the time the join should take at most.
func benchFleetJoin(n int, setup string, check int, goal time.Duration, bin, work string, r *testenv.Redis) error {
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
	nodeName := "lb-" + setup
	lb1, lb2 := filepath.Join(work, "lb1"), filepath.Join(work, nodeName)
	out, err := run(lb2, "fleet", "join", "--node", nodeName)
	if err != nil {
		return fmt.Errorf("fleet join: %v\n%s", err, out)
	}
	m := regexp.MustCompile(`fingerprint: (age1[0-9a-z]+)`).FindStringSubmatch(out)
	if m == nil {
		return fmt.Errorf("fleet join printed no fingerprint:\n%s", out)
	}
	if out, err := run(lb1, "fleet", "approve", nodeName, "--fingerprint", m[1]); err != nil {
		return fmt.Errorf("fleet approve: %v\n%s", err, out)
	}
	lb, err := startJoinLB(setup, filepath.Join(work, setup), lb2)
	if err != nil {
		return err
	}
	defer lb.stop()
	lb.goal = goal

	fmt.Printf("\nbench: node %s joins a fleet of %d lineages; its agent installs and deploys them (%s)\n", nodeName, n, setup)
	httpAddr, err := freeLoopback()
	if err != nil {
		return err
	}
	t0 := time.Now()
	agent := exec.Command(bin, append([]string{"--dir", lb2, "--redis", r.URL(), "--server", "http://" + ca.Addr().String() + "/dir",
		"agent", "--http-addr", httpAddr}, lb.deploy...)...)
	agent.Env = env
	agentLog := &syncLog{start: t0}
	defer func() {
		// Kept beside the load balancer's own log, for the phases.
		os.WriteFile(filepath.Join(work, setup, "agent.log"), []byte(agentLog.String()), 0o600)
	}()
	agent.Stdout, agent.Stderr = agentLog, agentLog
	if err := agent.Start(); err != nil {
		return err
	}
	defer func() { agent.Process.Signal(os.Interrupt); agent.Wait() }()

	// Installed and deployed: the agent has reported all n served.
	c := goredis.NewClient(&goredis.Options{Addr: r.Addr(), Password: "bench-pw"})
	defer c.Close()
	ctx := context.Background()
	key := "lbcert:served:" + nodeName
	var peak int
	for {
		peak = max(peak, rssKB(agent.Process.Pid))
		if got, _ := c.HLen(ctx, key).Result(); got >= int64(n) {
			break
		}
		if time.Since(t0) > 30*time.Minute {
			return fmt.Errorf("after 30 minutes %s reports %d of %d served:\n%s", nodeName, c.HLen(ctx, key).Val(), n, tail(agentLog.String()))
		}
		time.Sleep(100 * time.Millisecond)
	}
	reported := time.Since(t0)
	if bad := notServed(ctx, c, key); bad > 0 {
		return fmt.Errorf("%s reports %d of %d lineages not served:\n%s", nodeName, bad, n, tail(agentLog.String()))
	}
	// A reload returns once nginx is signalled: its master then loads
	// every certificate before new workers serve. The node serves them
	// when the last lineage's certificate is served.
	if _, err := servedAfter(lb.tlsAddr, domain(n-1), fmt.Sprintf("%x", n), 20*time.Minute); err != nil {
		return fmt.Errorf("%v\n%s", err, tail(agentLog.String()))
	}
	serving := time.Since(t0)
	lbRSS := lb.rss()
	checked, wrong, err := checkServed(lb.tlsAddr, n, check)
	if err != nil {
		return err
	}
	if wrong > 0 {
		return fmt.Errorf("%s's %s serves the wrong certificate (or none) for %d of %d names checked", nodeName, setup, wrong, check)
	}
	fmt.Printf("\nA node joins a fleet of %d lineages (%s), %s, %d cores, load average %s\n\n", n, setup, time.Now().UTC().Format(time.DateOnly), numCPU(), loadAverage())
	fmt.Println("| measure | figure |")
	fmt.Println("|---|---:|")
	fmt.Printf("| agent start to all %d installed, deployed and reported served | %.1f s |\n", n, reported.Seconds())
	fmt.Printf("| ... and to the load balancer serving them | %.1f s |\n", serving.Seconds())
	fmt.Printf("| then %d names, spread over the %d, checked over TLS, each with the fleet's serial (8 handshakes at a time) | %d of %d, in %.1f s |\n", check, n, check, check, checked.Seconds())
	fmt.Printf("| load balancer reloads (nginx) or runtime API updates (HAProxy) | %d |\n", strings.Count(agentLog.String(), "nginx tested and reloaded")+strings.Count(agentLog.String(), "haproxy updated over its runtime API")+strings.Count(agentLog.String(), "haproxy tested and reloaded"))
	fmt.Printf("| requests to the CA | %d |\n", caHits.Load())
	fmt.Printf("| agent peak RSS | %d MB |\n", peak/1024)
	fmt.Printf("| load balancer peak RSS (%s) | %d MB |\n", lb.rssWhat, lbRSS/1024)
	verdict := "holds"
	if serving > lb.goal || caHits.Load() != 0 {
		verdict = "FAILS"
	}
	fmt.Printf("| all served within %s, 0 CA requests | %s |\n", lb.goal, verdict)
	return nil
}

// notServed counts the lineages a node reports not served.
func notServed(ctx context.Context, c *goredis.Client, key string) int {
	served, _ := c.HGetAll(ctx, key).Result()
	bad := 0
	for _, raw := range served {
		var s struct {
			OK bool `json:"ok"`
		}
		if json.Unmarshal([]byte(raw), &s) != nil || !s.OK {
			bad++
		}
	}
	return bad
}

// checkServed makes a TLS handshake at addr for check names spread over
// the n (lineage i has the fleet's serial i+1) and counts the wrong ones.
func checkServed(addr string, n, check int) (time.Duration, int64, error) {
	check = min(check, n)
	var wrong atomic.Int64
	t0 := time.Now()
	err := parallel(check, func(k int) error {
		i := k * n / check
		conn, err := tls.DialWithDialer(&net.Dialer{Timeout: 10 * time.Second}, "tcp", addr, &tls.Config{ServerName: domain(i), InsecureSkipVerify: true})
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
	return time.Since(t0), wrong.Load(), err
}

// joinLB is the joining node's load balancer and its agent's flags.
type joinLB struct {
	tlsAddr string
	deploy  []string      // the agent's deploy flags
	goal    time.Duration // 40 s at 10,000 (#25); 5 minutes at 100,000 (#29)
	rssWhat string
	rss     func() int
	stop    func()
}

func startJoinLB(setup, dir, lbDir string) (*joinLB, error) {
	os.MkdirAll(dir, 0o755)
	tlsAddr, err := freeLoopback()
	if err != nil {
		return nil, err
	}
	lb := &joinLB{tlsAddr: tlsAddr}
	switch setup {
	case "nginx-sni", "nginx-include":
		servers := testenv.SNIServer(tlsAddr, filepath.Join(lbDir, "live"))
		var extra []string
		waitAddr := tlsAddr
		user := ""
		if setup == "nginx-include" {
			// The agent writes a server block per lineage into the
			// include file, each with the body's listen line.
			plain, err := freeLoopback()
			if err != nil {
				return nil, err
			}
			include, body := filepath.Join(dir, "lbcert.conf"), filepath.Join(dir, "server-body.conf")
			os.WriteFile(body, []byte(fmt.Sprintf("listen %s ssl;\nreturn 200;\n", tlsAddr)), 0o644)
			os.WriteFile(include, nil, 0o644)
			servers = fmt.Sprintf("    server { listen %s; return 204; }\n    include %s;", plain, include)
			extra = []string{"--nginx-include", include, "--nginx-server-body", body}
			waitAddr, user = plain, "nobody nogroup"
		}
		conf := testenv.NginxConfig(dir, servers)
		if user != "" {
			conf = testenv.NginxConfigAs(dir, user, servers)
		}
		ng, err := testenv.StartNginx(dir, conf, waitAddr)
		if err != nil {
			return nil, err
		}
		lb.deploy = append([]string{"--deploy", "nginx", "--nginx-conf", ng.Conf, "--nginx-bin", ng.Bin}, extra...)
		lb.stop, lb.rssWhat = ng.Stop, "nginx master"
		lb.rss = func() int { return rssKB(pidIn(filepath.Join(dir, "nginx.pid"))) }
	case "haproxy":
		h, deployFlags, err := startJoinHAProxy(dir, tlsAddr)
		if err != nil {
			return nil, err
		}
		lb.deploy, lb.stop, lb.rssWhat = deployFlags, h.Stop, "HAProxy worker"
		lb.rss = func() int {
			kb := 0
			for _, pid := range h.WorkerPIDs() {
				kb = max(kb, rssKB(pid))
			}
			return kb
		}
	default:
		return nil, fmt.Errorf("join setup %q: want nginx-sni, nginx-include or haproxy", setup)
	}
	return lb, nil
}

// startJoinHAProxy starts HAProxy serving a crt directory that holds one
// placeholder certificate (HAProxy does not start on an empty one), with
// an admin runtime socket the agent adds every lineage through.
func startJoinHAProxy(dir, tlsAddr string) (*testenv.HAProxy, []string, error) {
	certs, sock, conf := filepath.Join(dir, "certs"), filepath.Join(dir, "admin.sock"), filepath.Join(dir, "haproxy.cfg")
	os.MkdirAll(certs, 0o700)
	c, err := newCA()
	if err != nil {
		return nil, nil, err
	}
	certPEM, keyPEM, _, err := c.leaf("placeholder.invalid", 1)
	if err != nil {
		return nil, nil, err
	}
	os.WriteFile(filepath.Join(certs, "placeholder.invalid.pem"), deploy.CombinedPEM(append(certPEM, c.pem...), keyPEM), 0o600)
	os.WriteFile(conf, []byte(fmt.Sprintf(`global
    stats socket %s level admin
    tune.ssl.cachesize 0
defaults
    mode http
    timeout connect 5s
    timeout client 30s
    timeout server 30s
frontend tls
    bind %s ssl crt %s
    http-request return status 200 content-type text/plain string ok
`, sock, tlsAddr, certs)), 0o644)
	h, err := testenv.StartHAProxy(dir, conf, tlsAddr)
	if err != nil {
		return nil, nil, err
	}
	return h, []string{"--deploy", "haproxy", "--haproxy-conf", conf, "--haproxy-certs", certs, "--haproxy-socket", sock, "--haproxy-bin", h.Bin}, nil
}

// pidIn reads a pid file.
func pidIn(path string) int {
	data, _ := os.ReadFile(path)
	pid, _ := strconv.Atoi(strings.TrimSpace(string(data)))
	return pid
}

// syncLog is the agent's output, written by exec's copying goroutine
// and read while the agent runs.
// syncLog keeps a child's output, each line led by the seconds since
// start (the agent's phases of a join are read from it).
type syncLog struct {
	start time.Time
	mu    sync.Mutex
	b     strings.Builder
	mid   bool // the last write ended inside a line
}

func (l *syncLog) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	for _, line := range strings.SplitAfter(string(p), "\n") {
		if line == "" {
			continue
		}
		if !l.mid {
			fmt.Fprintf(&l.b, "[%8.2fs] ", time.Since(l.start).Seconds())
		}
		l.b.WriteString(line)
		l.mid = !strings.HasSuffix(line, "\n")
	}
	return len(p), nil
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

// benchJoin is a node joining a fleet of n lineages with each load
// balancer setup in turn (#29: 100,000 in under 5 minutes), and the
// fleet's Redis memory per lineage.
func benchJoin(n int, setups []string, check int, bin, work string) error {
	work = filepath.Join(work, "join")
	fl, err := startFleet(work)
	if err != nil {
		return err
	}
	defer fl.stop()
	ctx := context.Background()
	before, _ := fl.sh.Client().Info(ctx, "memory").Result()
	t0 := time.Now()
	if _, _, err := fl.publish(n); err != nil {
		return err
	}
	after, _ := fl.sh.Client().Info(ctx, "memory").Result()
	used := func(info string) float64 { f, _ := strconv.ParseFloat(infoField(info, "used_memory"), 64); return f }
	fmt.Printf("  published in %.0f s; Redis used_memory %.1f MiB for %d lineages: %.0f bytes per lineage\n", time.Since(t0).Seconds(),
		used(after)/(1<<20), n, (used(after)-used(before))/float64(n))
	for _, setup := range setups {
		if err := benchFleetJoin(n, setup, check, 5*time.Minute, bin, work, fl.r); err != nil {
			return err
		}
	}
	return nil
}
