package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log"
	"log/slog"
	"os"
	"runtime/debug"
	"strings"
	"time"

	legolog "github.com/go-acme/lego/v4/log"
	"github.com/spf13/cobra"
	"github.com/spf13/pflag"

	"github.com/lbcert/lbcert/internal/acme"
	"github.com/lbcert/lbcert/internal/argfile"
	"github.com/lbcert/lbcert/internal/ca"
	"github.com/lbcert/lbcert/internal/config"
	"github.com/lbcert/lbcert/internal/interrupt"
	"github.com/lbcert/lbcert/internal/notify"
	"github.com/lbcert/lbcert/internal/secret"
	lbversion "github.com/lbcert/lbcert/internal/version"
)

// version is set by the Makefile through -ldflags; without it (go
// install, go build) the build info says what this binary is.
var version = "dev"

// buildVersion is this binary's version (package version).
func buildVersion(info *debug.BuildInfo, ok bool) string { return lbversion.Of(version, info, ok) }

// defaultConfig is read when it exists and no --config is given.
const defaultConfig = "/etc/lbcert/config.yaml"

// app is what every command shares: streams, environment, clock and the
// global settings. Commands receive it instead of reaching for os.*, so
// tests can run Main in-process with their own environment and time.
type app struct {
	in       io.Reader
	out, err io.Writer
	say      *printer // every "lbcert: ..." line on err
	getenv   func(string) string
	now      func() time.Time
	ctx      context.Context

	// stdinTTY, stdoutTTY, stderrTTY decide how output looks and whether
	// lbcert may ask a question; they never change what happens.
	stdinTTY, stdoutTTY, stderrTTY bool

	global    globalOptions
	mail      mailOptions
	fleetOpts fleetOptions
	fleetWait time.Duration  // fleet init/join/approve/remove --wait-lock
	flags     *pflag.FlagSet // the running command's flags, settings applied

	// hookStop ends running deploy hooks (hookGrace after the first
	// signal, or at the second); hardStop ends the mail step (the second
	// signal). Nil in tests: nothing stops them but their own timeouts.
	hookStop, hardStop context.Context
}

type globalOptions struct {
	Config      string
	Dir         string
	acct        acme.Settings // --server, --email, --eab-* ...
	cas         ca.Settings   // --fallback-ca, --ca-backoff
	Quiet       bool
	Verbose     bool
	HookConc    int
	Keep        int
	MetricsFile string
}

// Main runs lbcert with os.Args and returns the exit code. Nothing below
// it calls os.Exit.
func Main() int {
	secret.FromEnviron()
	a := &app{
		in: os.Stdin, out: os.Stdout, err: os.Stderr, say: &printer{w: os.Stderr},
		getenv: os.Getenv, now: time.Now,
		stdinTTY:  isTerminal(os.Stdin),
		stdoutTTY: isTerminal(os.Stdout),
		stderrTTY: isTerminal(os.Stderr),
	}
	defer a.trapSignals()()
	return a.run(os.Args[1:])
}

// hookGrace is how long deploy hooks may go on after the first SIGINT or
// SIGTERM, before they are ended as at their timeout.
const hookGrace = 10 * time.Second

// trapSignals is lbcert's answer to SIGINT and SIGTERM (package
// interrupt): a.ctx, a.hookStop and a.hardStop.
func (a *app) trapSignals() (release func()) {
	grace := hookGrace
	if d, err := time.ParseDuration(a.getenv("LBCERT_HOOK_GRACE")); err == nil { // for tests
		grace = d
	}
	s, release := interrupt.Trap(grace, func() {
		a.say.warningf("interrupted: no new orders; deploying what was obtained (hooks get %s more); interrupt again to stop at once", grace)
	})
	a.ctx, a.hookStop, a.hardStop = s.Work, s.Hooks, s.Now
	// A pipe named in a flag that stalls (a secret manager's) gives up
	// at the second signal, as everything else does: the first still
	// lets the report's mail read its password.
	argfile.StopOn(s.Now)
	return release
}

func (a *app) run(args []string) int {
	if a.say == nil {
		a.say = &printer{w: a.err}
	}
	root := a.newRootCmd()
	root.SetArgs(args)
	err := root.ExecuteContext(a.ctx)
	signalled := a.ctx != nil && a.ctx.Err() != nil
	code := exitCode(err, signalled)
	switch {
	case err == nil || errors.Is(err, errReported):
	case code == exitInterrupted && !errors.Is(err, errInterrupted):
		// A signal that cut something short (a mail in flight, say)
		// makes the run interrupted, whatever failure it caused.
		a.say.errorWithHint(fmt.Errorf("interrupted: %w", err))
	default:
		a.say.errorWithHint(err)
	}
	return code
}

