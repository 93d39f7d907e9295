package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"time"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"

	"github.com/lbcert/lbcert/internal/config"
	"github.com/lbcert/lbcert/internal/fleet"
	"github.com/lbcert/lbcert/internal/fleet/rdb"
	"github.com/lbcert/lbcert/internal/hint"
	"github.com/lbcert/lbcert/internal/metrics"
	"github.com/lbcert/lbcert/internal/notify"
	"github.com/lbcert/lbcert/internal/secret"
	"github.com/lbcert/lbcert/internal/store"
)

// fleetOptions are the global fleet-mode settings (README "A pool of
// load balancers").
type fleetOptions struct{ fleet.Settings }

func (f *fleetOptions) register(pf *pflag.FlagSet) {
	pf.StringVar(&f.Redis, "redis", "", "fleet mode: the shared Redis, redis://HOST:PORT/DB, rediss:// (TLS) or redis-sentinel://S1:PORT,S2:PORT/MASTER/DB; the password never goes here")
	pf.StringVar(&f.PasswordFile, "redis-password-file", "", "file holding the Redis password (or set LBCERT_REDIS_PASSWORD); never passed in argv")
	pf.StringVar(&f.CA, "redis-ca", "", "PEM file of roots that sign the Redis server's certificate (rediss://, private CA)")
	pf.DurationVar(&f.LeaseTTL, "lease-ttl", fleet.DefaultLeaseTTL, "fleet mode: how long a node that stalls keeps a name before another may order it")
	pf.SetAnnotation("lease-ttl", config.WantAnnotation, []string{fleet.LeaseTTLRange})
	pf.IntVar(&f.LedgerCap, "ledger-cap", fleet.DefaultLedgerCap, "fleet mode: most certificates for one exact set of names in 7 days, fleet-wide (Let's Encrypt allows 5)")
	pf.BoolVar(&f.NoOrder, "no-order", false, "fleet mode: this node never orders (renewals stay on a dedicated node); its agent still answers tokens")
}

// redisPassword is LBCERT_REDIS_PASSWORD's value.
func (a *app) redisPassword() string { return a.getenv(config.EnvName("redis-password")) }

// openFleet opens this node's fleet for a command (fleetMode.open).
func (a *app) openFleet(ctx context.Context, st *store.Store, command string) (*fleet.Conn, error) {
	c, err := a.fleetOpts.Connect(ctx, a.redisPassword(), st)
	if err != nil {
		return nil, a.fleetDown(ctx, st, command, err)
	}
	return c, nil
}

// fleetDown mails the report of a run that could not start because
// Redis did not answer: cron's mail must say why nothing was renewed,
// not stay silent. It returns err, the run's error.
func (a *app) fleetDown(ctx context.Context, st *store.Store, command string, err error) error {
	if command == "agent" || !errors.As(err, new(*rdb.Unavailable)) {
		return err
	}
	rep := &notify.Report{Command: command, Items: []notify.Item{{
		Name: "fleet", Outcome: "failed", Error: secret.OneLine(err),
		Hint: "nothing was ordered: no order is placed without the fleet's Redis; certificates already on this node keep being served",
	}}}
	if merr := a.mailReport(ctx, st, rep); merr != nil {
		a.say.warningf("could not mail the report: %s", merr)
	}
	return err
}

func (a *app) newFleetCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "fleet",
		Short: "Manage a pool of load balancers that share one Redis",
		Long: `A fleet is a pool of load balancers that share one Redis (--redis). Any
node may run issue, batch or renew: a per-name lease in Redis makes exactly
one node order each name, every node's agent answers every HTTP-01 token,
and private keys leave a node only sealed (AES-256-GCM) under the fleet's
data key, which is wrapped (age X25519) for each approved node.

  lbcert --redis URL fleet init                   the first node; imports its --dir
  lbcert --redis URL fleet join --node lb2        on lb2: prints its fingerprint
  lbcert --redis URL fleet approve lb2 --fingerprint age1...   on a member
  lbcert --redis URL fleet remove lb3             rotates the data key

See README "A pool of load balancers".`,
	}
	cmd.PersistentFlags().DurationVar(&a.fleetWait, "wait-lock", time.Minute, "how long init, join, approve and remove wait for this node's short write lock (an install by its agent or a run)")
	cmd.AddCommand(a.newFleetInitCmd(), a.newFleetJoinCmd(), a.newFleetApproveCmd(), a.newFleetRemoveCmd(), a.newFleetStatusCmd(), a.newFleetRolloutCmd())
	return cmd
}

