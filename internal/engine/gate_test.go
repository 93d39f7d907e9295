package engine

import (
	"context"
	"errors"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/lbcert/lbcert/internal/store"
)

// gate is a staged rollout as the engine sees one: it holds the head
// back (this node serves version keep), or lets it through.
type gate struct {
	mu   sync.Mutex
	keep int // 0: the head
	st   *store.Store
}

func (g *gate) set(v int) { g.mu.Lock(); g.keep = v; g.mu.Unlock() }

func (g *gate) Gate(_ context.Context, head *store.Lineage, _ bool) (Gated, error) {
	g.mu.Lock()
	keep := g.keep
	g.mu.Unlock()
	if keep == 0 || keep == head.Version {
		return Gated{Want: head}, nil
	}
	l, err := g.st.LoadVersion(head.Name, keep)
	if err != nil {
		return Gated{}, err
	}
	l.Version = keep
	return Gated{Want: l, Held: "rollout: this node's wave is not released"}, nil
}

// A gate decides what the one install step installs, for an order and
// for the agent alike: a held head is neither deployed by the node that
// ordered it nor by an install-only run; once released it is; and a gate
// that asks for the version before (an aborted rollout) gets it through
// the same step, rolled back from the head if its deploy fails.
func TestGateHoldsWhatIsInstalled(t *testing.T) {
	f := newFixture(t)
	f.saved("g.test")
	g := &gate{st: f.st}
	run := func(o Options, jobs ...Job) *Result {
		t.Helper()
		e := f.engine(o)
		e.Node.Gate = g.Gate
		p, err := e.Plan(context.Background(), jobs)
		if err != nil {
			t.Fatal(err)
		}
		return p.Execute(context.Background())
	}
	live := func() int { v, _ := f.st.LiveVersion("g.test"); return v }
	f.dep.changes = nil

	g.set(1)
	renew := f.renewJobs()
	renew[0].Force = true
	res := run(Options{Command: "renew"}, renew...)
	if it := res.Items[0]; it.Outcome != Renewed || it.Deploy != "held" || it.Held == "" || live() != 1 || len(f.dep.changes) != 0 {
		t.Fatalf("an order held back on the node that placed it: %+v, live %d, changes %+v", it, live(), f.dep.changes)
	}
	agent := Options{Command: "agent", InstallOnly: true}
	res = run(agent, f.renewJobs()...)
	if it := res.Items[0]; it.Outcome != NotDue || it.Version != 1 || it.Held == "" || live() != 1 || len(f.dep.changes) != 0 {
		t.Fatalf("the agent with the head held back: %+v, live %d", it, live())
	}
	// Renew sees the held head as owed, and installs nothing either.
	res = run(Options{Command: "renew"}, f.renewJobs()...)
	if it := res.Items[0]; it.Outcome != NotDue || live() != 1 || len(f.dep.changes) != 0 {
		t.Fatalf("renew with the head held back: %+v, live %d", it, live())
	}

	g.set(0)
	res = run(agent, f.renewJobs()...)
	if it := res.Items[0]; it.Outcome != Deployed || it.Version != 2 || live() != 2 || len(f.dep.changes) != 1 {
		t.Fatalf("released: %+v, live %d, changes %+v", it, live(), f.dep.changes)
	}

	g.set(1) // aborted: back to version 1, through the same install step
	f.dep.changes = nil
	f.dep.fail["g.test"] = true
	res = run(agent, f.renewJobs()...)
	if it := res.Items[0]; it.Outcome != Failed || live() != 2 || len(f.dep.changes) != 1 || f.dep.changes[0].Previous != 2 {
		t.Fatalf("back to version 1 with a failing deploy: %+v, live %d, changes %+v", it, live(), f.dep.changes)
	}
	f.dep.fail["g.test"] = false
	res = run(agent, f.renewJobs()...)
	if it := res.Items[0]; it.Outcome != Deployed || it.Version != 1 || live() != 1 {
		t.Fatalf("back to version 1: %+v, live %d", it, live())
	}
	j, _ := f.st.Journal("g.test")
	if j.Pending != nil || j.Deployed == nil || j.Deployed.Version != 1 {
		t.Fatalf("journal after going back: %+v", j)
	}
	res = run(agent, f.renewJobs()...)
	if it := res.Items[0]; it.Outcome != NotDue || it.Version != 1 {
		t.Fatalf("nothing more to do: %+v", it)
	}
}

// A run's result carries the staged rollouts that need an operator
// (Node.Notes), and its mail says them; one on its way is no one's
// business, an install-only run (the agent) never asks, and a fleet
// that cannot say leaves the run as it was.
func TestRunNotesRollouts(t *testing.T) {
	f := newFixture(t)
	f.saved("n.test")
	asked := 0
	var fail error
	notes := func(context.Context, time.Time) ([]Note, error) {
		asked++
		return []Note{{Name: "a.test", State: "held", Text: "rollout of a.test version 2 held"}, {Name: "b.test", State: "rolling", Text: "at wave 1"}}, fail
	}
	run := func(o Options) *Result {
		t.Helper()
		e := f.engine(o)
		e.Node.Notes = notes
		p, err := e.Plan(context.Background(), f.renewJobs())
		if err != nil {
			t.Fatal(err)
		}
		return p.Execute(context.Background())
	}
	res := run(Options{Command: "renew"})
	if len(res.Rollouts) != 1 || res.Rollouts[0].Name != "a.test" || asked != 1 {
		t.Fatalf("rollouts in the result: %+v (asked %d)", res.Rollouts, asked)
	}
	if rep := res.Report(); !rep.Changed() || len(rep.Rollouts) != 1 || !strings.Contains(rep.Body(), "rollout of a.test version 2 held") {
		t.Fatalf("the report: %+v\n%s", rep.Rollouts, rep.Body())
	}
	if res = run(Options{Command: "agent", InstallOnly: true}); len(res.Rollouts) != 0 || asked != 1 {
		t.Fatalf("an install-only run asked: %+v (asked %d)", res.Rollouts, asked)
	}
	fail = errors.New("redis: connection refused")
	if res = run(Options{Command: "renew"}); len(res.Rollouts) != 0 || res.Items[0].Outcome != NotDue {
		t.Fatalf("a fleet that cannot say: %+v, %+v", res.Rollouts, res.Items[0])
	}
}
