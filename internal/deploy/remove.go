package deploy

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"strings"

	"github.com/lbcert/lbcert/internal/store"
)

// Reference is a place in a load balancer's config that still uses a
// lineage's files.
type Reference struct {
	File string // the config file, as nginx -T names it, or the HAProxy config
	Line string // the line that refers to the lineage
}

// References finds config lines that use lineage name's files, so that
// delete never breaks the next reload. For nginx it reads "nginx -T", which
// follows every include; for HAProxy, the config file. A "crt DIR" line
// that names the whole certificate directory is not a reference: dropping
// one file from it is how HAProxy is meant to be used. Neither are the
// lines of managed, the nginx include files lbcert itself rewrites
// without the lineage.
func (r *Runner) References(ctx context.Context, name string, d store.Deploy, managed map[string]bool) ([]Reference, error) {
	paths := []string{
		r.Store.LivePaths(name).Dir + "/",
		r.Store.ArchiveDir(name) + "/",
	}
	var refs []Reference
	file := ""
	scan := func(line string) {
		if f, ok := strings.CutPrefix(line, "# configuration file "); ok {
			file = strings.TrimSuffix(f, ":")
			return
		}
		trimmed := strings.TrimSpace(line)
		if strings.HasPrefix(trimmed, "#") || managed[file] {
			return
		}
		for _, p := range paths {
			if strings.Contains(line+"/", p) || strings.Contains(line, p) {
				refs = append(refs, Reference{File: file, Line: trimmed})
				return
			}
		}
	}
	switch d.Target {
	case "nginx":
		// Streamed, not kept: with an include file of 100,000 lineages
		// "nginx -T" prints tens of megabytes.
		out, err := runLines(ctx, testLimit(d), scan, d.NginxBin, "-T", "-c", d.NginxConf)
		if err != nil {
			return nil, cmdError(fmt.Sprintf("nginx -T -c %s", d.NginxConf), err, out)
		}
	case "haproxy":
		data, err := os.ReadFile(d.HAProxyConf)
		if err != nil {
			return nil, err
		}
		paths = append(paths, PEMPath(d.HAProxyCerts, name))
		scan("# configuration file " + d.HAProxyConf + ":")
		for _, line := range strings.Split(string(data), "\n") {
			scan(line)
		}
	}
	return refs, nil
}

// Unlist rewrites d's include file without lineage name, tests nginx and
// reloads it, so that nginx lets go of the lineage before its files go.
// On a failed test or reload the file is put back byte for byte, unless
// keep is set (delete --force: the files go anyway, and a file naming
// them would break every later reload).
func (r *Runner) Unlist(ctx context.Context, name string, d store.Deploy, keep bool) error {
	undo, err := r.writeSites(d, func(n string) bool { return n == name })
	if err != nil {
		return fmt.Errorf("write nginx include %s: %v", d.NginxInclude, err)
	}
	failed := nginxReload(ctx, d)
	err = failed
	if err != nil && !keep {
		if uerr := undo(); uerr != nil {
			err = fmt.Errorf("%v; and restoring %s failed: %v", err, d.NginxInclude, uerr)
		}
	}
	if !keep {
		settle(failed) // with keep, the file stays as the master read it
	}
	return err
}

// Remove takes a deleted lineage out of its load balancer: the HAProxy
// PEM goes (over the runtime API when there is a socket), and the load
// balancer is tested and reloaded so it lets go of the files. nginx
// with an include file was reloaded by Unlist before the files went.
func (r *Runner) Remove(ctx context.Context, name string, d store.Deploy) error {
	switch d.Target {
	case "nginx":
		if d.NginxInclude != "" {
			return nil // Unlist tested and reloaded nginx without the lineage
		}
		return nginxReload(ctx, d)
	case "haproxy":
		pemPath := PEMPath(d.HAProxyCerts, name)
		if err := os.Remove(pemPath); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return err
		}
		if d.HAProxySocket != "" {
			api := &runtimeAPI{addr: d.HAProxySocket}
			err1 := api.expect(ctx, "del ssl crt-list "+filepath.Clean(d.HAProxyCerts)+" "+pemPath, "deleted")
			err2 := api.expect(ctx, "del ssl cert "+pemPath, "deleted")
			if err1 == nil && err2 == nil {
				return nil
			}
			slog.Warn("haproxy runtime API removal failed", "err", errors.Join(err1, err2))
			if d.ReloadCmd == "" {
				return errors.Join(err1, err2)
			}
		}
		limit := testLimit(d)
		if out, err := run(ctx, limit, nil, "", d.HAProxyBin, "-c", "-f", d.HAProxyConf); err != nil {
			return cmdError(fmt.Sprintf("haproxy -c -f %s failed", d.HAProxyConf), err, out)
		}
		if out, err := run(ctx, limit, nil, d.ReloadCmd); err != nil {
			return cmdError(fmt.Sprintf("reload command %q failed", d.ReloadCmd), err, out)
		}
	}
	return nil
}
