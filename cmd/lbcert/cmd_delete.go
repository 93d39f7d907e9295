package main

import (
	"bufio"
	"context"
	"fmt"
	"log/slog"
	"os"
	"sort"
	"strconv"
	"strings"

	"github.com/spf13/cobra"

	"github.com/lbcert/lbcert/internal/acme"
	"github.com/lbcert/lbcert/internal/config"
	"github.com/lbcert/lbcert/internal/deploy"
	"github.com/lbcert/lbcert/internal/exit"
	"github.com/lbcert/lbcert/internal/issuer"
	"github.com/lbcert/lbcert/internal/names"
	"github.com/lbcert/lbcert/internal/notify"
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
					return exit.Errorf("give the lineage once: as an argument or with --name")
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
	f.StringVar(&o.Reason, "reason", "unspecified", "revocation reason: "+strings.Join(reasonNames(), ", "))
	f.BoolVar(&o.Force, "force", false, "delete even though a load balancer config still refers to the files")
	f.BoolVarP(&o.Yes, "yes", "y", false, "do not ask for confirmation")
	config.Exclude(f, "yes") // a standing yes in a config file would delete without ever asking
	f.StringVar(&o.CronFile, "cron-file", "", "cron entry to remove with the last lineage (default: this state directory's)")
	f.MarkHidden("cron-file")
	cmd.RegisterFlagCompletionFunc("name", a.completeLineages)
	cmd.RegisterFlagCompletionFunc("reason", func(*cobra.Command, []string, string) ([]string, cobra.ShellCompDirective) {
		return reasonNames(), cobra.ShellCompDirectiveNoFileComp
	})
	return cmd
}

func reasonNames() []string {
	var out []string
	for k := range acme.RevocationReasons {
		out = append(out, k)
	}
	sort.Slice(out, func(i, j int) bool { return acme.RevocationReasons[out[i]] < acme.RevocationReasons[out[j]] })
	return out
}

func parseReason(s string) (uint, error) {
	if r, ok := acme.RevocationReasons[s]; ok {
		return r, nil
	}
	if n, err := strconv.Atoi(s); err == nil {
		for _, r := range acme.RevocationReasons {
			if uint(n) == r {
				return r, nil
			}
		}
	}
	return 0, exit.Errorf("--reason %q: want one of %s", s, strings.Join(reasonNames(), ", "))
}

// deleteSource is where delete finds the lineage: the state directory,
// or the fleet.
type deleteSource interface {
	Names() ([]string, error)
	Load(name string) (*store.Lineage, error)
	Delete(name string) error
}

