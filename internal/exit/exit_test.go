package exit

import (
	"errors"
	"fmt"
	"io/fs"
	"testing"

	"github.com/lbcert/lbcert/internal/hint"
)

// Code is the one place an error becomes an exit code: every shape an
// error reaches the top in, and the code it must give.
func TestCode(t *testing.T) {
	locked := &Error{Code: Locked, Msg: "another lbcert holds /var/lib/lbcert"}
	cases := []struct {
		name string
		err  error
		want int
	}{
		{"nil", nil, OK},
		{"plain error", errors.New("boom"), Failure},
		{"Errorf", Errorf("read %s: %w", "x", fs.ErrNotExist), Failure},
		{"an *Error's own code", locked, Locked},
		{"*Error wrapped by fmt.Errorf", fmt.Errorf("renew: %w", locked), Locked},
		{"*Error under a hint", hint.Wrap(&Error{Code: Unavailable, Msg: "redis"}, "start redis"), Unavailable},
		{"*Error in errors.Join", errors.Join(errors.New("mail"), &Error{Code: Partial, Msg: "partial"}), Partial},
		{"Reported", Reported(Partial), Partial},
		{"Interrupted", &Error{Code: Interrupted, Msg: "interrupted"}, Interrupted},
		{"OK code on an error", &Error{Code: OK, Msg: "nothing"}, OK},
	}
	for _, tc := range cases {
		if got := Code(tc.err); got != tc.want {
			t.Errorf("%s: Code = %d, want %d", tc.name, got, tc.want)
		}
	}
}

// Errorf wraps with %w: errors.Is and errors.As see the cause, and a
// hint offered by a core package's error still reaches the user.
func TestErrorfWraps(t *testing.T) {
	cause := hint.Wrap(fs.ErrPermission, "run as root")
	err := Errorf("--webroot /srv: %w", cause)
	if !errors.Is(err, fs.ErrPermission) {
		t.Fatalf("errors.Is lost the cause: %v", err)
	}
	if got := Hint(err); got != "run as root" {
		t.Fatalf("Hint = %q, want the core package's", got)
	}
	if got := err.Error(); got != "--webroot /srv: permission denied" {
		t.Fatalf("Error() = %q", got)
	}
	// The *Error's own hint wins over one further down.
	if got := Hint(Errorf("x: %w", cause).WithHint("mine")); got != "mine" {
		t.Fatalf("Hint = %q, want the *Error's own", got)
	}
	var e *Error
	if !errors.As(fmt.Errorf("outer: %w", err), &e) || e.Code != Failure {
		t.Fatalf("errors.As did not find the *Error")
	}
}
