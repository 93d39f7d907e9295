package main

import (
	"cmp"
	"context"
	"fmt"
	"iter"
	"net"
	"slices"
	"sort"
	"strings"
	"time"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"

	"github.com/lbcert/lbcert/internal/acme"
	"github.com/lbcert/lbcert/internal/batch"
	"github.com/lbcert/lbcert/internal/challenge"
	"github.com/lbcert/lbcert/internal/config"
	"github.com/lbcert/lbcert/internal/engine"
	"github.com/lbcert/lbcert/internal/hint"
	"github.com/lbcert/lbcert/internal/names"
	"github.com/lbcert/lbcert/internal/progress"
	"github.com/lbcert/lbcert/internal/renewal"
	"github.com/lbcert/lbcert/internal/secret"
	"github.com/lbcert/lbcert/internal/store"
)

type batchOptions struct {
	Check       bool
	Strict      bool
	Concurrency int
	Force       bool
	Days        int
	JSON        bool
	Webroot     string
	Standalone  bool
	HTTPAddr    string
	KeyType     string
	Profile     string
	Chain       string
	VIPHost     string
	MaxWait     time.Duration
	WaitLock    time.Duration
	deploy      deployFlags
	pace        paceFlags
	preflight   preflightFlags
	flags       *pflag.FlagSet
}

func (a *app) newBatchCmd() *cobra.Command {
	o := &batchOptions{}
	cmd := &cobra.Command{
		Use:   "batch FILE.csv",
		Short: "Obtain one certificate per CSV row, checked first, paced, resumable",
		Long: `Batch obtains one certificate per row of a CSV file. Every row is checked
before anything is sent to the CA; bad rows are reported as FILE:LINE:
reason and skipped (--strict refuses the whole file instead, --check only
checks). Two formats, told apart by the first line:

The positional format, with or without this header:
  DOMAIN,VIPPort,ACMEPort,FROMAddr,TOAddr,RELAYAddr,RELAYPort
ACMEPort is the port of lbcert's standalone HTTP-01 listener (the host
comes from --http-addr); VIPPort is the TLS port the load balancer serves
the certificate on, checked at --vip-host after deploy; the rest are the
report's sender, recipient and SMTP relay. Empty fields use the command
line's settings.

Header-named, with a "domains" column (several names separated by spaces
or semicolons) and any of:
  ` + strings.Join(batch.NamedColumns, ",") + `

Rows whose certificate exists for the same names and is not due order
nothing (their changed settings are saved, and a new deploy target gets
the current certificate), so running the same file again finishes what a
crash or Ctrl-C left. Orders run --concurrency at a time (64 by default:
an order mostly waits for the CA, and a measured sweep finished 200
orders sooner with each doubling up to 64 in flight, at the same CPU per
certificate), inside the client-side budget (--rate-*, saved in --dir and
shared with renew), after a pre-flight check that each name routes
/.well-known/acme-challenge/ to lbcert. All deploys happen once at the
end, and each recipient gets one mail.

` + exitCodesHelp,
		Example: `  lbcert batch import.csv --check
  lbcert batch import.csv --http-addr :8888 --deploy haproxy --haproxy-socket /run/haproxy/admin.sock
  lbcert batch customers.csv --webroot /var/www/acme --deploy nginx --expect-ip 203.0.113.10`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			o.flags = cmd.Flags()
			return a.runBatch(cmd.Context(), o, args[0])
		},
		ValidArgsFunction: func(*cobra.Command, []string, string) ([]string, cobra.ShellCompDirective) {
			return []string{"csv"}, cobra.ShellCompDirectiveFilterFileExt
		},
	}
	f := cmd.Flags()
	f.BoolVar(&o.Check, "check", false, "check every row and exit; send nothing to the CA")
	f.BoolVar(&o.Strict, "strict", false, "refuse the whole file if any row is bad")
	f.IntVar(&o.Concurrency, "concurrency", engine.DefaultConcurrency, "orders in flight at once")
	f.BoolVar(&o.Force, "force", false, "order even for rows whose certificate is valid and not due, and ignore failure backoff")
	f.IntVar(&o.Days, "days", 0, "renew a row's existing certificate when fewer than N days remain, instead of ARI and the lifetime rule (as renew --days)")
	f.BoolVar(&o.JSON, "json", false, "print the run's rows as JSON on stdout")
	f.StringVar(&o.Webroot, "webroot", "", "HTTP-01 webroot for rows that name no challenge")
	f.BoolVar(&o.Standalone, "standalone", false, "HTTP-01 from lbcert's listener on --http-addr for rows that name no challenge")
	f.StringVar(&o.HTTPAddr, "http-addr", ":80", "standalone listen address; an ACMEPort column replaces its port")
	f.StringVar(&o.KeyType, "key-type", "ec256", "private key type for rows without key_type: "+strings.Join(acme.KeyTypes, ", "))
	f.StringVar(&o.Profile, "profile", "", "ACME profile for rows without one")
	f.StringVar(&o.Chain, "preferred-chain", "", "pick the chain whose top issuer has this common name, when the CA offers several")
	f.StringVar(&o.VIPHost, "vip-host", "127.0.0.1", "address where a VIPPort is checked for the new certificate after deploy")
	f.DurationVar(&o.MaxWait, "max-wait", 5*time.Minute, "wait at most this long for the rate budget or a Retry-After before leaving a row for the next run")
	f.DurationVar(&o.WaitLock, "wait-lock", 0, "wait this long for another lbcert run to finish, instead of failing at once")
	o.deploy.register(f)
	o.pace.register(f)
	o.preflight.register(f, true)
	return cmd
}

