package engine

import (
	"context"
	"fmt"
	"iter"
	"slices"

	"github.com/lbcert/lbcert/internal/acme"
	"github.com/lbcert/lbcert/internal/catalog"
	"github.com/lbcert/lbcert/internal/hint"
	"github.com/lbcert/lbcert/internal/names"
	"github.com/lbcert/lbcert/internal/renewal"
	"github.com/lbcert/lbcert/internal/store"
)

// Renewal is what renew selects: some lineages (all when Names is
// empty), forced or not, for real or a dry run.
type Renewal struct {
	Names  []string // --name
	Force  bool
	DryRun bool
	Where  string // for messages: the state directory, or "the fleet"
}

// RenewJobs is renew's jobs: one per selected lineage of all, with its
// saved settings, made as the plan reaches it (the plan loads each
// lineage when it decides it, so a pass over 100,000 holds one at a
// time; only a dry run reads them here, to point them at staging). Then
// one per name of failed (never issued: its first order failed) whose
// status kept that order's settings (Status.Request): renew orders it
// again with them once its backoff ends, as list promises, where
// certbot would leave it to the operator. A name whose failure an
// earlier release recorded, without its settings, cannot be retried.
func RenewJobs(ctx context.Context, cat catalog.Catalog, all, failed []string, r Renewal) (iter.Seq[Job], int, error) {
	retries := retryJobs(ctx, cat, failed, r)
	selected := all
	if len(r.Names) > 0 {
		selected = nil
		for _, n := range r.Names {
			switch {
			case slices.Contains(all, n):
				selected = append(selected, n)
			case !slices.ContainsFunc(retries, func(j Job) bool { return j.Lineage.Name == n }):
				return nil, 0, hint.Wrap(fmt.Errorf("--name %s: no such lineage in %s", n, r.Where), "'lbcert list' shows the lineages")
			}
		}
		retries = slices.DeleteFunc(retries, func(j Job) bool { return !slices.Contains(r.Names, j.Lineage.Name) })
	}
	return func(yield func(Job) bool) {
		for _, n := range selected {
			// A broken lineage is one failed item, not a failed run: the
			// plan says so when it cannot load it.
			job := Job{Lineage: store.Lineage{Name: n}, Force: r.Force, Stored: true}
			if r.DryRun {
				if l, err := cat.Head(ctx, n); err == nil {
					job.Stored, job.Lineage = false, *l
					job.Lineage.Server, job.Lineage.Fallback.Primary = acme.DryRunServer(l.Server), acme.DryRunServer(l.Fallback.Primary)
				}
			}
			if !yield(job) {
				return
			}
		}
		for _, job := range retries {
			if !yield(job) {
				return
			}
		}
	}, len(selected) + len(retries), nil
}

// CheckRenewFlags refuses renew's bad --days, --concurrency and --name
// before anything is read or written.
func CheckRenewFlags(days, concurrency int, lineages []string) error {
	if err := renewal.CheckDays(days); err != nil {
		return err
	}
	if concurrency < 1 {
		return fmt.Errorf("--concurrency %d: want 1 or more", concurrency)
	}
	for _, n := range lineages {
		if err := names.Lineage(n); err != nil {
			return fmt.Errorf("--name: %w", err)
		}
	}
	return nil
}

// retryJobs are the jobs of the names never issued whose status holds
// the settings of their failed first order.
func retryJobs(ctx context.Context, cat catalog.Catalog, failed []string, r Renewal) []Job {
	var out []Job
	for _, n := range failed {
		st, err := cat.Status(ctx, n)
		if err != nil || st.Request == nil || st.Request.Name != n {
			continue
		}
		job := Job{Lineage: *st.Request, Force: r.Force}
		if r.DryRun {
			job.Lineage.Server = acme.DryRunServer(job.Lineage.Server)
		}
		out = append(out, job)
	}
	return out
}
