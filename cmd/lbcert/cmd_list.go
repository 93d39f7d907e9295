package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/lbcert/lbcert/internal/engine"
	"github.com/lbcert/lbcert/internal/hint"
	"github.com/lbcert/lbcert/internal/inventory"
)

type listOptions struct {
	Names []string
	JSON  bool
}

func (a *app) newListCmd() *cobra.Command {
	o := &listOptions{}
	cmd := &cobra.Command{
		Use:   "list",
		Short: "List certificates, their expiry and next renewal",
		Long: `List every lineage: its names, expiry with days left, when renew will next
renew it and by which rule (ARI window, lifetime, expired), its challenge
mode and deploy target, and the last error and backoff if it is failing.

On a terminal times are relative ("in 59d"); in a pipe they are RFC 3339,
for scripts. --json gives the same data as JSON.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error { return a.runList(cmd.Context(), o) },
	}
	cmd.Flags().StringArrayVar(&o.Names, "name", nil, "show only this lineage (repeatable)")
	cmd.Flags().BoolVar(&o.JSON, "json", false, "print JSON")
	cmd.RegisterFlagCompletionFunc("name", a.completeLineages)
	return cmd
}

func (a *app) newShowCmd() *cobra.Command {
	o := &listOptions{}
	cmd := &cobra.Command{
		Use:               "show NAME",
		Short:             "Show one certificate lineage in full",
		Args:              cobra.ExactArgs(1),
		ValidArgsFunction: a.completeLineages,
		RunE: func(cmd *cobra.Command, args []string) error {
			h, err := a.mode().open(cmd.Context(), "show")
			if err != nil {
				return err
			}
			defer h.close()
			e, err := a.listEntry(cmd.Context(), h, a.inventory(h), args[0])
			if err != nil {
				return err
			}
			served, err := h.served(cmd.Context())
			if err != nil {
				return err
			}
			e.Nodes = served[e.Name]
			if o.JSON {
				return writeJSON(a, e)
			}
			a.printShow(e)
			return nil
		},
	}
	cmd.Flags().BoolVar(&o.JSON, "json", false, "print JSON")
	return cmd
}

func (a *app) runList(ctx context.Context, o *listOptions) error {
	h, err := a.mode().open(ctx, "list")
	if err != nil {
		return err
	}
	defer h.close()
	names := o.Names
	if len(names) == 0 {
		if names, err = h.catalog.Names(ctx); err != nil {
			return fmt.Errorf("read %s: %w", h.where, err)
		}
		// Names whose first order failed have no lineage; they are
		// listed all the same, as never issued.
		failed, _ := h.failedNames()
		for _, n := range failed {
			if !slices.Contains(names, n) {
				names = append(names, n)
			}
		}
	}
	served, err := h.served(ctx)
	if err != nil {
		return err
	}
	src := a.inventory(h)
	entries := make([]inventory.Entry, 0, len(names))
	for _, n := range names {
		e, err := a.listEntry(ctx, h, src, n)
		if err != nil {
			if len(o.Names) > 0 {
				return err
			}
			e = &inventory.Entry{Name: n, Error: err.Error()}
		}
		e.Nodes = served[n]
		entries = append(entries, *e)
	}
	if o.JSON {
		return writeJSON(a, inventory.List{Version: engine.SchemaVersion, Lineages: entries})
	}
	if len(entries) == 0 {
		a.say.say("", "no certificates in %s", h.where)
		return nil
	}
	a.printTable(entries)
	return nil
}

// inventory is what list and show read, with renew's recorded runs here
// for the cadence warning.
func (a *app) inventory(h *host) *inventory.Source {
	return &inventory.Source{Catalog: h.catalog, Local: h.st, Now: a.now(), Runs: h.st.Runs()}
}

func (a *app) listEntry(ctx context.Context, h *host, src *inventory.Source, name string) (*inventory.Entry, error) {
	e, err := src.Entry(ctx, name)
	if errors.Is(err, inventory.ErrNoLineage) {
		return nil, hint.Wrap(fmt.Errorf("no lineage %q in %s", name, h.where), "'lbcert list' shows the lineages")
	}
	return e, err
}

// when formats t for a person on a terminal, or as RFC 3339 for a pipe.
func (a *app) when(t time.Time) string {
	if !a.stdoutTTY {
		return t.UTC().Format(time.RFC3339)
	}
	d := t.Sub(a.now())
	switch {
	case d < 0:
		return relative(-d) + " ago"
	default:
		return "in " + relative(d)
	}
}

// renewWhen is when for the next renewal: a moment already passed means
// the next renew run renews it.
func (a *app) renewWhen(t time.Time) string {
	if a.stdoutTTY && !t.After(a.now()) {
		return "due now"
	}
	return a.when(t)
}

func relative(d time.Duration) string {
	switch {
	case d >= 48*time.Hour:
		return fmt.Sprintf("%dd", int(d.Hours()/24))
	case d >= 2*time.Hour:
		return fmt.Sprintf("%dh", int(d.Hours()))
	default:
		return fmt.Sprintf("%dm", int(d.Minutes()))
	}
}

// timeLeft is a certificate's remaining life in words: days, or hours
// and minutes for the short ones (step-ca's 24-hour default read "0
// days" when just issued).
func timeLeft(d time.Duration) string {
	switch {
	case d >= 48*time.Hour:
		return fmt.Sprintf("%d days", int(d.Hours()/24))
	case d >= 2*time.Hour:
		return fmt.Sprintf("%d hours", int(d.Hours()))
	case d >= 2*time.Minute:
		return fmt.Sprintf("%d minutes", int(d.Minutes()))
	case d > 0:
		return "under 2 minutes"
	}
	return "expired"
}

func (a *app) printTable(entries []inventory.Entry) {
	tw := tabwriter.NewWriter(a.out, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "NAME\tDOMAINS\tEXPIRES\tDAYS\tRENEWS\tRULE\tCHALLENGE\tDEPLOY\tSTATUS")
	for _, e := range entries {
		switch {
		case e.Error != "":
			fmt.Fprintf(tw, "%s\t-\t-\t-\t-\t-\t-\t-\terror: %s\n", e.Name, e.Error)
		case e.NeverIssued:
			fmt.Fprintf(tw, "%s\t-\t-\t-\t-\t-\t-\t-\tnever issued: %s\n", e.Name, a.failures(&e))
		default:
			fmt.Fprintf(tw, "%s\t%s\t%s\t%d\t%s\t%s\t%s\t%s\t%s\n", e.Name, strings.Join(e.Domains, ","), a.when(e.NotAfter), e.DaysLeft,
				a.renewWhen(e.RenewAt), e.RenewReason, e.Challenge, e.Deploy, a.status(&e))
		}
	}
	tw.Flush()
}

// status is a lineage's STATUS column: ok, what is owed, its failures,
// and a schedule too slow for it.
func (a *app) status(e *inventory.Entry) string {
	status := "ok"
	if e.Pending != "" {
		status = e.Pending
	} else if e.Failures > 0 {
		status = a.failures(e)
	}
	if e.Cadence != "" {
		status = strings.TrimPrefix(status+"; ", "ok; ") + "warning: " + e.Cadence
	}
	return status
}

// failures is "2 failures, retry in 58m: <last error>".
func (a *app) failures(e *inventory.Entry) string {
	if e.BackoffTill != nil {
		return fmt.Sprintf("%d failures, retry %s: %s", e.Failures, a.when(*e.BackoffTill), e.LastError)
	}
	return fmt.Sprintf("%d failures: %s", e.Failures, e.LastError)
}

func (a *app) printShow(e *inventory.Entry) {
	tw := tabwriter.NewWriter(a.out, 0, 4, 2, ' ', 0)
	row := func(k, v string) {
		if v != "" {
			fmt.Fprintf(tw, "%s:\t%s\n", k, v)
		}
	}
	row("name", e.Name)
	if e.NeverIssued {
		row("status", "never issued: its first order failed")
	} else {
		a.showCertificate(row, e)
	}
	if e.Failures > 0 {
		row("failures", fmt.Sprint(e.Failures))
		row("last error", e.LastError)
		if e.BackoffTill != nil {
			row("next attempt", a.when(*e.BackoffTill))
		}
	}
	for _, n := range e.Nodes {
		what := fmt.Sprintf("version %d, serial %s", n.Version, n.Serial)
		if !n.OK {
			what = fmt.Sprintf("version %d; %s", n.Version, n.Error)
		}
		row("node "+n.Node, what)
	}
	if !e.NeverIssued {
		row("fullchain", e.Paths.Fullchain)
		row("key", e.Paths.Key)
	}
	tw.Flush()
}

// showCertificate is show's rows about the certificate and its saved
// settings, the report's recipients and relay among them.
func (a *app) showCertificate(row func(k, v string), e *inventory.Entry) {
	row("domains", strings.Join(e.Domains, ", "))
	row("serial", e.Serial)
	row("valid from", a.when(e.NotBefore))
	row("expires", fmt.Sprintf("%s (%s)", a.when(e.NotAfter), timeLeft(e.NotAfter.Sub(a.now()))))
	row("renews", fmt.Sprintf("%s (%s)", a.renewWhen(e.RenewAt), e.RenewReason))
	row("challenge", e.Challenge+" "+e.Webroot+e.HTTPAddr)
	row("deploy", e.Deploy)
	row("verify", e.VerifyAddr)
	row("key type", e.KeyType)
	row("profile", e.Profile)
	row("server", e.Server)
	row("account", e.Email)
	row("version", fmt.Sprint(e.Version))
	row("pending", e.Pending)
	if m := e.Mail; m != nil {
		row("mail to", strings.Join(m.To, ", "))
		row("mail from", m.From)
		if m.Host != "" || m.Port != 0 {
			relay := fmt.Sprintf("%s:%d", m.Host, m.Port)
			if m.TLS != "" {
				relay += " (--smtp-tls " + m.TLS + ")"
			}
			row("mail relay", relay)
		}
	}
}

func writeJSON(a *app, v any) error {
	enc := json.NewEncoder(a.out)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}
