package fleet

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"slices"
	"strconv"
	"strings"
	"time"
)

// verdict is what judging one rollout decided.
type verdict struct {
	hold      bool
	node, why string    // hold: the node whose check failed, and why
	release   bool      // the current wave passed: release the next
	done      bool      // the last wave passed
	wait      time.Time // not ready: look again then (zero: when a report comes)
	missing   []string  // the current wave's nodes that do not serve it yet
	// stale are the current wave's nodes that serve it but whose checks
	// during the soak are not fresh, or whose agent has no heartbeat.
	stale []string
}

// judge decides one rolling rollout from what the nodes of its released
// waves report (invariant R1 of package catalog): a failure on any of
// them holds it; when every node of the current wave serves the version
// (its load balancer checked over TLS), its probe passed and the soak
// has gone by with every node still checking it (soakVerdict), the next
// wave is released. live are the nodes whose agent has a heartbeat; nil
// when not known (fleet status), which counts every node as live.
func judge(r *Record, cfg *RolloutConfig, waves [][]string, served map[string]Served, live map[string]bool, now time.Time) verdict {
	cur := min(r.Wave, len(waves)-1)
	for w := 0; w <= cur; w++ {
		for _, node := range waves[w] {
			if what, detail := failure(r, served[node]); what != "" {
				return verdict{hold: true, node: node, why: fmt.Sprintf("%s on %s (wave %d): %s", what, node, w+1, detail)}
			}
		}
	}
	ready := r.Since
	var v verdict
	for _, node := range waves[cur] {
		s, ok := served[node]
		if !ok || !s.OK || s.Version != r.Version || s.Serial != r.Serial || cfg.Probe != "" && s.Probe != ProbeOK {
			v.missing = append(v.missing, node)
			continue
		}
		if s.At.After(ready) {
			ready = s.At
		}
	}
	if len(v.missing) > 0 {
		return v
	}
	end := ready.Add(cfg.Soak)
	if cfg.Soak > 0 {
		sv := soakVerdict(cfg.Soak, waves[cur], cur, served, live, now)
		if !sv.hold && now.Before(end) {
			sv.wait = sooner(end, sv.wait)
		}
		if sv.hold || !sv.wait.IsZero() {
			return sv
		}
	}
	if now.Before(end) {
		v.wait = end
		return v
	}
	if r.Wave+1 >= len(waves) {
		return verdict{done: true}
	}
	return verdict{release: true}
}

// Timing of the checks while a wave soaks: its nodes check the version
// again every soakEvery (a sixth of the soak, from 1 s to 30 s); a
// check counts at the soak's end while no older than soakFresh (two
// rounds and a little: one late round is not a failure); a node that
// served the version but has neither checked for soakSilent nor has a
// heartbeat holds the rollout.
func soakEvery(soak time.Duration) time.Duration {
	return min(max(soak/6, time.Second), 30*time.Second)
}

func soakFresh(soak time.Duration) time.Duration { return 2*soakEvery(soak) + 2*time.Second }

func soakSilent(soak time.Duration) time.Duration { return max(3*soakFresh(soak), 2*time.Minute) }

// soakVerdict judges the checks of a soaking wave (index w) whose every
// node serves the version: a node without a heartbeat that has not
// checked it for soakSilent holds the rollout; one whose last check is
// older than soakFresh, or without a heartbeat, is stale, and the wave
// waits for it. wait is when a stale node would be silent for long
// enough to hold.
func soakVerdict(soak time.Duration, wave []string, w int, served map[string]Served, live map[string]bool, now time.Time) verdict {
	var v verdict
	for _, node := range wave {
		last := checkedAt(served[node])
		alive := live == nil || live[node]
		age := now.Sub(last)
		switch {
		case !alive && age > soakSilent(soak):
			return verdict{hold: true, node: node, why: fmt.Sprintf("no check from %s (wave %d) since %s and no heartbeat from its agent (agent down?)",
				node, w+1, last.UTC().Format(time.RFC3339))}
		case !alive || age > soakFresh(soak):
			v.stale = append(v.stale, node)
			wake := last.Add(soakSilent(soak) + time.Millisecond)
			if !wake.After(now) {
				wake = now.Add(soakEvery(soak)) // alive but not checking: look again, not at once
			}
			v.wait = sooner(v.wait, wake)
		}
	}
	return v
}

// checkedAt is when a report's version was last checked on its node:
// at its deploy, or since by the soak's checks.
func checkedAt(s Served) time.Time {
	if s.Checked.After(s.At) {
		return s.Checked
	}
	return s.At
}

// failure is which check node's report fails for r and how, or "". A
// report whose last check was before the rollout was resumed is not
// held against it again.
func failure(r *Record, s Served) (what, detail string) {
	if s.At.IsZero() || !r.Resumed.IsZero() && checkedAt(s).Before(r.Resumed) {
		return "", ""
	}
	switch {
	case !s.OK && s.Error != "" && s.Wanted == r.Version:
		return "deploy failed", strings.TrimPrefix(s.Error, "deploy: ")
	case s.Serial == r.Serial && s.Verify != "" && s.Verify != ProbeOK:
		return "TLS check failed", s.Verify
	case s.Serial == r.Serial && s.Probe != "" && s.Probe != ProbeOK:
		return "probe failed", s.Probe
	}
	return "", ""
}

