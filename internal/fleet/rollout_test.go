package fleet

import (
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/lbcert/lbcert/internal/store"
)

func TestResolveWaves(t *testing.T) {
	members := []string{"lb10", "lb2", "lb1", "lb3", "lb4", "lb5"}
	for _, tc := range []struct {
		waves []string
		want  string
	}{
		{[]string{"lb1", "rest"}, "lb1 | lb2,lb3,lb4,lb5,lb10"},
		{[]string{"lb1"}, "lb1,lb2,lb3,lb4,lb5,lb10"}, // the rest joins the last wave
		{[]string{"lb3", "2", "rest"}, "lb3 | lb1,lb2 | lb4,lb5,lb10"},
		{[]string{"lb1", "50%", "rest"}, "lb1 | lb2,lb3,lb4 | lb5,lb10"}, // ceil(2.5)
		{[]string{"1", "1", "lb2,lb10"}, "lb1 | lb3 | lb2,lb10,lb4,lb5"}, // named first, then counts from the rest
		{[]string{"lb9", "rest"}, " | lb1,lb2,lb3,lb4,lb5,lb10"},         // not a member: an empty wave
		{[]string{"lb1", "10", "1"}, "lb1 | lb2,lb3,lb4,lb5,lb10 | "},    // more than there are
		{[]string{"10%", "rest"}, "lb1 | lb2,lb3,lb4,lb5,lb10"},          // at least one
		{[]string{"lb2,lb1", "rest"}, "lb2,lb1 | lb3,lb4,lb5,lb10"},      // named order kept
		{[]string{"lb1", "lb2", "lb3", "rest"}, "lb1 | lb2 | lb3 | lb4,lb5,lb10"},
	} {
		cfg := &RolloutConfig{Waves: tc.waves}
		if err := CheckWaves(tc.waves); err != nil {
			t.Fatalf("%v: %v", tc.waves, err)
		}
		var got []string
		for _, w := range cfg.Resolve(members) {
			got = append(got, strings.Join(w, ","))
		}
		if g := strings.Join(got, " | "); g != tc.want {
			t.Errorf("%v: %q, want %q", tc.waves, g, tc.want)
		}
	}
}

func TestCheckWaves(t *testing.T) {
	for _, tc := range []struct {
		waves []string
		want  string
	}{
		{[]string{"rest", "lb1"}, "is \"rest\" but is not the last"},
		{[]string{"lb1", "lb1,lb2"}, "node lb1 is in two waves"},
		{[]string{"0"}, "want a count of 1 or more"},
		{[]string{"150%"}, "want a percentage above 0"},
		{[]string{"lb 1"}, "only letters"},
		{[]string{""}, "an empty wave"},
		{[]string{"lb1,"}, "an empty node name (a comma too many?)"},
	} {
		err := CheckWaves(tc.waves)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%q: %v, want %q", tc.waves, err, tc.want)
		}
	}
}

// The safety margin leaves a 6-day certificate most of a day, and keeps
// its proportion for every lifetime.
func TestOverrideMargin(t *testing.T) {
	nb := time.Date(2026, 5, 1, 0, 0, 0, 0, time.UTC)
	for _, tc := range []struct {
		life, atLeast time.Duration
	}{
		{6 * 24 * time.Hour, 20 * time.Hour},
		{160 * time.Hour, 20 * time.Hour}, // Let's Encrypt's shortlived
		{24 * time.Hour, 3 * time.Hour},   // step-ca's default
		{90 * 24 * time.Hour, 13 * 24 * time.Hour},
	} {
		c := store.CertInfo{NotBefore: nb, NotAfter: nb.Add(tc.life)}
		left := c.NotAfter.Sub(overrideAt(c, DefaultMargin))
		if left < tc.atLeast || left >= tc.life/3 {
			t.Errorf("lifetime %s: the override starts %s before expiry, want at least %s and before renewal (a third left)", tc.life, left, tc.atLeast)
		}
	}
}

