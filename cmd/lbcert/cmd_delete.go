package main

import (
	"bufio"
	"cmp"
	"context"
	"fmt"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/lbcert/lbcert/internal/acme"
	"github.com/lbcert/lbcert/internal/catalog"
	"github.com/lbcert/lbcert/internal/config"
	"github.com/lbcert/lbcert/internal/deploy"
	"github.com/lbcert/lbcert/internal/hint"
	"github.com/lbcert/lbcert/internal/issuer"
	"github.com/lbcert/lbcert/internal/names"
	"github.com/lbcert/lbcert/internal/notify"
	"github.com/lbcert/lbcert/internal/schedule"
	"github.com/lbcert/lbcert/internal/store"
)

type deleteOptions struct {
	Name     string
	Domain   string
	Revoke   bool
	Reason   string
	Force    bool
	Yes      bool
	CronFile string
	WaitLock time.Duration
}

func (a *app) newDeleteCmd() *cobra.Command {
	o := &deleteOptions{}
	cmd := &cobra.Command{
		Use:   "delete (--name NAME | -d DOMAIN | NAME)",
		Short: "Delete a certificate lineage, optionally revoking it",
		Long: `Delete removes a lineage: live/<name>, archive/<name>, its renewal status
and its HAProxy PEM, then reloads the load balancer it deploys to. Its
server block leaves every --nginx-include file first (nginx tested and
reloaded without it; on failure nothing is deleted).

It refuses while a config still refers to the lineage's files, so that the
next reload does not fail: the nginx config (as "nginx -T" shows it,
includes and all) and the HAProxy config of every lineage in this
directory, and /etc/nginx/nginx.conf and /etc/haproxy/haproxy.cfg when
present; --force deletes anyway. With --revoke the
certificate is first revoked at the CA. On a terminal it asks for
confirmation; otherwise it needs --yes. When the last lineage is gone, the
cron entry from "lbcert cron install" is removed too.`,
		Example: `  lbcert delete --name shop.example.net --yes
  lbcert delete -d old.example.com --revoke --reason cessationOfOperation --yes`,
		Args:              cobra.MaximumNArgs(1),
		ValidArgsFunction: a.completeLineages,
		RunE: func(cmd *cobra.Command, args []string) error {
			if len(args) == 1 {
				if o.Name != "" {
					return fmt.Errorf("give the lineage once: as an argument or with --name")
				}
				o.Name = args[0]
			}
			return a.runDelete(cmd.Context(), o)
		},
	}
	f := cmd.Flags()
	f.StringVar(&o.Name, "name", "", "lineage to delete")
	f.StringVarP(&o.Domain, "domain", "d", "", "delete the lineage whose certificate covers this name")
	f.BoolVar(&o.Revoke, "revoke", false, "revoke the certificate at the CA first")
	f.StringVar(&o.Reason, "reason", "unspecified", "revocation reason: "+strings.Join(acme.ReasonNames(), ", "))
	f.BoolVar(&o.Force, "force", false, "delete even though a load balancer config still refers to the files")
	f.BoolVarP(&o.Yes, "yes", "y", false, "do not ask for confirmation")
	config.Exclude(f, "yes") // a standing yes in a config file would delete without ever asking
	f.DurationVar(&o.WaitLock, "wait-lock", 0, "wait this long for another lbcert run to finish, instead of failing at once")
	f.StringVar(&o.CronFile, "cron-file", "", "cron entry to remove with the last lineage (default: this state directory's)")
	f.MarkHidden("cron-file")
	cmd.RegisterFlagCompletionFunc("name", a.completeLineages)
	cmd.RegisterFlagCompletionFunc("reason", func(*cobra.Command, []string, string) ([]string, cobra.ShellCompDirective) {
		return acme.ReasonNames(), cobra.ShellCompDirectiveNoFileComp
	})
	return cmd
}

