package main

import (
	"context"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/lbcert/lbcert/internal/engine"
	"github.com/lbcert/lbcert/internal/exit"
	"github.com/lbcert/lbcert/internal/fleet"
)

// fleet rollout: the fleet's staged rollout waves (issue 28).

type rolloutSetOptions struct {
	waves       []string
	soak        time.Duration
	probe       string
	probeStatus int
	margin      string
}

func (a *app) newFleetRolloutCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "rollout",
		Short: "Roll new certificates out in waves: a canary first, checked, then the rest",
		Long: `With waves set, a new version of a certificate reaches the fleet one wave
at a time. The first wave's nodes install it; once each of them serves it
(its agent's TLS check against --verify-addr), the probe through each of
them passes (if set) and the soak time has gone by, the next wave's nodes
install it, and so on. Until their wave, nodes keep serving the version
before it, which the fleet keeps while the rollout is on its way.

A failed check (a load balancer that refuses the new certificate, a probe
that fails) holds the version: no node that does not serve it yet gets
it, the node that failed goes back to the previous version, and 'fleet
status', 'list', the run reports, their mail and the metrics say which
version is held, where and why. 'resume' moves it on, 'abort' keeps the
previous version everywhere; a new version starts a rollout of its own.
A hold never outlives the certificate it keeps: within the expiry margin
of the previous version's lifetime, every node gets the new one, with a
loud warning.

  lbcert --redis URL fleet rollout set --wave lb1 --wave rest --soak 5m \
      --probe 'https://{name}/healthz'
  lbcert --redis URL fleet rollout show
  lbcert --redis URL fleet rollout resume shop.example.com
  lbcert --redis URL fleet rollout abort shop.example.com
  lbcert --redis URL fleet rollout off

See README "Staged rollouts".`,
	}
	cmd.AddCommand(a.newRolloutSetCmd(), a.newRolloutOffCmd(), a.newRolloutShowCmd(), a.newRolloutResumeCmd(), a.newRolloutAbortCmd())
	return cmd
}

