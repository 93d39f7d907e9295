package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"runtime/debug"
	"strings"
	"sync"
	"time"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"

	"github.com/lbcert/lbcert/internal/config"
	"github.com/lbcert/lbcert/internal/deploy"
	"github.com/lbcert/lbcert/internal/exit"
	"github.com/lbcert/lbcert/internal/fleet"
	"github.com/lbcert/lbcert/internal/fleet/rdb"
	"github.com/lbcert/lbcert/internal/notify"
	"github.com/lbcert/lbcert/internal/secret"
	"github.com/lbcert/lbcert/internal/store"
)

// fleetOptions are the global fleet-mode settings (README "A pool of
// load balancers").
type fleetOptions struct {
	Redis        string
	PasswordFile string
	CA           string
	LeaseTTL     time.Duration
	LedgerCap    int
	NoOrder      bool
}

func (f *fleetOptions) register(pf *pflag.FlagSet) {
	pf.StringVar(&f.Redis, "redis", "", "fleet mode: the shared Redis, redis://HOST:PORT/DB, rediss:// (TLS) or redis-sentinel://S1:PORT,S2:PORT/MASTER/DB; the password never goes here")
	pf.StringVar(&f.PasswordFile, "redis-password-file", "", "file holding the Redis password (or set LBCERT_REDIS_PASSWORD); never passed in argv")
	pf.StringVar(&f.CA, "redis-ca", "", "PEM file of roots that sign the Redis server's certificate (rediss://, private CA)")
	pf.DurationVar(&f.LeaseTTL, "lease-ttl", defaultLeaseTTL, "fleet mode: how long a node that stalls keeps a name before another may order it")
	pf.IntVar(&f.LedgerCap, "ledger-cap", fleet.DefaultLedgerCap, "fleet mode: most certificates for one exact set of names in 7 days, fleet-wide (Let's Encrypt allows 5)")
	pf.BoolVar(&f.NoOrder, "no-order", false, "fleet mode: this node never orders (renewals stay on a dedicated node); its agent still answers tokens")
}

// defaultLeaseTTL is --lease-ttl's default.
const defaultLeaseTTL = 10 * time.Minute

// fleetRun is one command's open fleet.
type fleetRun struct {
	sh   *rdb.Shared
	node *fleet.Node
}

// redisExit maps a Redis that did not answer to its exit code.
func redisExit(err error) error {
	if err == nil {
		return nil
	}
	var u *rdb.Unavailable
	var e *exit.Error
	if errors.As(err, &e) && !errors.As(err, &u) {
		return err // it says its own code
	}
	if errors.As(err, &u) {
		return &exit.Error{Code: exit.Unavailable, Err: err, Hint: u.HintText()}
	}
	return exit.Errorf("%w", err)
}

// dialRedis connects to --redis with the password from the environment
// or --redis-password-file.
func (a *app) dialRedis(ctx context.Context) (*rdb.Shared, error) {
	f := &a.fleetOpts
	if f.Redis == "" {
		return nil, exit.Errorf("fleet commands need --redis (or LBCERT_REDIS, or 'redis' in the config file)")
	}
	pw := a.getenv(config.EnvName("redis-password"))
	if f.PasswordFile != "" {
		data, err := os.ReadFile(f.PasswordFile)
		if err != nil {
			return nil, exit.Errorf("--redis-password-file %s: %w", f.PasswordFile, unwrapPath(err))
		}
		pw = strings.TrimSpace(string(data))
	}
	secret.Add(pw)
	if f.LedgerCap < 1 || f.LedgerCap > 4 {
		return nil, exit.Errorf("--ledger-cap %d: want 1 to 4, below the CA's 5 per week", f.LedgerCap)
	}
	if f.LeaseTTL < time.Second {
		return nil, exit.Errorf("--lease-ttl %s: want at least 1s", f.LeaseTTL)
	}
	dctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	sh, err := rdb.Dial(dctx, rdb.Options{URL: f.Redis, Password: pw, CAFile: f.CA})
	if err != nil {
		return nil, redisExit(err)
	}
	return sh, nil
}