func TestDecideTarget(t *testing.T) {
	now := time.Date(2026, 6, 1, 12, 0, 0, 0, time.UTC)
	fresh := store.CertInfo{NotBefore: now.Add(-24 * time.Hour), NotAfter: now.Add(89 * 24 * time.Hour)}
	expiring := store.CertInfo{NotBefore: now.Add(-80 * 24 * time.Hour), NotAfter: now.Add(10 * 24 * time.Hour)}
	waves := [][]string{{"lb1"}, {"lb2", "lb3"}}
	rec := func(state string, wave int, node string) *Record {
		return &Record{Name: "a.example", Version: 5, Serial: "new", Previous: 4, PrevSerial: "old", Wave: wave, State: state, Node: node, Why: "probe failed"}
	}
	for _, tc := range []struct {
		name     string
		rec      *Record
		node     string
		live     int
		prev     store.CertInfo
		want     int
		held     bool
		override bool
	}{
		{"canary released", rec(Rolling, 0, ""), "lb1", 4, fresh, 5, false, false},
		{"later wave waits", rec(Rolling, 0, ""), "lb2", 4, fresh, 4, true, false},
		{"joiner waits on the previous", rec(Rolling, 0, ""), "lb3", 0, fresh, 4, true, false},
		{"second wave released", rec(Rolling, 1, ""), "lb3", 4, fresh, 5, false, false},
		{"unknown node is in the last wave", rec(Rolling, 0, ""), "lb9", 0, fresh, 4, true, false},
		{"held: the failed node goes back", rec(Held, 0, "lb1"), "lb1", 5, fresh, 4, true, false},
		{"held: a node that passed keeps it", rec(Held, 1, "lb2"), "lb3", 5, fresh, 5, false, false},
		{"held: a released node not there yet stays", rec(Held, 1, "lb2"), "lb3", 4, fresh, 4, true, false},
		{"held: later wave stays", rec(Held, 0, "lb1"), "lb2", 4, fresh, 4, true, false},
		{"aborted: everyone back", rec(Aborted, 1, ""), "lb1", 5, fresh, 4, true, false},
		{"held near expiry: overridden", rec(Held, 0, "lb1"), "lb2", 4, expiring, 5, true, true},
		{"waiting near expiry: overridden", rec(Rolling, 0, ""), "lb3", 4, expiring, 5, true, true},
		{"aborted near expiry: overridden", rec(Aborted, 0, ""), "lb1", 4, expiring, 5, true, true},
		{"previous lost, serving it: keeps it", rec(Rolling, 0, ""), "lb2", 4, store.CertInfo{}, 4, true, false},
		{"previous lost, serving nothing: the new one", rec(Rolling, 0, ""), "lb2", 0, store.CertInfo{}, 5, true, true},
	} {
		got := decideTarget(targetIn{rec: tc.rec, waves: waves, node: tc.node, live: tc.live, liveSerial: "x", prev: tc.prev, margin: DefaultMargin, now: now})
		if got.Version != tc.want || (got.Held != "") != tc.held || (got.Override != "") != tc.override {
			t.Errorf("%s: %+v, want version %d, held %v, override %v", tc.name, got, tc.want, tc.held, tc.override)
		}
	}
}

