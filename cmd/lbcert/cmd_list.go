package main

import (
	"context"
	"errors"
	"fmt"

	"github.com/spf13/cobra"

	"github.com/lbcert/lbcert/internal/catalog"
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
				return a.printJSON(e)
			}
			inventory.Show(a.out, e, a.clock())
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
		// Names whose first order failed have no lineage; they are
		// listed all the same, as never issued.
		var failed []string
		names, failed, err = catalog.NamesBeside(ctx, h.catalog, h.failedNames, "the names never issued are left out of this list: they could not be listed")
		if err != nil {
			return fmt.Errorf("read %s: %w", h.where, err)
		}
		names = append(names, failed...)
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
		return a.printJSON(inventory.List{Version: engine.SchemaVersion, Lineages: entries})
	}
	if len(entries) == 0 {
		a.say.say("", "no certificates in %s", h.where)
		return nil
	}
	inventory.Table(a.out, entries, a.clock())
	return nil
}

// inventory is what list and show read, with renew's recorded runs here
// for the cadence warning.
func (a *app) inventory(h *host) *inventory.Source {
	return &inventory.Source{Catalog: h.catalog, Local: h.st, Now: a.now(), Runs: h.st.Runs(), CAs: a.global.cas.Known(), Notes: h.node.Notes}
}

func (a *app) listEntry(ctx context.Context, h *host, src *inventory.Source, name string) (*inventory.Entry, error) {
	e, err := src.Entry(ctx, name)
	if errors.Is(err, inventory.ErrNoLineage) {
		return nil, hint.Wrap(fmt.Errorf("no lineage %q in %s", name, h.where), "'lbcert list' shows the lineages")
	}
	return e, err
}

// clock is how list and show say times: relative on a terminal, RFC 3339
// in a pipe.
func (a *app) clock() inventory.Clock { return inventory.Clock{Now: a.now(), Terminal: a.stdoutTTY} }
