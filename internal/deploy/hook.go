package deploy

import (
	"context"
	"fmt"
	"log/slog"
	"strings"
	"time"
)

// DefaultHookTimeout bounds a deploy hook that sets none.
const DefaultHookTimeout = 2 * time.Minute

// HookEnv is the environment a deploy hook sees. It includes certbot's
// RENEWED_LINEAGE and RENEWED_DOMAINS so existing certbot deploy hooks
// work unchanged.
func (r *Runner) HookEnv(c Change) []string {
	p := r.Store.LivePaths(c.Name)
	domains := strings.Join(c.Domains, " ")
	return []string{
		"LBCERT_NAME=" + c.Name,
		"LBCERT_DOMAINS=" + domains,
		"LBCERT_CERT_PATH=" + p.Cert,
		"LBCERT_KEY_PATH=" + p.Key,
		"LBCERT_CHAIN_PATH=" + p.Chain,
		"LBCERT_FULLCHAIN_PATH=" + p.Fullchain,
		"LBCERT_SERIAL=" + c.Serial,
		"RENEWED_LINEAGE=" + p.Dir,
		"RENEWED_DOMAINS=" + domains,
	}
}

func (r *Runner) hook(ctx context.Context, c Change, res *Result) {
	timeout := time.Duration(c.Deploy.HookTimeout) * time.Second
	if timeout <= 0 {
		timeout = DefaultHookTimeout
	}
	out, err := run(ctx, timeout, r.HookEnv(c), c.Deploy.Hook)
	if err != nil {
		res.Hook = "failed"
		if res.Err == nil {
			res.Err = cmdError(fmt.Sprintf("deploy hook %q", c.Deploy.Hook), err, out)
		}
		return
	}
	res.Hook = "ok"
	slog.Info("deploy hook ran", "name", c.Name, "hook", c.Deploy.Hook)
	if out != "" {
		slog.Debug("deploy hook output", "name", c.Name, "output", out)
	}
}
