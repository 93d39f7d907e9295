package fleet

import (
	"errors"
	"fmt"
	"math"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/lbcert/lbcert/internal/store"
)

// A staged rollout (issue 28) sends a new certificate to the fleet in
// waves: the first wave's nodes deploy it, their load balancers serve
// it, an optional probe through each of them passes, a soak time goes
// by with those checks made again and again (rollout_soak.go; a wave
// passes on fresh checks of nodes whose agents are alive, invariant R1
// of package catalog), and only then may the next wave's nodes install
// it. Until then
// they keep serving the version before it, which the catalog keeps
// beside the new one (the previous bundle). A failed check holds the
// version everywhere it has not reached; an operator resumes or aborts.
//
// The waves are the fleet's, set once (RolloutConfig, 'fleet rollout
// set'); the state of each lineage's rollout is a Record in Redis, made
// by the very publish that makes a new version the head, and moved on
// only by compare-and-set scripts (package rdb), so every node agrees on
// it. What a node may serve is decided in the one install step
// (engine.Node.Gate, which Node.Gate implements): the rollout gates what
// is installed, it does not fork the install.

// DefaultSoak is how long a wave's nodes serve a new version, checked,
// before the next wave may install it.
const DefaultSoak = 5 * time.Minute

// DefaultMargin is the part of a certificate's lifetime before its
// expiry in which a held rollout no longer holds: 15 % is 21.6 hours
// of a 6-day certificate (agents look every minute or sooner), 3.6
// hours of step-ca's 24-hour one, and 13.5 days of a 90-day one.
const DefaultMargin = 0.15

// RolloutConfig is the fleet's waves and checks.
type RolloutConfig struct {
	// Waves, in order; each is node names ("lb1,lb2"), a count of the
	// nodes no earlier wave took ("2"), a percentage of them ("25%"),
	// or "rest". Nodes no wave names go in the last one. None: every
	// node installs every version at once (no staging).
	Waves []string `json:"waves,omitempty"`
	// Soak is how long a wave must have served the version.
	Soak time.Duration `json:"soak_ns"`
	// Probe is an https URL fetched through each node's load balancer
	// once it serves the version ({name} is the lineage's name), the
	// chain verified; ProbeStatus is the status it must answer.
	Probe       string `json:"probe,omitempty"`
	ProbeStatus int    `json:"probe_status,omitempty"`
	// Margin is the fraction of the lifetime before the served
	// version's expiry in which the hold is overridden.
	Margin float64   `json:"expiry_margin"`
	By     string    `json:"set_by,omitempty"`
	At     time.Time `json:"set_at,omitzero"`
	// Seq is the change's number, which never goes back: a rebuild keeps
	// the highest any node holds, and a change is numbered above it
	// (SetRolloutConfig).
	Seq int64 `json:"seq,omitempty"`
}

// Staged reports whether new versions roll out in waves.
func (c *RolloutConfig) Staged() bool { return c != nil && len(c.Waves) > 0 }

func (c *RolloutConfig) margin() float64 {
	if c == nil || c.Margin <= 0 {
		return DefaultMargin
	}
	return c.Margin
}

// wave is one parsed wave.
type wave struct {
	names   []string
	count   int     // a number of the nodes left
	percent float64 // a share of the nodes left
	rest    bool
}

// ParseWave reads one wave as 'fleet rollout set --wave' takes it.
func ParseWave(s string) (wave, error) {
	s = strings.TrimSpace(s)
	switch {
	case s == "":
		return wave{}, errors.New("an empty wave: give node names (lb1,lb2), a count (2), a percentage (25%) or rest")
	case s == "rest":
		return wave{rest: true}, nil
	case strings.HasSuffix(s, "%"):
		p, err := strconv.ParseFloat(strings.TrimSuffix(s, "%"), 64)
		if err != nil || !(p > 0 && p <= 100) { // NaN passes a plain range check
			return wave{}, fmt.Errorf("wave %q: want a percentage above 0 and at most 100", s)
		}
		return wave{percent: p}, nil
	}
	if n, err := strconv.Atoi(s); err == nil {
		if n < 1 {
			return wave{}, fmt.Errorf("wave %q: want a count of 1 or more", s)
		}
		return wave{count: n}, nil
	}
	var w wave
	for _, name := range strings.Split(s, ",") {
		name = strings.TrimSpace(name)
		if name == "" {
			return wave{}, fmt.Errorf("wave %q: an empty node name (a comma too many?)", s)
		}
		if err := checkNodeName(name); err != nil {
			// checkNodeName speaks of --node, the flag of 'fleet join'.
			return wave{}, fmt.Errorf("wave %q: node %s", s, strings.TrimPrefix(err.Error(), "--node "))
		}
		w.names = append(w.names, name)
	}
	return w, nil
}

