package main

import (
	"cmp"
	"context"
	"fmt"
	"iter"
	"slices"
	"sort"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/lbcert/lbcert/internal/batch"
	"github.com/lbcert/lbcert/internal/engine"
	"github.com/lbcert/lbcert/internal/store"
)

// executeBatch runs the good rows through the engine and adds the bad
// ones to the result as invalid items, so that --json, the summary and
// the mail show every row of the file.
func (a *app) executeBatch(ctx context.Context, st *store.Store, o *batchOptions, file string, rows *batch.Result,
	deploys map[string]store.Deploy) (*engine.Result, error) {
	h, err := a.mode().open(ctx, "batch")
	if err != nil {
		return nil, err
	}
	defer h.close()
	opts, err := a.acmeOptions(h.accounts)
	if err != nil {
		return nil, err
	}
	limits, _ := o.pace.Limits() // checked by checkBatch
	checker, _ := o.preflight.Checker()
	spec := runSpec{
		command: "batch", limits: limits, preflight: checker, concurrency: o.Concurrency, days: o.Days,
		maxWait: o.MaxWait, waitLock: o.WaitLock,
	}
	a.batchProgress(&spec, o, file, len(rows.Rows))
	res, err := a.runEngine(ctx, h, spec, func() (iter.Seq[engine.Job], int, error) {
		base := a.lineageMail(o.flags, nil)
		jobs := make([]engine.Job, 0, len(rows.Rows))
		for _, row := range rows.Rows {
			d, _ := a.rowDeploy(o, st.Dir, row, deploys) // resolved by the check, cached
			l := store.Lineage{
				Name: row.Name, Domains: row.Domains, Server: opts.Server, Email: opts.Email,
				KeyType: cmp.Or(row.KeyType, o.KeyType), Profile: cmp.Or(row.Profile, o.Profile), PreferredChain: o.Chain,
				Challenge: row.Challenge, Deploy: d, Mail: row.Mail(base),
			}
			jobs = append(jobs, engine.Job{Lineage: l, Line: row.Line, Force: o.Force})
		}
		return slices.Values(jobs), len(jobs), nil
	})
	if err != nil {
		return nil, err
	}
	res.File, res.Format = file, string(rows.Format)
	for _, p := range rows.Problems {
		res.Items = append(res.Items, &engine.Item{Line: p.Line, Outcome: engine.Invalid, Error: p.Msg})
	}
	sort.SliceStable(res.Items, func(i, j int) bool { return res.Items[i].Line < res.Items[j].Line })
	res.Count()
	return res, nil
}

// batchProgress says what happens to the rows as the run goes: on a
// terminal a progress bar (a row counts when its certificate is
// obtained; the deploy is a phase of its own), and a line, once, for
// every row that needs attention.
func (a *app) batchProgress(spec *runSpec, o *batchOptions, file string, rows int) {
	spec.observe = func(it *engine.Item) { a.sayRow(file, it) }
	// A deploy that failed is said once too, when the deploy is done.
	spec.deployed = func(it *engine.Item) {
		if it.Outcome == engine.Failed {
			a.sayRow(file, it)
		}
	}
	if !a.stderrTTY || a.global.Quiet || o.JSON {
		return
	}
	prog := newProgress(a.err, rows, a.now)
	a.logTo(prog)
	spec.deploying = func(n int) { prog.phase(fmt.Sprintf("deploying %d certificates", n)) }
	spec.observe = func(it *engine.Item) {
		prog.step(it.Outcome.Done())
		a.sayRow(file, it)
	}
	spec.done = func() {
		prog.finish()
		a.logTo(a.err)
	}
}

// sayRow says, once, during the run, what needs attention about a
// row: a failure with its hint, a deferral with its next attempt. The
// table at the end lists it again, and that is all.
func (a *app) sayRow(file string, it *engine.Item) {
	where := fmt.Sprintf("%s:%d %s", file, it.Line, it.Name)
	switch it.Outcome {
	case engine.Issued, engine.Renewed, engine.Deployed, engine.NotDue, engine.Reconfigured:
		return
	case engine.Deferred:
		a.say.warningf("%s: deferred: %s%s", where, it.Error, nextAttempt(it))
	default:
		a.say.errorf("%s: %s: %s", where, words[it.Outcome], it.Error)
	}
	if it.Hint != "" {
		a.say.hintf("%s", it.Hint)
	}
}

// nextAttempt is "; next attempt TIME", or "" when there is none.
func nextAttempt(it *engine.Item) string {
	if it.NextAttempt == nil {
		return ""
	}
	return "; next attempt " + it.NextAttempt.Format(time.RFC3339)
}

// words is how the summary names an outcome.
var words = map[engine.Outcome]string{
	engine.Issued: "issued", engine.Renewed: "renewed", engine.Deployed: "deployed", engine.NotDue: "up to date",
	engine.Reconfigured: "reconfigured",
	engine.Deferred:     "deferred", engine.Failed: "failed", engine.Invalid: "invalid",
	engine.NotStarted: "not started", engine.Aborted: "interrupted",
}

// printBatchSummary prints a table of every row that needs attention or
// changed, then the counts. Rows already up to date are only counted: on
// a re-run of a 5,000-row file they are the noise.
func (a *app) printBatchSummary(res *engine.Result) {
	if a.global.Quiet {
		return
	}
	tw := tabwriter.NewWriter(a.out, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "LINE\tNAME\tRESULT\tDETAIL")
	shown := 0
	for _, it := range res.Items {
		if it.Outcome == engine.NotDue {
			continue
		}
		shown++
		name := it.Name
		if name == "" {
			name = "-"
		}
		fmt.Fprintf(tw, "%d\t%s\t%s\t%s\n", it.Line, name, words[it.Outcome], rowDetail(it))
	}
	if shown > 0 {
		tw.Flush()
	}
	var parts []string
	for _, s := range engine.Outcomes {
		if n := res.Counts[s]; n > 0 {
			parts = append(parts, fmt.Sprintf("%d %s", n, words[s]))
		}
	}
	rows := "rows"
	if len(res.Items) == 1 {
		rows = "row"
	}
	a.printf("lbcert batch %s: %d %s: %s\n", res.File, len(res.Items), rows, strings.Join(parts, ", "))
}

func rowDetail(it *engine.Item) string {
	switch it.Outcome {
	case engine.Issued, engine.Renewed, engine.Deployed, engine.Reconfigured:
		d := fmt.Sprintf("serial %s, expires %s", it.Serial, it.NotAfter.Format(time.DateOnly))
		if it.Deploy != "" && it.Deploy != "none" {
			d += ", deploy " + it.Deploy
		}
		if it.Verify != "" {
			d += ", verify " + it.Verify
		}
		return d
	}
	return it.Error + nextAttempt(it)
}