func TestJudge(t *testing.T) {
	t0 := time.Date(2026, 6, 1, 12, 0, 0, 0, time.UTC)
	waves := [][]string{{"lb1"}, {"lb2", "lb3"}}
	rec := &Record{Name: "a.example", Version: 5, Serial: "new", Previous: 4, PrevSerial: "old", State: Rolling, Since: t0}
	ok := func(at time.Duration, probe string) Served {
		return Served{Version: 5, Serial: "new", Wanted: 5, OK: true, At: t0.Add(at), Probe: probe}
	}
	old := Served{Version: 4, Serial: "old", Wanted: 5, OK: true, At: t0}
	cfg := &RolloutConfig{Waves: []string{"lb1", "rest"}, Soak: time.Minute}
	probed := &RolloutConfig{Waves: []string{"lb1", "rest"}, Soak: time.Minute, Probe: "https://{name}/"}
	for _, tc := range []struct {
		name   string
		cfg    *RolloutConfig
		wave   int
		served map[string]Served
		now    time.Duration
		want   string
	}{
		{"canary not there yet", cfg, 0, map[string]Served{"lb1": old}, time.Minute, "wait [lb1]"},
		{"canary serves it, soaking", cfg, 0, map[string]Served{"lb1": ok(time.Second, "")}, 30 * time.Second, "wait until +1m1s"},
		{"canary soaked, checking", cfg, 0, map[string]Served{"lb1": ok(time.Second, "")}, 62 * time.Second, "release"},
		{"probe not done", probed, 0, map[string]Served{"lb1": ok(time.Second, "")}, time.Hour, "wait [lb1]"},
		{"probe passed", probed, 0, map[string]Served{"lb1": ok(time.Second, ProbeOK)}, time.Hour, "release"},
		{"probe failed", probed, 0, map[string]Served{"lb1": ok(time.Second, "GET x: status 503, want 200")}, time.Hour, "hold lb1: probe failed on lb1 (wave 1): GET x: status 503, want 200"},
		{"deploy failed", cfg, 0, map[string]Served{"lb1": {Version: 4, Wanted: 5, Error: "deploy: haproxy -c failed", At: t0.Add(time.Second)}}, time.Hour, "hold lb1: deploy failed on lb1 (wave 1): haproxy -c failed"},
		{"a failure of another version is not this one's", cfg, 0, map[string]Served{"lb1": {Version: 3, Wanted: 4, Error: "deploy: x", At: t0}}, time.Hour, "wait [lb1]"},
		{"last wave half there", cfg, 1, map[string]Served{"lb1": ok(0, ""), "lb2": ok(2*time.Minute, ""), "lb3": old}, time.Hour, "wait [lb3]"},
		{"last wave done", cfg, 1, map[string]Served{"lb1": ok(0, ""), "lb2": ok(2*time.Minute, ""), "lb3": ok(3*time.Minute, "")}, time.Hour, "done"},
		{"a released wave's later failure holds", cfg, 1, map[string]Served{"lb1": {Version: 4, Wanted: 5, Error: "deploy: x", At: t0.Add(time.Hour)}, "lb2": ok(0, "")}, time.Hour, "hold lb1: deploy failed on lb1 (wave 1): x"},
	} {
		r := *rec
		r.Wave = tc.wave
		// Every node serving the version checked it a second ago, and
		// has a heartbeat: TestJudgeSoak is about when they did not.
		served := map[string]Served{}
		for node, s := range tc.served {
			if s.Serial == "new" {
				s.Checked = t0.Add(tc.now - time.Second)
			}
			served[node] = s
		}
		v := judge(&r, tc.cfg, waves, served, allLive, t0.Add(tc.now))
		if got := verdictWords(v, t0); got != tc.want {
			t.Errorf("%s: %s, want %s", tc.name, got, tc.want)
		}
	}
	// After a resume, the failure reported before it is not held
	// against the wave again.
	r := *rec
	r.Resumed = t0.Add(time.Hour)
	v := judge(&r, cfg, waves, map[string]Served{"lb1": {Version: 4, Wanted: 5, Error: "deploy: x", At: t0.Add(time.Minute)}}, allLive, t0.Add(2*time.Hour))
	if v.hold || !slices.Equal(v.missing, []string{"lb1"}) {
		t.Errorf("after a resume: %+v, want waiting for lb1", v)
	}
}

var allLive = map[string]bool{"lb1": true, "lb2": true, "lb3": true}

func verdictWords(v verdict, t0 time.Time) string {
	switch {
	case v.hold:
		return "hold " + v.node + ": " + v.why
	case v.release:
		return "release"
	case v.done:
		return "done"
	case !v.wait.IsZero() && len(v.stale) > 0:
		return fmt.Sprintf("wait until +%s for %v", v.wait.Sub(t0), v.stale)
	case !v.wait.IsZero():
		return fmt.Sprintf("wait until +%s", v.wait.Sub(t0))
	}
	return fmt.Sprintf("wait %v", v.missing)
}