func (a *app) runBatch(ctx context.Context, o *batchOptions, file string) error {
	st := store.New(a.global.Dir)
	fallback, err := a.checkBatch(o)
	if err != nil {
		return err
	}
	res, err := batch.ReadFile(file, a.in, batch.Defaults{
		HTTPAddr: o.HTTPAddr, VIPHost: o.VIPHost, KeyTypeOK: acme.CheckKeyType, CheckWebroot: challenge.CheckWebroot,
	})
	if err != nil {
		return err
	}
	// Rows that name no challenge take the command line's; a row that
	// still has none is bad input like any other, and so is a deploy
	// target that cannot work.
	deploys := map[string]store.Deploy{}
	res.Keep(func(row *batch.Row) string {
		var problem string
		if row.Challenge, problem = a.mode().rowChallenge(row, fallback); problem != "" {
			return problem
		}
		if _, err := a.rowDeploy(o, st.Dir, row, deploys); err != nil {
			return secret.OneLine(err)
		}
		return ""
	})
	for _, p := range res.Problems {
		a.say.at(file, p.Line, "%s", p.Msg)
	}
	if err := a.batchChecked(o, file, res); err != nil || o.Check {
		return err
	}
	result, err := a.executeBatch(ctx, st, o, file, res, deploys)
	if err != nil {
		return err
	}
	if o.JSON {
		a.printJSON(result)
	} else {
		a.printBatchSummary(result)
	}
	a.sayUnreachable(result)
	return runError(result, a.mailReport(ctx, st, result.Report()))
}

// checkBatch checks batch's flags offline and returns the challenge of
// rows that name none.
func (a *app) checkBatch(o *batchOptions) (store.Challenge, error) {
	var none store.Challenge
	if o.Concurrency < 1 {
		return none, fmt.Errorf("--concurrency %d: want 1 or more", o.Concurrency)
	}
	if err := renewal.CheckDays(o.Days); err != nil {
		return none, err
	}
	if err := acme.CheckKeyType(o.KeyType); err != nil {
		return none, err
	}
	if err := challenge.CheckAddr(o.HTTPAddr); err != nil {
		return none, err
	}
	if o.Webroot != "" && o.Standalone {
		return none, config.Conflict(o.flags, "webroot", "standalone", "choose one default way to answer HTTP-01")
	}
	if net.ParseIP(o.VIPHost) == nil {
		if _, err := names.Domain(o.VIPHost); err != nil {
			return none, fmt.Errorf("--vip-host %q: want the load balancer's IP address or host name", o.VIPHost)
		}
	}
	if _, err := o.pace.Limits(); err != nil {
		return none, err
	}
	if _, err := o.preflight.Checker(); err != nil {
		return none, err
	}
	if err := a.mode().mayOrder("batch"); err != nil {
		return none, err
	}
	return a.mode().challenge(challengeFlags{webroot: o.Webroot, standalone: o.Standalone, httpAddr: o.HTTPAddr, batch: true, fs: o.flags})
}

