package main

import (
	"errors"

	"github.com/lbcert/lbcert/internal/engine"
	"github.com/lbcert/lbcert/internal/fleet/rdb"
	"github.com/lbcert/lbcert/internal/store"
)

// Exit codes: a contract with cron jobs and scripts (README "Exit
// codes", and exitCodesHelp): once published, a number never changes
// meaning.
const (
	exitOK          = 0   // everything asked for was done, or nothing was due
	exitFailure     = 1   // bad input, the CA refused, a deploy failed: nothing is in place
	exitPartial     = 2   // some certificates are in place and some failed or were deferred
	exitLocked      = 3   // another lbcert process holds the state directory
	exitUnavailable = 4   // fleet mode: the fleet's Redis did not answer; nothing was ordered
	exitInterrupted = 130 // SIGINT or SIGTERM stopped the run (128+2, as shells do)
)

// The outcomes a command reports beyond its plain errors. Commands wrap
// them (mark); exitCode is the only reader.
var (
	// errPartial: some of the work is done and some is not.
	errPartial = errors.New("partial failure")
	// errInterrupted: a signal stopped the run.
	errInterrupted = errors.New("interrupted")
	// errReported: the command printed its failures itself; only the
	// exit code is left (the printer says nothing more).
	errReported = errors.New("failures reported above")
)

// exitCode is the one place an error becomes an exit code (restic's
// main.go does the same). Core packages return plain wrapped errors;
// the kind is found anywhere in the chain, in this order. signalled
// says SIGINT or SIGTERM arrived while the command ran.
func exitCode(err error, signalled bool) int {
	switch {
	case err == nil:
		return exitOK
	case errors.As(err, new(*store.LockedError)):
		// First: a second run that waited for the lock and was then
		// stopped is still "locked" to the script that started it.
		return exitLocked
	case signalled, errors.Is(err, errInterrupted):
		return exitInterrupted
	case errors.As(err, new(*rdb.Unavailable)):
		return exitUnavailable
	case errors.Is(err, errPartial):
		return exitPartial
	}
	return exitFailure
}

// marked is err that exitCode counts as kind; it prints as err.
type marked struct {
	error
	kind error
}

func (m marked) Is(target error) bool { return target == m.kind }
func (m marked) Unwrap() error        { return m.error }

// mark makes err count as kind (errPartial, errInterrupted).
func mark(err, kind error) error { return marked{err, kind} }

// runError is the error of an engine run, for the table above:
//
//	interrupted   the run was stopped (what was obtained is saved and deployed)
//	nil           every item is in place: issued, renewed, deployed or not due
//	              (and installed on this node)
//	failed        nothing is in place and nothing was deferred
//	partial       anything else: some items failed or were deferred to a
//	              later run (backoff, budget, the CA's Retry-After) while
//	              others are fine, or all were deferred
//
// The items themselves were printed by the command; a mail that failed
// alone makes a good run partial.
func runError(res *engine.Result, mailErr error) error {
	// A certificate obtained and saved whose install on this node failed
	// (its disk, its write lock) is not in place here: left, like a
	// deferred one, to the next run or the fleet's agent.
	notInstalled := res.NotInstalled()
	done, deferred := res.Done()-notInstalled, res.Counts[engine.Deferred]+notInstalled
	notDone := len(res.Items) - done
	switch {
	case res.Interrupted:
		return mark(errors.New(res.Interruption()+"; run the same command again to finish"), errInterrupted)
	case notDone == 0:
		return mailErr
	case done == 0 && deferred == 0:
		return errReported
	}
	return mark(errReported, errPartial)
}
