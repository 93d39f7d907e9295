package main

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/lbcert/lbcert/internal/engine"
	"github.com/lbcert/lbcert/internal/exit"
	"github.com/lbcert/lbcert/internal/renewal"
	"github.com/lbcert/lbcert/internal/store"
)

type listOptions struct {
	Names []string
	JSON  bool
}

// listEntry is one lineage as list and show present it; --json prints it.
type listEntry struct {
	Name        string      `json:"name"`
	Domains     []string    `json:"domains"`
	Serial      string      `json:"serial"`
	NotBefore   time.Time   `json:"not_before"`
	NotAfter    time.Time   `json:"not_after"`
	DaysLeft    int         `json:"days_left"`
	RenewAt     time.Time   `json:"renew_at"`
	RenewReason string      `json:"renew_reason"`
	Challenge   string      `json:"challenge"`
	Webroot     string      `json:"webroot,omitempty"`
	HTTPAddr    string      `json:"http_addr,omitempty"`
	Deploy      string      `json:"deploy"`
	VerifyAddr  string      `json:"verify_addr,omitempty"`
	KeyType     string      `json:"key_type"`
	Profile     string      `json:"profile,omitempty"`
	Server      string      `json:"server"`
	Email       string      `json:"email,omitempty"`
	Version     int         `json:"cert_version"`      // the archive version live/ points at
	Pending     string      `json:"pending,omitempty"` // "pending deploy: <reason>"
	Failures    int         `json:"failures,omitempty"`
	LastError   string      `json:"last_error,omitempty"`
	BackoffTill *time.Time  `json:"backoff_until,omitempty"`
	Cadence     string      `json:"cadence_warning,omitempty"` // renew runs too seldom for this certificate
	Paths       store.Paths `json:"paths"`
	// Nodes is what each node of a fleet reports serving.
	Nodes []nodeServes `json:"nodes,omitempty"`
	// Rollout is a fleet's staged rollout of it that needs an operator.
	Rollout string `json:"rollout,omitempty"`
	Error   string `json:"error,omitempty"` // the lineage could not be read
}

// lineageList is list --json: the same schema rules as the run report
// (a "version", lowercase keys without spaces).
type lineageList struct {
	Version  int         `json:"version"`
	Lineages []listEntry `json:"lineages"`
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
			e, err := a.listEntry(cmd.Context(), h, args[0])
			if err != nil {
				return err
			}
			served, err := h.served(cmd.Context())
			if err != nil {
				return redisExit(err)
			}
			e.Nodes = served[e.Name]
			one := []listEntry{*e}
			a.markRollouts(cmd.Context(), h, one)
			e = &one[0]
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
			return redisExit(fmt.Errorf("read %s: %w", h.where, err))
		}
	}
	served, err := h.served(ctx)
	if err != nil {
		return redisExit(err)
	}
	entries := make([]listEntry, 0, len(names))
	for _, n := range names {
		e, err := a.listEntry(ctx, h, n)
		if e != nil {
			e.Nodes = served[n]
		}
		if err != nil {
			if len(o.Names) > 0 {
				return err
			}
			e = &listEntry{Name: n, Error: err.Error()}
		}
		entries = append(entries, *e)
	}
	a.markRollouts(ctx, h, entries)
	if o.JSON {
		return writeJSON(a, lineageList{Version: engine.SchemaVersion, Lineages: entries})
	}
	if len(entries) == 0 {
		fmt.Fprintf(a.err, "lbcert: no certificates in %s\n", h.where)
		return nil
	}
	a.printTable(entries)
	return nil
}

