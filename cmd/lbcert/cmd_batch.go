package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"os"
	"sort"
	"strings"
	"time"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"

	"github.com/lbcert/lbcert/internal/acme"
	"github.com/lbcert/lbcert/internal/batch"
	"github.com/lbcert/lbcert/internal/challenge"
	"github.com/lbcert/lbcert/internal/engine"
	"github.com/lbcert/lbcert/internal/exit"
	"github.com/lbcert/lbcert/internal/names"
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
crash or Ctrl-C left. Orders run --concurrency at a time, inside the client-side budget
(--rate-*, saved in --dir and shared with renew), after a pre-flight check
that each name routes /.well-known/acme-challenge/ to lbcert. All deploys
happen once at the end, and each recipient gets one mail.

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
	f.IntVar(&o.Concurrency, "concurrency", 8, "orders in flight at once")
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
	if o.Concurrency < 1 {
		return exit.Errorf("--concurrency %d: want 1 or more", o.Concurrency)
	}
	if err := checkDays(o.Days); err != nil {
		return err
	}
	if err := acme.CheckKeyType(o.KeyType); err != nil {
		return exit.Errorf("%w", err)
	}
	if o.Webroot != "" && o.Standalone {
		return exit.Errorf("--webroot and --standalone both given: choose one default way to answer HTTP-01")
	}
	if net.ParseIP(o.VIPHost) == nil {
		if _, err := names.Domain(o.VIPHost); err != nil {
			return exit.Errorf("--vip-host %q: want the load balancer's IP address or host name", o.VIPHost)
		}
	}
	m := a.mode()
	if err := m.mayOrder("batch"); err != nil {
		return err
	}
	fallback, err := m.challenge(challengeFlags{webroot: o.Webroot, standalone: o.Standalone, httpAddr: o.HTTPAddr, batch: true})
	if err != nil {
		return err
	}
	limits, err := o.pace.limits()
	if err != nil {
		return err
	}
	checker, err := o.preflight.checker()
	if err != nil {
		return err
	}

	res, err := a.readBatch(file, o)
	if err != nil {
		return err
	}
	var invalid []*engine.Item
	for _, p := range res.Problems {
		invalid = append(invalid, &engine.Item{Line: p.Line, Outcome: engine.Invalid, Error: p.Msg})
	}
	// Rows that name no challenge take the command line's; a row that
	// still has none is bad input like any other.
	deploys := map[string]store.Deploy{}
	var todo []batchRow
	good := 0
	for _, row := range res.Rows {
		var problem string
		row.Challenge, problem = m.rowChallenge(row, fallback)
		var d store.Deploy
		if problem == "" {
			var err error
			if d, err = a.rowDeploy(o, st.Dir, row, deploys); err != nil {
				problem = oneLine(err)
			}
		}
		if problem != "" {
			invalid = append(invalid, &engine.Item{Line: row.Line, Outcome: engine.Invalid, Error: problem})
			continue
		}
		good++
		if !o.Check { // --check keeps no per-row state: 100,000 rows stay small
			todo = append(todo, batchRow{row: row, deploy: d})
		}
	}
	res.Rows = nil
	sort.SliceStable(invalid, func(i, j int) bool { return invalid[i].Line < invalid[j].Line })
	for _, it := range invalid {
		if it.Line > 0 {
			fmt.Fprintf(a.err, "%s:%d: %s\n", file, it.Line, it.Error)
		} else {
			fmt.Fprintf(a.err, "%s: %s\n", file, it.Error)
		}
	}
	bad := len(invalid)
	if o.Check {
		if res.Format == "" { // a file-level problem: no rows, no format
			a.printf("%s: %d good, %d bad\n", file, good, bad)
		} else {
			rows := "rows"
			if good+bad == 1 {
				rows = "row"
			}
			a.printf("%s: %d %s (%s format): %d good, %d bad\n", file, good+bad, rows, res.Format, good, bad)
		}
		if bad > 0 {
			return exit.Reported(exit.Failure)
		}
		return nil
	}
	if bad > 0 && o.Strict {
		return exit.Errorf("%s: %d bad rows; nothing was sent to the CA (--strict)", file, bad)
	}
	if len(todo) == 0 {
		return exit.Errorf("%s: no good rows; nothing was sent to the CA", file).WithHint("fix the rows above; 'lbcert batch %s --check' checks without ordering", file)
	}
	result, err := a.executeBatch(ctx, st, o, file, string(res.Format), todo, invalid, limits, checker)
	if err != nil {
		return err
	}
	if o.JSON {
		a.printJSON(result)
	} else {
		a.printBatchSummary(result)
	}
	a.sayUnreachable(result)
	a.sayRollouts(result)
	return finish(result, a.mailReport(ctx, st, result.Report()))
}

// readBatch opens and parses the file ("-" is stdin).
func (a *app) readBatch(file string, o *batchOptions) (*batch.Result, error) {
	var r io.Reader
	if file == "-" {
		r = os.Stdin
	} else {
		f, err := os.Open(file)
		if errors.Is(err, fs.ErrNotExist) {
			return nil, exit.Errorf("%s: no such file", file)
		}
		if err != nil {
			return nil, exit.Errorf("%s: %w", file, unwrapPath(err))
		}
		defer f.Close()
		if fi, err := f.Stat(); err == nil && fi.IsDir() {
			return nil, exit.Errorf("%s: is a directory, want a CSV file", file)
		}
		r = f
	}
	res := batch.Parse(r, batch.Defaults{
		HTTPAddr:     o.HTTPAddr,
		VIPHost:      o.VIPHost,
		KeyTypeOK:    acme.CheckKeyType,
		CheckWebroot: challenge.CheckWebroot,
	})
	return res, nil
}

// rowDeploy fills the row's deploy settings: the command line's, with the
// row's deploy target and verify address on top. Each target is resolved
// (binaries found, configs checked) once per run, not once per row.
func (a *app) rowDeploy(o *batchOptions, stateDir string, row *batch.Row, cache map[string]store.Deploy) (store.Deploy, error) {
	target := row.Deploy
	if target == "" {
		target = o.deploy.target
	}
	d, ok := cache[target]
	if !ok {
		flags := o.deploy
		flags.target = target
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