func (a *app) runDelete(ctx context.Context, o *deleteOptions) (retErr error) {
	st := store.New(a.global.Dir)
	if (o.Name == "") == (o.Domain == "") {
		return exit.Errorf("say which lineage: --name NAME or -d DOMAIN")
	}
	reason, err := parseReason(o.Reason)
	if err != nil {
		return err
	}
	name := o.Name
	if name != "" {
		if err := names.Lineage(name); err != nil {
			return exit.Errorf("--name: %w", err)
		}
	} else if name, err = a.lineageForDomain(st, o.Domain); err != nil {
		return err
	}
	f, err := a.openFleet(ctx, st, "delete")
	if err != nil {
		return err
	}
	defer f.close()
	// In fleet mode the lineage is the fleet's: deleting it here deletes
	// it for every node, so no other node renews it.
	var src deleteSource = st
	where := st.Dir
	if f != nil {
		src, where = f.backend, "the fleet"
	}
	l, err := src.Load(name)
	if err != nil {
		if isNotFound(err) {
			return exit.Errorf("no lineage %q in %s", name, where).WithHint("'lbcert list' shows the lineages")
		}
		return redisExit(err)
	}
	if o.Revoke {
		if _, err := a.accountBase(st); err != nil {
			return err
		}
	}
	runner := &deploy.Runner{Store: st}
	targets := deleteTargets(st, l.Deploy)
	if err := checkReferences(ctx, runner, st, name, targets, o.Force); err != nil {
		return err
	}
	if !o.Yes {
		if !(a.stdinTTY && a.stderrTTY) {
			return exit.Errorf("delete %s: no terminal to confirm on: pass --yes", name)
		}
		fmt.Fprintf(a.err, "Delete %s (%s) and all %d of its versions? [y/N] ", name, strings.Join(l.Domains, ", "), l.Version)
		line, _ := bufio.NewReader(a.in).ReadString('\n')
		if ans := strings.ToLower(strings.TrimSpace(line)); ans != "y" && ans != "yes" {
			return exit.Errorf("not deleted")
		}
	}

	lock, err := a.lock(st)
	if err != nil {
		return err
	}
	defer lock.Unlock()

	if o.Revoke {
		if err := a.revoke(ctx, f, st, l, reason, o.Reason); err != nil {
			return err
		}
	}
	if err := a.unlistNginx(ctx, runner, name, targets, o.Force); err != nil {
		if o.Revoke {
			return exit.Errorf("%w; the certificate is revoked, nothing was deleted", err).WithHint("fix nginx and run delete again without --revoke, or pass --force")
		}
		return exit.Errorf("%w; nothing was deleted", err).WithHint("fix nginx and run delete again, or pass --force")
	}
	if err := src.Delete(name); err != nil {
		return exit.Errorf("delete %s: %w", name, err)
	}
	a.printf("%s: deleted\n", name)
	item := notify.Item{Name: name, Domains: l.Domains, Outcome: "deleted", Serial: l.Cert.Serial, OldNotAfter: l.Cert.NotAfter,
		MailTo: l.Mail.To, Relay: notify.Relay{Host: l.Mail.Host, Port: l.Mail.Port, From: l.Mail.From}}
	if o.Revoke {
		item.Hint = "revoked at the CA (" + o.Reason + ")"
	}
	defer func() {
		if mailErr := a.mailReport(ctx, st, &notify.Report{Command: "delete", Items: []notify.Item{item}}); mailErr != nil && retErr == nil {
			retErr = mailErr
		}
	}()
	if l.Deploy.Target != "" && l.Deploy.NginxInclude == "" {
		if err := runner.Remove(ctx, name, l.Deploy); err != nil {
			return exit.Errorf("deleted %s, but updating %s failed: %w", name, l.Deploy.Target, err)
		}
		a.printf("%s: %s reloaded\n", name, l.Deploy.Target)
	}
	left, _ := src.Names()
	if o.CronFile == "" {
		o.CronFile = cronFileFor("/etc/cron.d", a.global.Dir)
	}
	if len(left) == 0 {
		if _, err := os.Stat(o.CronFile); err == nil {
			if err := removeCronFile(o.CronFile); err != nil {
				return err
			}
			a.printf("last lineage deleted: removed %s\n", o.CronFile)
		}
	}
	slog.Debug("delete done", "name", name)
	return nil
}

// revoke revokes the lineage's live certificate at its CA.
func (a *app) revoke(ctx context.Context, f *fleetRun, st *store.Store, l *store.Lineage, reason uint, reasonName string) error {
	is := &issuer.Issuer{Account: a.lazyAccount(f.accounts(st), false)}
	client, err := is.Client(ctx, l.Server, l.Email)
	if err != nil {
		return err
	}
	cert, err := os.ReadFile(st.LivePaths(l.Name).Cert)
	if f != nil && err != nil {
		cert, err = f.backend.ReadFullchain(l.Name) // the fleet's, when this node does not hold it
	}
	if err != nil {
		return exit.Errorf("read %s: %w", l.Name, err)
	}
	if err := client.Revoke(cert, reason); err != nil {
		return exit.Errorf("%w; nothing was deleted", err)
	}
	a.printf("%s: revoked certificate %s (%s)\n", l.Name, l.Cert.Serial, reasonName)
	return nil
}

// lineageForDomain finds the one lineage whose certificate covers domain.
func (a *app) lineageForDomain(st *store.Store, raw string) (string, error) {
	d, err := names.Domain(raw)
	if err != nil {
		return "", exit.Errorf("%w", err)
	}
	all, err := st.Names()
	if err != nil {
		return "", exit.Errorf("%w", err)
	}
	var found []string
	for _, n := range all {
		if l, err := st.Load(n); err == nil {
			for _, x := range l.Domains {
				if x == d {
					found = append(found, n)
					break
				}
			}
		}
	}
	switch len(found) {
	case 0:
		return "", exit.Errorf("no lineage covers %s", d).WithHint("'lbcert list' shows the lineages")
	case 1:
		return found[0], nil
	}
	return "", exit.Errorf("%s is covered by %d lineages (%s): say which with --name", d, len(found), strings.Join(found, ", "))
}
