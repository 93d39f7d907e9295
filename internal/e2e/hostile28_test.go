package e2e

import (
	"os/exec"
	"strings"
	"testing"
	"time"
)

// Hostile review of staged rollouts (issue 28), with real parts: three
// nodes, each with its own HAProxy and an agent that checks over TLS
// what it serves, one Redis, Pebble. Each test shows one finding; a
// test that fails here is a defect still open.

// startCanaryRollout forms the fleet with waves lb1 then the rest (soak,
// probe), issues name everywhere, and has lb2 renew it: it returns the
// nodes' load balancers and the two versions' serials once the canary
// serves the new version with its probe passed.
func startCanaryRollout(t *testing.T, name string, soak time.Duration) (*fleetEnv, map[string]*rolloutLB, string, string) {
	f := newFleet(t, "lb1", "lb2", "lb3")
	f.form()
	lbs := f.rolloutPool(f.order...)
	f.mustOn("lb1", "fleet", "rollout", "set", "--wave", "lb1", "--wave", "rest", "--soak", soak.String(), "--probe", "https://{name}/healthz")
	f.mustOn("lb2", "issue", "-d", name, "--agree-tos", "--rate-domain", "off")
	v1 := f.fleetSerial(name)
	f.waitServes(lbs, name, v1, 20*time.Second, f.order...)
	f.mustOn("lb2", "renew", "--force", "--name", name, "--no-random-sleep")
	v2 := f.fleetSerial(name)
	f.waitServes(lbs, name, v2, 20*time.Second, "lb1")
	if !poll(15*time.Second, func() bool { s := f.servedReport("lb1", name); return s.Serial == v2 && s.Probe == "ok" }) {
		t.Fatalf("the canary never reported its probe passed: %+v\n%s", f.servedReport("lb1", name), f.nodes["lb1"].agentLog())
	}
	return f, lbs, v1, v2
}

// The soak is "how long a wave serves a new version, checked, before the
// next wave gets it" (--soak's help): a canary whose probe starts to fail
// during the soak must hold the version. The probe runs once, when the
// canary reports the deploy, and never again: the soak only counts time,
// and the failing version goes to every node when it is over.
func TestHostile28ProbeFailingDuringSoakHolds(t *testing.T) {
	const name = "soak.example.com"
	const soak = 15 * time.Second
	f, lbs, v1, _ := startCanaryRollout(t, name, soak)
	// A few seconds into the soak the canary starts answering 500.
	lbs["lb1"].health = 500
	lbs["lb1"].apply(t)
	keepsServing(t, lbs, []string{"lb2", "lb3"}, name, v1, soak+10*time.Second,
		"after the canary's probe started failing during its soak (want the previous version kept)")
	if _, st := f.rolloutStatus("lb1"); len(st.Rollouts) != 1 || st.Rollouts[0].State != "held" {
		t.Fatalf("the rollout is not held after the canary's probe failed during its soak: %+v", st.Rollouts)
	}
}

// A canary whose agent was killed (kill -9) and whose load balancer went
// down during its soak checked nothing while it soaked: the soak must not
// count for it, and the next wave must wait. The soak ends on the clock
// alone, from a report made before the node died, and the next wave gets
// the version although the canary serves nothing and has no heartbeat.
func TestHostile28DeadCanaryDoesNotPassItsSoak(t *testing.T) {
	const name = "dead.example.com"
	const soak = 12 * time.Second
	f, lbs, v1, _ := startCanaryRollout(t, name, soak)
	f.nodes["lb1"].agent.Process.Kill() // kill -9
	f.nodes["lb1"].agent.Wait()
	lbs["lb1"].broken = true // its HAProxy will not come back with this config
	lbs["lb1"].apply(t)
	if out, err := exec.Command("sh", "-c", "kill -9 $(cat "+lbs["lb1"].pidfile+")").CombinedOutput(); err != nil {
		t.Fatalf("kill the canary's haproxy: %v %s", err, out)
	}
	keepsServing(t, lbs, []string{"lb2", "lb3"}, name, v1, soak+15*time.Second,
		"after the canary died during its soak (want the previous version kept)")
}

// 'fleet rollout off' while a rollout is held releases the version whose
// check failed to every node at once; the command must at least say so
// (which rollouts end, and that their held version now goes everywhere),
// as abort and resume say what they do.
func TestHostile28RolloutOffWhileHeldSaysWhatItReleases(t *testing.T) {
	const name = "off.example.com"
	f := newFleet(t, "lb1", "lb2", "lb3")
	f.form()
	lbs := f.rolloutPool(f.order...)
	f.mustOn("lb1", "fleet", "rollout", "set", "--wave", "lb1", "--wave", "rest", "--soak", "0s", "--probe", "https://{name}/healthz")
	f.mustOn("lb2", "issue", "-d", name, "--agree-tos", "--rate-domain", "off")
	v1 := f.fleetSerial(name)
	f.waitServes(lbs, name, v1, 20*time.Second, f.order...)
	lbs["lb1"].health = 503
	lbs["lb1"].apply(t)
	f.mustOn("lb2", "renew", "--force", "--name", name, "--no-random-sleep")
	f.waitRollout("lb3", "the rollout held by the probe", 30*time.Second, func(r result, st rolloutStatusJSON) bool {
		return len(st.Rollouts) == 1 && st.Rollouts[0].State == "held"
	})
	// Without --yes it refuses, naming what it would release, and the
	// version stays held (README "Staged rollouts").
	r := f.on("lb3", "fleet", "rollout", "off")
	if r.code == 0 || !strings.Contains(r.stderr, name+" version 2 (held: ") || !strings.Contains(r.stderr, "hint: ") {
		t.Errorf("'fleet rollout off' with %s version 2 held (its probe failed on the canary): exit %d, want a refusal naming it, with a hint:\n%s%s",
			name, r.code, r.stdout, r.stderr)
	}
	if _, st := f.rolloutStatus("lb1"); len(st.Rollouts) != 1 || st.Rollouts[0].State != "held" {
		t.Errorf("a refused 'fleet rollout off' moved the held rollout: %+v", st.Rollouts)
	}
	keepsServing(t, lbs, []string{"lb2", "lb3"}, name, v1, 3*time.Second, "after a refused 'fleet rollout off'")
	r = f.mustOn("lb3", "fleet", "rollout", "off", "--yes")
	if !strings.Contains(r.stdout, "released to every node: "+name+" version 2 (held: ") {
		t.Errorf("'fleet rollout off --yes' with %s version 2 held does not name it, though it now goes to every node:\n%s%s",
			name, r.stdout, r.stderr)
	}
}

