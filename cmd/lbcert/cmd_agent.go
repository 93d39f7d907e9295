package main

import (
	"context"
	"fmt"
	"net"
	"os"
	"runtime/debug"
	"time"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"

	"github.com/lbcert/lbcert/internal/deploy"
	"github.com/lbcert/lbcert/internal/fleet"
	"github.com/lbcert/lbcert/internal/hint"
	"github.com/lbcert/lbcert/internal/schedule"
	"github.com/lbcert/lbcert/internal/store"
)

type agentOptions struct {
	httpAddr, advertise string
	reconcile           time.Duration
	printUnit           bool
	deploy              deployFlags
}

func (a *app) newAgentCmd() *cobra.Command {
	o := &agentOptions{}
	cmd := &cobra.Command{
		Use:   "agent --http-addr ADDR [--deploy nginx|haproxy ...]",
		Short: "Serve the fleet on this node: answer HTTP-01, install and deploy every certificate (runs until stopped)",
		Long: `The agent runs on every node of a fleet, under systemd
(--print-systemd-unit prints the unit). It:

  - answers HTTP-01 challenges for whichever node ordered, from Redis with
    a short local cache, and only for the Host the token was published for;
  - sends a heartbeat, so that an ordering node fetches each token through
    every live agent before the CA validates, and abandons the
    authorization if one cannot answer (no failed validation is spent);
  - installs every certificate the fleet publishes into this node's --dir
    (the key unsealed only here), learning of them from a Redis stream and
    reconciling everything every --reconcile as the fallback, and deploys
    each burst at once with this node's own --deploy settings: one config
    test, one reload or runtime-API update, rollback and the TLS check, as
    renew does; a failed deploy is retried at each reconcile;
  - reports to the fleet the version it serves of every lineage
    ('fleet status' shows them);
  - rebuilds an emptied Redis (FLUSHALL, a new instance) from this node's
    --dir.

It takes the state directory's short write lock only around each install
and deploy, so a long batch on the same node does not hold it up. When
Redis is unreachable it keeps serving from disk and the tokens it has
cached, and reconnects with backoff; what was published meanwhile arrives
after. SIGTERM stops it cleanly.

Point the load balancer's port 80 for /.well-known/acme-challenge/ at
--http-addr (an HAProxy backend or an nginx proxy_pass).`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error { return a.runAgent(cmd.Context(), o) },
	}
	f := cmd.Flags()
	f.StringVar(&o.httpAddr, "http-addr", "", "where the agent answers HTTP-01, host:port")
	f.StringVar(&o.advertise, "advertise-addr", "", "where the other nodes reach this agent (default --http-addr, which then needs a host part)")
	f.DurationVar(&o.reconcile, "reconcile", time.Minute, "how often the agent compares every lineage with the fleet, besides following its events")
	f.BoolVar(&o.printUnit, "print-systemd-unit", false, "print a systemd unit that runs this agent with these settings, and exit")
	o.deploy.register(f)
	return cmd
}

func (a *app) runAgent(ctx context.Context, o *agentOptions) error {
	advertise, err := fleet.AdvertiseAddr(o.httpAddr, o.advertise)
	if err != nil {
		return err
	}
	if o.reconcile < time.Second {
		return fmt.Errorf("--reconcile %s: want 1s or more", o.reconcile)
	}
	st := store.New(a.global.Dir)
	settings, err := o.deploy.resolve(st.Dir, nil)
	if err != nil {
		return err
	}
	if o.printUnit {
		a.printf("%s", a.agentUnit(o))
		return nil
	}
	if a.fleetOpts.Redis == "" {
		return fmt.Errorf("agent: fleet mode needs --redis (or LBCERT_REDIS, or 'redis' in the config file)")
	}
	if err := a.checkKeep(); err != nil {
		return err
	}
	if err := fleet.CheckMember(st); err != nil {
		return err
	}
	ln, err := net.Listen("tcp", o.httpAddr)
	if err != nil {
		return hint.Wrap(fmt.Errorf("agent: %w", err), "another process holds %s; stop it, or pick another --http-addr", o.httpAddr)
	}
	// The runs of this node deploy what they order with the agent's
	// settings, as the agent would (invariant I1: the ordering node
	// serves it too).
	if err := fleet.SaveNodeDeploy(st, settings); err != nil {
		return fmt.Errorf("save this node's deploy settings: %w", err)
	}
	conn := &fleet.Connector{
		Open: func(ctx context.Context) (*fleet.Conn, error) { return a.openFleet(ctx, st, "agent") },
		Connected: func(n *fleet.Node) {
			a.printf("agent of node %s (fleet %s) connected; answering HTTP-01 on %s\n", n.Name, n.ID, ln.Addr())
		},
	}
	defer conn.Close()
	a.printf("agent answering HTTP-01 on %s; connecting to the fleet's Redis\n", ln.Addr())
	runner := &deploy.Runner{Store: st, Opts: a.deployOptions()}
	syncer := &fleet.Syncer{Local: st, Deploy: settings, Reconcile: o.reconcile, Keep: a.global.Keep, Runner: runner, Remove: runner,
		Roots: a.global.cas.Known().RootsFor}
	ag := &fleet.Agent{Local: st, Connect: conn.Connect, Sync: syncer, Listener: ln, Advertise: advertise,
		Version: buildVersion(debug.ReadBuildInfo())}
	if a.global.MetricsFile != "" {
		go a.agentMetrics(ctx, ag)
	}
	return ag.Run(ctx)
}

// agentMetrics keeps the fleet's per-node figures beside --metrics-file
// fresh while the agent runs: the one process that is always there.
func (a *app) agentMetrics(ctx context.Context, ag *fleet.Agent) {
	t := time.NewTicker(15 * time.Second)
	defer t.Stop()
	for {
		if n := ag.N(); n != nil {
			a.writeFleetMetrics(ctx, n)
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// agentUnit is the systemd unit for this agent: the same flags, the
// password from an environment file (never in the unit's argv).
func (a *app) agentUnit(o *agentOptions) string {
	self, err := os.Executable()
	if err != nil {
		self = "/usr/local/bin/lbcert"
	}
	args := []string{self}
	if a.global.Dir == "/etc/lbcert" {
		args = append(args, "--dir", a.global.Dir) // said, as the unit's reader looks for it
	}
	args = append(append(args, a.carriedArgs()...), "agent", "--http-addr", o.httpAddr)
	if o.advertise != "" {
		args = append(args, "--advertise-addr", o.advertise)
	}
	if o.reconcile != time.Minute {
		args = append(args, "--reconcile", o.reconcile.String())
	}
	o.deploy.fs.Visit(func(fl *pflag.Flag) {
		if isDeployFlag(fl.Name) {
			args = append(args, "--"+fl.Name, fl.Value.String())
		}
	})
	return schedule.AgentUnit(args)
}
