package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/lbcert/lbcert/internal/fleet"
	"github.com/lbcert/lbcert/internal/testenv"
)

// Staged rollouts (issue 28): three nodes, each with its own HAProxy
// whose agent checks over TLS what it serves, one Redis, Pebble.

// A good version goes canary first, then the rest once the canary
// serves it, its probe passed and the soak is over, even when a node of
// the last wave ordered it; the agents' reports show the order.
func TestFleetRolloutCanaryThenRest(t *testing.T) {
	f := newFleet(t, "lb1", "lb2", "lb3")
	f.form()
	lbs := f.rolloutPool(f.order...)
	const name = "ro.example.com"
	const soak = 4 * time.Second
	r := f.mustOn("lb1", "fleet", "rollout", "set", "--wave", "lb1", "--wave", "rest", "--soak", soak.String(), "--probe", "https://{name}/healthz")
	if !strings.Contains(r.stdout, "wave 1: lb1") || !strings.Contains(r.stdout, "wave 2: rest         lb2, lb3") {
		t.Fatalf("rollout set:\n%s", r.stdout)
	}
	// A new lineage has no previous version to keep: it goes everywhere.
	f.mustOn("lb2", "issue", "-d", name, "--agree-tos", "--rate-domain", "off")
	v1 := f.fleetSerial(name)
	f.waitServes(lbs, name, v1, 20*time.Second, f.order...)
	sampler := f.sampleRollouts(lbs, name)

	// lb3, in the last wave, renews: it does not deploy what it ordered.
	r = f.mustOn("lb3", "renew", "--force", "--name", name, "--no-random-sleep", "--json")
	var rep struct {
		Items []struct{ Deploy, Held string } `json:"items"`
	}
	json.Unmarshal([]byte(r.stdout), &rep)
	if len(rep.Items) != 1 || rep.Items[0].Deploy != "held" || !strings.Contains(rep.Items[0].Held, "this node is in wave 2") {
		t.Fatalf("renew on a last-wave node: %s", r.stdout)
	}
	v2 := f.fleetSerial(name)
	f.waitServes(lbs, name, v2, 20*time.Second, "lb1")
	// The canary serves it; the rest keep the previous version while it
	// soaks, and fleet status says they wait, which is no problem.
	for _, n := range []string{"lb2", "lb3"} {
		if got := lbs[n].serves(name); got != v1 {
			t.Fatalf("%s serves %s before the canary's soak is over, want the previous %s", n, got, v1)
		}
	}
	st, js := f.waitRollout("lb2", "the rollout waiting for wave 2", soak, func(r result, st rolloutStatusJSON) bool {
		return len(st.Rollouts) == 1 && st.Nodes[1].Waiting == 1
	})
	if st.code != 0 || js.Rollouts[0].State != "rolling" || js.Rollouts[0].Wave != 1 || js.Rollouts[0].Version != 2 || js.Rollouts[0].Previous != 1 {
		t.Fatalf("fleet status during the soak: exit %d\n%s", st.code, st.stdout)
	}
	f.waitServes(lbs, name, v2, soak+20*time.Second, "lb2", "lb3")

	// The order, as the agents reported it: the canary first with its
	// probe passed, the others not before its soak was over.
	canary := f.servedReport("lb1", name)
	if canary.Serial != v2 || canary.Probe != "ok" {
		t.Fatalf("the canary's report: %+v", canary)
	}
	for _, n := range []string{"lb2", "lb3"} {
		// The agent reports after its load balancer serves the version
		// (the deploy, then the report): wait for the report.
		var rest fleet.Served
		poll(10*time.Second, func() bool { rest = f.servedReport(n, name); return rest.Serial == v2 })
		if rest.Serial != v2 || rest.At.Sub(canary.At) < soak {
			t.Errorf("%s reported %s at %s, %s after the canary's %s: want after the %s soak", n, rest.Serial, rest.At.Format(time.RFC3339Nano),
				rest.At.Sub(canary.At), canary.At.Format(time.RFC3339Nano), soak)
		}
		if log := f.nodes[n].agentLog(); !strings.Contains(log, "not installing here yet: a staged rollout holds it") {
			t.Errorf("%s's agent never said it held the version back:\n%s", n, log)
		}
	}
	f.waitRollout("lb1", "the rollout done", 10*time.Second, func(r result, st rolloutStatusJSON) bool {
		return r.code == 0 && len(st.Rollouts) == 0
	})
	sampler.check(t)
}

