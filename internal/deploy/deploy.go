// Package deploy puts new certificates in front of users: it writes what
// the load balancer needs, tests its config, reloads it once per run (or
// hot-updates HAProxy over its runtime API, where HAProxy tests each
// certificate itself and the config test runs only before a fallback
// reload), checks over TLS that the new certificate is the one being
// served, and runs deploy hooks.
//
// With an nginx include file (store.Deploy.NginxInclude) it also keeps
// one server block per live lineage of the state directory in that file,
// rewritten once per run.
//
// The promise: if the config test, the runtime-API update (with no
// reload to fall back on) or the reload fails, every lineage the
// run changed is rolled back to its previous version, on disk, in the
// HAProxy certificate directory and in the nginx include file (byte for
// byte), and nothing is reloaded, so the load balancer keeps serving the
// old, valid certificates. Every failure is
// returned in a Result; none is only a log line.
//
// deploy never talks to the CA and never decides what to renew.
package deploy

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/lbcert/lbcert/internal/store"
)

// Change is one lineage whose live version this run replaced.
type Change struct {
	Name     string
	Domains  []string
	Serial   string // of the new certificate, hex
	Previous int    // version before this run; 0 when the lineage is new
	Deploy   store.Deploy
	// Roots, when set, replaces Deploy.VerifyRoots in the chain check:
	// the roots of the CA that issued this certificate, when that is a
	// fallback ("system" for the system's roots). The check itself is
	// on only when Deploy.VerifyRoots is set.
	Roots string
}

// Result is what happened to one Change.
type Result struct {
	Name       string
	Deployed   bool   // in place and loaded by the load balancer (or no target)
	RolledBack bool   // the previous version is live again
	Verify     string // "ok", "failed", or "" when no --verify-addr
	Hook       string // "ok", "failed", or "" when no hook
	Err        error  // the first failure, with the tool's own output
	// Check, when the load balancer's config test failed, names that
	// failure (Runner.Test gives the same for the same broken config).
	Check string
}

// Failed reports whether anything about this change failed.
func (r Result) Failed() bool { return r.Err != nil }

// Options tune a run; zero values are the defaults.
type Options struct {
	// VerifyTimeout bounds the whole verify step, every change's TLS
	// check included (default 10s).
	VerifyTimeout     time.Duration
	VerifyConcurrency int  // TLS checks at once (default 32)
	HookConcurrency   int  // deploy hooks at once (default 1, as certbot)
	DryRun            bool // plan only: test nothing, reload nothing
	// Stop, when set and done, ends the deploy hooks: one still running
	// is killed, and its certificate stays owed a deploy. An interrupt's
	// grace, or a second interrupt, ends a deploy's waiting this way; the
	// config test, reload, rollback and TLS check (bounded on its own)
	// always run to the end.
	Stop context.Context
}

// stoppable is ctx ended also by Opts.Stop.
func (r *Runner) stoppable(ctx context.Context) (context.Context, context.CancelFunc) {
	ctx, cancel := context.WithCancel(ctx)
	if r.Opts.Stop == nil {
		return ctx, cancel
	}
	stop := context.AfterFunc(r.Opts.Stop, cancel)
	return ctx, func() { stop(); cancel() }
}

// Store is what deploy needs of the storage seam: the live paths the
// load balancer reads and a way back to the previous version.
type Store interface {
	LivePaths(name string) store.Paths
	ArchiveDir(name string) string
	ReadKey(name string) ([]byte, error)
	ReadFullchain(name string) ([]byte, error)
	Rollback(name string, previous int) error
	// Names, LiveVersion and Load list the live lineages for the nginx
	// include file, which serves every one of them.
	Names() ([]string, error)
	LiveVersion(name string) (int, error)
	Load(name string) (*store.Lineage, error)
}

// Runner deploys changes.
type Runner struct {
	Store Store
	Opts  Options

	apiFailures atomic.Int64 // HAProxy runtime-API updates that failed
}

// RuntimeAPIFailures counts the HAProxy runtime-API updates of this
// Runner that failed (and were rolled back, or replaced by a reload):
// the agent deploys a large install in slices only while none has.
func (r *Runner) RuntimeAPIFailures() int64 { return r.apiFailures.Load() }

// group is the changes that share one load balancer: one test and one
// reload for all of them.
type group struct {
	key     string
	target  string
	d       store.Deploy // the settings of the first change; the key makes them equal
	changes []int        // indexes into the run's changes
}