func (a *app) newFleetInitCmd() *cobra.Command {
	var node string
	cmd := &cobra.Command{
		Use:   "init",
		Short: "Create a fleet in an empty Redis, with this node as its first member",
		Long: `Init creates the fleet: a fleet ID, a random data key wrapped for this
node's new identity (kept in <dir>/fleet/, 0600, never sent anywhere),
and this node as the first member. It then publishes every lineage and
account in --dir, keys sealed, so the other nodes never order them again.
It refuses a Redis that already holds a fleet.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			return a.withRedis(cmd.Context(), func(sh *rdb.Shared, st *store.Store) error {
				n, err := fleet.Init(cmd.Context(), sh, st, nodeName(node))
				if err != nil {
					return err
				}
				count, err := n.Import(cmd.Context())
				if err != nil {
					return err
				}
				a.printf("created fleet %s in %s with node %s\n", n.ID, sh.Addr(), n.Name)
				a.printf("imported %d lineages from %s\n", count, st.Dir)
				a.printf("fingerprint: %s\n", n.Fingerprint())
				return nil
			})
		},
	}
	cmd.Flags().StringVar(&node, "node", "", "this node's name in the fleet (default the host name)")
	return cmd
}

func (a *app) newFleetJoinCmd() *cobra.Command {
	var node string
	cmd := &cobra.Command{
		Use:   "join",
		Short: "Ask to join the fleet; prints this node's fingerprint for approval",
		Long: `Join makes this node's identity (an age X25519 key in <dir>/fleet/, 0600)
and leaves a join request in Redis. Read the printed fingerprint on this
node and approve it on a member with 'fleet approve NODE --fingerprint'.
Until then this node can read no key.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			return a.withRedis(cmd.Context(), func(sh *rdb.Shared, st *store.Store) error {
				node := nodeName(node)
				fp, id, err := fleet.Join(cmd.Context(), sh, st, node)
				if err != nil {
					return err
				}
				a.printf("node %s asked to join fleet %s\n", node, id)
				a.printf("fingerprint: %s\n", fp)
				a.printf("on a member run: lbcert --redis URL fleet approve %s --fingerprint %s\n", node, fp)
				return nil
			})
		},
	}
	cmd.Flags().StringVar(&node, "node", "", "this node's name in the fleet (default the host name)")
	return cmd
}

func (a *app) newFleetApproveCmd() *cobra.Command {
	var fp string
	cmd := &cobra.Command{
		Use:   "approve NODE --fingerprint age1...",
		Short: "Let a node that asked to join read the fleet's keys",
		Long: `Approve wraps the fleet's data key for NODE's identity, if NODE's join
request carries exactly the fingerprint given: read it on NODE itself
('fleet join' prints it). A different fingerprint is refused, because
the request then did not come from that node.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if fp == "" {
				return fmt.Errorf("--fingerprint is required: the age1... that 'fleet join' printed on %s", args[0])
			}
			return a.withMember(cmd.Context(), func(n *fleet.Node) error {
				if err := n.Approve(cmd.Context(), args[0], fp); err != nil {
					return err
				}
				a.printf("approved %s in fleet %s\n", args[0], n.ID)
				return nil
			})
		},
	}
	cmd.Flags().StringVar(&fp, "fingerprint", "", "the joining node's fingerprint (age1...), as it printed it")
	return cmd
}

func (a *app) newFleetRemoveCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "remove NODE",
		Short: "Take a node out of the fleet and rotate the data key",
		Long: `Remove deletes NODE's membership and wrapped keys, makes a new data key
for the remaining members, and re-seals every certificate and account
key under it: NODE can open nothing published afterwards. Keys NODE held
before stay known to it: renew those certificates if that matters (for
a node that was stolen, say), and change the Redis password too.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return a.withMember(cmd.Context(), func(n *fleet.Node) error {
				count, err := n.Remove(cmd.Context(), args[0])
				if err != nil {
					return err
				}
				a.printf("removed %s from fleet %s; data key rotated to epoch %d, %d keys re-sealed\n", args[0], n.ID, n.Epoch(), count)
				return nil
			})
		},
	}
}

