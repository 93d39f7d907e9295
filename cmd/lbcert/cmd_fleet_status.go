package main

import (
	"context"
	"fmt"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/lbcert/lbcert/internal/exit"
	"github.com/lbcert/lbcert/internal/fleet"
	"github.com/lbcert/lbcert/internal/metrics"
)

type fleetStatusOptions struct {
	json    bool
	maxLag  time.Duration
	maxBeat time.Duration
}

// fleetStatusDefaults are the thresholds when none is given: what the
// metrics written by runs and the agent use.
var fleetStatusDefaults = fleetStatusOptions{maxLag: 5 * time.Minute, maxBeat: 30 * time.Second}

func (a *app) newFleetStatusCmd() *cobra.Command {
	o := &fleetStatusOptions{}
	cmd := &cobra.Command{
		Use:   "status",
		Short: "Show every node: heartbeat, versions served, lag and failures (a monitoring check)",
		Long: `Status shows every member of the fleet: its agent's last heartbeat and
version, and how many lineages it serves at the fleet's newest version,
how many it is behind on, and how many failed to deploy there, with the
reasons.

It exits 0 when every node is fine, and 2 when a node's heartbeat is older
than --max-heartbeat-age (or gone), a deploy failed on it, or it has been
behind for longer than --max-lag: run it from your monitoring. --json
prints the same in the versioned JSON schema. With --metrics-file, the
same per-node figures also go to the Prometheus textfile beside it
(lbcert.prom -> lbcert-fleet.prom), which every run in fleet mode and the
agent refresh too.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			return a.readMember(cmd.Context(), func(n *fleet.Node) error { return a.fleetStatus(cmd.Context(), n, o) })
		},
	}
	cmd.Flags().BoolVar(&o.json, "json", false, "print JSON (schema version 1)")
	cmd.Flags().DurationVar(&o.maxLag, "max-lag", fleetStatusDefaults.maxLag, "a node behind the newest version for longer than this is a problem")
	cmd.Flags().DurationVar(&o.maxBeat, "max-heartbeat-age", fleetStatusDefaults.maxBeat, "a node whose agent's last heartbeat is older than this is a problem")
	return cmd
}

func (a *app) fleetStatus(ctx context.Context, n *fleet.Node, o *fleetStatusOptions) error {
	st, err := n.Report(ctx, a.now(), o.maxLag, o.maxBeat)
	if err != nil {
		return err
	}
	if a.global.MetricsFile != "" {
		if err := metrics.WriteFleet(a.global.MetricsFile, st); err != nil {
			return exit.Errorf("--metrics-file: %w", unwrapPath(err))
		}
	}
	if o.json {
		a.printJSON(st)
	} else {
		a.printf("fleet %s in %s: %d lineages, %d nodes\n", st.Fleet, st.Redis, st.Lineages, len(st.Nodes))
		tw := tabwriter.NewWriter(a.out, 0, 0, 2, ' ', 0)
		staged := len(st.Waves) > 0 // WAITING: for its wave
		fmt.Fprintln(tw, "NODE\tHEARTBEAT\tAGENT\tNEWEST\t"+waitingCol(staged, "WAITING")+"BEHIND\tFAILED\tLAG")
		for _, ns := range st.Nodes {
			beat := "none"
			if ns.Heartbeat != nil {
				beat = a.now().Sub(*ns.Heartbeat).Round(time.Second).String() + " ago"
			}
			lag := "-"
			if ns.Behind+ns.Failed > 0 {
				lag = (time.Duration(ns.LagSeconds) * time.Second).String()
			}
			fmt.Fprintf(tw, "%s\t%s\t%s\t%d\t%s%d\t%d\t%s\n", ns.Node, beat, orDash(ns.Agent), ns.Newest, waitingCol(staged, fmt.Sprint(ns.Waiting)), ns.Behind, ns.Failed, lag)
		}
		tw.Flush()
		for _, ns := range st.Nodes {
			for _, f := range ns.Failures {
				a.printf("  %s %s: %s\n", ns.Node, f.Name, f.Error)
			}
		}
		a.printRollouts(st)
	}
	if st.OK {
		return nil
	}
	lines := st.Problems
	for _, ns := range st.Nodes {
		if len(ns.Problems) > 0 {
			lines = append(lines, "node "+ns.Node+": "+strings.Join(ns.Problems, ", "))
		}
	}
	hint := "README \"When a node lags\": check the node's agent (systemctl status lbcert-agent) and its load balancer's config"
	if len(st.Problems) > 0 {
		hint = rolloutHint
	}
	return &exit.Error{Code: exit.Partial, Msg: strings.Join(lines, "; "), Hint: hint}
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}
