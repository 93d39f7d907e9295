package main

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"sort"
	"strings"
	"sync"
	"text/tabwriter"
	"time"

	"github.com/lbcert/lbcert/internal/batch"
	"github.com/lbcert/lbcert/internal/deploy"
	"github.com/lbcert/lbcert/internal/exit"
	"github.com/lbcert/lbcert/internal/issuer"
	"github.com/lbcert/lbcert/internal/notify"
	"github.com/lbcert/lbcert/internal/pace"
	"github.com/lbcert/lbcert/internal/preflight"
	"github.com/lbcert/lbcert/internal/renewal"
	"github.com/lbcert/lbcert/internal/store"
)

// batchRun is one batch run after its rows were checked.
type batchRun struct {
	app     *app
	o       *batchOptions
	st      *store.Store
	rep     *batchReport
	checker *preflight.Checker

	is          *issuer.Issuer
	budget      *pace.Budget
	server      string
	email       string
	prog        *progress
	interrupted bool

	mu      sync.Mutex
	changes []deploy.Change
	byName  map[string]*batchRow
}

// execute orders what the rows need, under the lock, and deploys once.
func (r *batchRun) execute(ctx context.Context, todo []*batchRow, limits pace.Limits) error {
	a, st := r.app, r.st
	r.is = a.newIssuer(st)
	defer r.is.Close()
	// Bind every standalone port first: a port in use fails its rows
	// here, before the lock and before the CA.
	bound := map[string]error{}
	for _, br := range todo {
		c := br.row.Challenge
		if c.Mode != "standalone" {
			continue
		}
		if _, done := bound[c.HTTPAddr]; !done {
			_, bound[c.HTTPAddr] = r.is.Listen(c.HTTPAddr)
		}
	}
	opts, err := a.acmeOptions(st)
	if err != nil {
		return err
	}
	r.server, r.email = opts.Server, opts.Email
	lock, err := a.renewLock(ctx, st, r.o.WaitLock)
	if err != nil {
		return err
	}
	defer lock.Unlock()
	if r.budget, err = a.openBudget(st, limits); err != nil {
		return err
	}
	defer flushBudget(r.budget)

	// Skip what is already done: this is what makes a re-run resume.
	now := a.now()
	var queue []*batchRow
	for _, br := range todo {
		if err := bound[br.row.Challenge.HTTPAddr]; err != nil && br.row.Challenge.Mode == "standalone" {
			br.Status, br.Error = rowFailed, oneLine(err)
			continue
		}
		prev, err := st.Load(br.Name)
		if err != nil && !isNotFound(err) {
			br.Status, br.Error = rowFailed, oneLine(err)
			br.Hint = fmt.Sprintf("move the broken lineage %s aside, or give the row another name", st.LivePaths(br.Name).Dir)
			continue
		}
		if prev != nil {
			br.oldEnd = prev.Cert.NotAfter
			if sameNames(prev.Domains, br.Domains) && !r.o.Force {
				if due, _, _ := renewal.LifetimeDue(prev.Cert, now); !due {
					br.Status, br.ok = rowUpToDate, true
					br.Serial, br.NotAfter = prev.Cert.Serial, timePtr(prev.Cert.NotAfter)
					continue
				}
			}
		}
		if status, _ := st.ReadStatus(br.Name); renewal.InBackoff(status, now) && !r.o.Force {
			br.Status, br.Error, br.NextAttempt = rowDeferred, "waiting after earlier failures: "+status.LastError, timePtr(status.NextAttempt)
			continue
		}
		queue = append(queue, br)
	}
	slog.Debug("batch", "rows", len(r.rep.Rows), "to order", len(queue))
	r.orderAll(ctx, queue)

	if len(r.changes) > 0 {
		// Certificates already saved are deployed even after Ctrl-C: they
		// are live on disk, and the load balancer should serve them.
		results := (&deploy.Runner{Store: st}).Run(context.WithoutCancel(ctx), r.changes)
		for _, res := range results {
			br := r.byName[res.Name]
			applyBatchDeploy(br, res)
			if res.Failed() {
				status, _ := st.ReadStatus(res.Name)
				br.NextAttempt = timePtr(recordFailure(st, status, res.Name, br.Error, a.now()))
			}
		}
	}
	return nil
}

