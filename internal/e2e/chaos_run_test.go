package e2e

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/lbcert/lbcert/internal/testenv"
)

// chaosRun is one seed's fleet while its schedule runs: the nodes, the
// Redis, the record of every command and fault, and what the observers
// saw. Every change of state goes through mu.
type chaosRun struct {
	t     *testing.T
	plan  *chaosPlan
	f     *fleetEnv
	redis *chaosRedis
	front *testenv.RateFront
	vf    *validationFront
	def   *defaultCert
	roots string    // Pebble's root, when the seed's rollouts probe (chaosNode.roots)
	start time.Time // the seed's start, for the timeline
	sched time.Time // the schedule's start: its events' times count from it

	mu       sync.Mutex
	nodes    []*chaosNode // every node ever, in creation order
	ops      []*chaosOp
	faults   []*faultRec
	inflight map[*chaosCmd]*chaosOp
	timeline []string
	viol     []violation
	joined   int // nodes joined by the schedule
	// waveSets are the staged rollout waves the schedule set, in order
	// (chaos_rollout_test.go).
	waveSets []waveSet

	sem       chan struct{} // operations in flight at once
	replaceMu sync.Mutex    // one remove-and-join at a time
	opsWG     sync.WaitGroup
	faultsWG  sync.WaitGroup

	obs        *chaosObserver
	mostPerSet int // the most certificates Pebble issued for one exact set
}

// chaosOp is one scheduled operation and the commands it ran.
type chaosOp struct {
	ID    int
	Kind  string
	Node  string
	Names []string // lineage names it concerns
	Start time.Time
	End   time.Time
	Code  int  // the last command's exit code
	OK    bool // the operation did what it set out to do
	Cmds  []*chaosCmd
	Note  string
}

// chaosCmd is one lbcert command.
type chaosCmd struct {
	Node           string
	Args           []string
	Start, End     time.Time
	Code           int // -1: killed by a signal
	Stdout, Stderr string
	Killed         bool // kill -9 by the schedule
	TimedOut       bool
	proc           *os.Process
}

type faultRec struct {
	Kind       string
	Target     string
	Start, End time.Time
	Skipped    string // why it did nothing
	// LostData: Redis's data went (FLUSHALL, or a redis-server killed or
	// restarted without an AOF), the leases with it.
	LostData bool
}

type violation struct{ Inv, Msg string }

// opDeadline bounds each command; with --max-wait 10s and --wait-lock
// 30s nothing legitimate comes near it.
const opDeadline = 3 * time.Minute

func (r *chaosRun) since() string {
	return fmt.Sprintf("+%7.3fs", time.Since(r.start).Seconds())
}

// logf records one line of the timeline, with the time since the start.
func (r *chaosRun) logf(format string, args ...any) {
	line := r.since() + " " + fmt.Sprintf(format, args...)
	r.mu.Lock()
	r.timeline = append(r.timeline, line)
	r.mu.Unlock()
	r.t.Log(line)
}

func (r *chaosRun) violate(inv, format string, args ...any) {
	msg := fmt.Sprintf(format, args...)
	r.mu.Lock()
	r.viol = append(r.viol, violation{inv, msg})
	r.mu.Unlock()
	r.logf("VIOLATION %s: %s", inv, msg)
}

// members are the approved, not removed nodes, sorted by name.
func (r *chaosRun) members() []*chaosNode {
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []*chaosNode
	for _, n := range r.nodes {
		if n.member {
			out = append(out, n)
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].name < out[j].name })
	return out
}

func (r *chaosRun) node(name string) *chaosNode {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, n := range r.nodes {
		if n.name == name {
			return n
		}
	}
	return nil
}

// lbcert runs one command on node n in fleet mode, killable by the
// schedule while it runs.
func (r *chaosRun) lbcert(op *chaosOp, n *chaosNode, args ...string) *chaosCmd {
	ctx, cancel := context.WithTimeout(context.Background(), opDeadline)
	defer cancel()
	full := append([]string{"--dir", n.dir, "--redis", r.f.url}, args...)
	cmd := r.f.command(ctx, full...)
	cmd.Env = append(cmd.Env, "LBCERT_REDIS_PASSWORD="+fleetPassword)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	c := &chaosCmd{Node: n.name, Args: args, Start: time.Now()}
	if err := cmd.Start(); err != nil {
		c.Code, c.Stderr, c.End = -1, err.Error(), time.Now()
		return c
	}
	c.proc = cmd.Process
	r.mu.Lock()
	r.inflight[c] = op
	if op != nil {
		op.Cmds = append(op.Cmds, c)
	}
	r.mu.Unlock()
	err := cmd.Wait()
	r.mu.Lock()
	delete(r.inflight, c)
	c.End, c.Stdout, c.Stderr = time.Now(), out.String(), errb.String()
	c.TimedOut = ctx.Err() != nil
	r.mu.Unlock()
	if ee, ok := err.(*exec.ExitError); ok {
		c.Code = ee.ExitCode()
	} else if err != nil {
		c.Code = -1
	}
	if c.TimedOut {
		r.violate("LIVE", "%s: lbcert %s ran past %s; its goroutines:\n%s", n.name, strings.Join(args, " "), opDeadline, tailOf(c.Stderr, 20000))
	}
	return c
}

