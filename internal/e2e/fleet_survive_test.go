package e2e

import (
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/lbcert/lbcert/internal/store"
	"github.com/lbcert/lbcert/internal/testenv"
)

// T11 and T12: the agents survive a kill -9 in the middle of a deploy,
// and a Redis outage.
func TestFleetAgentsSurvive(t *testing.T) {
	f := newFleet(t, "lb1", "lb2", "lb3")
	f.form()
	addrs := map[string]string{}
	flags := map[string][]string{}
	for _, n := range []string{"lb1", "lb2"} {
		addr, _, fl := f.nodeNginx(n)
		addrs[n], flags[n] = addr, fl
		f.startAgent(n, flags[n]...)
	}
	// lb3 deploys to HAProxy, which serves a certificate only once it is
	// reloaded (nginx above loads its files per handshake). Its reload
	// command, while SLOW exists, writes its PID to MARK and hangs: the
	// agent is then in the middle of its deploy, the new PEM on disk and
	// HAProxy still serving the old one.
	hdir := filepath.Join(f.work, "haproxy-lb3")
	certs := filepath.Join(hdir, "certs")
	os.MkdirAll(certs, 0o755)
	addrs["lb3"] = freeAddr(t)
	conf := filepath.Join(hdir, "haproxy.cfg")
	os.WriteFile(conf, []byte(haproxyConfig(filepath.Join(hdir, "admin.sock"), addrs["lb3"], certs)), 0o644)
	slow, mark, pidfile := filepath.Join(f.work, "SLOW"), filepath.Join(f.work, "MARK"), filepath.Join(hdir, "haproxy.pid")
	reload := fmt.Sprintf(`if [ -e %s ]; then echo $$ > %s; exec sleep 600; fi; if [ -e %s ]; then kill -USR2 $(cat %s); fi`, slow, mark, pidfile, pidfile)
	flags["lb3"] = []string{"--deploy", "haproxy", "--haproxy-conf", conf, "--haproxy-certs", certs, "--reload-cmd", reload, "--reconcile", "2s"}
	f.startAgent("lb3", flags["lb3"]...)
	f.validateVia(f.order...)
	csv := f.writeCSV("survive.csv", 0, 4)
	f.mustOn("lb1", "batch", csv, "--preflight=false", "--agree-tos", "--rate-domain", "off")
	names := f.fleetNames()
	sort.Strings(names)
	if len(names) != 4 {
		t.Fatalf("%d lineages in the fleet, want 4", len(names))
	}
	// HAProxy cannot start before its crt directory holds a certificate:
	// it starts once lb3's agent has installed all four.
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(100 * time.Millisecond) {
		pems, _ := filepath.Glob(filepath.Join(certs, "*.pem"))
		if len(pems) == 4 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("lb3's agent installed %d of 4 PEMs:\n%s", len(pems), f.nodes["lb3"].agentLog())
		}
	}
	h, err := testenv.StartHAProxy(hdir, conf, addrs["lb3"])
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(h.Stop)
	servedEverywhere := func(limit time.Duration) map[string]string {
		t.Helper()
		want := map[string]string{}
		for _, name := range names {
			want[name] = f.fleetSerial(name)
			for _, n := range f.order {
				waitServed(t, addrs[n], name, want[name], limit)
			}
		}
		return want
	}
	servedEverywhere(30 * time.Second)

	// T11: kill -9 lb3's agent while it deploys a renewal, then start it
	// again: it finishes the pending deploy and serves the newest version.
	name := names[0]
	old := f.fleetSerial(name)
	os.WriteFile(slow, nil, 0o644)
	f.mustOn("lb1", "renew", "--force", "--name", name, "--no-random-sleep")
	renewed := f.fleetSerial(name)
	var sleeper int
	for deadline := time.Now().Add(20 * time.Second); time.Now().Before(deadline) && sleeper == 0; time.Sleep(50 * time.Millisecond) {
		b, _ := os.ReadFile(mark)
		sleeper, _ = strconv.Atoi(strings.TrimSpace(string(b)))
	}
	if sleeper == 0 {
		t.Fatalf("T11: lb3's agent never started its reload:\n%s", f.nodes["lb3"].agentLog())
	}
	j := readJournal(t, f.nodes["lb3"].dir, name)
	if j.Pending == nil {
		t.Fatalf("T11: mid-deploy, lb3's journal for %s is %+v, want a pending deploy", name, j)
	}
	f.nodes["lb3"].agent.Process.Kill()
	f.nodes["lb3"].agent.Wait()
	syscall.Kill(sleeper, syscall.SIGKILL)
	os.Remove(slow)
	if got := tryServed(addrs["lb3"], name); got != old {
		t.Fatalf("T11: after the kill lb3 serves %q, want the old %s (HAProxy was never reloaded)", got, old)
	}
	// Restarted while Redis is away too: the pending deploy is finished
	// from disk alone.
	orders := f.pebble.Orders()
	f.redis.Kill()
	f.spawnAgent("lb3", flags["lb3"]...)
	waitServed(t, addrs["lb3"], name, renewed, 20*time.Second)
	if log := f.nodes["lb3"].agentLog(); !strings.Contains(log, "finishing the deploys this node was stopped in") || strings.Contains(log, "could not finish the pending deploy") {
		t.Errorf("T11: lb3's agent did not finish its own pending deploy:\n%s", log)
	}
	if err := f.redis.Start(); err != nil {
		t.Fatal(err)
	}
	f.waitHeartbeat("lb3", 20*time.Second)
	if st := readJournal(t, f.nodes["lb3"].dir, name); st.Pending != nil {
		t.Errorf("T11: lb3's journal still owes %+v", st.Pending)
	}
	f.waitStatusOK(30 * time.Second)
	if got := f.pebble.Orders() - orders; got != 0 {
		t.Errorf("T11: the restart cost %d orders", got)
	}

	// T12: redis-server stopped for 30 s while the agents run. Every node
	// keeps serving throughout; an agent restarted meanwhile starts
	// without Redis; the agents reconnect; and what is published once
	// Redis is back, while they are still backing off, reaches them all.
	before := servedEverywhere(10 * time.Second)
	logAt := map[string]int{}
	for _, n := range f.order {
		logAt[n] = len(f.nodes[n].agentLog())
	}
	f.redis.Kill()
	down := time.Now()
	restarted := false
	for time.Since(down) < 30*time.Second {
		for _, n := range f.order {
			for _, name := range names {
				if got := tryServed(addrs[n], name); got != before[name] {
					t.Fatalf("T12: %s after %s without Redis: %s serves %q, want %s", n, time.Since(down).Round(time.Second), name, got, before[name])
				}
			}
		}
		if !restarted && time.Since(down) > 5*time.Second {
			node := f.nodes["lb2"]
			node.cancel()
			node.agent.Wait()
			f.spawnAgent("lb2", flags["lb2"]...)
			restarted = true
		}
		time.Sleep(time.Second)
	}
	// The agent restarted without Redis is up: it answers (503, not
	// yet connected) and has said why.
	resp, err := http.Get(fmt.Sprintf("http://127.0.0.1:%d/.well-known/acme-challenge/x", f.nodes["lb2"].port))
	if err != nil || resp.StatusCode != http.StatusServiceUnavailable {
		t.Errorf("T12: lb2's agent started while Redis was down: %v %v, want 503", resp, err)
	} else {
		resp.Body.Close()
	}
	if !strings.Contains(f.nodes["lb2"].agentLog(), "nginx and HAProxy keep serving what is on disk") {
		t.Errorf("T12: lb2's agent did not say Redis was unreachable:\n%s", f.nodes["lb2"].agentLog())
	}
	if err := f.redis.Start(); err != nil {
		t.Fatal(err)
	}
	back := time.Now()
	for _, n := range f.order {
		f.waitHeartbeat(n, 20*time.Second)
	}
	t.Logf("T12: every agent heartbeats %s after Redis is back", time.Since(back).Round(100*time.Millisecond))
	for _, n := range []string{"lb1", "lb3"} {
		if !strings.Contains(f.nodes[n].agentLog()[logAt[n]:], "the fleet's Redis is back") {
			t.Errorf("T12: %s's agent did not notice Redis come back:\n%s", n, f.nodes[n].agentLog())
		}
	}
	changed := names[1]
	f.mustOn("lb1", "renew", "--force", "--name", changed, "--no-random-sleep")
	after := servedEverywhere(30 * time.Second)
	if after[changed] == before[changed] {
		t.Errorf("T12: %s was not renewed", changed)
	}
	t.Logf("T12: the renewal published after the outage is served by every node %s after Redis came back", time.Since(back).Round(100*time.Millisecond))
	f.waitStatusOK(30 * time.Second)
	if n := f.failedValidations(); n != 0 {
		t.Errorf("%d failed validations", n)
	}

	// The per-node figures of fleet status, for Prometheus, beside the
	// run's textfile.
	// A node serves a new certificate (checked above, over TLS) a moment
	// before its agent reports it in Redis, where fleet status reads it:
	// the figures are read again until every node reports all four, for
	// up to 20 s.
	prom := filepath.Join(f.work, "lbcert.prom")
	var missing []string
	var figures string
	for deadline := time.Now().Add(20 * time.Second); ; time.Sleep(time.Second) {
		f.mustOn("lb1", "--metrics-file", prom, "fleet", "status")
		figures = readFile(t, filepath.Join(f.work, "lbcert-fleet.prom"))
		missing = nil
		for _, n := range f.order {
			for _, want := range []string{
				fmt.Sprintf(`lbcert_fleet_node_ok{node=%q} 1`, n),
				fmt.Sprintf(`lbcert_fleet_node_lineages{node=%q,state="newest"} 4`, n),
				fmt.Sprintf(`lbcert_fleet_node_heartbeat_timestamp_seconds{node=%q} `, n),
			} {
				if !strings.Contains(figures, want) {
					missing = append(missing, want)
				}
			}
		}
		if len(missing) == 0 || time.Now().After(deadline) {
			break
		}
	}
	if len(missing) > 0 {
		t.Errorf("the fleet's metrics lack %q:\n%s", missing, figures)
	}
}

// waitStatusOK waits until fleet status exits 0: every node heartbeats
// and serves every lineage at the fleet's version.
func (f *fleetEnv) waitStatusOK(limit time.Duration) {
	f.t.Helper()
	var st result
	for deadline := time.Now().Add(limit); time.Now().Before(deadline); time.Sleep(500 * time.Millisecond) {
		if st = f.on("lb1", "fleet", "status"); st.code == 0 {
			return
		}
	}
	f.t.Fatalf("fleet status still exits %d after %s:\n%s%s", st.code, limit, st.stdout, st.stderr)
}

func readJournal(t *testing.T, dir, name string) store.Journal {
	t.Helper()
	var st store.Journal
	b, err := os.ReadFile(filepath.Join(dir, "renewal", name+".json"))
	if err == nil {
		err = json.Unmarshal(b, &st)
	}
	if err != nil && !os.IsNotExist(err) {
		t.Fatalf("%s's status: %v", name, err)
	}
	return st
}
