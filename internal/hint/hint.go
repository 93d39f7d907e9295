// Package hint carries "what to try next" from the package that knows it
// to the command that prints it, without the core packages knowing about
// exit codes. An error offers a hint by having a HintText() string method
// anywhere in its chain; hint.Of finds the first one.
//
// Only cmd/lbcert turns errors into exit codes (exitCode, its one table); acme,
// preflight, issuer and the engine return plain wrapped errors, some of
// them carrying a hint through this package.
package hint

import (
	"errors"
	"fmt"
)

// Hinter is an error that knows what the user should try next.
type Hinter interface {
	HintText() string
}

// Error is an error with a hint. It wraps Err, so errors.Is and
// errors.As see through it.
type Error struct {
	Err  error
	Text string
}

func (e *Error) Error() string    { return e.Err.Error() }
func (e *Error) Unwrap() error    { return e.Err }
func (e *Error) HintText() string { return e.Text }

// Wrap attaches a hint to err; a nil err stays nil.
func Wrap(err error, format string, args ...any) error {
	if err == nil {
		return nil
	}
	return &Error{Err: err, Text: fmt.Sprintf(format, args...)}
}

// Errorf is fmt.Errorf (so %w wraps) with a hint.
func Errorf(hintText, format string, args ...any) error {
	return &Error{Err: fmt.Errorf(format, args...), Text: hintText}
}

// Of returns the first non-empty hint in err's chain, or "". It walks
// joined errors (Unwrap() []error) too, depth first.
func Of(err error) string {
	for err != nil {
		if h, ok := err.(Hinter); ok && h.HintText() != "" {
			return h.HintText()
		}
		switch u := err.(type) {
		case interface{ Unwrap() []error }:
			for _, e := range u.Unwrap() {
				if h := Of(e); h != "" {
					return h
				}
			}
			return ""
		default:
			err = errors.Unwrap(err)
		}
	}
	return ""
}

// Set replaces the hint of the first *Error in err's chain, or wraps err
// with one when it has none. Callers that know the set-up better than
// the package that raised err (issuer knows the webroot) use it.
func Set(err error, text string) error {
	var e *Error
	if errors.As(err, &e) {
		e.Text = text
		return err
	}
	return &Error{Err: err, Text: text}
}
