package e2e

import (
	"context"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"
)

// The flags every ordering command gets: the per-domain budget off (the
// whole pool is under example.com), a short --max-wait so a command
// refused by the ledger gives up instead of waiting minutes, and a
// --wait-lock so two operations on one node queue as an operator's
// would.
var orderFlags = []string{"--agree-tos", "--rate-domain", "off", "--max-wait", "10s", "--wait-lock", "30s"}

// runOp runs one scheduled operation; it waits for a place among the
// operations in flight first.
func (r *chaosRun) runOp(id int, ev chaosEvent) {
	defer r.opsWG.Done()
	r.sem <- struct{}{}
	defer func() { <-r.sem }()
	op := &chaosOp{ID: id, Kind: ev.Kind, Start: time.Now()}
	members := r.members()
	n := members[int(ev.Pick)%len(members)]
	op.Node = n.name
	for _, i := range ev.Lineages {
		op.Names = append(op.Names, r.plan.Pool[i].Name)
	}
	r.mu.Lock()
	r.ops = append(r.ops, op)
	r.mu.Unlock()
	switch ev.Kind {
	case opIssue:
		spec := r.plan.Pool[ev.Lineages[0]]
		op.Names = []string{spec.Name}
		args := []string{"issue"}
		for _, d := range spec.Domains {
			args = append(args, "-d", d)
		}
		r.command(op, n, append(args, orderFlags...)...)
	case opBatch:
		csv := r.writeBatch(id, ev.Lineages)
		r.command(op, n, append([]string{"batch", csv, "--preflight=false", "--concurrency", "4"}, orderFlags...)...)
	case opRenew:
		op.Names = []string{r.existing(ev)}
		r.command(op, n, append([]string{"renew", "--force", "--name", op.Names[0], "--no-random-sleep"}, orderFlags...)...)
	case opDelete:
		op.Names = []string{r.existing(ev)}
		r.command(op, n, "delete", "--name", op.Names[0], "--yes")
	case opDeploy:
		op.Names = nil
		r.changeDeploy(op, n, ev.Variant)
	case opReplace:
		op.Names = nil
		r.replace(op, ev)
	case opRolloutSet, opRolloutOff, opRolloutResume, opRolloutAbort:
		op.Names = nil
		r.rolloutOp(op, n, ev)
	}
	r.mu.Lock()
	op.End = time.Now()
	r.mu.Unlock()
}

// existing picks the lineage a renew or delete acts on among those the
// operations so far have issued and not deleted (the pool's, when there
// are none), so that most of them act on something.
func (r *chaosRun) existing(ev chaosEvent) string {
	live := map[string]bool{}
	r.mu.Lock()
	for _, op := range r.ops {
		if !op.OK || op.End.IsZero() {
			continue
		}
		for _, name := range op.Names {
			switch op.Kind {
			case opIssue, opBatch, opRenew:
				live[name] = true
			case opDelete:
				delete(live, name)
			}
		}
	}
	r.mu.Unlock()
	names := slices.Sorted(maps.Keys(live))
	if len(names) == 0 {
		return r.plan.Pool[ev.Lineages[0]].Name
	}
	return names[ev.Lineages[0]%len(names)]
}

// command runs one command for op and logs how it ended, with the
// faults that were in effect meanwhile (a command an injected fault
// makes fail is allowed to; what counts is the state after quiet).
func (r *chaosRun) command(op *chaosOp, n *chaosNode, args ...string) *chaosCmd {
	r.logf("op#%d %s on %s: lbcert %s", op.ID, op.Kind, n.name, strings.Join(args, " "))
	c := r.lbcert(op, n, args...)
	r.setOK(op, c.Code, c.Code == 0)
	note := ""
	if c.Code != 0 {
		note = " " + firstLine(c.Stderr)
		if f := r.activeFaults(c.Start, c.End); len(f) > 0 {
			note += fmt.Sprintf(" [faults meanwhile: %s]", strings.Join(f, ", "))
		}
	}
	r.logf("op#%d %s on %s %v: exit %d%s in %s%s", op.ID, op.Kind, n.name, op.Names, c.Code, killedNote(c), c.End.Sub(c.Start).Round(time.Millisecond), note)
	return c
}

// writeBatch writes a header-format CSV of the pool's lineages.
func (r *chaosRun) writeBatch(id int, lineages []int) string {
	var b strings.Builder
	b.WriteString("domains\n")
	for _, i := range lineages {
		b.WriteString(strings.Join(r.plan.Pool[i].Domains, " ") + "\n")
	}
	path := filepath.Join(r.f.work, fmt.Sprintf("batch-%03d.csv", id))
	os.WriteFile(path, []byte(b.String()), 0o644)
	return path
}

