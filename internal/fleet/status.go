package fleet

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"slices"
	"sort"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/lbcert/lbcert/internal/inventory"
)

// StatusVersion is the fleet status JSON schema's version; it changes
// only when a field changes meaning or goes away.
const StatusVersion = 1

// Status is the fleet as 'fleet status' shows it.
type Status struct {
	Version  int          `json:"version"`
	Fleet    string       `json:"fleet"`
	Redis    string       `json:"redis"`
	Lineages int          `json:"lineages"`
	Nodes    []NodeStatus `json:"nodes"`
	OK       bool         `json:"ok"`
	At       time.Time    `json:"at"`
}

// NodeStatus is one member's view.
type NodeStatus struct {
	Node        string     `json:"node"`
	Heartbeat   *time.Time `json:"heartbeat,omitempty"`
	Agent       string     `json:"agent_version,omitempty"`
	Addr        string     `json:"agent_addr,omitempty"`
	Newest      int        `json:"newest"` // lineages served at the fleet's newest version
	Behind      int        `json:"behind"`
	Failed      int        `json:"failed"`
	LagSeconds  float64    `json:"lag_seconds"` // the oldest change not served yet
	Failures    []Failure  `json:"failures,omitempty"`
	Problems    []string   `json:"problems,omitempty"`
	BehindNames []string   `json:"behind_names,omitempty"`
}

// Failure is a lineage a node failed to install or deploy.
type Failure struct {
	Name  string    `json:"name"`
	Error string    `json:"error"`
	At    time.Time `json:"at"`
}

// Report builds the fleet's status at now: a node is a problem when its
// heartbeat is older than maxBeat (or gone), when a deploy failed, or
// when it has been behind the newest version for longer than maxLag.
func (n *Node) Report(ctx context.Context, now time.Time, maxLag, maxBeat time.Duration) (*Status, error) {
	names, err := n.Shared.Names(ctx)
	if err != nil {
		return nil, err
	}
	heads, err := n.Shared.Heads(ctx, names)
	if err != nil {
		return nil, err
	}
	agents, err := n.Shared.Agents(ctx)
	if err != nil {
		return nil, err
	}
	st := &Status{Version: StatusVersion, Fleet: n.ID, Redis: n.Shared.Addr(), Lineages: len(heads), OK: true, At: now.UTC()}
	for _, m := range n.Members() {
		ns := NodeStatus{Node: m.Node}
		var info AgentInfo
		if raw, ok := agents[m.Node]; ok && json.Unmarshal(raw, &info) == nil {
			t := info.At
			ns.Heartbeat, ns.Agent, ns.Addr = &t, info.Version, info.Addr
		}
		served, err := n.Shared.Served(ctx, m.Node)
		if err != nil {
			return nil, err
		}
		var lag time.Duration
		for name, h := range heads {
			var s Served
			if raw, ok := served[name]; ok {
				json.Unmarshal([]byte(raw), &s)
			}
			// The same version AND the same certificate: a node that
			// serves another certificate under the newest number (a Redis
			// that lost writes renumbered it) is behind (invariant I1).
			switch {
			case s.OK && s.Version == h.Version && (h.Serial == "" || s.Serial == h.Serial):
				ns.Newest++
				continue
			case s.Error != "" && s.Wanted >= h.Version:
				ns.Failed++
				ns.Failures = append(ns.Failures, Failure{Name: name, Error: s.Error, At: s.At})
			default:
				ns.Behind++
				ns.BehindNames = append(ns.BehindNames, name)
			}
			lag = max(lag, now.Sub(h.Published))
		}
		sort.Slice(ns.Failures, func(i, j int) bool { return ns.Failures[i].Name < ns.Failures[j].Name })
		sort.Strings(ns.BehindNames)
		if len(ns.BehindNames) > 20 {
			ns.BehindNames = ns.BehindNames[:20]
		}
		ns.LagSeconds = lag.Seconds()
		switch {
		case ns.Heartbeat == nil:
			ns.Problems = append(ns.Problems, "no heartbeat: its agent is not running or cannot reach Redis")
		case now.Sub(*ns.Heartbeat) > maxBeat:
			ns.Problems = append(ns.Problems, fmt.Sprintf("last heartbeat %s ago", now.Sub(*ns.Heartbeat).Round(time.Second)))
		}
		if ns.Failed > 0 {
			ns.Problems = append(ns.Problems, fmt.Sprintf("%d failed to deploy", ns.Failed))
		}
		if ns.Behind > 0 && lag > maxLag {
			ns.Problems = append(ns.Problems, fmt.Sprintf("%d behind for %s", ns.Behind, lag.Round(time.Second)))
		}
		if len(ns.Problems) > 0 {
			st.OK = false
		}
		st.Nodes = append(st.Nodes, ns)
	}
	return st, nil
}