func (a *app) listEntry(ctx context.Context, h *host, name string) (*listEntry, error) {
	l, err := h.catalog.Head(ctx, name)
	if err != nil {
		if isNotFound(err) {
			return nil, exit.Errorf("no lineage %q in %s", name, h.where).WithHint("'lbcert list' shows the lineages")
		}
		return nil, redisExit(err)
	}
	status, _ := h.catalog.Status(ctx, name)
	now := a.now()
	d := renewal.Decide(l.Cert, status, now, renewal.Options{ARIOffered: !now.Before(status.ARIUnsupported), Name: l.Name})
	reason := renewal.Rule(d, l.Cert, status, now)
	e := &listEntry{
		Name: l.Name, Domains: l.Domains, Serial: l.Cert.Serial, NotBefore: l.Cert.NotBefore, NotAfter: l.Cert.NotAfter,
		DaysLeft: int(l.Cert.NotAfter.Sub(now).Hours() / 24), RenewAt: d.At.UTC(), RenewReason: reason,
		Challenge: l.Challenge.Mode, Webroot: l.Challenge.Webroot, HTTPAddr: l.Challenge.HTTPAddr,
		Deploy: l.Deploy.Target, VerifyAddr: l.Deploy.VerifyAddr, KeyType: l.KeyType, Profile: l.Profile,
		Server: l.Server, Email: l.Email, Version: l.Version, Failures: status.Failures, LastError: status.LastError,
		Paths: h.st.LivePaths(name),
	}
	if e.Deploy == "" {
		e.Deploy = "none"
	}
	e.Pending = pendingWords(h, l)
	if renewal.InBackoff(status, now) {
		next := status.NextAttempt.UTC()
		e.BackoffTill = &next
	}
	// The schedule as renew has really run here, up to now: a cron that
	// stopped a week ago shows as a week's gap.
	if a.runs == nil {
		runs := h.st.Runs()
		a.runs = &runs // once for the whole list, not once per lineage
	}
	if runs := *a.runs; len(runs) > 0 {
		e.Cadence = renewal.CadenceWarning(l.Cert, d.At, renewal.RunGap(runs, now))
	}
	return e, nil
}

// pendingWords says what this node still owes of the lineage: a deploy
// that failed (and why), or a version it does not serve yet.
func pendingWords(h *host, l *store.Lineage) string {
	j, _ := h.st.Journal(l.Name)
	live, _ := h.st.LiveVersion(l.Name)
	switch {
	case j.Pending != nil && j.Pending.Error != "":
		return "pending deploy: " + j.Pending.Error
	case j.Pending != nil || live != l.Version:
		return fmt.Sprintf("pending deploy of version %d", l.Version)
	}
	return ""
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

func (a *app) printTable(entries []listEntry) {
	tw := tabwriter.NewWriter(a.out, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "NAME\tDOMAINS\tEXPIRES\tDAYS\tRENEWS\tRULE\tCHALLENGE\tDEPLOY\tSTATUS")
	for _, e := range entries {
		if e.Error != "" {
			fmt.Fprintf(tw, "%s\t-\t-\t-\t-\t-\t-\t-\terror: %s\n", e.Name, e.Error)
			continue
		}
		status := "ok"
		if e.Pending != "" {
			status = e.Pending
		} else if e.Failures > 0 {
			status = fmt.Sprintf("%d failures: %s", e.Failures, e.LastError)
			if e.BackoffTill != nil {
				status = fmt.Sprintf("%d failures, retry %s: %s", e.Failures, a.when(*e.BackoffTill), e.LastError)
			}
		}
		if e.Cadence != "" {
			status = strings.TrimPrefix(status+"; ", "ok; ") + "warning: " + e.Cadence
		}
		if e.Rollout != "" {
			status = strings.TrimPrefix(status+"; ", "ok; ") + e.Rollout
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%d\t%s\t%s\t%s\t%s\t%s\n", e.Name, strings.Join(e.Domains, ","), a.when(e.NotAfter), e.DaysLeft,
			a.renewWhen(e.RenewAt), e.RenewReason, e.Challenge, e.Deploy, status)
	}
	tw.Flush()
}

func (a *app) printShow(e *listEntry) {
	tw := tabwriter.NewWriter(a.out, 0, 4, 2, ' ', 0)
	row := func(k, v string) {
		if v != "" {
			fmt.Fprintf(tw, "%s:\t%s\n", k, v)
		}
	}
	row("name", e.Name)
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
	row("rollout", e.Rollout)
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
		if n.Held != "" {
			what += "; " + n.Held
		}
		row("node "+n.Node, what)
	}
	row("fullchain", e.Paths.Fullchain)
	row("key", e.Paths.Key)
	tw.Flush()
}

func writeJSON(a *app, v any) error {
	enc := json.NewEncoder(a.out)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}