const exitCodesHelp = `Exit codes:
  0    success, or nothing was due
  1    error: bad input, the CA refused, a deploy failed
  2    partial failure: some certificates succeeded, some failed
  3    locked: another lbcert process is using the state directory
  4    fleet mode: the fleet's Redis is unreachable; nothing was ordered
  130  interrupted by SIGINT or SIGTERM; nothing half-written was kept`

func (a *app) newRootCmd() *cobra.Command {
	g := &a.global
	root := &cobra.Command{
		Use:   "lbcert",
		Short: "Obtain and renew ACME certificates for nginx and HAProxy",
		Long: `lbcert obtains and renews free TLS certificates over ACME (Let's Encrypt,
ZeroSSL, any RFC 8555 CA) for hosts that terminate TLS on nginx or HAProxy.

Every setting has a flag, an environment variable (LBCERT_ and the flag
name in capitals, dashes as underscores: --http-addr is LBCERT_HTTP_ADDR)
and a config-file key (the flag name). A flag beats the environment, which
beats the config file, which beats the default.

` + exitCodesHelp,
		Version:       buildVersion(debug.ReadBuildInfo()),
		SilenceErrors: true,
		SilenceUsage:  true,
		// Commands, not the root, do the work.
		PersistentPreRunE: func(cmd *cobra.Command, args []string) error {
			return a.setup(cmd)
		},
	}
	if root.Version == "dev" {
		root.SetVersionTemplate(`lbcert version dev
(no version stamped: 'make build' stamps one; a plain 'go build' stamps the git revision,
 unless -buildvcs=false is set, as GOFLAGS or 'go env -w' can do, or the checkout is a git worktree)
`)
	}
	root.SetOut(a.out)
	root.SetErr(a.err)
	root.SetIn(a.in)
	root.SetFlagErrorFunc(func(cmd *cobra.Command, err error) error {
		return fmt.Errorf("%w (see '%s --help')", err, cmd.CommandPath())
	})

	pf := root.PersistentFlags()
	pf.StringVar(&g.Config, "config", "", "config file (YAML, keys are flag names; default "+defaultConfig+" if it exists)")
	pf.StringVar(&g.Dir, "dir", "/etc/lbcert", "state directory: accounts, certificates, lock")
	pf.StringVar(&g.acct.Server, "server", "", "ACME directory URL (default Let's Encrypt production)")
	pf.BoolVar(&g.acct.Staging, "staging", false, "use Let's Encrypt's staging server, for testing")
	pf.StringVar(&g.acct.CABundle, "ca-bundle", "", "PEM file of roots to trust for the ACME server (private CAs, Pebble)")
	pf.StringVar(&g.acct.Email, "email", "", "account email address, for the CA's notices")
	pf.BoolVar(&g.acct.AgreeTOS, "agree-tos", false, "accept the CA's terms of service (required without a terminal)")
	pf.StringVar(&g.acct.EABKid, "eab-kid", "", "external account binding key ID (ZeroSSL and others)")
	pf.StringVar(&g.acct.EABHMACFile, "eab-hmac-key-file", "", "file holding the EAB HMAC key (or set LBCERT_EAB_HMAC_KEY); never passed in argv")
	pf.StringArrayVar(&g.cas.Fallbacks, "fallback-ca", nil, "a CA to order from when the one before it fails itself: NAME [URL] [email=, eab-kid=, eab-hmac-key-file=, ca-bundle=, preferred-chain=, verify-roots=, profile=FROM:TO] (repeat, in order; its EAB HMAC key from the file or LBCERT_EAB_HMAC_KEY_NAME)")
	pf.DurationVar(&g.cas.Backoff, "ca-backoff", 5*time.Minute, "how long a CA that failed several orders in a row is passed over for the next one, before an order tries it again (doubling while it keeps failing, up to 1h)")
	pf.BoolVarP(&g.Quiet, "quiet", "q", false, "print only warnings and errors")
	pf.BoolVarP(&g.Verbose, "verbose", "v", false, "print debug detail, including the ACME exchange")
	pf.IntVar(&g.HookConc, "hook-concurrency", 1, "deploy hooks run at once (1: one after another, as certbot runs them)")
	pf.IntVar(&g.Keep, "keep-versions", 3, "versions of each certificate kept in the archive after a successful deploy, the live one included (older keys are removed)")
	pf.StringVar(&g.MetricsFile, "metrics-file", "", "after every run, write Prometheus metrics here (node_exporter textfile format); off when empty")
	a.mail.register(pf)
	a.fleetOpts.register(pf)

	root.AddCommand(
		a.newIssueCmd(nil),
		a.newBatchCmd(),
		a.newRenewCmd(),
		a.newCronCmd(),
		a.newListCmd(),
		a.newShowCmd(),
		a.newDeleteCmd(),
		a.newMailTestCmd(),
		a.newFleetCmd(),
		a.newAgentCmd(),
	)
	completeValues(root)
	return root
}