// Evaluate judges the rollouts of names (none given: every one on its
// way) and moves each as judged: held, next wave released, or done.
// Every agent does this whenever a node reports and at each reconcile;
// the moves are compare-and-set, so two agents judging at once move a
// rollout once. It returns when a rollout should be judged again (a
// soak ending, a held version nearing its expiry), zero for none.
func (n *Node) Evaluate(ctx context.Context, names ...string) (time.Time, error) {
	cfg, err := n.RolloutConfig(ctx, false)
	if err != nil || !cfg.Staged() && len(names) > 0 {
		return time.Time{}, err // nothing staged: nothing on its way but leftovers, ended at the reconcile
	}
	recs, err := n.Records(ctx, names...)
	if err != nil || len(recs) == 0 {
		return time.Time{}, err
	}
	rnames := make([]string, 0, len(recs))
	for name := range recs {
		rnames = append(rnames, name)
	}
	slices.Sort(rnames)
	heads, err := n.Shared.Heads(ctx, rnames)
	if err != nil {
		return time.Time{}, err
	}
	members := n.memberNames()
	raw, err := n.Shared.ServedOf(ctx, members, rnames)
	if err != nil {
		return time.Time{}, err
	}
	live, err := n.liveNodes(ctx, cfg)
	if err != nil {
		return time.Time{}, err
	}
	var next time.Time
	for _, name := range rnames {
		r, h := recs[name], heads[name]
		if h.Version > r.Version || !cfg.Staged() && cfg.Seq > 0 {
			// Staging turned off ('fleet rollout off' is a change with a
			// seq; an emptied Redis has none), or a record a rebuild left
			// behind.
			n.move(ctx, r, true)
			continue
		}
		if h.Version != r.Version || r.State != Rolling {
			next = sooner(next, n.overrideWake(ctx, cfg, r))
			continue
		}
		served := map[string]Served{}
		for node, m := range raw {
			var s Served
			if js, ok := m[name]; ok && json.Unmarshal([]byte(js), &s) == nil {
				served[node] = s
			}
		}
		waves := n.wavesOf(ctx, cfg, r)
		v := judge(r, cfg, waves, served, live, time.Now())
		switch {
		case v.hold:
			slog.Error("rollout held: the new version goes to no further node", "name", name, "version", r.Version, "why", v.why)
			n.move(ctx, r, false, "state", Held, "why", v.why, "node", v.node)
		case v.done:
			slog.Info("rollout done: every wave serves the new version", "name", name, "version", r.Version)
			n.move(ctx, r, true)
		case v.release:
			slog.Info("rollout: wave passed; releasing the next", "name", name, "version", r.Version, "wave", r.Wave+2, "nodes", strings.Join(waves[r.Wave+1], ","))
			n.move(ctx, r, false, "wave", strconv.Itoa(r.Wave+1), "since", strconv.FormatInt(time.Now().UnixMilli(), 10))
		default:
			next = sooner(next, v.wait)
			next = sooner(next, n.overrideWake(ctx, cfg, r))
		}
	}
	return next, nil
}

// liveNodes are the members whose agent has a heartbeat, as a soak's
// judge needs them (nil when no soak does).
func (n *Node) liveNodes(ctx context.Context, cfg *RolloutConfig) (map[string]bool, error) {
	if cfg.Soak <= 0 {
		return nil, nil
	}
	agents, err := n.LiveAgents(ctx)
	if err != nil {
		return nil, err
	}
	live := make(map[string]bool, len(agents))
	for _, a := range agents {
		live[a.Node] = true
	}
	return live, nil
}

// move moves r (compare-and-set on its version and seq) and keeps this
// node's copy current; losing the race to another node is fine.
func (n *Node) move(ctx context.Context, r *Record, done bool, kv ...string) {
	ok, err := n.Shared.MoveRollout(ctx, r.Name, r.Version, r.Seq, done, kv...)
	if err != nil {
		slog.Warn("could not move a rollout on; the next look does", "name", r.Name, "err", err)
		return
	}
	if ok && done {
		n.keepRecord(r.Name, nil)
	} else if ok {
		n.Records(ctx, r.Name)
	}
}

// overrideWake is when the version r holds back enters its safety
// margin, if that is still to come.
func (n *Node) overrideWake(ctx context.Context, cfg *RolloutConfig, r *Record) time.Time {
	prev, err := n.prevLineage(ctx, r)
	if err != nil || prev == nil {
		return time.Time{}
	}
	at := overrideAt(prev.Cert, cfg.margin())
	if at.Before(time.Now()) {
		return time.Time{}
	}
	return at
}

func sooner(a, b time.Time) time.Time {
	if a.IsZero() || !b.IsZero() && b.Before(a) {
		return b
	}
	return a
}