// batchChecked says what --check found, and refuses a file with bad rows
// under --strict, or with no good row at all.
func (a *app) batchChecked(o *batchOptions, file string, res *batch.Result) error {
	good, bad := len(res.Rows), len(res.Problems)
	switch {
	case o.Check && res.Format == "": // a file-level problem: no rows, no format
		a.printf("%s: %d good, %d bad\n", file, good, bad)
	case o.Check:
		rows := "rows"
		if good+bad == 1 {
			rows = "row"
		}
		a.printf("%s: %d %s (%s format): %d good, %d bad\n", file, good+bad, rows, res.Format, good, bad)
	case bad > 0 && o.Strict:
		return fmt.Errorf("%s: %d bad rows; nothing was sent to the CA (--strict)", file, bad)
	case good == 0:
		return hint.Wrap(fmt.Errorf("%s: no good rows; nothing was sent to the CA", file), "fix the rows above; 'lbcert batch %s --check' checks without ordering", file)
	}
	if o.Check && bad > 0 {
		return errReported
	}
	return nil
}

// rowDeploy fills the row's deploy settings: the command line's, with the
// row's deploy target and verify address on top. Each target is resolved
// (binaries found, configs checked) once per run, not once per row.
func (a *app) rowDeploy(o *batchOptions, stateDir string, row *batch.Row, cache map[string]store.Deploy) (store.Deploy, error) {
	target := row.Deploy
	if target == "" {
		target = o.deploy.Target
	}
	d, ok := cache[target]
	if !ok {
		flags := o.deploy
		flags.Target = target
		var err error
		if d, err = a.mode().deploy(&flags, stateDir, nil); err != nil {
			return d, err
		}
		cache[target] = d
	}
	if row.VerifyAddr != "" {
		d.VerifyAddr = row.VerifyAddr
	}
	return d, nil
}

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
	spec := runSpec{limits: limits, waitLock: o.WaitLock, Options: engine.Options{
		Command: "batch", Preflight: checker, Concurrency: o.Concurrency, Days: o.Days, MaxWait: o.MaxWait,
	}}
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
	spec.Observe = func(it *engine.Item) { a.sayRow(file, it) }
	// A deploy that failed is said once too, when the deploy is done.
	spec.Deployed = func(it *engine.Item) {
		if it.Outcome == engine.Failed {
			a.sayRow(file, it)
		}
	}
	if !a.stderrTTY || a.global.Quiet || o.JSON {
		return
	}
	prog := progress.New(a.err, rows, a.now)
	a.logTo(prog)
	spec.Deploying = func(n int) { prog.Phase(fmt.Sprintf("deploying %d certificates", n)) }
	spec.Observe = func(it *engine.Item) {
		prog.Step(it.Outcome.Done())
		a.sayRow(file, it)
	}
	spec.done = func() {
		prog.Finish()
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
		a.say.warningf("%s: deferred: %s%s", where, it.Error, it.NextAttemptWords())
	default:
		a.say.errorf("%s: %s: %s", where, it.Outcome.Words(), it.Error)
	}
	if it.Hint != "" {
		a.say.hintf("%s", it.Hint)
	}
}

// printBatchSummary prints a table of every row that needs attention or
// changed, then the counts (engine.Result.BatchTable).
func (a *app) printBatchSummary(res *engine.Result) {
	if !a.global.Quiet {
		res.BatchTable(a.out)
	}
}