// openFleet opens this node's fleet for a command (fleetMode.open).
func (a *app) openFleet(ctx context.Context, st *store.Store, command string) (*fleetRun, error) {
	sh, err := a.dialRedis(ctx)
	if err != nil {
		return nil, a.fleetDown(ctx, st, command, err)
	}
	n, err := fleet.Open(ctx, sh, st)
	if err != nil {
		sh.Close()
		return nil, a.fleetDown(ctx, st, command, redisExit(err))
	}
	return &fleetRun{sh: sh, node: n}, nil
}

// fleetDown mails the report of a run that could not start because
// Redis did not answer: cron's mail must say why nothing was renewed,
// not stay silent. It returns err, the run's error.
func (a *app) fleetDown(ctx context.Context, st *store.Store, command string, err error) error {
	if command == "agent" || !errors.As(err, new(*rdb.Unavailable)) {
		return err
	}
	rep := &notify.Report{Command: command, Items: []notify.Item{{
		Name: "fleet", Outcome: "failed", Error: secret.Scrub(oneLine(err)),
		Hint: "nothing was ordered: no order is placed without the fleet's Redis; certificates already on this node keep being served",
	}}}
	if merr := a.mailReport(ctx, st, rep); merr != nil {
		fmt.Fprintf(a.err, "lbcert: warning: could not mail the report: %s\n", secret.Scrub(oneLine(merr)))
	}
	return err
}

