package e2e

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	goredis "github.com/redis/go-redis/v9"

	"github.com/lbcert/lbcert/internal/fleet"
)

// Helpers of the staged rollout tests (fleet_rollout_test.go): nodes
// whose HAProxy answers /healthz with a status the test sets and whose
// config the test can break, agents that check what their HAProxy
// serves over TLS against Pebble's root, and a sampler that checks the
// rollout's invariants all through a test.

// rolloutLB is one node's HAProxy, with the knobs the tests turn.
type rolloutLB struct {
	nodeLB
	conf, sock, pidfile string
	health              int  // what /healthz answers
	broken              bool // a line haproxy -c refuses, and the runtime API out of reach
}

// rolloutPool gives each of nodes (formed into a fleet already) its own
// HAProxy and an agent deploying to it with --verify-addr and
// --verify-roots, and points Pebble's validations at their agents.
func (f *fleetEnv) rolloutPool(nodes ...string) map[string]*rolloutLB {
	f.t.Helper()
	roots := f.pebbleRoots()
	lbs := map[string]*rolloutLB{}
	for _, n := range nodes {
		lbs[n] = f.rolloutLB(n, roots)
		f.startAgent(n, lbs[n].flags...)
	}
	f.validateVia(nodes...)
	return lbs
}

// pebbleRoots writes Pebble's issuing root to a file, for --verify-roots.
func (f *fleetEnv) pebbleRoots() string {
	f.t.Helper()
	pem, err := f.pebble.Roots()
	if err != nil {
		f.t.Fatal(err)
	}
	path := filepath.Join(f.work, "pebble-roots.pem")
	if err := os.WriteFile(path, pem, 0o644); err != nil {
		f.t.Fatal(err)
	}
	return path
}

func (f *fleetEnv) rolloutLB(n, roots string) *rolloutLB {
	f.t.Helper()
	base := f.nodeHAProxy(n)
	hdir := filepath.Join(f.work, "haproxy-"+n)
	lb := &rolloutLB{nodeLB: base, conf: filepath.Join(hdir, "haproxy.cfg"), sock: filepath.Join(hdir, "admin.sock"),
		pidfile: filepath.Join(hdir, "haproxy.pid"), health: http.StatusOK}
	lb.flags = append(lb.flags, "--verify-addr", lb.addr, "--verify-roots", roots)
	lb.apply(f.t)
	return lb
}

// config is the node's HAProxy config: TLS by SNI from its directory,
// /healthz answering lb.health, everything else 200.
func (lb *rolloutLB) config() string {
	health := fmt.Sprintf("    http-request return status %d content-type text/plain string health if { path /healthz }\n", lb.health)
	c := strings.Replace(haproxyConfig(lb.sock, lb.addr, lb.certs), "    http-request return", health+"    http-request return", 1)
	if lb.broken {
		c += "    this_is_not_a_directive\n"
	}
	return c
}

// keepsServing fails t unless every node of lbs serves serial of name,
// looked at every 300 ms, for d: what must not move while a rollout is
// held or was aborted.
func keepsServing(t *testing.T, lbs map[string]*rolloutLB, nodes []string, name, serial string, d time.Duration, why string) {
	t.Helper()
	for start := time.Now(); time.Since(start) < d; time.Sleep(300 * time.Millisecond) {
		for _, n := range nodes {
			if got := lbs[n].serves(name); got != serial {
				t.Fatalf("%s serves %s %s; want %s", n, got, why, serial)
			}
		}
	}
}

// apply writes the config and, when it is valid, reloads HAProxy and
// waits until /healthz answers what it says. A broken one also moves
// the runtime API's socket aside: a config that fails its test does not
// hold back a runtime-API update (HAProxy tests each PEM itself), so a
// deploy fails only when it falls back to a reload, whose test fails.
func (lb *rolloutLB) apply(t *testing.T) {
	t.Helper()
	if err := os.WriteFile(lb.conf, []byte(lb.config()), 0o644); err != nil {
		t.Fatal(err)
	}
	aside := lb.sock + ".aside"
	if lb.broken {
		if err := os.Rename(lb.sock, aside); err != nil && !errors.Is(err, fs.ErrNotExist) {
			t.Fatal(err)
		}
		return // the next deploy falls back to a reload, whose test fails, and rolls back
	}
	// Back in place before the reload: HAProxy hands its listening
	// sockets to the new process, the runtime API's as it is, moved or not.
	if err := os.Rename(aside, lb.sock); err != nil && !errors.Is(err, fs.ErrNotExist) {
		t.Fatal(err)
	}
	if out, err := exec.Command("sh", "-c", "kill -USR2 $(cat "+lb.pidfile+")").CombinedOutput(); err != nil {
		t.Fatalf("reload haproxy: %v %s", err, out)
	}
	if !poll(10*time.Second, func() bool { return lb.healthz() == lb.health }) {
		t.Fatalf("haproxy at %s answers /healthz %d after the reload, want %d", lb.addr, lb.healthz(), lb.health)
	}
}

// healthz is the status /healthz answers (0: no answer).
func (lb *rolloutLB) healthz() int {
	c := &http.Client{Timeout: 2 * time.Second, Transport: &http.Transport{
		TLSClientConfig: &tls.Config{InsecureSkipVerify: true, ServerName: "placeholder.invalid"}, DisableKeepAlives: true,
		DialContext: func(ctx context.Context, network, _ string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, network, lb.addr)
		}}}
	resp, err := c.Get("https://placeholder.invalid/healthz")
	if err != nil {
		return 0
	}
	resp.Body.Close()
	return resp.StatusCode
}

