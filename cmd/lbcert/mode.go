package main

import (
	"context"
	"fmt"

	"github.com/spf13/pflag"

	"github.com/lbcert/lbcert/internal/batch"
	"github.com/lbcert/lbcert/internal/catalog"
	"github.com/lbcert/lbcert/internal/challenge"
	"github.com/lbcert/lbcert/internal/config"
	"github.com/lbcert/lbcert/internal/deploy"
	"github.com/lbcert/lbcert/internal/engine"
	"github.com/lbcert/lbcert/internal/hint"
	"github.com/lbcert/lbcert/internal/inventory"
	"github.com/lbcert/lbcert/internal/issuer"
	"github.com/lbcert/lbcert/internal/pace"
	"github.com/lbcert/lbcert/internal/store"
)

// mode is a single host or a fleet, chosen once (a.mode) from the
// settings: --redis makes it a fleet. Everything a command does
// differently between the two goes through it; no command asks which
// one it has.
type mode interface {
	// challenge resolves the command line's challenge flags.
	challenge(c challengeFlags) (store.Challenge, error)
	// rowChallenge is a batch row's challenge, or why the row is bad.
	rowChallenge(row *batch.Row, fallback store.Challenge) (store.Challenge, string)
	// mayOrder refuses a command that orders on a node set never to.
	mayOrder(command string) error
	// deploy resolves the command line's deploy flags for a lineage.
	deploy(d *deployFlags, dir string, saved *store.Deploy) (store.Deploy, error)
	// open opens the catalog and this node for one command.
	open(ctx context.Context, command string) (*host, error)
}

// challengeFlags are the challenge settings of issue and batch.
type challengeFlags struct {
	webroot    string
	standalone bool
	httpAddr   string
	addrSet    bool // --http-addr was given
	batch      bool // batch: none given is fine (rows may name theirs)
	fs         *pflag.FlagSet
}

// host is one command's catalog and node, as its mode opened them.
type host struct {
	st       *store.Store // this node's state directory
	catalog  catalog.Catalog
	accounts catalog.Accounts
	node     *engine.Node
	where    string // for messages: the state directory, or "the fleet"
	// budget opens the run's pace budget (and, in a fleet, its ledger).
	budget func(l pace.Limits) (engine.Budget, *pace.Budget, error)
	// tokens answers HTTP-01 in a fleet (the agents); nil on one host.
	tokens func(is *issuer.Issuer)
	// prepare runs before a plan: a fleet node publishes what it kept
	// while Redis was away, so the plan sees it.
	prepare func(ctx context.Context) error
	// after runs after a run wrote its metrics: the fleet's figures.
	after func(ctx context.Context)
	// served is what each node of a fleet reports serving, by lineage
	// and node; nil on one host, where the state directory says it.
	served func(ctx context.Context) (map[string][]inventory.Serves, error)
	// failedNames are the names whose first order failed (list shows
	// them as never issued): from the state directory on one host; in a
	// fleet the run's report says them.
	failedNames func() ([]string, error)
	close       func()
}

// mode is the run's mode, from the settings.
func (a *app) mode() mode {
	if a.fleetOpts.Redis != "" {
		return fleetMode{a}
	}
	return singleHost{a}
}

// singleHost is one load balancer: the state directory is the catalog,
// and each lineage deploys with its own saved settings.
type singleHost struct{ a *app }

func (m singleHost) challenge(c challengeFlags) (store.Challenge, error) {
	a := m.a
	switch {
	case c.webroot != "" && c.standalone:
		return store.Challenge{}, config.Conflict(c.fs, "webroot", "standalone", "choose one way to answer HTTP-01")
	case c.webroot == "" && !c.standalone && c.batch:
		return store.Challenge{}, nil
	case c.webroot == "" && !c.standalone:
		return store.Challenge{}, hint.Wrap(fmt.Errorf("no challenge method: pass --webroot DIR or --standalone"), "or set it once for every command: 'webroot: /var/www/acme' (or 'standalone: true') in %s", a.configPath())
	case c.addrSet && !c.standalone && !c.batch:
		return store.Challenge{}, fmt.Errorf("--http-addr only applies with --standalone")
	}
	return challenge.Resolve(c.webroot, c.httpAddr)
}

func (singleHost) rowChallenge(row *batch.Row, fallback store.Challenge) (store.Challenge, string) {
	if row.Challenge.Mode != "" {
		return row.Challenge, ""
	}
	if fallback.Mode == "" {
		return fallback, "no challenge: the row has no ACMEPort (or webroot/http_addr column); pass --webroot DIR or --standalone"
	}
	return fallback, ""
}

func (singleHost) mayOrder(string) error { return nil }

func (singleHost) deploy(d *deployFlags, dir string, saved *store.Deploy) (store.Deploy, error) {
	return d.resolve(dir, saved)
}

func (m singleHost) open(ctx context.Context, command string) (*host, error) {
	a := m.a
	st := store.New(a.global.Dir)
	runner := &deploy.Runner{Store: st, Opts: a.deployOptions()}
	return &host{
		st: st, catalog: catalog.NewDir(st), accounts: st, where: st.Dir,
		node: &engine.Node{Local: st, Deploy: runner, Keep: a.global.Keep},
		budget: func(l pace.Limits) (engine.Budget, *pace.Budget, error) {
			b, err := a.openBudget(st, l)
			return b, b, err
		},
		tokens:      func(*issuer.Issuer) {},
		prepare:     func(context.Context) error { return nil },
		after:       func(context.Context) {},
		served:      func(context.Context) (map[string][]inventory.Serves, error) { return nil, nil },
		failedNames: st.FailedNames,
		close:       func() {},
	}, nil
}

// deployOptions are the deploy runner's settings in either mode: hooks
// end hookGrace after an interrupt, or at the second.
func (a *app) deployOptions() deploy.Options {
	return deploy.Options{HookConcurrency: a.global.HookConc, Stop: a.hookStop}
}