// orderAll runs the queue with --concurrency workers. Ctrl-C stops new
// orders; orders in flight are abandoned (nothing of theirs is saved) or
// finish if the CA already answered.
func (r *batchRun) orderAll(ctx context.Context, queue []*batchRow) {
	a := r.app
	if len(queue) == 0 {
		return
	}
	r.byName = map[string]*batchRow{}
	if a.stderrTTY && !a.global.Quiet && !r.o.JSON {
		r.prog = newProgress(a.err, len(queue), a.now)
		a.logTo(r.prog)
		defer func() {
			r.prog.finish()
			a.logTo(a.err)
		}()
	}
	jobs := make(chan *batchRow)
	var wg sync.WaitGroup
	for range min(r.o.Concurrency, len(queue)) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for br := range jobs {
				r.one(ctx, br)
				r.done(br)
			}
		}()
	}
	for i, br := range queue {
		if ctx.Err() != nil {
			for _, left := range queue[i:] {
				left.Status, left.Error = rowNotStarted, "interrupted before it started; run the same command again to finish"
			}
			slog.Warn("interrupted: no new orders started", "left", len(queue)-i)
			r.interrupted = true
			break
		}
		jobs <- br
	}
	close(jobs)
	wg.Wait()
	if ctx.Err() != nil {
		r.interrupted = true
	}
}

// done reports one finished row: on the bar, or as a log line.
func (r *batchRun) done(br *batchRow) {
	if r.prog != nil {
		r.prog.step(br.ok)
		if br.ok {
			return
		}
	}
	switch br.Status {
	case rowIssued:
		slog.Info("issued", "line", br.Line, "name", br.Name, "serial", br.Serial, "expires", br.NotAfter.Format(time.DateOnly))
	case rowDeferred:
		slog.Warn("deferred", "line", br.Line, "name", br.Name, "why", br.Error)
	default:
		slog.Warn(br.Status, "line", br.Line, "name", br.Name, "err", br.Error)
	}
}

// one takes a row through pre-flight, the budget and the CA.
func (r *batchRun) one(ctx context.Context, br *batchRow) {
	a, o := r.app, r.o
	if ctx.Err() != nil {
		br.Status, br.Error = rowNotStarted, "interrupted before it started; run the same command again to finish"
		return
	}
	row := br.row
	l := store.Lineage{
		Name: br.Name, Domains: br.Domains, Server: r.server, Email: r.email,
		KeyType: row.KeyType, Profile: row.Profile, Challenge: row.Challenge, Deploy: br.deploy,
		Mail: r.rowMail(row),
	}
	if l.KeyType == "" {
		l.KeyType = o.KeyType
	}
	if l.Profile == "" {
		l.Profile = o.Profile
	}
	if r.checker != nil {
		responder, err := r.is.Provider(row.Challenge)
		if err == nil {
			err = runPreflight(ctx, r.checker, br.Domains, responder)
		}
		if err != nil {
			// No backoff: nothing reached the CA, and the fix (DNS, a
			// route) should work on the very next run.
			br.Status, br.Error, br.Hint = rowFailed, oneLine(err), exit.Hint(err)
			return
		}
	}
	key := pace.Key{Server: l.Server, Email: l.Email}
	for attempt := 0; ; attempt++ {
		if !r.reserve(ctx, br, key) {
			return
		}
		got, err := r.is.Obtain(ctx, issuer.Request{Lineage: l})
		if err == nil {
			if err := r.st.RemoveStatus(br.Name); err != nil {
				slog.Warn("could not reset renewal status", "name", br.Name, "err", err)
			}
			br.Status, br.ok = rowIssued, true
			br.Serial, br.NotAfter = got.Lineage.Cert.Serial, timePtr(got.Lineage.Cert.NotAfter)
			r.mu.Lock()
			r.changes = append(r.changes, got.Change)
			r.byName[br.Name] = br
			r.mu.Unlock()
			return
		}
		if ctx.Err() != nil {
			br.Status, br.Error = rowInterrupted, "interrupted while ordering; nothing was saved; run the same command again to finish"
			return
		}
		wait, limited := spend(r.budget, key, br.Domains, err, a.now())
		if limited && attempt == 0 && wait <= o.MaxWait {
			slog.Warn("the CA said rateLimited; waiting as it asked", "name", br.Name, "retry_after", wait)
			if !sleepCtx(ctx, wait) {
				br.Status, br.Error = rowInterrupted, "interrupted while waiting for the CA's Retry-After"
				return
			}
			continue
		}
		if limited {
			br.Status, br.Error = rowDeferred, oneLine(err)
			br.NextAttempt = timePtr(a.now().Add(wait))
			return
		}
		br.Status, br.Error, br.Hint = rowFailed, oneLine(err), exit.Hint(err)
		// The same backoff renew uses: a broken name is not retried by
		// the next batch or cron run for an hour, then 2, 4, ... 24.
		status, _ := r.st.ReadStatus(br.Name)
		br.NextAttempt = timePtr(recordFailure(r.st, status, br.Name, br.Error, a.now()))
		return
	}
}

