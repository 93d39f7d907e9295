package fleet

import (
	"context"
	"log/slog"
	"sync"
	"time"

	"github.com/lbcert/lbcert/internal/deploy"
)

// soakChecks keeps checking, while staged rollouts soak, the versions
// this node serves of them: a soak is a time the version is served and
// checked, not a time that goes by. Every soakEvery the agent runs the
// deploy's TLS check and the rollout's probe again for each version a
// released wave of it this node is in, and reports how they went with
// the time (Served.Checked); a failure holds the rollout as a failed
// check at the deploy does, and a wave passes only with fresh checks of
// every node (judge). It runs until ctx ends.
func (s *Syncer) soakChecks(ctx context.Context) {
	for ctx.Err() == nil {
		wait := s.soakRound(ctx)
		select {
		case <-ctx.Done():
		case <-time.After(wait):
		}
	}
}

// soakIdle is how often the agent looks whether a soak needs its checks
// while none is configured (the fleet's waves are followed, so a look
// reads nothing from Redis).
const soakIdle = 2 * time.Second

// soakRound checks once every version that soaks here, reports, and
// says when to check again.
func (s *Syncer) soakRound(ctx context.Context) time.Duration {
	cfg, err := s.N.RolloutConfig(ctx, false)
	if err != nil || !cfg.Staged() || cfg.Soak <= 0 {
		return soakIdle
	}
	every := soakEvery(cfg.Soak)
	due, err := s.soaking(ctx, cfg)
	if err != nil {
		slog.Debug("could not read the rollouts this node soaks; looking again", "err", err)
		return every
	}
	if len(due) == 0 {
		return every
	}
	start := time.Now()
	done := make(map[string]soakItem, len(due))
	var mu sync.Mutex
	var wg sync.WaitGroup
	sem := make(chan struct{}, 8)
	for name, c := range due {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer func() { <-sem; wg.Done() }()
			rep := s.soakCheck(ctx, cfg, c)
			mu.Lock()
			done[name] = soakItem{rec: c.rec, rep: rep}
			mu.Unlock()
		}()
	}
	wg.Wait()
	if err := s.sendChecks(ctx, done); err != nil {
		slog.Warn("could not report this node's checks of the versions it soaks; checking again", "err", err)
	}
	return max(every-time.Since(start), 0)
}

// soakItem is one version this node soaks: its rollout and this node's
// report of it.
type soakItem struct {
	rec *Record
	rep Served
}

// soaking is what this node checks this round: each rolling rollout of
// a wave released to this node whose version it reports serving.
func (s *Syncer) soaking(ctx context.Context, cfg *RolloutConfig) (map[string]soakItem, error) {
	recs, err := s.N.Records(ctx)
	if err != nil || len(recs) == 0 {
		return nil, err
	}
	mine, err := s.previous(ctx, recs)
	if err != nil {
		return nil, err
	}
	w := waveOf(cfg.Resolve(s.N.memberNames()), s.N.Name)
	due := map[string]soakItem{}
	for name, r := range recs {
		rep, ok := mine[name]
		if r.State != Rolling || w > r.Wave || !ok || !rep.OK || rep.Version != r.Version || rep.Serial != r.Serial {
			continue
		}
		if live, err := s.Local.LiveVersion(name); err != nil || live != r.Version {
			continue // an install is on its way: its own report says how it went
		}
		due[name] = soakItem{rec: r, rep: rep}
	}
	return due, nil
}

// soakCheck runs the deploy's TLS check (when this agent checks its
// deploys) and the rollout's probe (when there is one) again, and
// returns the report with how they went.
func (s *Syncer) soakCheck(ctx context.Context, cfg *RolloutConfig, c soakItem) Served {
	rep, name := c.rep, c.rec.Name
	rep.Verify = ""
	if s.Deploy.VerifyAddr != "" && s.Deploy.Target != "" {
		l, err := s.Local.LoadVersion(name, c.rec.Version)
		if err == nil {
			ch := deploy.Change{Name: name, Domains: l.Domains, Serial: c.rec.Serial, Deploy: s.Deploy}
			if s.Roots != nil {
				ch.Roots = s.Roots(l)
			}
			cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
			err = deploy.CheckServed(cctx, ch)
			cancel()
		}
		rep.Verify = ProbeOK
		if err != nil {
			rep.Verify = oneLine(err)
			slog.Warn("the TLS check of a version this node soaks failed", "name", name, "version", c.rec.Version, "err", rep.Verify)
		}
	}
	if cfg.Probe != "" && (rep.Verify == "" || rep.Verify == ProbeOK) {
		rep.Probe = ProbeOK
		if err := probe(ctx, cfg, name, s.Deploy); err != nil {
			rep.Probe = oneLine(err)
			slog.Warn("the staged rollout's probe failed on this node during the soak", "name", name, "version", c.rec.Version, "err", rep.Probe)
		}
	}
	rep.Checked = time.Now().UTC()
	return rep
}

// sendChecks reports the checks made, each only if this node's report
// is still the one checked (an install meanwhile made its own), then
// judges those rollouts at once: a failure holds without waiting for
// anything else.
func (s *Syncer) sendChecks(ctx context.Context, done map[string]soakItem) error {
	recs := make(map[string]*Record, len(done))
	for name, c := range done {
		recs[name] = c.rec
	}
	now, err := s.previous(ctx, recs)
	if err != nil {
		return err
	}
	out := map[string]Served{}
	var names []string
	for name, c := range done {
		if p, ok := now[name]; ok && p.At.Equal(c.rep.At) && sameReport(p, withoutChecks(c.rep, p)) {
			out[name] = c.rep
			names = append(names, name)
		}
	}
	if len(out) == 0 {
		return nil
	}
	if err := s.send(ctx, out); err != nil {
		return err
	}
	next, err := s.N.Evaluate(ctx, names...)
	s.mu.Lock()
	s.wake = sooner(s.wake, next)
	s.mu.Unlock()
	return err
}

// withoutChecks is rep with the probe result p has, so that comparing
// the two asks only whether the node's report changed meanwhile.
func withoutChecks(rep, p Served) Served {
	rep.Probe = p.Probe
	return rep
}