// CheckWaves checks a list of waves: each parses, no node is named
// twice, and "rest" comes last.
func CheckWaves(specs []string) error {
	seen := map[string]bool{}
	for i, s := range specs {
		w, err := ParseWave(s)
		if err != nil {
			return err
		}
		if w.rest && i != len(specs)-1 {
			return fmt.Errorf("wave %d is \"rest\" but is not the last: nothing would be left for the waves after it", i+1)
		}
		for _, n := range w.names {
			if seen[n] {
				return fmt.Errorf("node %s is in two waves", n)
			}
			seen[n] = true
		}
	}
	return nil
}

// Resolve puts every member in a wave: named nodes where they are
// named, then counts and percentages from the unnamed ones in name
// order, "rest" for all that are left; whoever is left after the last
// wave joins it. A named node that is not a member is left out. A
// rollout resolves the waves once, when it starts, and keeps them in its
// record (placeWaves).
func (c *RolloutConfig) Resolve(members []string) [][]string {
	if !c.Staged() {
		return nil
	}
	ms := slices.Clone(members)
	slices.SortFunc(ms, naturalCmp)
	isMember := map[string]bool{}
	for _, m := range ms {
		isMember[m] = true
	}
	waves := make([]wave, len(c.Waves))
	named := map[string]bool{}
	for i, s := range c.Waves {
		waves[i], _ = ParseWave(s) // checked when set
		for _, n := range waves[i].names {
			named[n] = true
		}
	}
	var left []string
	for _, m := range ms {
		if !named[m] {
			left = append(left, m)
		}
	}
	out := make([][]string, len(waves))
	for i, w := range waves {
		take := 0
		switch {
		case w.rest:
			take = len(left)
		case w.count > 0:
			take = min(w.count, len(left))
		case w.percent > 0:
			take = min(int(math.Ceil(w.percent*float64(len(left))/100)), len(left))
		}
		for _, n := range w.names {
			if isMember[n] {
				out[i] = append(out[i], n)
			}
		}
		out[i] = append(out[i], left[:take]...)
		left = left[take:]
	}
	if len(out) > 0 {
		out[len(out)-1] = append(out[len(out)-1], left...)
	}
	return out
}

// placeWaves is a rollout's waves among the members now: the nodes its
// waves were resolved to when it started (Record.Waves) where they were,
// those no longer members left out, and every member in none of them
// (one that joined since) in the last wave. A node that joins or leaves
// never moves another node to another wave: a canary that passed stays
// the canary, and no node goes back to the previous version.
func placeWaves(pinned [][]string, members []string) [][]string {
	if len(pinned) == 0 {
		return nil
	}
	isMember := map[string]bool{}
	for _, m := range members {
		isMember[m] = true
	}
	out := make([][]string, len(pinned))
	placed := map[string]bool{}
	for i, w := range pinned {
		for _, node := range w {
			placed[node] = true
			if isMember[node] {
				out[i] = append(out[i], node)
			}
		}
	}
	var late []string
	for _, m := range members {
		if !placed[m] {
			late = append(late, m)
		}
	}
	slices.SortFunc(late, naturalCmp)
	out[len(out)-1] = append(out[len(out)-1], late...)
	return out
}

func naturalCmp(a, b string) int {
	if store.NaturalLess(a, b) {
		return -1
	}
	if store.NaturalLess(b, a) {
		return 1
	}
	return 0
}

// waveOf is node's wave in resolved waves, or the last one.
func waveOf(waves [][]string, node string) int {
	for i, w := range waves {
		if slices.Contains(w, node) {
			return i
		}
	}
	return len(waves) - 1
}

// Rollout states.
const (
	Rolling = "rolling" // waves are released one after the other
	Held    = "held"    // a check failed: the version goes no further
	Aborted = "aborted" // the operator sent the fleet back to the previous version
)

