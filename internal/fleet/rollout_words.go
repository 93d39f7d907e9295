package fleet

import (
	"context"
	"fmt"
	"io"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/lbcert/lbcert/internal/engine"
	"github.com/lbcert/lbcert/internal/hint"
)

// What the 'fleet rollout' commands, fleet status, list and the run
// reports say of staged rollouts; the commands only parse flags and
// call these.

// RolloutSettings are the 'fleet rollout' commands' flags as given.
type RolloutSettings struct {
	Waves       []string
	Soak        time.Duration
	Probe       string
	ProbeStatus int
	Margin      string // a percentage, "15%"
	SkipWave    bool   // resume: release the next wave at once
	Yes         bool   // off: release held and aborted rollouts too
}

// Rollout does 'fleet rollout VERB ARGS' (set, resume NAME, abort NAME,
// off) and writes what it did to w.
func (n *Node) Rollout(ctx context.Context, verb string, args []string, o *RolloutSettings, w io.Writer) error {
	var what string
	var err error
	switch verb {
	case "set":
		cfg, err := o.Config()
		if err != nil {
			return err
		}
		return n.SetRollout(ctx, cfg, w)
	case "off":
		return n.RolloutOff(ctx, o.Yes, w)
	case "resume":
		what, err = n.Resume(ctx, args[0], o.SkipWave)
	case "abort":
		what, err = n.Abort(ctx, args[0])
	default:
		return fmt.Errorf("fleet rollout %s: no such command", verb)
	}
	if err == nil {
		fmt.Fprintln(w, what)
	}
	return err
}

// Config checks the settings, before anything reaches Redis. Each
// refusal is one line with a hint.
func (o *RolloutSettings) Config() (*RolloutConfig, error) {
	if len(o.Waves) == 0 {
		return nil, hint.Wrap(fmt.Errorf("--wave is required: the first wave, such as --wave lb1, then --wave rest"),
			"to roll every version out to every node at once, as without waves, run 'fleet rollout off'")
	}
	if err := CheckWaves(o.Waves); err != nil {
		return nil, hint.Wrap(fmt.Errorf("--wave: %w", err),
			"one --wave per wave, in order: node names (--wave lb1,lb2), a count (--wave 2), a percentage (--wave 25%%), and --wave rest last (README \"Staged rollouts\")")
	}
	if o.Soak < 0 {
		return nil, hint.Wrap(fmt.Errorf("--soak %s: want 0 or more", o.Soak),
			"how long each wave serves the version, checked, before the next wave gets it, such as --soak 10m (0: no wait)")
	}
	if o.Probe != "" {
		if err := CheckProbe(o.Probe); err != nil {
			return nil, hint.Wrap(err, "the probe is fetched through each node's load balancer, such as --probe https://{name}/healthz; leave --probe out for the TLS check alone")
		}
	}
	if o.ProbeStatus < 100 || o.ProbeStatus > 599 {
		return nil, hint.Wrap(fmt.Errorf("--probe-status %d: want an HTTP status, 100 to 599", o.ProbeStatus),
			"the status the probe must answer, 200 unless your health check says otherwise")
	}
	m, err := parsePercent(o.Margin)
	if err != nil || !(m >= 0.01 && m <= 0.9) { // NaN passes a plain range check
		return nil, hint.Wrap(fmt.Errorf("--expiry-margin %q: want a percentage of the lifetime from 1%% to 90%%, such as 15%%", o.Margin),
			"a held rollout is overridden when the certificate nodes serve has less than this share of its lifetime left")
	}
	return &RolloutConfig{Waves: o.Waves, Soak: o.Soak, Probe: o.Probe, ProbeStatus: o.ProbeStatus, Margin: m}, nil
}

func parsePercent(s string) (float64, error) {
	s = strings.TrimSpace(s)
	p, err := strconv.ParseFloat(strings.TrimSuffix(s, "%"), 64)
	if err != nil || !strings.HasSuffix(s, "%") {
		return 0, fmt.Errorf("not a percentage")
	}
	return p / 100, nil
}