// A canary whose load balancer refuses the new version holds it: the
// other nodes never get it, the canary serves the previous certificate
// again, and status, list and the next run's report say why; resume
// moves it on once the canary is fixed. A canary whose probe fails goes
// back to the previous version the same way; abort keeps that version
// everywhere; and a new version starts a rollout of its own.
func TestFleetRolloutCanaryFails(t *testing.T) {
	f := newFleet(t, "lb1", "lb2", "lb3")
	f.form()
	lbs := f.rolloutPool(f.order...)
	const name = "cf.example.com"
	f.mustOn("lb1", "fleet", "rollout", "set", "--wave", "lb1", "--wave", "rest", "--soak", "0s")
	f.mustOn("lb2", "issue", "-d", name, "--agree-tos", "--rate-domain", "off")
	v1 := f.fleetSerial(name)
	f.waitServes(lbs, name, v1, 20*time.Second, f.order...)
	sampler := f.sampleRollouts(lbs, name)

	// The canary's HAProxy refuses the new PEM (its config test fails).
	lbs["lb1"].broken = true
	lbs["lb1"].apply(t)
	f.mustOn("lb2", "renew", "--force", "--name", name, "--no-random-sleep")
	v2 := f.fleetSerial(name)
	r, st := f.waitRollout("lb3", "the rollout held", 20*time.Second, func(r result, st rolloutStatusJSON) bool {
		return len(st.Rollouts) == 1 && st.Rollouts[0].State == "held"
	})
	if r.code != 2 || st.Rollouts[0].Node != "lb1" || !strings.Contains(st.Rollouts[0].Why, "deploy failed on lb1 (wave 1)") ||
		!strings.Contains(r.stderr, "rollout of "+name+" version 2 held: deploy failed on lb1") || !strings.Contains(r.stderr, "lb1, lb2, lb3 keep version 1") {
		t.Fatalf("fleet status with the canary's deploy failed: exit %d\n%s%s", r.code, r.stdout, r.stderr)
	}
	// Long enough for the agents of the last wave to have acted on it
	// had they been going to: several reconciles.
	keepsServing(t, lbs, f.order, name, v1, 6*time.Second, "while version 2 is held (want the previous)")
	if l := f.on("lb3", "list"); !strings.Contains(l.stdout, "held: deploy failed on lb1") {
		t.Errorf("list does not say the rollout is held:\n%s", l.stdout)
	}
	txt := f.on("lb3", "fleet", "status")
	if txt.code != 2 || !strings.Contains(txt.stdout, "  "+name+" version 2 (was 1): held at wave 1 of 2\n") ||
		!strings.Contains(txt.stdout, "resume: lbcert fleet rollout resume "+name) || !strings.Contains(txt.stdout, "WAITING") ||
		!strings.Contains(txt.stdout, "waves: 1: lb1; 2: lb2, lb3\n") {
		t.Errorf("fleet status does not show the held rollout: exit %d\n%s", txt.code, txt.stdout)
	}
	if !strings.Contains(txt.stdout, "  soak 0s, no probe, expiry margin 15%\n") {
		t.Errorf("fleet status does not show the rollout settings:\n%s", txt.stdout)
	}
	rep := f.on("lb3", "renew", "--name", name, "--no-random-sleep", "--json")
	var res struct {
		Rollouts []struct{ Name, State, Text string } `json:"rollouts"`
	}
	json.Unmarshal([]byte(rep.stdout), &res)
	if len(res.Rollouts) != 1 || res.Rollouts[0].State != "held" || !strings.Contains(res.Rollouts[0].Text, "deploy failed on lb1") ||
		!strings.Contains(rep.stderr, "lbcert: warning: rollout of "+name+" version 2 held") {
		t.Errorf("the next run's report does not say the rollout is held: exit %d\n%s%s", rep.code, rep.stdout, rep.stderr)
	}

	// Fixed; resume: the canary gets it, then the rest.
	lbs["lb1"].broken = false
	lbs["lb1"].apply(t)
	if r := f.mustOn("lb3", "fleet", "rollout", "resume", name); !strings.Contains(r.stdout, "resumed the rollout of "+name+" version 2") {
		t.Fatalf("resume: %s", r.stdout)
	}
	f.waitServes(lbs, name, v2, 30*time.Second, f.order...)
	f.waitRollout("lb1", "the rollout done", 10*time.Second, func(r result, st rolloutStatusJSON) bool { return r.code == 0 && len(st.Rollouts) == 0 })

	// Now the probe fails on the canary: it deploys version 3, its
	// probe fails, and it goes back to version 2.
	f.mustOn("lb1", "fleet", "rollout", "set", "--wave", "lb1", "--wave", "rest", "--soak", "0s", "--probe", "https://{name}/healthz")
	lbs["lb1"].health = 503
	lbs["lb1"].apply(t)
	f.mustOn("lb3", "renew", "--force", "--name", name, "--no-random-sleep")
	r, st = f.waitRollout("lb2", "the rollout held by the probe", 30*time.Second, func(r result, st rolloutStatusJSON) bool {
		return len(st.Rollouts) == 1 && st.Rollouts[0].State == "held"
	})
	if !strings.Contains(st.Rollouts[0].Why, "probe failed on lb1 (wave 1): GET https://"+name+"/healthz: status 503, want 200") {
		t.Fatalf("held for the wrong reason: %+v", st.Rollouts[0])
	}
	f.waitServes(lbs, name, v2, 20*time.Second, "lb1") // back to the previous version
	for _, n := range []string{"lb2", "lb3"} {
		if got := lbs[n].serves(name); got != v2 {
			t.Fatalf("%s serves %s with version 3 held, want %s", n, got, v2)
		}
	}
	// Abort: version 2 everywhere, and it stays so.
	if r := f.mustOn("lb2", "fleet", "rollout", "abort", name); !strings.Contains(r.stdout, "every node serves version 2 again") {
		t.Fatalf("abort: %s", r.stdout)
	}
	r, st = f.waitRollout("lb2", "the rollout aborted", 10*time.Second, func(r result, st rolloutStatusJSON) bool {
		return len(st.Rollouts) == 1 && st.Rollouts[0].State == "aborted"
	})
	if r.code != 2 || !strings.Contains(r.stderr, "version 3 aborted; lb1, lb2, lb3 keep version 2") {
		t.Fatalf("fleet status after abort: exit %d\n%s", r.code, r.stderr)
	}
	lbs["lb1"].health = 200
	lbs["lb1"].apply(t)
	keepsServing(t, lbs, f.order, name, v2, 5*time.Second, "after the abort")
	// A new version moves on: its own rollout, canary then the rest.
	f.mustOn("lb2", "--ledger-cap", "4", "renew", "--force", "--name", name, "--no-random-sleep")
	v4 := f.fleetSerial(name)
	f.waitServes(lbs, name, v4, 30*time.Second, f.order...)
	f.waitRollout("lb1", "the new version's rollout done", 10*time.Second, func(r result, st rolloutStatusJSON) bool { return r.code == 0 && len(st.Rollouts) == 0 })
	sampler.check(t)
}

