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
// one file from it is how HAProxy is meant to be used.
func (r *Runner) References(ctx context.Context, name string, d store.Deploy) ([]Reference, error) {
	paths := []string{
		r.Store.LivePaths(name).Dir + "/",
		r.Store.ArchiveDir(name) + "/",
	}
	var text string
	switch d.Target {
	case "nginx":
		out, err := run(ctx, commandTimeout, nil, "", d.NginxBin, "-T", "-c", d.NginxConf)
		if err != nil {
			return nil, cmdError(fmt.Sprintf("nginx -T -c %s", d.NginxConf), err, out)
		}
		text = out
	case "haproxy":
		data, err := os.ReadFile(d.HAProxyConf)
		if err != nil {
			return nil, err
		}
		text = "# configuration file " + d.HAProxyConf + ":\n" + string(data)
		paths = append(paths, PEMPath(d.HAProxyCerts, name))
	default:
		return nil, nil
	}
	var refs []Reference
	file := ""
	for _, line := range strings.Split(text, "\n") {
		if f, ok := strings.CutPrefix(line, "# configuration file "); ok {
			file = strings.TrimSuffix(f, ":")
			continue
		}
		trimmed := strings.TrimSpace(line)
		if strings.HasPrefix(trimmed, "#") {
			continue
		}
		for _, p := range paths {
			if strings.Contains(line+"/", p) || strings.Contains(line, p) {
				refs = append(refs, Reference{File: file, Line: trimmed})
				break
			}
		}
	}
	return refs, nil
}

// Remove takes a deleted lineage out of its load balancer: the HAProxy
// PEM goes (over the runtime API when there is a socket), and the load
// balancer is tested and reloaded so it lets go of the files.
func (r *Runner) Remove(ctx context.Context, name string, d store.Deploy) error {
	switch d.Target {
	case "nginx":
		if out, err := run(ctx, commandTimeout, nil, "", d.NginxBin, "-t", "-c", d.NginxConf); err != nil {
			return cmdError(fmt.Sprintf("nginx -t -c %s failed", d.NginxConf), err, out)
		}
		if d.ReloadCmd != "" {
			out, err := run(ctx, commandTimeout, nil, d.ReloadCmd)
			if err != nil {
				return cmdError(fmt.Sprintf("reload command %q failed", d.ReloadCmd), err, out)
			}
			return nil
		}
		if out, err := run(ctx, commandTimeout, nil, "", d.NginxBin, "-s", "reload", "-c", d.NginxConf); err != nil {
			return cmdError("reload nginx", err, out)
		}
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
		if out, err := run(ctx, commandTimeout, nil, "", d.HAProxyBin, "-c", "-f", d.HAProxyConf); err != nil {
			return cmdError(fmt.Sprintf("haproxy -c -f %s failed", d.HAProxyConf), err, out)
		}
		if out, err := run(ctx, commandTimeout, nil, d.ReloadCmd); err != nil {
			return cmdError(fmt.Sprintf("reload command %q failed", d.ReloadCmd), err, out)
		}
	}
	return nil
}