// newFleetRolloutCmd parses 'fleet rollout's flags (issue 28); package fleet does the rest.
func (a *app) newFleetRolloutCmd() *cobra.Command {
	o := &fleet.RolloutSettings{}
	verb := func(use, short string, nargs int) *cobra.Command {
		return &cobra.Command{Use: use, Short: short, Args: cobra.ExactArgs(nargs), RunE: func(c *cobra.Command, args []string) error {
			return a.withMember(c.Context(), func(n *fleet.Node) error { return n.Rollout(c.Context(), c.Name(), args, o, a.out) })
		}}
	}
	set := verb("set --wave SPEC [--wave SPEC...]", "Set the fleet's waves, soak time, probe and expiry margin", 0)
	set.PreRunE = func(*cobra.Command, []string) error { _, err := o.Config(); return err } // bad input never reaches Redis
	f := set.Flags()
	f.StringArrayVar(&o.Waves, "wave", nil, "one wave, in order: node names (lb1,lb2), a count (2), a percentage (25%) or rest (repeatable)")
	f.DurationVar(&o.Soak, "soak", fleet.DefaultSoak, "how long a wave serves a new version, checked, before the next wave gets it")
	f.StringVar(&o.Probe, "probe", "", "an https URL fetched through each node's load balancer once it serves the new version ({name} is the certificate's first name), chain verified")
	f.IntVar(&o.ProbeStatus, "probe-status", 200, "the HTTP status the probe must answer")
	f.StringVar(&o.Margin, "expiry-margin", "15%", "the part of a certificate's lifetime before its expiry in which a held rollout is overridden")
	resume := verb("resume NAME", "Move a held rollout on: its wave is checked again, then the rollout goes on", 1)
	resume.Flags().BoolVar(&o.SkipWave, "skip-wave", false, "count the current wave as passed and release the next at once")
	cmd := &cobra.Command{Use: "rollout", Short: "Roll new certificates out in waves: a canary first, checked, then the rest", Long: `A new version reaches one wave of nodes at a time, each checked (TLS, probe,
soak) before the next; a failed check holds it. See README "Staged rollouts".`}
	off := verb("off", "Roll every new version out to every node at once, as without waves", 0)
	off.Flags().BoolVarP(&o.Yes, "yes", "y", false, "release held and aborted rollouts to every node too")
	config.Exclude(off.Flags(), "yes") // a standing yes would release a held version without asking
	cmd.AddCommand(set, resume, verb("abort NAME", "Keep the version before NAME's rollout on every node", 1), off)
	return cmd
}

// withRedis runs f with the fleet's Redis and this node's state
// directory, under the short write lock (fleet.Settings.Locked).
func (a *app) withRedis(ctx context.Context, f func(*rdb.Shared, *store.Store) error) error {
	st := store.New(a.global.Dir)
	return a.fleetOpts.Locked(ctx, a.redisPassword(), st, a.fleetWait, func(sh *rdb.Shared) error { return f(sh, st) })
}

// readMember runs f with this node's open fleet and no lock: what only
// reads the fleet (status) never waits for, or fails on, a run.
func (a *app) readMember(ctx context.Context, f func(*fleet.Node) error) error {
	c, err := a.fleetOpts.Connect(ctx, a.redisPassword(), store.New(a.global.Dir))
	if err != nil {
		return err
	}
	defer c.Close()
	return f(c.Node)
}

// withMember runs f with this node's open fleet, under the short write
// lock.
func (a *app) withMember(ctx context.Context, f func(*fleet.Node) error) error {
	return a.withRedis(ctx, func(sh *rdb.Shared, st *store.Store) error {
		n, err := fleet.Open(ctx, sh, st)
		if err != nil {
			return err
		}
		return f(n)
	})
}

// nodeName is --node, or the host name.
func nodeName(flag string) string {
	if flag == "" {
		flag, _ = os.Hostname()
	}
	return flag
}

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
			return fmt.Errorf("--metrics-file: %w", unwrapPath(err))
		}
	}
	if o.json {
		a.printJSON(st)
	} else {
		st.Table(a.out, a.now())
	}
	if st.OK {
		return nil
	}
	return mark(hint.Wrap(errors.New(st.Problems()), "%s", st.Hint()), errPartial)
}