// setup resolves settings for cmd (flag, env, config file, default) and
// sets up logging. It runs before every command.
func (a *app) setup(cmd *cobra.Command) error {
	fs := cmd.Flags()
	path := a.global.Config
	if !fs.Changed("config") {
		path = a.getenv(config.EnvName("config"))
	}
	file, err := config.Find(path, defaultConfig, a.knownKey(cmd.Root()))
	if err != nil {
		return err
	}
	if err := config.Apply(fs, file, a.getenv); err != nil {
		return err
	}
	a.flags = fs
	a.setupLogging()
	if err := a.fleetOpts.CheckURL(); err != nil {
		return err
	}
	if err := a.global.cas.Check(a.account(), a.getenv); err != nil {
		return err
	}
	return a.mail.Check()
}

// configPath is the config file this run reads, or would read.
func (a *app) configPath() string {
	if a.global.Config != "" {
		return a.global.Config
	}
	if p := a.getenv(config.EnvName("config")); p != "" {
		return p
	}
	return defaultConfig
}

// knownKey accepts any setting of any command, so one config file can
// serve issue, renew and batch alike.
func (a *app) knownKey(root *cobra.Command) func(string) bool {
	var sets []*pflag.FlagSet
	var walk func(c *cobra.Command)
	walk = func(c *cobra.Command) {
		sets = append(sets, c.PersistentFlags(), c.LocalFlags())
		for _, sc := range c.Commands() {
			walk(sc)
		}
	}
	walk(root)
	return config.Known(sets...)
}

func (a *app) setupLogging() {
	a.logTo(a.err)
	// lego logs every step of every order; that is -v material.
	legolog.Logger = log.New(slogWriter{}, "", 0)
}

// logTo sends the printer's lines to w, log lines at the level -q/-v
// chose; batch points it at its progress bar so lines are drawn above
// the bar.
func (a *app) logTo(w io.Writer) {
	a.say.to(w)
	level := slog.LevelInfo
	switch {
	case a.global.Verbose:
		level = slog.LevelDebug
	case a.global.Quiet:
		level = slog.LevelWarn
	}
	slog.SetDefault(slog.New(&lineHandler{p: a.say, level: level}))
}

// slogWriter turns lego's log lines into debug records.
type slogWriter struct{}

func (slogWriter) Write(p []byte) (int, error) {
	slog.Debug(strings.TrimSpace(string(p)), "from", "lego")
	return len(p), nil
}

// printf writes a result line to stdout unless -q.
func (a *app) printf(format string, args ...any) {
	if a.global.Quiet {
		return
	}
	fmt.Fprintf(a.out, format, args...)
}

func isTerminal(f *os.File) bool {
	fi, err := f.Stat()
	return err == nil && fi.Mode()&os.ModeCharDevice != 0
}

// valueCompletions are the known values of flags that take one of a few,
// completed by every shell's completion script (delete completes its
// --reason itself).
var valueCompletions = map[string]func() []string{
	"key-type": func() []string { return acme.KeyTypes },
	"deploy":   func() []string { return []string{"nginx", "haproxy", "none"} },
	"smtp-tls": func() []string { return notify.TLSModes },
	"report":   func() []string { return []string{"changes", "always", "never"} },
	// Let's Encrypt's profiles; another CA's are whatever it lists.
	"profile": func() []string { return []string{"classic", "tlsserver", "shortlived"} },
}

// completeValues registers valueCompletions on every command that defines
// one of those flags.
func completeValues(c *cobra.Command) {
	for name, values := range valueCompletions {
		if c.LocalNonPersistentFlags().Lookup(name) != nil || c.PersistentFlags().Lookup(name) != nil {
			c.RegisterFlagCompletionFunc(name, func(*cobra.Command, []string, string) ([]string, cobra.ShellCompDirective) {
				return values(), cobra.ShellCompDirectiveNoFileComp
			})
		}
	}
	for _, sc := range c.Commands() {
		completeValues(sc)
	}
}
