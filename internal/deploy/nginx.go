package deploy

import (
	"context"
	"fmt"
	"log/slog"
	"time"
)

// commandTimeout bounds config tests and reloads, which take well under a
// second on a healthy host; a hung one must not hang cron.
const commandTimeout = 2 * time.Minute

func (r *Runner) runNginx(ctx context.Context, g *group, changes []Change, results []Result) {
	d := g.d
	// live/<name> already points at the new version: the files nginx
	// reads are in place, so test now.
	out, err := run(ctx, commandTimeout, nil, "", d.NginxBin, "-t", "-c", d.NginxConf)
	if err != nil {
		r.rollback(g, changes, results, cmdError(fmt.Sprintf("nginx -t -c %s failed", d.NginxConf), err, out), nil)
		return
	}
	if d.ReloadCmd != "" {
		out, err = run(ctx, commandTimeout, nil, d.ReloadCmd)
	} else {
		out, err = run(ctx, commandTimeout, nil, "", d.NginxBin, "-s", "reload", "-c", d.NginxConf)
	}
	if err != nil {
		what := "reload nginx"
		if d.ReloadCmd != "" {
			what = fmt.Sprintf("reload command %q failed", d.ReloadCmd)
		}
		r.rollback(g, changes, results, cmdError(what, err, out), nil)
		return
	}
	slog.Info("nginx tested and reloaded", "conf", d.NginxConf, "certificates", len(g.changes))
	for _, i := range g.changes {
		results[i].Deployed = true
	}
}