// Record is one lineage's rollout, as Redis holds it.
type Record struct {
	Name       string    `json:"name"`
	Version    int       `json:"version"` // being rolled out
	Serial     string    `json:"serial"`
	Previous   int       `json:"previous"` // what nodes keep until their wave
	PrevSerial string    `json:"prev_serial,omitempty"`
	Wave       int       `json:"wave"` // the last wave released (0: the first)
	State      string    `json:"state"`
	Why        string    `json:"why,omitempty"`  // why it is held
	Node       string    `json:"node,omitempty"` // the node whose check failed
	Since      time.Time `json:"since"`          // when Wave was released
	Resumed    time.Time `json:"resumed,omitzero"`
	Started    time.Time `json:"started"`
	Override   time.Time `json:"override_at,omitzero"` // the expiry override began
	OverNode   string    `json:"override_node,omitempty"`
	// Waves are the fleet's waves resolved to node names when the
	// rollout started (Node.wavesOf), so that nodes joining or leaving
	// meanwhile move no node to another wave.
	Waves [][]string `json:"waves,omitempty"`
	Seq   int64      `json:"seq"`
}

// Target is what one node may serve of a lineage now.
type Target struct {
	Version int
	Serial  string
	// Held says why it is not the head; "" when it is.
	Held string
	// Override is the expiry override's warning: the head is served
	// although its rollout holds it, since the previous version is
	// about to expire.
	Override string
}

// targetIn is what deciding a node's target needs.
type targetIn struct {
	rec   *Record
	waves [][]string
	node  string
	live  int // the version this node serves (0: none)
	// liveSerial is the live version's serial.
	liveSerial string
	// prev is the previous version's certificate; zero NotAfter when
	// the fleet has it nowhere.
	prev   store.CertInfo
	margin float64
	now    time.Time
}

// decideTarget is the rollout's rule for one node and one lineage
// whose head is rec.Version (invariants R1 to R3 of package catalog).
func decideTarget(in targetIn) Target {
	r := in.rec
	w := waveOf(in.waves, in.node)
	switch {
	case r.State == Rolling && w <= r.Wave:
		return Target{Version: r.Version, Serial: r.Serial}
	case r.State == Held && w <= r.Wave && in.live == r.Version && in.node != r.Node:
		// It passed its own check before the hold: it keeps it.
		return Target{Version: r.Version, Serial: r.Serial}
	}
	t := Target{Version: r.Previous, Serial: r.PrevSerial, Held: heldWords(r, in.waves, w)}
	switch {
	case in.prev.NotAfter.IsZero() && in.live != 0 && in.live != r.Version:
		// The fleet lost the previous bundle (a rebuild not done yet):
		// what this node serves stays.
		t.Version, t.Serial = in.live, in.liveSerial
		return t
	case in.prev.NotAfter.IsZero():
		t.Version, t.Serial = r.Version, r.Serial
		t.Override = "the previous version is nowhere in the fleet and this node serves none; serving the new one"
		return t
	}
	if at := overrideAt(in.prev, in.margin); !in.now.Before(at) {
		t.Version, t.Serial = r.Version, r.Serial
		t.Override = fmt.Sprintf("expiry beats caution: version %d expires %s, within the safety margin; serving version %d although its rollout %s",
			r.Previous, in.prev.NotAfter.UTC().Format(time.RFC3339), r.Version, strings.TrimPrefix(t.Held, "rollout of version "+strconv.Itoa(r.Version)+" "))
	}
	return t
}

// overrideAt is when a held certificate's expiry overrides the hold.
func overrideAt(c store.CertInfo, margin float64) time.Time {
	life := c.NotAfter.Sub(c.NotBefore)
	return c.NotAfter.Add(-time.Duration(float64(life) * margin))
}

func heldWords(r *Record, waves [][]string, w int) string {
	v := "rollout of version " + strconv.Itoa(r.Version)
	switch r.State {
	case Held:
		return fmt.Sprintf("%s held: %s", v, r.Why)
	case Aborted:
		return v + " aborted: every node keeps version " + strconv.Itoa(r.Previous)
	}
	return fmt.Sprintf("%s is at wave %d of %d (%s); this node is in wave %d", v, r.Wave+1, len(waves), strings.Join(waves[min(r.Wave, len(waves)-1)], ","), w+1)
}