// killRun is kill -9 of one running command, chosen by pick among those
// running, oldest first.
func (r *chaosRun) killRun(pick uint32) string {
	r.mu.Lock()
	var cmds []*chaosCmd
	for c := range r.inflight {
		cmds = append(cmds, c)
	}
	sort.Slice(cmds, func(i, j int) bool { return cmds[i].Start.Before(cmds[j].Start) })
	if len(cmds) == 0 {
		r.mu.Unlock()
		return ""
	}
	c := cmds[int(pick)%len(cmds)]
	c.Killed = true
	op := r.inflight[c]
	r.mu.Unlock()
	c.proc.Signal(syscall.SIGKILL)
	return fmt.Sprintf("op#%d %s on %s (lbcert %s)", op.ID, op.Kind, c.Node, strings.Join(c.Args, " "))
}

// newNode makes a node (not yet a member) with its load balancer.
func (r *chaosRun) newNode(name, lb string) (*chaosNode, error) {
	n := &chaosNode{name: name, dir: filepath.Join(r.f.work, name), lb: lb, port: mustPort(), log: &cappedLog{}, roots: r.roots,
		pool: append(slices.Clone(r.plan.Pool), lineageSpec{Name: r.finalName(), Domains: []string{r.finalName()}})}
	if err := os.MkdirAll(n.dir, 0o700); err != nil {
		return nil, err
	}
	if err := n.startLB(r.f.work, r.def); err != nil {
		return nil, fmt.Errorf("%s's %s: %w", name, lb, err)
	}
	r.mu.Lock()
	r.nodes = append(r.nodes, n)
	r.mu.Unlock()
	r.t.Cleanup(n.stopAll)
	return n, nil
}

// heartbeats waits until every given node's agent heartbeats in Redis.
func (r *chaosRun) heartbeats(nodes []*chaosNode, limit time.Duration) []string {
	deadline := time.Now().Add(limit)
	for {
		var missing []string
		c := r.redis.client()
		for _, n := range nodes {
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
			if v, _ := c.Exists(ctx, rkAgent+n.name).Result(); v != 1 {
				missing = append(missing, n.name)
			}
			cancel()
		}
		c.Close()
		if len(missing) == 0 || time.Now().After(deadline) {
			return missing
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// poolNodes are the nodes the CA's validation goes to: the members.
func (r *chaosRun) setPool() error {
	return r.vf.set(r.members())
}

// joinNode runs fleet join on n and fleet approve on approver, retrying
// what an injected fault or a busy directory makes fail; it returns
// whether n is approved.
func (r *chaosRun) joinNode(op *chaosOp, n *chaosNode, approver func() *chaosNode) bool {
	var fp string
	ok := r.retry(op, 45*time.Second, func() *chaosCmd {
		c := r.lbcert(op, n, "fleet", "join", "--node", n.name)
		if m := fingerprintRe.FindStringSubmatch(c.Stdout); c.Code == 0 && m != nil {
			fp = m[1]
		}
		return c
	})
	if !ok || fp == "" {
		return false
	}
	return r.retry(op, 45*time.Second, func() *chaosCmd {
		return r.lbcert(op, approver(), "fleet", "approve", n.name, "--fingerprint", fp)
	})
}

// retry runs fn until it exits 0, for up to limit: an operator runs a
// command again when Redis was away (4), the directory was busy (3) or
// the command was killed.
func (r *chaosRun) retry(op *chaosOp, limit time.Duration, fn func() *chaosCmd) bool {
	deadline := time.Now().Add(limit)
	for {
		c := fn()
		if c.Code == 0 {
			return true
		}
		r.logf("op#%d %s: lbcert %s on %s exit %d%s, retrying: %s", op.ID, op.Kind, strings.Join(c.Args, " "), c.Node, c.Code, killedNote(c), firstLine(c.Stderr))
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(time.Second)
	}
}

func killedNote(c *chaosCmd) string {
	if c.Killed {
		return " (killed by the schedule)"
	}
	return ""
}

// firstLine is the first error line of a command's stderr.
func firstLine(s string) string {
	for _, l := range strings.Split(s, "\n") {
		if strings.Contains(l, "error:") {
			return strings.TrimSpace(l)
		}
	}
	if i := strings.IndexByte(s, '\n'); i >= 0 {
		return s[:i]
	}
	return s
}

// activeFaults names the faults in effect at some time in [from, to].
func (r *chaosRun) activeFaults(from, to time.Time) []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []string
	for _, f := range r.faults {
		end := f.End
		if end.IsZero() {
			end = time.Now()
		}
		if f.Skipped == "" && !f.Start.After(to) && !end.Before(from) {
			out = append(out, f.Kind+" "+f.Target)
		}
	}
	return slices.Compact(out)
}

// finalName is the lineage issued after the faults when none of the
// pool's can be renewed.
func (r *chaosRun) finalName() string { return fmt.Sprintf("c%d-final.example.com", r.plan.Seed) }