func (f *fleetRun) close() {
	if f != nil {
		f.sh.Close()
	}
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
				return exit.Errorf("--fingerprint is required: the age1... that 'fleet join' printed on %s", args[0])
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

// withRedis runs f with the fleet's Redis and this node's state
// directory, under the state directory's short write lock: a fleet
// command changes only this node's fleet records, and must not wait for
// (or fail on) a long run of this node, which holds the long lock.
func (a *app) withRedis(ctx context.Context, f func(*rdb.Shared, *store.Store) error) error {
	st := store.New(a.global.Dir)
	sh, err := a.dialRedis(ctx)
	if err != nil {
		return err
	}
	defer sh.Close()
	wctx, cancel := context.WithTimeout(ctx, max(a.fleetWait, time.Second))
	defer cancel()
	l, err := st.WriteLock(wctx)
	var le *store.LockedError
	if errors.As(err, &le) {
		return &exit.Error{Code: exit.Locked, Msg: fmt.Sprintf("%v; waited %s", le, a.fleetWait)}
	}
	if err != nil {
		return dirError(st, err)
	}
	defer l.Unlock()
	if err := f(sh, st); err != nil {
		return redisExit(err)
	}
	return nil
}

// readMember runs f with this node's open fleet and no lock: what only
// reads the fleet (status) never waits for, or fails on, a run.
func (a *app) readMember(ctx context.Context, f func(*fleet.Node) error) error {
	st := store.New(a.global.Dir)
	sh, err := a.dialRedis(ctx)
	if err != nil {
		return err
	}
	defer sh.Close()
	n, err := fleet.Open(ctx, sh, st)
	if err == nil {
		err = f(n)
	}
	return redisExit(err)
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
	if o.httpAddr == "" {
		return exit.Errorf("--http-addr is required: where this node's agent listens, such as 127.0.0.1:8888")
	}
	advertise := o.advertise
	if advertise == "" {
		host, _, err := net.SplitHostPort(o.httpAddr)
		if err != nil {
			return exit.Errorf("--http-addr %q: %w", o.httpAddr, err)
		}
		if host == "" || host == "0.0.0.0" || host == "::" {
			return exit.Errorf("%w", fleet.ErrAdvertise)
		}
		advertise = o.httpAddr
	}
	if o.reconcile < time.Second {
		return exit.Errorf("--reconcile %s: want 1s or more", o.reconcile)
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
		return exit.Errorf("agent: fleet mode needs --redis (or LBCERT_REDIS, or 'redis' in the config file)")
	}
	ln, err := net.Listen("tcp", o.httpAddr)
	if err != nil {
		return exit.Errorf("agent: %w", err).WithHint("another process holds %s; stop it, or pick another --http-addr", o.httpAddr)
	}
	// The fleet is opened on the agent's connect goroutine, which may
	// still be dialling when Run returns: the one it opened is closed
	// here under the lock, or by itself when the agent is already gone.
	var (
		mu   sync.Mutex
		f    *fleetRun
		done bool
	)
	defer func() {
		mu.Lock()
		defer mu.Unlock()
		done = true
		f.close()
	}()
	connect := func(ctx context.Context) (*fleet.Node, error) {
		opened, err := a.openFleet(ctx, st, "agent")
		if err != nil {
			return nil, err // the agent retries a *rdb.Unavailable
		}
		mu.Lock()
		defer mu.Unlock()
		if done {
			opened.close()
			return nil, context.Canceled
		}
		f = opened
		a.printf("agent of node %s (fleet %s) connected; answering HTTP-01 on %s\n", f.node.Name, f.node.ID, ln.Addr())
		return f.node, nil
	}
	a.printf("agent answering HTTP-01 on %s; connecting to the fleet's Redis\n", ln.Addr())
	if err := a.checkKeep(); err != nil {
		return err
	}
	// The runs of this node deploy what they order with the agent's
	// settings, as the agent would (invariant I1: the ordering node
	// serves it too).
	if err := fleet.SaveNodeDeploy(st, settings); err != nil {
		return exit.Errorf("save this node's deploy settings: %w", err)
	}
	runner := &deploy.Runner{Store: st, Opts: deploy.Options{HookConcurrency: a.global.HookConc}}
	syncer := &fleet.Syncer{Local: st, Deploy: settings, Reconcile: o.reconcile, Keep: a.global.Keep, Runner: runner, Remove: runner}
	ag := &fleet.Agent{Local: st, Connect: connect, Sync: syncer, Listener: ln, Advertise: advertise,
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
// password from an environment file (never in the unit's argv), and a
// restart on failure.
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
		if strings.HasPrefix(fl.Name, "deploy") || strings.HasPrefix(fl.Name, "nginx") || strings.HasPrefix(fl.Name, "haproxy") ||
			fl.Name == "reload-cmd" || fl.Name == "verify-addr" || fl.Name == "verify-roots" || fl.Name == "hook-timeout" {
			args = append(args, "--"+fl.Name, fl.Value.String())
		}
	})
	return fmt.Sprintf(`%s
# Install: put it in /etc/systemd/system/lbcert-agent.service, put
# LBCERT_REDIS_PASSWORD=... in /etc/lbcert/agent.env (mode 0600) unless
# --redis-password-file is used, then:
#   systemctl daemon-reload && systemctl enable --now lbcert-agent
[Unit]
Description=lbcert fleet agent (HTTP-01 answers, certificate sync and deploy)
Wants=network-online.target
After=network-online.target

[Service]
Type=simple
EnvironmentFile=-/etc/lbcert/agent.env
ExecStart=%s
Restart=on-failure
RestartSec=5s
KillSignal=SIGTERM
TimeoutStopSec=30s
NoNewPrivileges=yes
PrivateTmp=yes

[Install]
WantedBy=multi-user.target
`, printedBy("lbcert-agent.service", "agent --print-systemd-unit"), execStart(args))
}

// systemdQuote quotes one ExecStart word when it needs it.
func systemdQuote(s string) string {
	if s != "" && !strings.ContainsAny(s, " \t\"'\\$%;") {
		return s
	}
	r := strings.NewReplacer(`\`, `\\`, `"`, `\"`, "$", "$$", "%", "%%")
	return `"` + r.Replace(s) + `"`
}