// SetRollout makes cfg the fleet's waves (an empty one: no staging,
// 'fleet rollout off') and writes what it did to w. A wave naming a
// node that is not a member is refused.
func (n *Node) SetRollout(ctx context.Context, cfg *RolloutConfig, w io.Writer) error {
	if err := n.checkWaveNodes(cfg); err != nil {
		return err
	}
	if err := n.SetRolloutConfig(ctx, cfg); err != nil {
		return err
	}
	if !cfg.Staged() {
		fmt.Fprintf(w, "fleet %s rolls every new version out to every node at once; rollouts on their way end at the agents' next look\n", n.ID)
		return nil
	}
	fmt.Fprintf(w, "fleet %s rolls new versions out in %d waves:\n", n.ID, len(cfg.Waves))
	fmt.Fprintln(w, cfg.settingsWords())
	for i, nodes := range cfg.Resolve(n.memberNames()) {
		fmt.Fprintf(w, "  wave %d: %-12s %s\n", i+1, cfg.Waves[i], orNoNode(nodes))
	}
	return nil
}

// checkWaveNodes refuses a wave naming a node that is not a member.
func (n *Node) checkWaveNodes(cfg *RolloutConfig) error {
	members := n.memberNames()
	for i, spec := range cfg.Waves {
		w, _ := ParseWave(spec) // checked by Config
		for _, name := range w.names {
			if !slices.Contains(members, name) {
				return hint.Wrap(fmt.Errorf("--wave %s (wave %d): %s is not a member of fleet %s", spec, i+1, name, n.ID),
					"approve it first ('fleet approve'), or leave it out: a count, a percentage or rest takes the nodes no wave names")
			}
		}
	}
	return nil
}

// settingsWords says the soak, the probe and the expiry margin.
func (cfg *RolloutConfig) settingsWords() string {
	probe := "no probe"
	if cfg.Probe != "" {
		probe = fmt.Sprintf("probe %s expecting %d", shownURL(cfg.Probe), cfg.ProbeStatus)
	}
	return fmt.Sprintf("soak %s, %s, expiry margin %g%%", cfg.Soak, probe, cfg.margin()*100)
}

// RolloutTable writes the waves, their settings and the rollouts on
// their way, as fleet status prints them; nothing in a fleet without
// waves.
func (st *Status) RolloutTable(w io.Writer) {
	if len(st.Waves) == 0 {
		return
	}
	fmt.Fprintf(w, "waves: %s\n", wavesWords(st.Waves))
	if st.RolloutSettings != nil {
		fmt.Fprintf(w, "  %s\n", st.RolloutSettings.settingsWords())
	}
	if len(st.Rollouts) == 0 {
		fmt.Fprintf(w, "rollouts on their way: none\n")
		return
	}
	fmt.Fprintf(w, "rollouts on their way:\n")
	for _, r := range st.Rollouts {
		state := fmt.Sprintf("%s at wave %d of %d", r.State, r.Wave, len(r.Waves))
		if len(r.Waiting) > 0 {
			state += ", waiting for " + strings.Join(r.Waiting, ",")
		}
		fmt.Fprintf(w, "  %s version %d (was %d): %s\n", r.Name, r.Version, r.Previous, state)
		if !slices.EqualFunc(r.Waves, st.Waves, slices.Equal) {
			// Resolved when it started: nodes joined or left since.
			fmt.Fprintf(w, "    its waves: %s\n", wavesWords(r.Waves))
		}
		nodes := make([]string, 0, len(r.Serving))
		for node := range r.Serving {
			nodes = append(nodes, node)
		}
		slices.Sort(nodes)
		for _, node := range nodes {
			fmt.Fprintf(w, "    %s serves version %d\n", node, r.Serving[node])
		}
		if p := r.Problem(); p != "" {
			fmt.Fprintf(w, "    %s\n", p)
			fmt.Fprintf(w, "    resume: lbcert fleet rollout resume %s   abort: lbcert fleet rollout abort %s\n", r.Name, r.Name)
		}
	}
}

func wavesWords(ws [][]string) string {
	var out []string
	for i, nodes := range ws {
		out = append(out, fmt.Sprintf("%d: %s", i+1, orNoNode(nodes)))
	}
	return strings.Join(out, "; ")
}

func orNoNode(s []string) string {
	if len(s) == 0 {
		return "(no node)"
	}
	return strings.Join(s, ", ")
}

// RolloutNotes are the fleet's rollouts on their way, as a run's report
// (engine.Node.Notes: those that need an operator) and list (all) say
// them.
func (n *Node) RolloutNotes(ctx context.Context, now time.Time) ([]engine.Note, error) {
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
