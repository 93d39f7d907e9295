package main

import (
	"context"
	"crypto/tls"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"time"

	goredis "github.com/redis/go-redis/v9"

	"github.com/lbcert/lbcert/internal/testenv"
)

// benchRollout measures what a staged rollout adds to a fleet's
// convergence (issue 28, item 6): three nodes, each with its own HAProxy
// and an agent that deploys to it and checks over TLS what it serves,
// one Redis, Pebble. Each of renewals names is renewed on the last node
// (the one a staged rollout holds back longest) and timed from the
// renew's return to every HAProxy serving the new serial: first with no
// waves, then with waves lb1, then the rest, and no soak.
func benchRollout(renewals int, bin, work string) error {
	work = filepath.Join(work, "rollout")
	os.RemoveAll(work)
	os.MkdirAll(work, 0o755)
	f, err := startBenchFleet(bin, work)
	if err != nil {
		return err
	}
	defer f.stop()
	var csv = "domains\n"
	for i := range renewals {
		csv += fmt.Sprintf("ro%03d.bench.example\n", i)
	}
	path := filepath.Join(work, "names.csv")
	os.WriteFile(path, []byte(csv), 0o644)
	if out, err := f.run("lb1", "batch", path, "--preflight=false", "--agree-tos", "--rate-domain", "off"); err != nil {
		return fmt.Errorf("batch: %v\n%s", err, out)
	}
	measure := func() ([]time.Duration, error) {
		var lat []time.Duration
		for i := range renewals {
			name := fmt.Sprintf("ro%03d.bench.example", i)
			if out, err := f.run("lb3", "renew", "--force", "--name", name, "--no-random-sleep", "--rate-domain", "off"); err != nil {
				return nil, fmt.Errorf("renew %s: %v\n%s", name, err, out)
			}
			done := time.Now()
			serial, err := f.headSerial(name)
			if err != nil {
				return nil, err
			}
			for _, lb := range f.lbs {
				for deadline := time.Now().Add(time.Minute); benchServes(lb, name) != serial; time.Sleep(10 * time.Millisecond) {
					if time.Now().After(deadline) {
						return nil, fmt.Errorf("%s not served at %s a minute after its renewal", name, lb)
					}
				}
			}
			lat = append(lat, time.Since(done))
		}
		sort.Slice(lat, func(i, j int) bool { return lat[i] < lat[j] })
		return lat, nil
	}
	plain, err := measure()
	if err != nil {
		return err
	}
	if out, err := f.run("lb1", "fleet", "rollout", "set", "--wave", "lb1", "--wave", "rest", "--soak", "0s"); err != nil {
		return fmt.Errorf("rollout set: %v\n%s", err, out)
	}
	staged, err := measure()
	if err != nil {
		return err
	}
	q := func(l []time.Duration, p int) time.Duration {
		return l[min(len(l)-1, len(l)*p/100)].Round(time.Millisecond)
	}
	fmt.Printf("\nFleet convergence with and without waves: %d renewals, each on the last node, until all 3 HAProxies serve it\n\n", renewals)
	fmt.Println("| waves | p50 | p90 | max |")
	fmt.Println("|---|---:|---:|---:|")
	fmt.Printf("| none | %s | %s | %s |\n", q(plain, 50), q(plain, 90), plain[len(plain)-1].Round(time.Millisecond))
	fmt.Printf("| lb1, then the rest, no soak | %s | %s | %s |\n", q(staged, 50), q(staged, 90), staged[len(staged)-1].Round(time.Millisecond))
	fmt.Printf("\nwhat the waves add: p50 %s, p90 %s\n", q(staged, 50)-q(plain, 50), q(staged, 90)-q(plain, 90))
	return nil
}

// benchServes is the serial addr serves for name, "" for none.
func benchServes(addr, name string) string {
	conn, err := tls.DialWithDialer(&net.Dialer{Timeout: 2 * time.Second}, "tcp", addr, &tls.Config{ServerName: name, InsecureSkipVerify: true})
	if err != nil {
		return ""
	}
	defer conn.Close()
	return fmt.Sprintf("%x", conn.ConnectionState().PeerCertificates[0].SerialNumber)
}

// benchFleet3 is three nodes with their HAProxies and agents.
type benchFleet3 struct {
	bin, url string
	redis    *testenv.Redis
	pebble   *testenv.Pebble
	dirs     map[string]string
	lbs      map[string]string // node -> its HAProxy's TLS address
	stops    []func()
}

func (f *benchFleet3) stop() {
	for i := len(f.stops) - 1; i >= 0; i-- {
		f.stops[i]()
	}
}

func (f *benchFleet3) run(node string, args ...string) (string, error) {
	base := []string{"--dir", f.dirs[node], "--redis", f.url, "--server", f.pebble.DirectoryURL, "--ca-bundle", f.pebble.CABundle}
	cmd := exec.Command(f.bin, append(base, args...)...)
	cmd.Env = append(os.Environ(), "LBCERT_REDIS_PASSWORD=bench-pw", "LBCERT_CONFIG=")
	out, err := cmd.CombinedOutput()
	return string(out), err
}

