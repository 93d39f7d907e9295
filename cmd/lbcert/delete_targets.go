package main

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"

	"github.com/lbcert/lbcert/internal/deploy"
	"github.com/lbcert/lbcert/internal/hint"
	"github.com/lbcert/lbcert/internal/store"
)

// lbTarget is one load balancer config that delete must not break.
type lbTarget struct {
	d store.Deploy
	// own: the deleted lineage deploys to it, and a config that cannot
	// be checked stops the delete. Other lineages' configs and the
	// usual files are checked too, but a failure to read one (a config
	// since moved, say) is only a warning: it would otherwise block
	// every delete.
	own bool
}

// deleteTargets lists the configs delete checks: the deleted lineage's
// own target, every other lineage's of this state directory (a lineage
// issued without --deploy is still named by the config another lineage
// deploys to, and by every --nginx-include file), and the usual
// configs when they exist.
func deleteTargets(st *store.Store, own store.Deploy) []lbTarget {
	var out []lbTarget
	seen := map[string]bool{}
	add := func(d store.Deploy, own bool) {
		k := lbKey(d)
		if d.Target == "" || seen[k] {
			return
		}
		seen[k] = true
		out = append(out, lbTarget{d: d, own: own})
	}
	add(own, true)
	all, err := st.Names()
	if err != nil {
		slog.Warn("delete: cannot list the other lineages' deploy targets", "err", err)
	}
	for _, n := range all {
		if l, err := st.Load(n); err == nil {
			add(l.Deploy, false)
		}
	}
	if _, err := os.Stat(defaultNginxConf); err == nil {
		if bin, err := findBin("--nginx-bin", "nginx"); err == nil {
			add(store.Deploy{Target: "nginx", NginxConf: defaultNginxConf, NginxBin: bin}, false)
		}
	}
	if _, err := os.Stat(defaultHAProxyConf); err == nil {
		certs, _ := filepath.Abs(filepath.Join(st.Dir, "haproxy"))
		add(store.Deploy{Target: "haproxy", HAProxyConf: defaultHAProxyConf, HAProxyCerts: certs}, false)
	}
	return out
}

// lbKey is what makes two targets' reference checks the same: a config
// read the same way for the same files. An include file and its body are
// part of it: that target rewrites the file.
func lbKey(d store.Deploy) string {
	switch d.Target {
	case "nginx":
		return strings.Join([]string{d.Target, d.NginxBin, d.NginxConf, d.NginxInclude}, "\x00")
	case "haproxy":
		return strings.Join([]string{d.Target, d.HAProxyConf, d.HAProxyCerts}, "\x00")
	}
	return d.Target
}

// checkReferences refuses to delete a lineage whose files a config still
// names, unless force. The include files lbcert writes are not
// references: delete takes the lineage out of them itself.
func checkReferences(ctx context.Context, runner *deploy.Runner, st *store.Store, name string, targets []lbTarget, force bool) error {
	managed := map[string]bool{}
	for _, t := range targets {
		if t.d.NginxInclude != "" {
			managed[t.d.NginxInclude] = true
		}
	}
	checked := map[string]bool{}
	for _, t := range targets {
		// One "nginx -T" per config: the include file does not change
		// what it shows of the operator's own files.
		k := lbKey(store.Deploy{Target: t.d.Target, NginxBin: t.d.NginxBin, NginxConf: t.d.NginxConf, HAProxyConf: t.d.HAProxyConf, HAProxyCerts: t.d.HAProxyCerts})
		if checked[k] {
			continue
		}
		checked[k] = true
		refs, err := runner.References(ctx, name, t.d, managed)
		if err != nil {
			if !t.own || force {
				slog.Warn("delete: could not check a load balancer config for references", "config", confOf(t.d), "err", err)
				continue
			}
			return hint.Wrap(fmt.Errorf("check %s config for references to %s: %w", t.d.Target, name, err), "fix the config, or pass --force to delete without checking")
		}
		if len(refs) > 0 && !force {
			return hint.Wrap(fmt.Errorf("%s config still uses %s: %s: %s", t.d.Target, name, refs[0].File, refs[0].Line), "remove the %d line(s) that use %s first, or pass --force to delete anyway", len(refs), st.LivePaths(name).Dir)
		}
	}
	return nil
}

func confOf(d store.Deploy) string {
	if d.Target == "haproxy" {
		return d.HAProxyConf
	}
	return d.NginxConf
}

// unlistNginx takes the lineage's block out of every nginx include file,
// each rewritten, tested and reloaded once. With force a failure is a
// warning and the file stays without the block, since the files it
// names are about to go.
func (a *app) unlistNginx(ctx context.Context, runner *deploy.Runner, name string, targets []lbTarget, force bool) error {
	done := map[string]bool{}
	for _, t := range targets {
		if t.d.Target != "nginx" || t.d.NginxInclude == "" || done[t.d.NginxInclude] {
			continue
		}
		done[t.d.NginxInclude] = true
		err := runner.Unlist(ctx, name, t.d, force)
		if err == nil {
			a.printf("%s: removed from %s, nginx reloaded\n", name, t.d.NginxInclude)
			continue
		}
		if !force {
			return err
		}
		slog.Warn("delete --force: nginx include rewritten without the lineage, but nginx failed", "file", t.d.NginxInclude, "err", err)
	}
	return nil
}