// Exploration of a held rollout as an operator meets it: list and show
// say so, a new version while held starts its own rollout (held again
// on the still failing canary), an emptied Redis brings the hold back,
// removing the canary and resuming moves the rollout on, and a delete
// ends it.
func TestHostile28HeldRolloutOperatorPath(t *testing.T) {
	const name = "op.example.com"
	f := newFleet(t, "lb1", "lb2", "lb3")
	f.form()
	lbs := f.rolloutPool(f.order...)
	f.mustOn("lb1", "fleet", "rollout", "set", "--wave", "lb1", "--wave", "rest", "--soak", "0s", "--probe", "https://{name}/healthz")
	f.mustOn("lb2", "issue", "-d", name, "--agree-tos", "--rate-domain", "off")
	v1 := f.fleetSerial(name)
	f.waitServes(lbs, name, v1, 20*time.Second, f.order...)
	lbs["lb1"].health = 500
	lbs["lb1"].apply(t)
	f.mustOn("lb2", "renew", "--force", "--name", name, "--no-random-sleep")
	f.waitRollout("lb3", "the rollout held", 30*time.Second, func(r result, st rolloutStatusJSON) bool {
		return len(st.Rollouts) == 1 && st.Rollouts[0].State == "held"
	})
	f.waitServes(lbs, name, v1, 20*time.Second, f.order...)
	for _, args := range [][]string{{"list"}, {"show", name}, {"list", "--json"}} {
		r := f.on("lb3", args...)
		if !strings.Contains(r.stdout+r.stderr, "held") {
			t.Errorf("lbcert %s while %s version 2 is held does not say so: exit %d\n%s%s", strings.Join(args, " "), name, r.code, r.stdout, r.stderr)
		}
	}
	// A new version while held: its own rollout, held again on lb1.
	f.mustOn("lb3", "renew", "--force", "--name", name, "--no-random-sleep")
	_, st := f.waitRollout("lb2", "version 3 held", 30*time.Second, func(r result, st rolloutStatusJSON) bool {
		return len(st.Rollouts) == 1 && st.Rollouts[0].Version == 3 && st.Rollouts[0].State == "held"
	})
	if st.Rollouts[0].Previous != 1 {
		t.Errorf("version 3's rollout keeps version %d, want 1 (what every node may serve)", st.Rollouts[0].Previous)
	}
	f.waitServes(lbs, name, v1, 20*time.Second, "lb1") // the canary tried version 3 and went back
	keepsServing(t, lbs, f.order, name, v1, 4*time.Second, "with versions 2 and 3 held")
	// Redis emptied: the hold comes back.
	f.flushAll()
	f.waitRollout("lb2", "version 3 held after FLUSHALL", 40*time.Second, func(r result, st rolloutStatusJSON) bool {
		return r.code == 2 && len(st.Rollouts) == 1 && st.Rollouts[0].Version == 3 && st.Rollouts[0].State == "held"
	})
	keepsServing(t, lbs, f.order, name, v1, 4*time.Second, "after FLUSHALL with version 3 held")
	// The canary is taken out of the fleet; resume moves the rollout on.
	f.stopAgent("lb1")
	f.mustOn("lb2", "fleet", "remove", "lb1")
	f.mustOn("lb2", "fleet", "rollout", "resume", name)
	v3 := f.fleetSerial(name)
	f.waitServes(lbs, name, v3, 30*time.Second, "lb2", "lb3")
	f.waitRollout("lb3", "the rollout done", 20*time.Second, func(r result, st rolloutStatusJSON) bool {
		return len(st.Rollouts) == 0
	})
	f.mustOn("lb3", "delete", name, "--yes")
	r, st := f.rolloutStatus("lb2")
	if len(st.Rollouts) != 0 || strings.Contains(r.stdout+r.stderr, name) {
		t.Errorf("fleet status after the delete: exit %d\n%s%s", r.code, r.stdout, r.stderr)
	}
}

// The canary taken out of the fleet (fleet remove) in the middle of its
// soak: its wave has no node left, and the rollout must not be stuck:
// the others get the version once the soak is over.
func TestHostile28CanaryRemovedMidSoak(t *testing.T) {
	const name = "rm.example.com"
	const soak = 10 * time.Second
	f, lbs, _, v2 := startCanaryRollout(t, name, soak)
	f.stopAgent("lb1")
	f.mustOn("lb2", "fleet", "remove", "lb1")
	f.waitServes(lbs, name, v2, soak+30*time.Second, "lb2", "lb3")
	f.waitRollout("lb3", "the rollout done", 20*time.Second, func(r result, st rolloutStatusJSON) bool {
		return len(st.Rollouts) == 0
	})
}
