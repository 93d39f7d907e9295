package fleet

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/lbcert/lbcert/internal/catalog"
	"github.com/lbcert/lbcert/internal/hint"
)

// lease is one fleet-wide lease held by this process, extended by a
// heartbeat until released.
type lease struct {
	c     *Catalog
	name  string
	token int64
	stop  chan struct{}
	done  chan struct{}
	once  sync.Once
}

func (l *lease) Token() int64 { return l.token }

func (l *lease) Release() {
	l.once.Do(func() {
		if sp := spooledFor(l.c.N.Local, l.name); sp != nil && sp.Token == l.token && !l.publishSpooled() {
			// Keep the lease (the heartbeat too, until the TTL ends it):
			// the certificate is only on this node, and another node that
			// took the name now would order it again.
			slog.Warn("Redis still away: keeping the lease until it expires so no other node orders this name again; the certificate is published by the agent or the next run", "name", l.name)
			close(l.stop)
			<-l.done
			return
		}
		close(l.stop)
		<-l.done
		l.c.mu.Lock()
		if l.c.held[l.name] == l {
			delete(l.c.held, l.name)
		}
		l.c.mu.Unlock()
		// A Redis that is failing over comes back in seconds: waiting for
		// it to hand the name back spares every other node the lease's
		// whole TTL (10 minutes by default) of "another run holds it".
		if err := withRedis(context.Background(), "leaving the lease to expire", func(ctx context.Context) error {
			return l.c.sh().Release(ctx, l.name, l.c.Holder, l.token)
		}); err != nil {
			slog.Info("could not hand the lease back; it expires by itself", "name", l.name, "err", err)
		}
	})
}

// publishSpooled publishes what this lease's holder kept on the node
// while Redis was away, retrying for redisWait; it reports whether
// nothing waits any more.
func (l *lease) publishSpooled() bool {
	err := withRedis(context.Background(), "keeping the lease", l.c.N.PublishSpool)
	return err == nil && spooledFor(l.c.N.Local, l.name) == nil
}

// Acquire takes name's fleet-wide lease, or fails at once with
// catalog.ErrLeaseHeld. A heartbeat extends it every third of ttl; a Redis
// error is retried, not taken as a lost lease (one community Redis
// storage let its lock go after a single error); the lease is given up
// as lost only when Redis says another holder has it.
func (c *Catalog) Acquire(ctx context.Context, name string, ttl time.Duration) (catalog.Lease, error) {
	tok, err := c.sh().Acquire(ctx, name, c.Holder, ttl)
	if err == nil && tok == 0 && c.breakDeadOwn(ctx, name) {
		tok, err = c.sh().Acquire(ctx, name, c.Holder, ttl)
	}
	if err != nil {
		return nil, hint.Wrap(fmt.Errorf("take the fleet lease of %s: %w", name, err), "no order is placed without the lease; the name is left for the next run")
	}
	if tok == 0 {
		return nil, catalog.ErrLeaseHeld
	}
	l := &lease{c: c, name: name, token: tok, stop: make(chan struct{}), done: make(chan struct{})}
	c.mu.Lock()
	c.held[name] = l
	c.mu.Unlock()
	go l.heartbeat(ttl)
	return l, nil
}

// breakDeadOwn frees a lease that a process of this very node holds
// and that is no longer running (killed, or it could not release while
// Redis was away). This run holds the node's state-directory lock, so
// no other lbcert run of this node can be using it. Another node's
// lease is never broken: only its TTL ends it, or that node's agent
// (freeDeadLeases).
func (c *Catalog) breakDeadOwn(ctx context.Context, name string) bool {
	holder, token, err := c.sh().Holder(ctx, name)
	if err != nil || holder == c.Holder {
		return false
	}
	pid, dead := exited(holder, c.N.Name)
	if !dead {
		return false
	}
	slog.Info("freeing a lease left by a process of this node that has exited", "name", name, "pid", pid)
	return c.sh().Break(ctx, name, holder, token) == nil
}

// freeDeadLeases frees the leases this node's processes took and left
// behind when they exited, killed or unable to hand them back while
// Redis was away: without it another node's run waits out the lease's
// TTL (10 minutes by default) with "another run holds this lineage".
// The agent runs it at every reconcile. A lease whose certificate waits
// on this node for Redis (kept here) stays: the certificate is
// published first (PublishSpool), or another node would order the name
// again.
func (n *Node) freeDeadLeases(ctx context.Context) error {
	held, err := n.Shared.LeasesOf(ctx, n.Name)
	if err != nil {
		return err
	}
	for name, h := range held {
		pid, dead := exited(h.Holder, n.Name)
		if !dead || spooledFor(n.Local, name) != nil {
			continue
		}
		slog.Info("freeing a lease left by a process of this node that has exited", "name", name, "pid", pid)
		if err := n.Shared.Break(ctx, name, h.Holder, h.Token); err != nil {
			return err
		}
	}
	return nil
}

// exited reports whether holder ("<node>/<pid>@<space>") is a process
// of node that is no longer running (a PID taken by another process
// since, or one this process cannot signal, counts as running). Only a
// holder in this process's own process space (processSpace) is judged:
// from another PID namespace (a container per process sharing the
// state directory) or another host given the same node name, a live
// process looks dead to kill(pid, 0), and freeing its lease would let a
// second order for the name go out (hostile review: two certificates
// for one name while the first run was still ordering). Such a lease
// ends with its TTL.
func exited(holder, node string) (int, bool) {
	hnode, rest, ok := strings.Cut(holder, "/")
	if !ok || hnode != node {
		return 0, false
	}
	pidText, space, _ := strings.Cut(rest, "@")
	pid, err := strconv.Atoi(pidText)
	if err != nil || pid <= 0 || pid == os.Getpid() || "@"+space != processSpace() || processSpace() == unknownSpace {
		return 0, false
	}
	return pid, syscall.Kill(pid, 0) == syscall.ESRCH
}

// unknownSpace is the space of a process that cannot read /proc.
const unknownSpace = "@unknown"

// processSpace names where this process's PIDs mean something: its PID
// namespace and the machine's boot, as "@<namespace inode>.<boot id>".
// A holder's PID is only looked up from the same space.
var processSpace = sync.OnceValue(func() string {
	ns, err := os.Readlink("/proc/self/ns/pid") // "pid:[4026531836]"
	boot, err2 := os.ReadFile("/proc/sys/kernel/random/boot_id")
	if err != nil || err2 != nil {
		return unknownSpace // never judged: without /proc a live process elsewhere cannot be told from a dead one
	}
	ns = strings.TrimSuffix(strings.TrimPrefix(ns, "pid:["), "]")
	b := strings.ReplaceAll(strings.TrimSpace(string(boot)), "-", "")
	return "@" + ns + "." + b[:min(12, len(b))]
})

func (l *lease) heartbeat(ttl time.Duration) {
	defer close(l.done)
	every := max(ttl/3, 100*time.Millisecond)
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-l.stop:
			return
		case <-t.C:
		}
		ctx, cancel := context.WithTimeout(context.Background(), every)
		ok, err := l.c.sh().Extend(ctx, l.name, l.c.Holder, l.token, ttl)
		cancel()
		if err != nil {
			slog.Debug("could not extend the lease; retrying", "name", l.name, "err", err)
			continue
		}
		if !ok {
			slog.Warn("lost the fleet lease (this process stalled past --lease-ttl, or Redis lost it); its certificate will be refused if another node published meanwhile", "name", l.name)
			return
		}
	}
}