// A soak is checked: the wave's nodes check the version again while it
// soaks, a failing check holds the rollout, and the wave passes only
// when at the soak's end every node has a fresh passing check and a
// heartbeat. A node gone quiet without a heartbeat holds it, naming
// the node; a wave with no node left (removed from the fleet) passes
// on time.
func TestJudgeSoak(t *testing.T) {
	t0 := time.Date(2026, 6, 1, 12, 0, 0, 0, time.UTC)
	const soak = time.Minute // checks every 10 s; fresh for 22 s; silent after 2 min
	if soakEvery(soak) != 10*time.Second || soakFresh(soak) != 22*time.Second || soakSilent(soak) != 2*time.Minute {
		t.Fatalf("soak of 1m: every %s, fresh %s, silent %s; want 10s, 22s, 2m", soakEvery(soak), soakFresh(soak), soakSilent(soak))
	}
	cfg := &RolloutConfig{Waves: []string{"lb1", "rest"}, Soak: soak, Probe: "https://{name}/"}
	waves := [][]string{{"lb1"}, {"lb2", "lb3"}}
	rec := &Record{Name: "a.example", Version: 5, Serial: "new", Previous: 4, PrevSerial: "old", State: Rolling, Since: t0}
	// Served since +1s (the deploy's check passed then), checked again at
	// +checked.
	at := func(checked time.Duration, verify, probe string) Served {
		s := Served{Version: 5, Serial: "new", Wanted: 5, OK: true, At: t0.Add(time.Second), Probe: probe, Verify: verify}
		if checked > 0 {
			s.Checked = t0.Add(checked)
		}
		return s
	}
	good := func(checked time.Duration) Served { return at(checked, ProbeOK, ProbeOK) }
	for _, tc := range []struct {
		name   string
		wave   int
		served map[string]Served
		live   map[string]bool
		now    time.Duration
		want   string
	}{
		{"soaking, checks passing", 0, map[string]Served{"lb1": good(50 * time.Second)}, allLive, 55 * time.Second, "wait until +1m1s"},
		{"soaked, a fresh check", 0, map[string]Served{"lb1": good(55 * time.Second)}, allLive, 62 * time.Second, "release"},
		{"probe failing during the soak holds", 0, map[string]Served{"lb1": at(20*time.Second, ProbeOK, "GET x: status 500, want 200")}, allLive, 21 * time.Second,
			"hold lb1: probe failed on lb1 (wave 1): GET x: status 500, want 200"},
		{"TLS check failing during the soak holds", 0, map[string]Served{"lb1": at(20*time.Second, "verify a.example at 127.0.0.1:8443: connection refused", ProbeOK)}, allLive, 21 * time.Second,
			"hold lb1: TLS check failed on lb1 (wave 1): verify a.example at 127.0.0.1:8443: connection refused"},
		{"soaked on the deploy's check alone: waits", 0, map[string]Served{"lb1": good(0)}, allLive, 62 * time.Second, "wait until +2m1.001s for [lb1]"},
		{"soaked, last check too old: waits", 0, map[string]Served{"lb1": good(30 * time.Second)}, allLive, 62 * time.Second, "wait until +2m30.001s for [lb1]"},
		{"soaked, fresh check but no heartbeat: waits", 0, map[string]Served{"lb1": good(55 * time.Second)}, map[string]bool{}, 62 * time.Second, "wait until +2m55.001s for [lb1]"},
		{"silent and no heartbeat mid-soak: waits until silent long enough", 0, map[string]Served{"lb1": good(0)}, map[string]bool{}, 40 * time.Second, "wait until +1m1s for [lb1]"},
		{"silent and no heartbeat: holds", 0, map[string]Served{"lb1": good(0)}, map[string]bool{}, 2*time.Minute + 2*time.Second,
			"hold lb1: no check from lb1 (wave 1) since 2026-06-01T12:00:01Z and no heartbeat from its agent (agent down?)"},
		{"silent with a heartbeat: waits, looks again", 0, map[string]Served{"lb1": good(0)}, allLive, time.Hour, "wait until +1h0m10s for [lb1]"},
		{"one of two stale", 1, map[string]Served{"lb1": good(0), "lb2": good(time.Hour), "lb3": good(time.Hour - 30*time.Second)}, allLive, time.Hour + time.Second, "wait until +1h1m30.001s for [lb3]"},
		{"both fresh: done", 1, map[string]Served{"lb1": good(0), "lb2": good(time.Hour), "lb3": good(time.Hour - 5*time.Second)}, allLive, time.Hour + time.Second, "done"},
		{"an earlier wave's node need not be fresh", 1, map[string]Served{"lb1": good(0), "lb2": good(time.Hour), "lb3": good(time.Hour)}, map[string]bool{"lb2": true, "lb3": true}, time.Hour + time.Second, "done"},
	} {
		r := *rec
		r.Wave = tc.wave
		v := judge(&r, cfg, waves, tc.served, tc.live, t0.Add(tc.now))
		if got := verdictWords(v, t0); got != tc.want {
			t.Errorf("%s: %s, want %s", tc.name, got, tc.want)
		}
	}
	// The canary removed from the fleet mid-soak: its wave has no node
	// left, and passes once the soak time is over.
	empty := [][]string{nil, {"lb2", "lb3"}}
	r := *rec
	if v := judge(&r, cfg, empty, map[string]Served{}, map[string]bool{}, t0.Add(30*time.Second)); verdictWords(v, t0) != "wait until +1m0s" {
		t.Errorf("an empty wave mid-soak: %s, want to wait until the soak's end", verdictWords(v, t0))
	}
	if v := judge(&r, cfg, empty, map[string]Served{}, map[string]bool{}, t0.Add(61*time.Second)); !v.release {
		t.Errorf("an empty wave soaked: %s, want the next released", verdictWords(v, t0))
	}
	// No soak: the deploy's check is the check, with no wait for another
	// and no heartbeat asked for.
	quick := &RolloutConfig{Waves: []string{"lb1", "rest"}, Probe: "https://{name}/"}
	if v := judge(&r, quick, waves, map[string]Served{"lb1": good(0)}, nil, t0.Add(2*time.Second)); !v.release {
		t.Errorf("no soak: %s, want the next wave released at once", verdictWords(v, t0))
	}
	// A failing check made before a resume is not held against the wave
	// again; one made after it is.
	r.Resumed = t0.Add(30 * time.Second)
	if v := judge(&r, cfg, waves, map[string]Served{"lb1": at(20*time.Second, ProbeOK, "status 500")}, allLive, t0.Add(40*time.Second)); v.hold {
		t.Errorf("a failed check before the resume holds again: %s", verdictWords(v, t0))
	}
	if v := judge(&r, cfg, waves, map[string]Served{"lb1": at(35*time.Second, ProbeOK, "status 500")}, allLive, t0.Add(40*time.Second)); !v.hold {
		t.Errorf("a failed check after the resume does not hold: %s", verdictWords(v, t0))
	}
}