// Expiry beats caution: a rollout held by a failed probe keeps the last
// wave on the previous version only until that version nears its
// expiry; then every node gets the new one, and fleet status, the
// metrics, the next run's report and its mail say so loudly.
func TestFleetRolloutExpiryOverride(t *testing.T) {
	// Certificates of 150 seconds; a margin of 60% overrides a hold 60
	// seconds after the previous version was issued.
	f := newFleetWith(t, testenv.PebbleOptions{Profiles: map[string]int{"brief": 150}}, "lb1", "lb2", "lb3")
	f.form()
	lbs := f.rolloutPool(f.order...)
	const name = "ex.example.com"
	f.mustOn("lb1", "issue", "-d", name, "--agree-tos", "--rate-domain", "off", "--profile", "brief")
	v1 := f.fleetSerial(name)
	issued := time.Now()
	f.waitServes(lbs, name, v1, 20*time.Second, f.order...)
	f.mustOn("lb1", "fleet", "rollout", "set", "--wave", "lb1", "--wave", "rest", "--soak", "0s", "--probe", "https://{name}/healthz", "--expiry-margin", "60%")
	lbs["lb1"].health = 500
	lbs["lb1"].apply(t)
	sampler := f.sampleRollouts(lbs, name)
	f.mustOn("lb2", "renew", "--force", "--name", name, "--no-random-sleep")
	v2 := f.fleetSerial(name)
	f.waitRollout("lb3", "the rollout held by the probe", 30*time.Second, func(r result, st rolloutStatusJSON) bool {
		return len(st.Rollouts) == 1 && st.Rollouts[0].State == "held"
	})
	f.waitServes(lbs, name, v1, 20*time.Second, f.order...)
	if left := 60*time.Second - time.Since(issued); left < 10*time.Second {
		t.Fatalf("the hold took until %s before the override: the test shows nothing", left)
	}
	// Held until the override: then every node serves the new version.
	for _, n := range []string{"lb2", "lb3"} {
		if got := lbs[n].serves(name); got != v1 {
			t.Fatalf("%s serves %s before the override, want %s", n, got, v1)
		}
	}
	f.waitServes(lbs, name, v2, 60*time.Second+time.Until(issued.Add(60*time.Second)), f.order...)
	if since := time.Since(issued); since < 55*time.Second {
		t.Fatalf("overridden %s after the previous version was issued, before its margin (60 s)", since)
	}
	metrics := filepath.Join(f.work, "metrics", "lbcert.prom")
	os.MkdirAll(filepath.Dir(metrics), 0o755)
	r, _ := f.waitRollout("lb1", "the expiry override", 10*time.Second, func(r result, st rolloutStatusJSON) bool {
		return len(st.Rollouts) == 1 && st.Rollouts[0].Override != nil
	})
	if r.code != 2 || !strings.Contains(r.stderr, "rollout of "+name+" version 2 held but overridden since") {
		t.Fatalf("fleet status after the override: exit %d\n%s", r.code, r.stderr)
	}
	f.mustOnCode(2, "lb1", "--metrics-file", metrics, "fleet", "status")
	prom := readFile(t, metrics[:len(metrics)-len(".prom")]+"-fleet.prom")
	if !strings.Contains(prom, `lbcert_fleet_rollout_expiry_override_timestamp_seconds{name="`+name+`",version="2"}`) ||
		!strings.Contains(prom, `lbcert_fleet_rollout_held{name="`+name+`",version="2",state="held",node="lb1"} 1`) {
		t.Fatalf("metrics:\n%s", prom)
	}
	// The next run's report and mail carry the warning, whatever it did
	// (here: a new lineage; renewing this one would start a new rollout).
	smtp, err := testenv.StartSMTP(f.work, "lbcert", smtpSecret)
	if err != nil {
		t.Fatal(err)
	}
	defer smtp.Stop()
	mailEnv := []string{"LBCERT_REDIS_PASSWORD=" + fleetPassword, "LBCERT_SMTP_HOST=" + smtp.Host, fmt.Sprintf("LBCERT_SMTP_PORT=%d", smtp.Port),
		"LBCERT_SMTP_USER=lbcert", "LBCERT_SMTP_PASSWORD=" + smtpSecret, "LBCERT_SMTP_CA_BUNDLE=" + smtp.CABundle,
		"LBCERT_MAIL_FROM=lbcert@lb3.example.com", "LBCERT_MAIL_TO=ops@example.com"}
	rep := f.runEnv(mailEnv, "--dir", f.nodes["lb3"].dir, "--redis", f.url, "issue", "-d", "other.example.com", "--profile", "brief", "--rate-domain", "off", "--json")
	var res struct {
		Rollouts []struct{ Name, State, Text string } `json:"rollouts"`
	}
	json.Unmarshal([]byte(rep.stdout), &res)
	if len(res.Rollouts) != 1 || res.Rollouts[0].State != "expiry_override" {
		t.Fatalf("the report after the override: exit %d\n%s%s", rep.code, rep.stdout, rep.stderr)
	}
	msgs := smtp.Messages()
	if len(msgs) != 1 || !strings.Contains(msgs[0].Data, "WARNING: staged rollouts held, aborted or overridden near expiry") ||
		!strings.Contains(msgs[0].Data, "the version held back was about to expire") {
		t.Fatalf("the mail after the override: %+v", msgs)
	}
	for _, n := range f.order {
		if log := f.nodes[n].agentLog(); n != "lb1" && !strings.Contains(log, "EXPIRY OVERRIDE") {
			t.Errorf("%s's agent did not say the hold was overridden:\n%s", n, log)
		}
	}
	sampler.check(t)
}

