package fleet

import (
	"context"
	"fmt"
	"io"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/lbcert/lbcert/internal/hint"
)

// NoRollout is a lineage with no rollout on its way.
type NoRollout struct{ Name string }

func (e *NoRollout) Error() string { return "no staged rollout of " + e.Name + " is on its way" }

// HintText makes *NoRollout a hint.Hinter.
func (e *NoRollout) HintText() string {
	return "'lbcert fleet status' lists the rollouts on their way; a finished one needs nothing"
}

// record reads name's rollout, or says there is none.
func (n *Node) record(ctx context.Context, name string) (*Record, error) {
	recs, err := n.Records(ctx, name)
	if err != nil {
		return nil, err
	}
	r := recs[name]
	if r == nil {
		return nil, &NoRollout{Name: name}
	}
	return r, nil
}

// Resume moves a held or aborted rollout on: its current wave is
// checked again (the node that failed installs the version again) and
// the rollout goes on once it passes. With skip, the current wave counts
// as passed and the next is released at once (a check the operator
// knows was wrong, a node that is gone). It says what it did.
func (n *Node) Resume(ctx context.Context, name string, skip bool) (string, error) {
	r, err := n.record(ctx, name)
	if err != nil {
		return "", err
	}
	cfg, err := n.RolloutConfig(ctx, true)
	if err != nil {
		return "", err
	}
	waves := n.wavesOf(ctx, cfg, r)
	if r.State == Rolling && !skip {
		return "", hint.Wrap(fmt.Errorf("the rollout of %s version %d is not held: it is at wave %d of %d", name, r.Version, r.Wave+1, len(waves)),
			"to release the next wave without waiting for this one, add --skip-wave")
	}
	now := strconv.FormatInt(time.Now().UnixMilli(), 10)
	kv := []string{"state", Rolling, "why", "", "node", "", "resumed", now, "since", now}
	what := fmt.Sprintf("resumed the rollout of %s version %d: wave %d is checked again, then the rollout goes on", name, r.Version, r.Wave+1)
	if skip {
		if r.Wave+1 >= len(waves) {
			if ok, err := n.Shared.MoveRollout(ctx, name, r.Version, r.Seq, true); err != nil || !ok {
				return "", moved(name, err)
			}
			n.keepRecord(name, nil)
			return fmt.Sprintf("ended the rollout of %s version %d: every node may serve it now", name, r.Version), nil
		}
		kv = append(kv, "wave", strconv.Itoa(r.Wave+1))
		what = fmt.Sprintf("released wave %d of %d of %s version %d without waiting for wave %d", r.Wave+2, len(waves), name, r.Version, r.Wave+1)
	}
	if ok, err := n.Shared.MoveRollout(ctx, name, r.Version, r.Seq, false, kv...); err != nil || !ok {
		return "", moved(name, err)
	}
	n.Records(ctx, name)
	return what, nil
}

// Abort sends every node back to the version before name's rollout and
// keeps it there, until a new version starts a rollout of its own (or
// Resume). The version before expiring still overrides it.
func (n *Node) Abort(ctx context.Context, name string) (string, error) {
	r, err := n.record(ctx, name)
	if err != nil {
		return "", err
	}
	if r.State == Aborted {
		return fmt.Sprintf("the rollout of %s version %d was already aborted: every node keeps version %d", name, r.Version, r.Previous), nil
	}
	why := fmt.Sprintf("aborted on %s at %s", n.Name, time.Now().UTC().Format(time.RFC3339))
	if ok, err := n.Shared.MoveRollout(ctx, name, r.Version, r.Seq, false, "state", Aborted, "why", why); err != nil || !ok {
		return "", moved(name, err)
	}
	n.Records(ctx, name)
	return fmt.Sprintf("aborted the rollout of %s version %d: every node serves version %d again (the agents install it within seconds)", name, r.Version, r.Previous), nil
}

func moved(name string, err error) error {
	if err != nil {
		return err
	}
	return hint.Wrap(fmt.Errorf("the rollout of %s moved while this command read it", name), "run it again")
}

// RolloutOff turns staged rollouts off ('fleet rollout off'): every
// rollout on its way ends at the agents' next look and every node gets
// its lineage's newest version. That includes the version of a held
// rollout (its check failed) or of an aborted one (an operator sent the
// fleet back from it): without yes, it refuses and names them, and with
// yes it says which it released.
func (n *Node) RolloutOff(ctx context.Context, yes bool, w io.Writer) error {
	recs, err := n.Records(ctx)
	if err != nil {
		return err
	}
	var stopped []string
	for _, r := range recs {
		if r.State == Held || r.State == Aborted {
			stopped = append(stopped, stoppedWords(r))
		}
	}
	slices.Sort(stopped)
	if len(stopped) > 0 && !yes {
		return hint.Wrap(fmt.Errorf("fleet rollout off would send to every node what a rollout holds back: %s", strings.Join(stopped, "; ")),
			"'lbcert fleet status' shows why; once fixed, 'lbcert fleet rollout resume NAME' (or a new version: 'lbcert renew --force --name NAME') moves it on; --yes turns staging off and releases them now")
	}
	if err := n.SetRollout(ctx, &RolloutConfig{}, w); err != nil {
		return err
	}
	for _, s := range stopped {
		fmt.Fprintf(w, "released to every node: %s\n", s)
	}
	return nil
}

// stoppedWords says which version a held or aborted rollout holds back,
// and why, on one line.
func stoppedWords(r *Record) string {
	why := "aborted"
	if r.State == Held {
		why = "held: " + strings.Join(strings.Fields(r.Why), " ")
	}
	return fmt.Sprintf("%s version %d (%s; nodes keep version %d)", r.Name, r.Version, why, r.Previous)
}
