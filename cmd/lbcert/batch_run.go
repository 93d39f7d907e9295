package main

import (
	"context"
	"fmt"
	"iter"
	"log/slog"
	"slices"
	"sort"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/lbcert/lbcert/internal/batch"
	"github.com/lbcert/lbcert/internal/engine"
	"github.com/lbcert/lbcert/internal/pace"
	"github.com/lbcert/lbcert/internal/preflight"
	"github.com/lbcert/lbcert/internal/store"
)

// batchRow is one good row on its way to the engine.
type batchRow struct {
	row    *batch.Row
	deploy store.Deploy
}

// executeBatch runs the good rows through the engine and adds the bad
// ones to the result as invalid items, so that --json and the summary
// show every row of the file.
func (a *app) executeBatch(ctx context.Context, st *store.Store, o *batchOptions, file, format string,
	rows []batchRow, invalid []*engine.Item, limits pace.Limits, checker *preflight.Checker) (*engine.Result, error) {
	h, err := a.mode().open(ctx, "batch")
	if err != nil {
		return nil, err
	}
	defer h.close()
	opts, err := a.acmeOptions(h.accounts)
	if err != nil {
		return nil, err
	}
	spec := runSpec{
		command: "batch", limits: limits, preflight: checker, concurrency: o.Concurrency, days: o.Days,
		maxWait: o.MaxWait, waitLock: o.WaitLock,
	}
	if a.stderrTTY && !a.global.Quiet && !o.JSON {
		prog := newProgress(a.err, len(rows), a.now)
		a.logTo(prog)
		defer func() {
			prog.finish()
			a.logTo(a.err)
		}()
		spec.deploying = func(n int) { prog.phase(fmt.Sprintf("deploying %d certificates", n)) }
		spec.observe = func(it *engine.Item) {
			prog.step(it.Outcome.Done())
			a.sayRow(file, it)
		}
	} else {
		spec.observe = func(it *engine.Item) { a.sayRow(file, it) }
	}
	// A deploy that failed is said once too, when the deploy is done.
	spec.deployed = func(it *engine.Item) {
		if it.Outcome == engine.Failed {
			a.sayRow(file, it)
		}
	}
	res, err := a.runEngine(ctx, h, spec, func() (iter.Seq[engine.Job], int, error) {
		jobs := make([]engine.Job, 0, len(rows))
		for _, br := range rows {
			row := br.row
			l := store.Lineage{
				Name: row.Name, Domains: row.Domains, Server: opts.Server, Email: opts.Email,
				KeyType: row.KeyType, Profile: row.Profile, Challenge: row.Challenge, Deploy: br.deploy,
				Mail: a.rowMail(o, row),
			}
			if l.KeyType == "" {
				l.KeyType = o.KeyType
			}
			l.PreferredChain = o.Chain
			if l.Profile == "" {
				l.Profile = o.Profile
			}
			jobs = append(jobs, engine.Job{Lineage: l, Line: row.Line, Force: o.Force})
		}
		return slices.Values(jobs), len(jobs), nil
	})
	if err != nil {
		return nil, err
	}
	slog.Debug("batch", "rows", len(rows)+len(invalid))
	res.File, res.Format = file, format
	res.Items = append(res.Items, invalid...)
	sort.SliceStable(res.Items, func(i, j int) bool { return res.Items[i].Line < res.Items[j].Line })
	res.Count()
	return res, nil
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

// rowMail is what the lineage saves for its reports: the row's own
// sender, recipients and relay, over those given on the command line.
func (a *app) rowMail(o *batchOptions, row *batch.Row) store.Mail {
	m := a.lineageMail(o.flags, nil)
	if len(row.MailTo) > 0 {
		m.To = row.MailTo
	}
	if row.MailFrom != "" {
		m.From = row.MailFrom
	}
	if row.SMTPHost != "" {
		m.Host = row.SMTPHost
	}
	if row.SMTPPort != 0 {
		m.Port = row.SMTPPort
	}
	return m
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