// Run deploys every change: per load balancer, write, test once, reload
// once, verify, then run hooks. It returns one Result per change, in order.
func (r *Runner) Run(ctx context.Context, changes []Change) []Result {
	results := make([]Result, len(changes))
	for i, c := range changes {
		results[i].Name = c.Name
	}
	for _, g := range groupChanges(changes) {
		switch g.target {
		case "nginx":
			r.runNginx(ctx, g, changes, results)
		case "haproxy":
			r.runHAProxy(ctx, g, changes, results)
		default:
			for _, i := range g.changes {
				results[i].Deployed = true
			}
		}
	}
	r.verifyAll(ctx, changes, results)
	hctx, cancel := r.stoppable(ctx)
	defer cancel()
	r.hooks(hctx, changes, results)
	return results
}

// verifyAll checks every deployed change over TLS, VerifyConcurrency at
// a time, under one deadline for the whole step: 3,000 renewed
// certificates behind a load balancer that serves the wrong one must not
// hold the lock for hours, one 10-second wait after another.
func (r *Runner) verifyAll(ctx context.Context, changes []Change, results []Result) {
	timeout := r.Opts.VerifyTimeout
	if timeout == 0 {
		timeout = 10 * time.Second
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	r.each(ctx, r.Opts.VerifyConcurrency, 32, changes, func(i int) bool {
		c := changes[i]
		return results[i].Deployed && c.Deploy.VerifyAddr != "" && c.Deploy.Target != ""
	}, func(i int) { r.verify(ctx, changes[i], &results[i]) })
}

// hooks runs the deploy hooks, one after another by default as certbot
// runs them (hooks written for certbot may not expect company), or
// HookConcurrency at a time.
func (r *Runner) hooks(ctx context.Context, changes []Change, results []Result) {
	r.each(ctx, r.Opts.HookConcurrency, 1, changes, func(i int) bool {
		return changes[i].Deploy.Hook != "" && results[i].Deployed
	}, func(i int) { r.hook(ctx, changes[i], &results[i]) })
}

// each runs do for every index that want selects, n at a time (def
// when n is 0).
func (r *Runner) each(ctx context.Context, n, def int, changes []Change, want func(int) bool, do func(int)) {
	if n <= 0 {
		n = def
	}
	sem := make(chan struct{}, n)
	var wg sync.WaitGroup
	for i := range changes {
		if !want(i) {
			continue
		}
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer func() { <-sem; wg.Done() }()
			do(i)
		}()
	}
	wg.Wait()
}

func groupChanges(changes []Change) []*group {
	byKey := map[string]*group{}
	var out []*group
	for i, c := range changes {
		d := c.Deploy
		var key string
		switch d.Target {
		case "nginx":
			key = strings.Join([]string{"nginx", d.NginxBin, d.NginxConf, d.ReloadCmd, d.NginxInclude, d.NginxServerBody}, "\x00")
		case "haproxy":
			key = strings.Join([]string{"haproxy", d.HAProxyBin, d.HAProxyConf, d.HAProxyCerts, d.HAProxySocket, d.ReloadCmd}, "\x00")
		default:
			key = "none\x00" + c.Name
		}
		g := byKey[key]
		if g == nil {
			g = &group{key: key, target: d.Target, d: d}
			byKey[key] = g
			out = append(out, g)
		}
		g.changes = append(g.changes, i)
	}
	sort.SliceStable(out, func(a, b int) bool { return out[a].target < out[b].target })
	return out
}

// rollback restores the previous version of every change in g and records
// why on each result. undo runs first, for target-specific files.
func (r *Runner) rollback(g *group, changes []Change, results []Result, cause error, undo func(i int) error) {
	for _, i := range g.changes {
		c := changes[i]
		if undo != nil {
			if err := undo(i); err != nil {
				slog.Error("rollback: restore load balancer file", "name", c.Name, "err", err)
			}
		}
		if err := r.Store.Rollback(c.Name, c.Previous); err != nil {
			results[i].Err = fmt.Errorf("%v; and rollback failed: %v", cause, err)
			continue
		}
		results[i].RolledBack = true
		results[i].Err = cause
		if tf := (*testFailed)(nil); errors.As(cause, &tf) {
			results[i].Check = fingerprint(tf.output)
		}
	}
	if sb := (*signalledBeside)(nil); errors.As(cause, &sb) {
		// The master was signalled beside the test (testBeside): it tried
		// the same files and failed as the test did, and is signalled again.
		slog.Warn("deploy failed; rolled back (each name to the certificate it had, if any); nginx, signalled beside its test, is reloaded again with them", "lineages", len(g.changes))
		return
	}
	slog.Warn("deploy failed; rolled back (each name to the certificate it had, if any), nothing reloaded", "lineages", len(g.changes))
}