// Serving is what every member reports serving: lineage -> node -> what.
func (n *Node) Serving(ctx context.Context) (map[string]map[string]Served, error) {
	out := map[string]map[string]Served{}
	for _, m := range n.Members() {
		served, err := n.Shared.Served(ctx, m.Node)
		if err != nil {
			return nil, err
		}
		for name, raw := range served {
			var s Served
			if json.Unmarshal([]byte(raw), &s) != nil {
				continue
			}
			if out[name] == nil {
				out[name] = map[string]Served{}
			}
			out[name][m.Node] = s
		}
	}
	return out, nil
}

// Table writes the status as 'fleet status' prints it: the fleet, a row
// per node (heartbeat, agent, lineages at the newest version, behind,
// failed, lag), then every failure.
func (st *Status) Table(w io.Writer, now time.Time) {
	fmt.Fprintf(w, "fleet %s in %s: %d lineages, %d nodes\n", st.Fleet, st.Redis, st.Lineages, len(st.Nodes))
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "NODE\tHEARTBEAT\tAGENT\tNEWEST\tBEHIND\tFAILED\tLAG")
	for _, ns := range st.Nodes {
		beat, agent, lag := "none", ns.Agent, "-"
		if ns.Heartbeat != nil {
			beat = now.Sub(*ns.Heartbeat).Round(time.Second).String() + " ago"
		}
		if agent == "" {
			agent = "-"
		}
		if ns.Behind+ns.Failed > 0 {
			lag = (time.Duration(ns.LagSeconds) * time.Second).String()
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%d\t%d\t%d\t%s\n", ns.Node, beat, agent, ns.Newest, ns.Behind, ns.Failed, lag)
	}
	tw.Flush()
	for _, ns := range st.Nodes {
		for _, f := range ns.Failures {
			fmt.Fprintf(w, "  %s %s: %s\n", ns.Node, f.Name, f.Error)
		}
	}
}

// Problems says, in one line, what is wrong with each node that is not
// fine ("" when every node is).
func (st *Status) Problems() string {
	var lines []string
	for _, ns := range st.Nodes {
		if len(ns.Problems) > 0 {
			lines = append(lines, "node "+ns.Node+": "+strings.Join(ns.Problems, ", "))
		}
	}
	return strings.Join(lines, "; ")
}

// ServingByLineage is what each member reports serving, by lineage, in
// node order: list and show in a fleet.
func (n *Node) ServingByLineage(ctx context.Context) (map[string][]inventory.Serves, error) {
	all, err := n.Serving(ctx)
	if err != nil {
		return nil, err
	}
	out := make(map[string][]inventory.Serves, len(all))
	for name, byNode := range all {
		for node, s := range byNode {
			out[name] = append(out[name], inventory.Serves{Node: node, Version: s.Version, Serial: s.Serial, OK: s.OK, Error: s.Error})
		}
		slices.SortFunc(out[name], func(a, b inventory.Serves) int { return strings.Compare(a.Node, b.Node) })
	}
	return out, nil
}