// changeDeploy restarts n's agent with other deploy settings, as an
// operator changes them: for HAProxy either a fresh crt directory (the
// load balancer's config follows it, and HAProxy reloads) or the
// runtime API switched on or off; for nginx the TLS check or a hook.
func (r *chaosRun) changeDeploy(op *chaosOp, n *chaosNode, variant int) {
	n.mu.Lock()
	defer n.mu.Unlock()
	was := n.variant()
	running := n.agentRunning()
	n.stopAgent()
	if n.lb == "haproxy" {
		if variant == 0 {
			n.certGen++
			os.MkdirAll(n.certsDir(), 0o755)
			if err := n.writeHAProxyConf(r.def); err == nil {
				n.reloadHAProxy()
			}
		} else {
			n.socket = !n.socket
		}
	} else {
		n.ngVariant = (n.ngVariant + 1 + variant) % 3
	}
	r.setOK(op, 0, true)
	if !running {
		// Killed by a fault: its restart takes the new settings.
		r.logf("op#%d deploy on %s: %s -> %s (its agent is down; it restarts with them)", op.ID, n.name, was, n.variant())
		return
	}
	if err := n.startAgent(r.f.url); err != nil {
		r.setOK(op, 0, false)
		r.logf("op#%d deploy on %s: restart the agent: %v", op.ID, n.name, err)
		return
	}
	r.logf("op#%d deploy on %s: agent restarted, %s -> %s", op.ID, n.name, was, n.variant())
}

// replace removes a member (from another member), then joins a new node
// and approves it: its load balancer, its agent, and a place behind the
// CA's validation front once it heartbeats.
func (r *chaosRun) replace(op *chaosOp, ev chaosEvent) {
	r.replaceMu.Lock()
	defer r.replaceMu.Unlock()
	members := r.members()
	if len(members) < 3 {
		op.Note = "skipped: fewer than 3 members"
		r.logf("op#%d replace: %s", op.ID, op.Note)
		return
	}
	x := members[int(ev.Pick)%len(members)]
	others := members[:0:0]
	for _, m := range members {
		if m != x {
			others = append(others, m)
		}
	}
	by := others[int(ev.Pick2)%len(others)]
	op.Node = by.name
	r.mu.Lock()
	x.member = false
	r.mu.Unlock()
	if err := r.setPool(); err != nil {
		r.logf("op#%d replace: validation front without %s: %v", op.ID, x.name, err)
	}
	r.logf("op#%d replace: fleet remove %s on %s", op.ID, x.name, by.name)
	removed := r.retry(op, 45*time.Second, func() *chaosCmd {
		r.logf("op#%d replace: lbcert fleet remove %s on %s", op.ID, x.name, by.name)
		return r.lbcert(op, by, "fleet", "remove", x.name)
	})
	if !removed && r.stillMember(x.name) {
		r.mu.Lock()
		x.member = true
		r.mu.Unlock()
		r.setPool()
		r.logf("op#%d replace: fleet remove %s failed; it stays a member", op.ID, x.name)
	} else {
		r.mu.Lock()
		x.removedAt = time.Now()
		r.mu.Unlock()
		r.logf("op#%d replace: %s removed (its agent keeps running: it must answer no new token)", op.ID, x.name)
	}
	r.mu.Lock()
	r.joined++
	name := fmt.Sprintf("lb%d", len(r.plan.Nodes)+r.joined)
	r.mu.Unlock()
	z, err := r.newNode(name, ev.LB)
	if err != nil {
		r.violate("HARNESS", "op#%d replace: %v", op.ID, err)
		return
	}
	approver := func() *chaosNode {
		m := r.members()
		return m[int(ev.Pick2)%len(m)]
	}
	if !r.joinNode(op, z, approver) {
		op.Note = "join or approve of " + z.name + " failed"
		r.logf("op#%d replace: %s", op.ID, op.Note)
		return
	}
	z.mu.Lock()
	err = z.startAgent(r.f.url)
	z.mu.Unlock()
	if err != nil {
		r.violate("HARNESS", "op#%d replace: start %s's agent: %v", op.ID, z.name, err)
		return
	}
	r.mu.Lock()
	z.member = true
	r.mu.Unlock()
	if missing := r.heartbeats([]*chaosNode{z}, 30*time.Second); len(missing) > 0 {
		r.logf("op#%d replace: %s's agent sent no heartbeat within 30 s", op.ID, z.name)
	}
	if err := r.setPool(); err != nil {
		r.logf("op#%d replace: validation front with %s: %v", op.ID, z.name, err)
	}
	r.setOK(op, 0, removed)
	r.logf("op#%d replace: %s (%s) joined, approved, its agent started (%s)", op.ID, z.name, z.lb, z.variant())
}

// stillMember asks Redis whether node is still a member, when a remove
// could not be told to have worked (killed, or Redis away).
func (r *chaosRun) stillMember(node string) bool {
	c := r.redis.client()
	defer c.Close()
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(time.Second) {
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
		ok, err := c.HExists(ctx, rkMembers, node).Result()
		cancel()
		if err == nil || time.Now().After(deadline) {
			return ok
		}
	}
}

func (r *chaosRun) setOK(op *chaosOp, code int, ok bool) {
	r.mu.Lock()
	op.Code, op.OK = code, ok
	r.mu.Unlock()
}
