package main

import (
	"context"
	"fmt"
	"strings"

	"github.com/spf13/pflag"

	"github.com/lbcert/lbcert/internal/batch"
	"github.com/lbcert/lbcert/internal/deploy"
	"github.com/lbcert/lbcert/internal/engine"
	"github.com/lbcert/lbcert/internal/fleet"
	"github.com/lbcert/lbcert/internal/hint"
	"github.com/lbcert/lbcert/internal/issuer"
	"github.com/lbcert/lbcert/internal/pace"
	"github.com/lbcert/lbcert/internal/store"
)

// fleetMode is a pool of load balancers sharing one Redis: the catalog
// is the fleet's, every node's agent answers every HTTP-01 token, and
// each node deploys every certificate with its own settings (its
// agent's), whoever ordered it.
type fleetMode struct{ a *app }

// fleetChallenge refuses a challenge flag in fleet mode: the agents
// answer every token, and a run binding its own listener would answer
// for one node only.
func fleetChallenge(what string) error {
	return hint.Wrap(fmt.Errorf("%s is not used in fleet mode: every node's 'lbcert agent' answers HTTP-01 for the fleet; drop it", what), "start 'lbcert --redis URL agent --http-addr ADDR' on every node behind the address the CA validates")
}

func (fleetMode) challenge(c challengeFlags) (store.Challenge, error) {
	switch {
	case c.webroot != "":
		return store.Challenge{}, fleetChallenge("--webroot")
	case c.standalone:
		return store.Challenge{}, fleetChallenge("--standalone")
	case c.addrSet && !c.batch:
		return store.Challenge{}, fleetChallenge("--http-addr")
	}
	return store.Challenge{Mode: "fleet"}, nil
}

func (fleetMode) rowChallenge(row *batch.Row, _ store.Challenge) (store.Challenge, string) {
	if row.Challenge.Mode != "" {
		return store.Challenge{}, "the row names a challenge (ACMEPort, webroot or http_addr), which fleet mode does not use: every node's 'lbcert agent' answers HTTP-01; leave the column empty"
	}
	if row.Deploy != "" {
		return store.Challenge{}, "the row names a deploy target, which fleet mode does not use: every node deploys with its own agent's settings; leave the column empty"
	}
	return store.Challenge{Mode: "fleet"}, ""
}

func (m fleetMode) mayOrder(command string) error {
	if m.a.fleetOpts.NoOrder {
		return fmt.Errorf("%s: this node is set never to order (--no-order, or 'no-order' in the config file); run it on a node that orders", command)
	}
	return nil
}

// deploy refuses deploy flags on a command that orders: in a fleet, how
// a node deploys is its agent's setting, for every certificate.
func (fleetMode) deploy(d *deployFlags, _ string, _ *store.Deploy) (store.Deploy, error) {
	var given []string
	d.fs.Visit(func(f *pflag.Flag) {
		if isDeployFlag(f.Name) {
			given = append(given, "--"+f.Name)
		}
	})
	if len(given) > 0 {
		return store.Deploy{}, hint.Wrap(fmt.Errorf("%s: in fleet mode every node deploys with its own agent's settings, whoever orders", strings.Join(given, ", ")), "give the deploy flags to 'lbcert --redis URL agent' on each node, and drop them here")
	}
	return store.Deploy{}, nil
}

// isDeployFlag says whether a flag is one of the deploy settings.
func isDeployFlag(name string) bool {
	return strings.HasPrefix(name, "deploy") || strings.HasPrefix(name, "nginx") || strings.HasPrefix(name, "haproxy") ||
		name == "reload-cmd" || name == "verify-addr" || name == "verify-roots" || name == "hook-timeout"
}

func (m fleetMode) open(ctx context.Context, command string) (*host, error) {
	a := m.a
	st := store.New(a.global.Dir)
	f, err := a.openFleet(ctx, st, command)
	if err != nil {
		return nil, err
	}
	cat := fleet.NewCatalog(f.Node)
	runner := &deploy.Runner{Store: st, Opts: a.deployOptions()}
	settings := fleet.NodeDeploy(st)
	return &host{
		st: st, catalog: cat, accounts: cat, where: "the fleet",
		node: &engine.Node{
			Local: st, Deploy: runner, Keep: a.global.Keep,
			Settings: func(*store.Lineage) store.Deploy { return settings },
			Lock:     fleet.WriteLock(st),
			Report:   fleet.ReportServed(f.Node),
		},
		// One budget for the fleet: the CA counts per account and
		// domain, whichever node orders; and the fleet's ledger of
		// certificates per exact set of names.
		budget: func(l pace.Limits) (engine.Budget, *pace.Budget, error) {
			b := pace.OpenShared(fleet.PaceStore{Shared: f.Shared}, l, a.now)
			return &fleet.Budget{Pace: b, N: f.Node, Cap: a.fleetOpts.LedgerCap, Now: a.now}, b, nil
		},
		tokens:      func(is *issuer.Issuer) { is.Fleet = &fleet.Tokens{N: f.Node} },
		prepare:     f.Node.PublishSpool,
		after:       func(ctx context.Context) { a.writeFleetMetrics(ctx, f.Node) },
		served:      f.Node.ServingByLineage,
		failedNames: func() ([]string, error) { return nil, nil },
		close:       f.Close,
	}, nil
}