// serves is the serial this node's HAProxy serves for name ("" none).
func (lb *rolloutLB) serves(name string) string { return servesName(lb.addr, name) }

// waitServes waits until every node in nodes serves serial for name.
func (f *fleetEnv) waitServes(lbs map[string]*rolloutLB, name, serial string, limit time.Duration, nodes ...string) {
	f.t.Helper()
	for _, n := range nodes {
		if !poll(limit, func() bool { return lbs[n].serves(name) == serial }) {
			f.t.Fatalf("%s serves %q for %s after %s, want %s\nagent log:\n%s", n, lbs[n].serves(name), name, limit, serial, f.nodes[n].agentLog())
		}
	}
}

// rolloutStatusJSON is what the rollout tests read of fleet status.
type rolloutStatusJSON struct {
	OK       bool     `json:"ok"`
	Problems []string `json:"problems"`
	Nodes    []struct {
		Node    string `json:"node"`
		Waiting int    `json:"waiting"`
		Behind  int    `json:"behind"`
		Failed  int    `json:"failed"`
	} `json:"nodes"`
	Rollouts []fleet.RolloutStatus `json:"rollouts"`
	Settings *fleet.RolloutConfig  `json:"rollout_settings"`
}

func (f *fleetEnv) rolloutStatus(n string) (result, rolloutStatusJSON) {
	f.t.Helper()
	r := f.on(n, "fleet", "status", "--json")
	var st rolloutStatusJSON
	if err := json.Unmarshal([]byte(r.stdout), &st); err != nil {
		f.t.Fatalf("fleet status --json: %v\n%s", err, r.stdout)
	}
	return r, st
}

// waitRollout polls fleet status on n until cond holds.
func (f *fleetEnv) waitRollout(n, what string, limit time.Duration, cond func(result, rolloutStatusJSON) bool) (result, rolloutStatusJSON) {
	f.t.Helper()
	var r result
	var st rolloutStatusJSON
	if !poll(limit, func() bool { r, st = f.rolloutStatus(n); return cond(r, st) }) {
		f.t.Fatalf("fleet status never showed %s in %s: exit %d\n%s%s", what, limit, r.code, r.stdout, r.stderr)
	}
	return r, st
}

// servedReport is one node's report of a lineage, as its agent wrote it.
func (f *fleetEnv) servedReport(n, name string) fleet.Served {
	c := f.rdb()
	defer c.Close()
	var s fleet.Served
	json.Unmarshal([]byte(c.HGet(context.Background(), "lbcert:served:"+n, name).Val()), &s)
	return s
}

// rolloutSampler checks the rollout invariants every 150 ms while a
// test runs (checkRolloutInvariants), as the randomized fault test can.
type rolloutSampler struct {
	f     *fleetEnv
	lbs   map[string]*rolloutLB
	names []string
	stop  chan struct{}
	done  chan struct{}

	mu         sync.Mutex
	violations []string
	samples    int
}

func (f *fleetEnv) sampleRollouts(lbs map[string]*rolloutLB, names ...string) *rolloutSampler {
	s := &rolloutSampler{f: f, lbs: lbs, names: names, stop: make(chan struct{}), done: make(chan struct{})}
	go s.run()
	f.t.Cleanup(s.halt)
	return s
}

func (s *rolloutSampler) run() {
	defer close(s.done)
	c := s.f.rdb()
	defer c.Close()
	for {
		select {
		case <-s.stop:
			return
		case <-time.After(150 * time.Millisecond):
		}
		serving := map[string]map[string]servedCert{}
		for n, lb := range s.lbs {
			serving[n] = map[string]servedCert{}
			for _, name := range s.names {
				if leaf := servedLeaf(lb.addr, name); leaf != nil && leaf.VerifyHostname(name) == nil {
					serving[n][name] = servedCert{Serial: fmt.Sprintf("%x", leaf.SerialNumber), NotAfter: leaf.NotAfter}
				}
			}
		}
		v, err := checkRolloutInvariants(c, "lbcert:", serving, time.Now(), nil)
		s.mu.Lock()
		if err == nil {
			s.samples++
			s.violations = append(s.violations, v...)
		}
		s.mu.Unlock()
	}
}

func (s *rolloutSampler) halt() {
	select {
	case <-s.stop:
	default:
		close(s.stop)
	}
	<-s.done
}

// check stops the sampler and fails the test on any violation.
func (s *rolloutSampler) check(t *testing.T) {
	t.Helper()
	s.halt()
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.samples < 5 {
		t.Fatalf("the rollout sampler took only %d samples: it checked nothing", s.samples)
	}
	if len(s.violations) > 0 {
		t.Fatalf("rollout invariants violated (%d samples):\n%s", s.samples, strings.Join(s.violations, "\n"))
	}
	t.Logf("rollout invariants held over %d samples", s.samples)
}

// redisInt reads one integer field of a hash.
func redisInt(c goredis.UniversalClient, key, field string) int {
	v, _ := strconv.Atoi(c.HGet(context.Background(), key, field).Val())
	return v
}

// mustOnCode runs lbcert on node n and fails unless it exits code.
func (f *fleetEnv) mustOnCode(code int, n string, args ...string) result {
	f.t.Helper()
	r := f.on(n, args...)
	if r.code != code {
		f.t.Fatalf("%s: lbcert %s: exit %d, want %d\n%s", n, strings.Join(args, " "), r.code, code, r.stderr)
	}
	return r
}