func (a *app) runDelete(ctx context.Context, o *deleteOptions) (retErr error) {
	st := store.New(a.global.Dir)
	if (o.Name == "") == (o.Domain == "") {
		return fmt.Errorf("say which lineage: --name NAME or -d DOMAIN")
	}
	reason, err := acme.ParseReason(o.Reason)
	if err != nil {
		return err
	}
	if o.Name != "" {
		if err := names.Lineage(o.Name); err != nil {
			return fmt.Errorf("--name: %w", err)
		}
	}
	h, err := a.mode().open(ctx, "delete")
	if err != nil {
		return err
	}
	defer h.close()
	l, err := a.deleteTarget(ctx, h, o)
	if err != nil {
		return err
	}
	name, d := l.Name, l.Deploy
	if h.node.Settings != nil {
		d = h.node.Settings(l) // this node's way of serving it
	}
	runner := &deploy.Runner{Store: st}
	targets := runner.DeleteTargets(d, st.Dir)
	if err := runner.CheckReferences(ctx, name, targets, o.Force); err != nil {
		return err
	}
	if err := a.confirmDelete(o, l); err != nil {
		return err
	}
	lock, err := st.Take(ctx, o.WaitLock)
	if err != nil {
		return err
	}
	defer lock.Unlock()
	if o.Revoke {
		if err := a.revoke(ctx, h, l, reason, o.Reason); err != nil {
			return err
		}
	}
	unlisted, err := runner.UnlistAll(ctx, name, targets, o.Force)
	for _, f := range unlisted {
		a.printf("%s: removed from %s, nginx reloaded\n", name, f)
	}
	if err != nil {
		if o.Revoke {
			return hint.Wrap(fmt.Errorf("%w; the certificate is revoked, nothing was deleted", err), "fix nginx and run delete again without --revoke, or pass --force")
		}
		return hint.Wrap(fmt.Errorf("%w; nothing was deleted", err), "fix nginx and run delete again, or pass --force")
	}
	if err := h.catalog.Delete(ctx, name); err != nil {
		return fmt.Errorf("delete %s: %w", name, err)
	}
	a.printf("%s: deleted\n", name)
	defer func() {
		if mailErr := a.mailReport(ctx, st, notify.Deleted(l, revokedFor(o))); mailErr != nil && retErr == nil {
			retErr = mailErr
		}
	}()
	if d.Target != "" && d.NginxInclude == "" {
		if err := runner.Remove(ctx, name, d); err != nil {
			return fmt.Errorf("deleted %s, but updating %s failed: %w", name, d.Target, err)
		}
		a.printf("%s: %s reloaded\n", name, d.Target)
	}
	return a.removeCronIfLast(ctx, h, o)
}

// deleteTarget finds the lineage to delete, checking the account
// settings a revocation needs before anything changes.
func (a *app) deleteTarget(ctx context.Context, h *host, o *deleteOptions) (*store.Lineage, error) {
	name := o.Name
	if name == "" {
		var err error
		if name, err = catalog.Covering(ctx, h.catalog, o.Domain); err != nil {
			return nil, err
		}
	}
	l, err := h.catalog.Head(ctx, name)
	if isNotFound(err) {
		return nil, hint.Wrap(fmt.Errorf("no lineage %q in %s", name, h.where), "'lbcert list' shows the lineages")
	}
	if err != nil {
		return nil, err
	}
	if o.Revoke {
		if _, err := a.accountBase(h.accounts); err != nil {
			return nil, err
		}
	}
	return l, nil
}

// confirmDelete asks on a terminal, or needs --yes.
func (a *app) confirmDelete(o *deleteOptions, l *store.Lineage) error {
	if o.Yes {
		return nil
	}
	if !(a.stdinTTY && a.stderrTTY) {
		return fmt.Errorf("delete %s: no terminal to confirm on: pass --yes", l.Name)
	}
	fmt.Fprintf(a.err, "Delete %s (%s) and all %d of its versions? [y/N] ", l.Name, strings.Join(l.Domains, ", "), l.Version)
	line, _ := bufio.NewReader(a.in).ReadString('\n')
	if ans := strings.ToLower(strings.TrimSpace(line)); ans != "y" && ans != "yes" {
		return fmt.Errorf("not deleted")
	}
	return nil
}

// revoke revokes the lineage's current certificate at its CA.
func (a *app) revoke(ctx context.Context, h *host, l *store.Lineage, reason uint, reasonName string) error {
	_, files, err := h.catalog.Fetch(ctx, l.Name, 0)
	if err != nil {
		return fmt.Errorf("read %s: %w", l.Name, err)
	}
	is := &issuer.Issuer{Account: acme.Lazy(func() (acme.Options, error) { return a.accountBase(h.accounts) }, false)}
	if err := is.Revoke(ctx, l, files.Cert, reason); err != nil {
		return fmt.Errorf("%w; nothing was deleted", err)
	}
	a.printf("%s: revoked certificate %s (%s)\n", l.Name, l.Cert.Serial, reasonName)
	return nil
}

// removeCronIfLast removes the cron entry with the last lineage.
func (a *app) removeCronIfLast(ctx context.Context, h *host, o *deleteOptions) error {
	if left, _ := h.catalog.Names(ctx); len(left) > 0 {
		return nil
	}
	file := cmp.Or(o.CronFile, schedule.CronFileFor("/etc/cron.d", a.global.Dir))
	removed, err := schedule.RemoveFile(file)
	if removed {
		a.printf("last lineage deleted: removed %s\n", file)
	}
	return err
}

// revokedFor is the reason a delete revoked with, or "".
func revokedFor(o *deleteOptions) string {
	if o.Revoke {
		return o.Reason
	}
	return ""
}
