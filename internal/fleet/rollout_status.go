package fleet

import (
	"context"
	"encoding/json"
	"fmt"
	"sort"
	"strings"
	"time"

	"github.com/lbcert/lbcert/internal/fleet/rdb"
	"github.com/lbcert/lbcert/internal/store"
)

// RolloutStatus is one staged rollout on its way, as 'fleet status'
// shows it.
type RolloutStatus struct {
	Name     string `json:"name"`
	Version  int    `json:"version"`  // the version rolling out
	Previous int    `json:"previous"` // what the nodes not reached keep
	State    string `json:"state"`    // rolling, held, aborted
	// Wave is the last wave released, from 1, of Waves.
	Wave    int        `json:"wave"`
	Waves   [][]string `json:"waves"`
	Why     string     `json:"why,omitempty"`
	Node    string     `json:"failed_node,omitempty"`
	Started time.Time  `json:"started"`
	Since   time.Time  `json:"wave_since"`
	// Waiting are the current wave's nodes that do not serve it (with
	// its probe passed) yet, or whose checks during the soak are late.
	Waiting []string `json:"waiting_for,omitempty"`
	// Override is when the expiry override began, on OverrideNode.
	Override     *time.Time `json:"expiry_override,omitempty"`
	OverrideNode string     `json:"expiry_override_node,omitempty"`
	// Serving is the version each node serves.
	Serving map[string]int `json:"serving"`
}

// Problem is what fleet status says of a rollout that needs an
// operator, or "".
func (r *RolloutStatus) Problem() string {
	s := fmt.Sprintf("rollout of %s version %d", r.Name, r.Version)
	var where []string
	for _, w := range r.Waves {
		for _, node := range w {
			if r.Serving[node] != r.Version {
				where = append(where, node)
			}
		}
	}
	verb := "keep"
	if len(where) == 1 {
		verb = "keeps"
	}
	keep := fmt.Sprintf("; %s %s version %d", orNone(where), verb, r.Previous)
	switch {
	case r.Override != nil:
		return fmt.Sprintf("%s %s but overridden since %s: the version held back was about to expire", s, r.State, r.Override.UTC().Format(time.RFC3339))
	case r.State == Held:
		return s + " held: " + r.Why + keep
	case r.State == Aborted:
		return s + " aborted" + keep
	}
	return ""
}

func orNone(s []string) string {
	if len(s) == 0 {
		return "no node"
	}
	return strings.Join(s, ", ")
}

// rolloutView is what status needs to know of the rollouts on their
// way: each record with the previous version's certificate, and the
// fleet's waves resolved over the members (each rollout has its own,
// resolved when it started: wavesOf).
type rolloutView struct {
	cfg     *RolloutConfig
	members []string
	waves   [][]string
	recs    map[string]*Record
	prev    map[string]store.CertInfo
}

// wavesOf is r's waves among the members now; status only reads, so a
// record whose waves are not resolved yet is shown with the fleet's.
func (v *rolloutView) wavesOf(r *Record) [][]string {
	if r.Waves == nil {
		return v.waves
	}
	return placeWaves(r.Waves, v.members)
}

func (n *Node) viewRollouts(ctx context.Context, heads map[string]rdb.Head) (*rolloutView, error) {
	cfg, err := n.RolloutConfig(ctx, true)
	if err != nil {
		return nil, err
	}
	members := n.memberNames()
	v := &rolloutView{cfg: cfg, members: members, waves: cfg.Resolve(members), recs: map[string]*Record{}, prev: map[string]store.CertInfo{}}
	if !cfg.Staged() {
		return v, nil
	}
	names, err := n.Shared.Rollouts(ctx)
	if err != nil {
		return nil, err
	}
	raw, err := n.Shared.RolloutRecords(ctx, names)
	if err != nil {
		return nil, err
	}
	for name, m := range raw {
		r := recordOf(name, m)
		if h, ok := heads[name]; !ok || h.Version != r.Version {
			continue
		}
		v.recs[name] = r
		if bd, err := n.Shared.BundleMetaOf(ctx, "prev", name); err == nil && bd.Version == r.Previous {
			if l, err := metaOf(bd); err == nil {
				v.prev[name] = l.Cert
			}
		}
	}
	return v, nil
}

// target is node's Target of name, when a rollout is on its way for it.
func (v *rolloutView) target(name, node string, served Served, now time.Time) (Target, bool) {
	r := v.recs[name]
	if r == nil {
		return Target{}, false
	}
	return decideTarget(targetIn{rec: r, waves: v.wavesOf(r), node: node, live: served.Version, liveSerial: served.Serial,
		prev: v.prev[name], margin: v.cfg.margin(), now: now}), true
}

// statuses are the rollouts as fleet status shows them, from what every
// node reports (node -> name -> what it serves).
func (v *rolloutView) statuses(served map[string]map[string]Served, now time.Time) []RolloutStatus {
	var out []RolloutStatus
	for name, r := range v.recs {
		rs := RolloutStatus{Name: name, Version: r.Version, Previous: r.Previous, State: r.State, Wave: r.Wave + 1, Waves: v.wavesOf(r),
			Why: r.Why, Node: r.Node, Started: r.Started, Since: r.Since, Serving: map[string]int{}}
		if !r.Override.IsZero() {
			t := r.Override
			rs.Override, rs.OverrideNode = &t, r.OverNode
		}
		for node, m := range served {
			rs.Serving[node] = m[name].Version
		}
		if r.State == Rolling {
			byNode := map[string]Served{}
			for node, m := range served {
				byNode[node] = m[name]
			}
			jv := judge(r, v.cfg, v.wavesOf(r), byNode, nil, now)
			rs.Waiting = append(jv.missing, jv.stale...)
		}
		out = append(out, rs)
	}
	return out
}

// RolloutsOnTheirWay are the staged rollouts on their way, as fleet
// status shows them, read without the fleet's every lineage (a run's
// report asks this after each run).
func (n *Node) RolloutsOnTheirWay(ctx context.Context, now time.Time) ([]RolloutStatus, error) {
	names, err := n.Shared.Rollouts(ctx)
	if err != nil || len(names) == 0 {
		return nil, err
	}
	heads, err := n.Shared.Heads(ctx, names)
	if err != nil {
		return nil, err
	}
	v, err := n.viewRollouts(ctx, heads)
	if err != nil {
		return nil, err
	}
	members := n.memberNames()
	raw, err := n.Shared.ServedOf(ctx, members, names)
	if err != nil {
		return nil, err
	}
	served := map[string]map[string]Served{}
	for node, m := range raw {
		served[node] = map[string]Served{}
		for name, js := range m {
			var s Served
			if json.Unmarshal([]byte(js), &s) == nil {
				served[node][name] = s
			}
		}
	}
	for _, node := range members {
		if served[node] == nil {
			served[node] = map[string]Served{}
		}
	}
	out := v.statuses(served, now)
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out, nil
}