func (a *app) newRolloutSetCmd() *cobra.Command {
	o := &rolloutSetOptions{}
	cmd := &cobra.Command{
		Use:   "set --wave SPEC [--wave SPEC...]",
		Short: "Set the fleet's waves, soak time, probe and expiry margin",
		Long: `Set replaces the fleet's rollout settings. Each --wave, in order, is node
names (lb1 or lb2,lb3), a count of the nodes no earlier wave took (2), a
share of them (25%), or rest; nodes no wave names go in the last wave.
Rollouts already on their way follow the new waves from their next move.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			cfg, err := o.config()
			if err != nil {
				return err
			}
			return a.withMember(cmd.Context(), func(n *fleet.Node) error {
				if err := checkWaveNodes(cfg, n); err != nil {
					return err
				}
				if err := n.SetRolloutConfig(cmd.Context(), cfg); err != nil {
					return err
				}
				a.printf("fleet %s rolls new versions out in %d waves:\n", n.ID, len(cfg.Waves))
				a.printWaves(cfg, n)
				return nil
			})
		},
	}
	f := cmd.Flags()
	f.StringArrayVar(&o.waves, "wave", nil, "one wave, in order: node names (lb1,lb2), a count (2), a percentage (25%) or rest (repeatable)")
	f.DurationVar(&o.soak, "soak", fleet.DefaultSoak, "how long a wave serves a new version, checked, before the next wave gets it")
	f.StringVar(&o.probe, "probe", "", "an https URL fetched through each node's load balancer once it serves the new version ({name} is the certificate's name), chain verified")
	f.IntVar(&o.probeStatus, "probe-status", 200, "the HTTP status the probe must answer")
	f.StringVar(&o.margin, "expiry-margin", "15%", "the part of a certificate's lifetime before its expiry in which a held rollout is overridden")
	return cmd
}

func (o *rolloutSetOptions) config() (*fleet.RolloutConfig, error) {
	if len(o.waves) == 0 {
		return nil, exit.Errorf("--wave is required: the first wave, such as --wave lb1, then --wave rest").
			WithHint("to roll every version out to every node at once, as without waves, run 'fleet rollout off'")
	}
	if err := fleet.CheckWaves(o.waves); err != nil {
		return nil, exit.Errorf("--wave: %w", err)
	}
	if o.soak < 0 {
		return nil, exit.Errorf("--soak %s: want 0 or more", o.soak)
	}
	if o.probe != "" {
		if err := fleet.CheckProbe(o.probe); err != nil {
			return nil, exit.Errorf("%w", err)
		}
	}
	if o.probeStatus < 100 || o.probeStatus > 599 {
		return nil, exit.Errorf("--probe-status %d: want an HTTP status, 100 to 599", o.probeStatus)
	}
	m, err := parsePercent(o.margin)
	if err != nil || m < 0.01 || m > 0.9 {
		return nil, exit.Errorf("--expiry-margin %q: want a percentage of the lifetime from 1%% to 90%%, such as 15%%", o.margin)
	}
	return &fleet.RolloutConfig{Waves: o.waves, Soak: o.soak, Probe: o.probe, ProbeStatus: o.probeStatus, Margin: m}, nil
}

func parsePercent(s string) (float64, error) {
	p, err := strconv.ParseFloat(strings.TrimSuffix(strings.TrimSpace(s), "%"), 64)
	if err != nil || !strings.HasSuffix(strings.TrimSpace(s), "%") {
		return 0, fmt.Errorf("not a percentage")
	}
	return p / 100, nil
}

// checkWaveNodes refuses a wave naming a node that is not a member.
func checkWaveNodes(cfg *fleet.RolloutConfig, n *fleet.Node) error {
	members := map[string]bool{}
	for _, m := range n.Members() {
		members[m.Node] = true
	}
	for i, w := range cfg.Waves {
		for _, name := range strings.Split(w, ",") {
			name = strings.TrimSpace(name)
			if _, err := strconv.Atoi(name); err == nil || name == "rest" || strings.HasSuffix(name, "%") {
				continue
			}
			if !members[name] {
				return exit.Errorf("--wave %s (wave %d): %s is not a member of fleet %s", w, i+1, name, n.ID).
					WithHint("approve it first ('fleet approve'), or leave it out: a count, a percentage or rest takes the nodes no wave names")
			}
		}
	}
	return nil
}

func (a *app) newRolloutOffCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "off",
		Short: "Roll every new version out to every node at once, as without waves",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			return a.withMember(cmd.Context(), func(n *fleet.Node) error {
				if err := n.SetRolloutConfig(cmd.Context(), &fleet.RolloutConfig{}); err != nil {
					return err
				}
				a.printf("fleet %s rolls every new version out to every node at once; rollouts on their way end at the agents' next look\n", n.ID)
				return nil
			})
		},
	}
}

func (a *app) newRolloutShowCmd() *cobra.Command {
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "show",
		Short: "Show the fleet's waves and the rollouts on their way",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			return a.readMember(cmd.Context(), func(n *fleet.Node) error {
				cfg, err := n.RolloutConfig(cmd.Context(), true)
				if err != nil {
					return err
				}
				rs, err := n.RolloutsOnTheirWay(cmd.Context(), a.now())
				if err != nil {
					return err
				}
				st := &fleet.Status{Waves: cfg.Resolve(memberNames(n)), Rollouts: rs}
				if asJSON {
					a.printJSON(struct {
						Version  int                   `json:"version"`
						Config   *fleet.RolloutConfig  `json:"settings"`
						Waves    [][]string            `json:"waves"`
						Rollouts []fleet.RolloutStatus `json:"rollouts"`
					}{fleet.StatusVersion, cfg, st.Waves, st.Rollouts})
					return nil
				}
				if !cfg.Staged() {
					a.printf("fleet %s has no waves: every node installs every new version at once ('fleet rollout set' stages them)\n", n.ID)
					return nil
				}
				a.printWaves(cfg, n)
				a.printRollouts(st)
				return nil
			})
		},
	}
	cmd.Flags().BoolVar(&asJSON, "json", false, "print JSON")
	return cmd
}

func (a *app) newRolloutResumeCmd() *cobra.Command {
	var skip bool
	cmd := &cobra.Command{
		Use:   "resume NAME",
		Short: "Move a held rollout on: its wave is checked again, then the rollout goes on",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return a.withMember(cmd.Context(), func(n *fleet.Node) error {
				what, err := n.Resume(cmd.Context(), args[0], skip)
				if err != nil {
					return err
				}
				a.printf("%s\n", what)
				return nil
			})
		},
	}
	cmd.Flags().BoolVar(&skip, "skip-wave", false, "count the current wave as passed and release the next at once")
	return cmd
}

func (a *app) newRolloutAbortCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "abort NAME",
		Short: "Keep the version before NAME's rollout on every node",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return a.withMember(cmd.Context(), func(n *fleet.Node) error {
				what, err := n.Abort(cmd.Context(), args[0])
				if err != nil {
					return err
				}
				a.printf("%s\n", what)
				return nil
			})
		},
	}
}

// printWaves prints the settings and each wave with the nodes it holds.
func (a *app) printWaves(cfg *fleet.RolloutConfig, n *fleet.Node) {
	members := memberNames(n)
	probe := "no probe"
	if cfg.Probe != "" {
		probe = fmt.Sprintf("probe %s expecting %d", cfg.Probe, cfg.ProbeStatus)
	}
	a.printf("soak %s, %s, expiry margin %g%%\n", cfg.Soak, probe, cfg.Margin*100)
	for i, w := range cfg.Resolve(members) {
		a.printf("  wave %d: %-12s %s\n", i+1, cfg.Waves[i], orNone(w))
	}
}

// printRollouts prints the rollouts on their way, as fleet status and
// rollout show do.
func (a *app) printRollouts(st *fleet.Status) {
	if len(st.Waves) == 0 {
		return
	}
	var waves []string
	for i, w := range st.Waves {
		waves = append(waves, fmt.Sprintf("%d: %s", i+1, orNone(w)))
	}
	a.printf("waves: %s\n", strings.Join(waves, "; "))
	if len(st.Rollouts) == 0 {
		a.printf("rollouts on their way: none\n")
		return
	}
	a.printf("rollouts on their way:\n")
	for _, r := range st.Rollouts {
		state := fmt.Sprintf("%s at wave %d of %d", r.State, r.Wave, len(r.Waves))
		if len(r.Waiting) > 0 {
			state += ", waiting for " + strings.Join(r.Waiting, ",")
		}
		a.printf("  %s version %d (was %d): %s\n", r.Name, r.Version, r.Previous, state)
		var nodes []string
		for node := range r.Serving {
			nodes = append(nodes, node)
		}
		slices.Sort(nodes)
		for _, node := range nodes {
			a.printf("    %s serves version %d\n", node, r.Serving[node])
		}
		if p := r.Problem(); p != "" {
			a.printf("    %s\n", p)
			a.printf("    resume: lbcert fleet rollout resume %s   abort: lbcert fleet rollout abort %s\n", r.Name, r.Name)
		}
	}
}

func orNone(s []string) string {
	if len(s) == 0 {
		return "(no node)"
	}
	return strings.Join(s, ", ")
}

// rolloutNotes are the fleet's rollouts on their way, for a run's
// report (those that need an operator) and list (all).
func rolloutNotes(ctx context.Context, n *fleet.Node, now time.Time) ([]engine.Note, error) {
	rs, err := n.RolloutsOnTheirWay(ctx, now)
	if err != nil {
		return nil, err
	}
	var out []engine.Note
	for _, r := range rs {
		state, text := r.State, r.Problem()
		if r.Override != nil {
			state = "expiry_override"
		}
		if text == "" {
			text = fmt.Sprintf("rollout of version %d at wave %d of %d", r.Version, r.Wave, len(r.Waves))
		}
		out = append(out, engine.Note{Name: r.Name, State: state, Text: text})
	}
	return out, nil
}

// addRolloutNotes puts the fleet's rollouts that need an operator into
// a run's result (its JSON, text and mail); a fleet that cannot say is
// a warning, never a failed run.
func (a *app) addRolloutNotes(ctx context.Context, h *host, res *engine.Result) {
	if h.notes == nil {
		return
	}
	notes, err := h.notes(ctx)
	if err != nil {
		fmt.Fprintf(a.err, "lbcert: warning: could not read the fleet's staged rollouts: %s\n", oneLine(err))
		return
	}
	for _, n := range notes {
		if n.State != fleet.Rolling {
			res.Rollouts = append(res.Rollouts, n)
		}
	}
}

// sayRollouts prints each rollout that needs an operator.
func (a *app) sayRollouts(res *engine.Result) {
	for _, n := range res.Rollouts {
		fmt.Fprintf(a.err, "lbcert: warning: %s\n", n.Text)
	}
	if len(res.Rollouts) > 0 {
		fmt.Fprintf(a.err, "lbcert: hint: %s\n", rolloutHint)
	}
}

// rolloutHint is what to do about a rollout held, aborted or overridden.
const rolloutHint = "'lbcert fleet status' shows where; fix the node's load balancer or the probe's target, then 'lbcert fleet rollout resume NAME' moves it on, or 'abort NAME' keeps the previous version everywhere (README \"Staged rollouts\")"

// waitingCol is fleet status's WAITING column, shown only in a fleet
// that stages rollouts.
func waitingCol(staged bool, v string) string {
	if !staged {
		return ""
	}
	return v + "\t"
}

// markRollouts notes on list's entries the fleet's rollouts on their
// way: a version this node does not serve because its wave waits is
// not a pending deploy, and the rollout says why.
func (a *app) markRollouts(ctx context.Context, h *host, entries []listEntry) {
	if h.notes == nil {
		return
	}
	notes, err := h.notes(ctx)
	if err != nil {
		fmt.Fprintf(a.err, "lbcert: warning: could not read the fleet's staged rollouts: %s\n", oneLine(err))
		return
	}
	by := map[string]string{}
	for _, n := range notes {
		by[n.Name] = n.Text
	}
	for i := range entries {
		e := &entries[i]
		e.Rollout = by[e.Name]
		if e.Rollout != "" && e.Pending == fmt.Sprintf("pending deploy of version %d", e.Version) {
			e.Pending = ""
		}
	}
}

func memberNames(n *fleet.Node) []string {
	var out []string
	for _, m := range n.Members() {
		out = append(out, m.Node)
	}
	return out
}