func (f *benchFleet3) headSerial(name string) (string, error) {
	c := goredis.NewClient(&goredis.Options{Addr: f.redis.Addr(), Password: "bench-pw"})
	defer c.Close()
	return c.HGet(context.Background(), "lbcert:bundle:"+name, "serial").Result()
}

// startBenchFleet forms lb1 to lb3, each with an HAProxy and an agent;
// lb1's agent answers Pebble's validations.
func startBenchFleet(bin, work string) (*benchFleet3, error) {
	f := &benchFleet3{bin: bin, dirs: map[string]string{}, lbs: map[string]string{}}
	var err error
	if f.redis, err = testenv.StartRedis(filepath.Join(work, "redis"), "bench-pw", nil); err != nil {
		return nil, err
	}
	f.stops = append(f.stops, f.redis.Stop)
	f.url = f.redis.URL()
	httpPort, err := testenv.FreePort()
	if err != nil {
		return f, err
	}
	os.MkdirAll(filepath.Join(work, "pebble"), 0o755)
	if f.pebble, err = testenv.StartPebble(testenv.PebbleOptions{Dir: filepath.Join(work, "pebble"), HTTPPort: httpPort}); err != nil {
		return f, err
	}
	f.stops = append(f.stops, f.pebble.Stop)
	for i, n := range []string{"lb1", "lb2", "lb3"} {
		f.dirs[n] = filepath.Join(work, n)
		if err := f.join(n, i); err != nil {
			return f, err
		}
		port := httpPort
		if i > 0 {
			if port, err = testenv.FreePort(); err != nil {
				return f, err
			}
		}
		flags, err := f.haproxy(n, work)
		if err != nil {
			return f, err
		}
		cmd := exec.Command(bin, append([]string{"--dir", f.dirs[n], "--redis", f.url, "agent", "--http-addr", fmt.Sprintf("127.0.0.1:%d", port)}, flags...)...)
		cmd.Env = append(os.Environ(), "LBCERT_REDIS_PASSWORD=bench-pw", "LBCERT_CONFIG=")
		if err := cmd.Start(); err != nil {
			return f, err
		}
		f.stops = append(f.stops, func() { cmd.Process.Signal(os.Interrupt); cmd.Wait() })
	}
	time.Sleep(2 * time.Second) // the agents' first heartbeats
	return f, nil
}

func (f *benchFleet3) join(n string, i int) error {
	if i == 0 {
		_, err := f.run(n, "fleet", "init", "--node", n)
		return err
	}
	out, err := f.run(n, "fleet", "join", "--node", n)
	if err != nil {
		return fmt.Errorf("join %s: %v\n%s", n, err, out)
	}
	var fp string
	for _, w := range strings.Fields(out) {
		if strings.HasPrefix(w, "age1") {
			fp = w
		}
	}
	if out, err := f.run("lb1", "fleet", "approve", n, "--fingerprint", fp); err != nil {
		return fmt.Errorf("approve %s: %v\n%s", n, err, out)
	}
	return nil
}

// haproxy starts node n's HAProxy and returns its agent's deploy flags.
func (f *benchFleet3) haproxy(n, work string) ([]string, error) {
	dir := filepath.Join(work, "haproxy-"+n)
	certs := filepath.Join(dir, "certs")
	os.MkdirAll(certs, 0o700)
	c, err := newCA()
	if err != nil {
		return nil, err
	}
	cert, key, _, err := c.leaf("placeholder.invalid", 1)
	if err != nil {
		return nil, err
	}
	os.WriteFile(filepath.Join(certs, "0-placeholder.pem"), append(cert, key...), 0o600)
	port, err := testenv.FreePort()
	if err != nil {
		return nil, err
	}
	addr := fmt.Sprintf("127.0.0.1:%d", port)
	sock, conf := filepath.Join(dir, "admin.sock"), filepath.Join(dir, "haproxy.cfg")
	cfg := fmt.Sprintf("global\n    stats socket %s level admin\ndefaults\n    mode http\n    timeout connect 2s\n    timeout client 5s\n    timeout server 5s\n"+
		"frontend tls\n    bind %s ssl crt %s\n    http-request return status 200 content-type text/plain string ok\n", sock, addr, certs)
	os.WriteFile(conf, []byte(cfg), 0o644)
	h, err := testenv.StartHAProxy(dir, conf, addr)
	if err != nil {
		return nil, err
	}
	f.stops = append(f.stops, h.Stop)
	f.lbs[n] = addr
	return []string{"--deploy", "haproxy", "--haproxy-conf", conf, "--haproxy-certs", certs, "--haproxy-socket", sock,
		"--reload-cmd", "kill -USR2 $(cat " + h.PIDFile + ")", "--verify-addr", addr}, nil
}