// A node that joins while a rollout is held gets the version its wave
// may serve (the previous one, from the fleet), never the held one; and
// an emptied Redis loses nothing of the rollout: its state, the held
// version, the previous one and the waves come back from the nodes, and
// resume then finishes it.
func TestFleetRolloutJoinAndFlush(t *testing.T) {
	f := newFleet(t, "lb1", "lb2", "lb3", "lb4")
	f.mustOn("lb1", "fleet", "init", "--node", "lb1")
	f.joinFleet("lb2")
	f.joinFleet("lb3")
	roots := f.pebbleRoots()
	lbs := map[string]*rolloutLB{}
	for _, n := range f.order {
		lbs[n] = f.rolloutLB(n, roots)
	}
	for _, n := range []string{"lb1", "lb2", "lb3"} {
		f.startAgent(n, lbs[n].flags...)
	}
	f.validateVia("lb1", "lb2", "lb3")
	const name = "jf.example.com"
	f.mustOn("lb1", "fleet", "rollout", "set", "--wave", "lb1", "--wave", "rest", "--soak", "0s", "--probe", "https://{name}/healthz")
	f.mustOn("lb2", "issue", "-d", name, "--agree-tos", "--rate-domain", "off")
	v1 := f.fleetSerial(name)
	f.waitServes(lbs, name, v1, 20*time.Second, "lb1", "lb2", "lb3")
	sampler := f.sampleRollouts(lbs, name)
	lbs["lb1"].health = 503
	lbs["lb1"].apply(t)
	f.mustOn("lb2", "renew", "--force", "--name", name, "--no-random-sleep")
	v2 := f.fleetSerial(name)
	f.waitRollout("lb3", "the rollout held by the probe", 30*time.Second, func(r result, st rolloutStatusJSON) bool {
		return len(st.Rollouts) == 1 && st.Rollouts[0].State == "held"
	})
	f.waitServes(lbs, name, v1, 20*time.Second, "lb1", "lb2", "lb3")

	// lb4 joins: it is in the last wave, and gets the previous version.
	f.joinFleet("lb4")
	f.startAgent("lb4", lbs["lb4"].flags...)
	f.waitServes(lbs, name, v1, 20*time.Second, "lb4")
	if !strings.Contains(f.nodes["lb4"].agentLog(), "version=1") {
		t.Errorf("lb4's agent did not install version 1:\n%s", f.nodes["lb4"].agentLog())
	}

	// Redis emptied: the nodes rebuild it, the rollout included. (First
	// every node's copy of the membership has lb4, which their agents
	// refresh every heartbeat: the rebuild takes the members from it.)
	for _, n := range f.order {
		if !poll(15*time.Second, func() bool {
			return strings.Contains(readFileOrEmpty(filepath.Join(f.nodes[n].dir, "fleet", "state.json")), `"node": "lb4"`)
		}) {
			t.Fatalf("%s's copy of the membership never had lb4", n)
		}
	}
	f.flushAll()
	c := f.rdb()
	defer c.Close()
	var rec map[string]string
	if !poll(30*time.Second, func() bool {
		rec = c.HGetAll(context.Background(), "lbcert:rollout:"+name).Val()
		v, _ := f.head(name)
		return rec["state"] == "held" && v == 2 && redisInt(c, "lbcert:prev:"+name, "version") == 1
	}) {
		v, s := f.head(name)
		t.Fatalf("after FLUSHALL: record %v, head %d %s, previous %d", rec, v, s, redisInt(c, "lbcert:prev:"+name, "version"))
	}
	if rec["version"] != "2" || rec["serial"] != v2 || rec["wave"] != "0" || rec["node"] != "lb1" || !strings.Contains(rec["why"], "probe failed on lb1") {
		t.Fatalf("the rebuilt record: %v", rec)
	}
	r, st := f.waitRollout("lb4", "the held rollout after the rebuild", 20*time.Second, func(r result, st rolloutStatusJSON) bool {
		return len(st.Rollouts) == 1 && st.Rollouts[0].State == "held"
	})
	if r.code != 2 || len(st.Rollouts[0].Waves) != 2 || len(st.Rollouts[0].Waves[1]) != 3 {
		t.Fatalf("fleet status after the rebuild: exit %d\n%s", r.code, r.stdout)
	}
	if c := st.Settings; c == nil || c.Probe != "https://{name}/healthz" || c.ProbeStatus != 200 || len(c.Waves) != 2 {
		t.Fatalf("the waves' settings after the rebuild: %+v", c)
	}
	// Nothing moved meanwhile: the last wave, lb4 included, kept version 1.
	for _, n := range []string{"lb2", "lb3", "lb4"} {
		if got := lbs[n].serves(name); got != v1 {
			t.Fatalf("%s serves %s after the rebuild, want %s", n, got, v1)
		}
	}
	lbs["lb1"].health = 200
	lbs["lb1"].apply(t)
	f.mustOn("lb4", "fleet", "rollout", "resume", name)
	f.waitServes(lbs, name, v2, 40*time.Second, f.order...)
	sampler.check(t)
}

// joinFleet has node n ask to join and lb1 approve it.
func (f *fleetEnv) joinFleet(n string) {
	f.t.Helper()
	r := f.mustOn(n, "fleet", "join", "--node", n)
	m := fingerprintRe.FindStringSubmatch(r.stdout)
	if m == nil {
		f.t.Fatalf("join printed no fingerprint:\n%s", r.stdout)
	}
	f.mustOn("lb1", "fleet", "approve", n, "--fingerprint", m[1])
}
