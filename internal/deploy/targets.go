package deploy

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"

	"github.com/lbcert/lbcert/internal/hint"
	"github.com/lbcert/lbcert/internal/store"
)

// Target is one load balancer config that delete must not break.
type Target struct {
	Deploy store.Deploy
	// own: the deleted lineage deploys to it, and a config that cannot
	// be checked stops the delete. Other lineages' configs and the
	// usual files are checked too, but a failure to read one (a config
	// since moved, say) is only a warning: it would otherwise block
	// every delete.
	Own bool
}

// DeleteTargets lists the configs a delete checks: the deleted lineage's
// own target, every other lineage's in the store (a lineage issued
// without --deploy is still named by the config another lineage deploys
// to, and by every --nginx-include file), and the usual configs when
// they exist. stateDir places the default HAProxy directory.
func (r *Runner) DeleteTargets(own store.Deploy, stateDir string) []Target {
	var out []Target
	seen := map[string]bool{}
	add := func(d store.Deploy, own bool) {
		k := lbKey(d)
		if d.Target == "" || seen[k] {
			return
		}
		seen[k] = true
		out = append(out, Target{Deploy: d, Own: own})
	}
	add(own, true)
	all, err := r.Store.Names()
	if err != nil {
		slog.Warn("delete: cannot list the other lineages' deploy targets", "err", err)
	}
	for _, n := range all {
		if l, err := r.Store.Load(n); err == nil {
			add(l.Deploy, false)
		}
	}
	if _, err := os.Stat(DefaultNginxConf); err == nil {
		if bin, err := FindBin("--nginx-bin", "nginx"); err == nil {
			add(store.Deploy{Target: "nginx", NginxConf: DefaultNginxConf, NginxBin: bin}, false)
		}
	}
	if _, err := os.Stat(DefaultHAProxyConf); err == nil {
		certs, _ := filepath.Abs(filepath.Join(stateDir, "haproxy"))
		add(store.Deploy{Target: "haproxy", HAProxyConf: DefaultHAProxyConf, HAProxyCerts: certs}, false)
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

// CheckReferences refuses to delete a lineage whose files a config
// still names, unless force. The include files lbcert writes are not
// references: delete takes the lineage out of them itself.
func (r *Runner) CheckReferences(ctx context.Context, name string, targets []Target, force bool) error {
	managed := map[string]bool{}
	for _, t := range targets {
		if t.Deploy.NginxInclude != "" {
			managed[t.Deploy.NginxInclude] = true
		}
	}
	checked := map[string]bool{}
	for _, t := range targets {
		// One "nginx -T" per config: the include file does not change
		// what it shows of the operator's own files.
		k := lbKey(store.Deploy{Target: t.Deploy.Target, NginxBin: t.Deploy.NginxBin, NginxConf: t.Deploy.NginxConf, HAProxyConf: t.Deploy.HAProxyConf, HAProxyCerts: t.Deploy.HAProxyCerts})
		if checked[k] {
			continue
		}
		checked[k] = true
		refs, err := r.References(ctx, name, t.Deploy, managed)
		if err != nil {
			if !t.Own || force {
				slog.Warn("delete: could not check a load balancer config for references", "config", confOf(t.Deploy), "err", err)
				continue
			}
			return hint.Wrap(fmt.Errorf("check %s config for references to %s: %w", t.Deploy.Target, name, err), "fix the config, or pass --force to delete without checking")
		}
		if len(refs) > 0 && !force {
			return hint.Wrap(fmt.Errorf("%s config still uses %s: %s: %s", t.Deploy.Target, name, refs[0].File, refs[0].Line), "remove the %d line(s) that use %s first, or pass --force to delete anyway", len(refs), r.Store.LivePaths(name).Dir)
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

// UnlistAll takes the lineage's block out of every nginx include file,
// each rewritten, tested and reloaded once, and returns the files it
// changed. With force a failure is a warning and the file stays without
// the block, since the files it names are about to go.
func (r *Runner) UnlistAll(ctx context.Context, name string, targets []Target, force bool) ([]string, error) {
	done := map[string]bool{}
	var changed []string
	for _, t := range targets {
		if t.Deploy.Target != "nginx" || t.Deploy.NginxInclude == "" || done[t.Deploy.NginxInclude] {
			continue
		}
		done[t.Deploy.NginxInclude] = true
		err := r.Unlist(ctx, name, t.Deploy, force)
		if err == nil {
			changed = append(changed, t.Deploy.NginxInclude)
			continue
		}
		if !force {
			return changed, err
		}
		slog.Warn("delete --force: nginx include rewritten without the lineage, but nginx failed", "file", t.Deploy.NginxInclude, "err", err)
	}
	return changed, nil
}