// reserve takes the row's tokens from the budget, waiting up to
// --max-wait for them. A longer wait leaves the row for the next run.
func (r *batchRun) reserve(ctx context.Context, br *batchRow, key pace.Key) bool {
	for {
		err := r.budget.Reserve(key, br.Domains)
		if err == nil {
			return true
		}
		d, ok := denied(err)
		if !ok {
			br.Status, br.Error = rowFailed, oneLine(err)
			return false
		}
		if d.Wait > r.o.MaxWait {
			br.Status, br.Error = rowDeferred, "not ordered: "+d.Reason
			br.Hint = "run the same command again after next_attempt; --rate-* set the budget"
			br.NextAttempt = timePtr(r.app.now().Add(d.Wait))
			return false
		}
		slog.Debug("waiting for the rate budget", "name", br.Name, "for", d.Wait.Round(time.Second), "why", d.Reason)
		if !sleepCtx(ctx, d.Wait) {
			br.Status, br.Error = rowNotStarted, "interrupted while waiting for the rate budget"
			return false
		}
	}
}

func sleepCtx(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-ctx.Done():
		return false
	}
}

// rowMail is what the lineage saves for its reports: the row's own
// sender, recipients and relay, over those given on the command line.
func (r *batchRun) rowMail(row *batch.Row) store.Mail {
	m := r.app.lineageMail(r.o.flags, nil)
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

func applyBatchDeploy(br *batchRow, res deploy.Result) {
	switch {
	case res.RolledBack:
		br.Deploy = "rolled back"
	case res.Deployed && br.deploy.Target != "":
		br.Deploy = "ok"
	}
	br.Verify = res.Verify
	if res.Failed() {
		msg := res.Err.Error()
		if res.RolledBack {
			msg += "; rolled back to the previous certificate"
		}
		br.Status, br.ok, br.Error = rowFailed, false, oneLine(fmt.Errorf("deploy: %s", msg))
	}
}

// finish prints the summary (or JSON), mails the reports and picks the
// exit code: 0 when every row is issued or up to date, 2 when some are,
// 1 when none is, 130 after Ctrl-C.
func (r *batchRun) finish(ctx context.Context) error {
	a, rep := r.app, r.rep
	good := 0
	for _, br := range rep.Rows {
		rep.Counts[br.Status]++
		if br.ok {
			good++
		}
	}
	if r.o.JSON {
		enc := json.NewEncoder(a.out)
		enc.SetIndent("", "  ")
		enc.Encode(rep)
	} else {
		r.printSummary()
	}
	mailErr := a.mailReport(context.WithoutCancel(ctx), r.st, r.mailReport())
	switch {
	case r.interrupted:
		return &exit.Error{Code: exit.Interrupted, Msg: "interrupted; certificates already issued are saved and deployed; run the same command again to finish"}
	case good == len(rep.Rows):
		return mailErr
	case good > 0:
		return exit.Reported(exit.Partial)
	default:
		return exit.Reported(exit.Failure)
	}
}

// printSummary prints a table of every row that needs attention or
// changed, then the counts. Rows that were already up to date are only
// counted: on a re-run of a 5,000-row file they are the noise.
func (r *batchRun) printSummary() {
	a, rep := r.app, r.rep
	for _, br := range rep.Rows {
		if br.Status == rowFailed && br.Hint != "" {
			fmt.Fprintf(a.err, "lbcert: error: %s:%d %s: %s\nlbcert: hint: %s\n", rep.File, br.Line, br.Name, br.Error, br.Hint)
		}
	}
	if a.global.Quiet {
		return
	}
	tw := tabwriter.NewWriter(a.out, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "LINE\tNAME\tRESULT\tDETAIL")
	shown := 0
	for _, br := range rep.Rows {
		if br.Status == rowUpToDate {
			continue
		}
		shown++
		name := br.Name
		if name == "" {
			name = "-"
		}
		fmt.Fprintf(tw, "%d\t%s\t%s\t%s\n", br.Line, name, br.Status, rowDetail(br))
	}
	if shown > 0 {
		tw.Flush()
	}
	var parts []string
	for _, s := range []string{rowIssued, rowUpToDate, rowFailed, rowInvalid, rowDeferred, rowInterrupted, rowNotStarted} {
		if n := rep.Counts[s]; n > 0 {
			parts = append(parts, fmt.Sprintf("%d %s", n, s))
		}
	}
	a.printf("lbcert batch %s: %d rows: %s\n", rep.File, len(rep.Rows), strings.Join(parts, ", "))
}

func rowDetail(br *batchRow) string {
	switch br.Status {
	case rowIssued:
		d := fmt.Sprintf("serial %s, expires %s", br.Serial, br.NotAfter.Format(time.DateOnly))
		if br.Deploy != "" {
			d += ", deploy " + br.Deploy
		}
		if br.Verify != "" {
			d += ", verify " + br.Verify
		}
		return d
	case rowDeferred:
		if br.NextAttempt != nil {
			return fmt.Sprintf("%s; next attempt %s", br.Error, br.NextAttempt.Format(time.RFC3339))
		}
	}
	return br.Error
}

// mailReport: issued and failed rows, each to the global recipients and
// to the row's own; up-to-date rows are not news.
func (r *batchRun) mailReport() *notify.Report {
	out := &notify.Report{Command: "batch", Time: r.app.now()}
	for _, br := range r.rep.Rows {
		var outcome string
		switch br.Status {
		case rowIssued:
			outcome = "issued"
		case rowFailed, rowDeferred, rowInterrupted:
			outcome = "failed"
		default:
			continue
		}
		it := notify.Item{Name: br.Name, Domains: br.Domains, Outcome: outcome, Serial: br.Serial, Deploy: br.Deploy,
			Verify: br.Verify, Error: br.Error, Hint: br.Hint, OldNotAfter: br.oldEnd,
			MailTo: br.row.MailTo, Relay: notify.Relay{Host: br.row.SMTPHost, Port: br.row.SMTPPort, From: br.row.MailFrom}}
		if br.NotAfter != nil {
			it.NewNotAfter = *br.NotAfter
		}
		out.Items = append(out.Items, it)
	}
	return out
}

// sortRows orders the summary by line; whole-file problems (line 0) first.
func sortRows(rows []*batchRow) {
	sort.SliceStable(rows, func(i, j int) bool { return rows[i].Line < rows[j].Line })
}
