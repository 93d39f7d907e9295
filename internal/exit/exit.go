// Package exit owns lbcert's exit codes and the error type that carries one.
//
// The codes are a contract with cron jobs and scripts (see README, "Exit
// codes"): once published, a number never changes meaning. Every error that
// reaches the top of a command is either an *Error, which says which code to
// use and what the user should try next, or a plain error, which means
// Failure.
package exit

import (
	"errors"
	"fmt"

	"github.com/lbcert/lbcert/internal/hint"
)

// Exit codes. Keep README.md and the root command's help in step with these.
const (
	OK          = 0   // everything asked for was done, or nothing was due
	Failure     = 1   // the run failed: bad input, CA refused, I/O error
	Partial     = 2   // some certificates succeeded and some failed
	Locked      = 3   // another lbcert process holds the state directory
	Unavailable = 4   // fleet mode: the fleet's Redis did not answer; nothing was ordered without it
	Interrupted = 130 // SIGINT or SIGTERM stopped the run (128+2, as shells do)
)

// Error is an error with an exit code and an optional hint that tells the
// user what to try next. Msg is one line, lowercase, with no trailing period.
type Error struct {
	Code int
	Msg  string
	Hint string
	Err  error
	// Reported means the command already printed its failures one by
	// one (a partial run's summary), so only the code is left to use.
	Reported bool
}

// Reported returns an error that carries only an exit code, for a run
// that has printed its own failures.
func Reported(code int) *Error {
	return &Error{Code: code, Msg: fmt.Sprintf("exit status %d", code), Reported: true}
}

func (e *Error) Error() string {
	if e.Err != nil && e.Msg == "" {
		return e.Err.Error()
	}
	if e.Err != nil {
		return e.Msg + ": " + e.Err.Error()
	}
	return e.Msg
}

func (e *Error) Unwrap() error { return e.Err }

// HintText makes *Error a hint.Hinter.
func (e *Error) HintText() string { return e.Hint }

// Errorf returns an *Error with code Failure. It formats with
// fmt.Errorf, so a %w argument stays in the chain for errors.Is/As and
// for its hint.
func Errorf(format string, args ...any) *Error {
	return &Error{Code: Failure, Err: fmt.Errorf(format, args...)}
}

// WithHint returns e with its hint set, for chaining at the call site.
func (e *Error) WithHint(format string, args ...any) *Error {
	e.Hint = fmt.Sprintf(format, args...)
	return e
}

// Code reports the exit code for err: nil is OK, an *Error anywhere in the
// chain gives its code, anything else is Failure.
func Code(err error) int {
	if err == nil {
		return OK
	}
	var e *Error
	if errors.As(err, &e) {
		return e.Code
	}
	return Failure
}

// Hint returns the first hint found in err's chain, or "": an *Error's
// own, or one offered by a core package through hint.Hinter.
func Hint(err error) string { return hint.Of(err) }