// A report that says again what Redis holds keeps Redis's time and the
// soak's checks since; a different one starts afresh.
func TestKeepSince(t *testing.T) {
	t0 := time.Date(2026, 6, 1, 12, 0, 0, 0, time.UTC)
	prev := map[string]Served{"a": {Version: 5, Serial: "new", Wanted: 5, OK: true, At: t0, Probe: ProbeOK, Checked: t0.Add(time.Minute), Verify: ProbeOK}}
	same := Served{Version: 5, Serial: "new", Wanted: 5, OK: true, At: t0.Add(time.Hour), Probe: ProbeOK}
	other := Served{Version: 6, Serial: "newer", Wanted: 6, OK: true, At: t0.Add(time.Hour)}
	reports := map[string]Served{"a": same}
	keepSince(reports, prev)
	if got := reports["a"]; !got.At.Equal(t0) || !got.Checked.Equal(t0.Add(time.Minute)) || got.Verify != ProbeOK {
		t.Errorf("the same report again: %+v, want Redis's time and checks kept", got)
	}
	reports = map[string]Served{"a": other}
	keepSince(reports, prev)
	if got := reports["a"]; !got.At.Equal(t0.Add(time.Hour)) || !got.Checked.IsZero() || got.Verify != "" {
		t.Errorf("a new version: %+v, want a report of its own", got)
	}
}
