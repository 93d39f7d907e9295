package hint

import (
	"errors"
	"fmt"
	"io/fs"
	"testing"
)

func TestOf(t *testing.T) {
	base := Wrap(fs.ErrNotExist, "create it with mkdir")
	cases := []struct {
		name string
		err  error
		want string
	}{
		{"nil", nil, ""},
		{"plain", errors.New("x"), ""},
		{"direct", base, "create it with mkdir"},
		{"wrapped by fmt", fmt.Errorf("open: %w", base), "create it with mkdir"},
		{"joined", errors.Join(errors.New("a"), base), "create it with mkdir"},
		{"errorf", Errorf("try --force", "lineage %s: %w", "x", fs.ErrExist), "try --force"},
	}
	for _, c := range cases {
		if got := Of(c.err); got != c.want {
			t.Errorf("%s: Of = %q, want %q", c.name, got, c.want)
		}
	}
	if !errors.Is(fmt.Errorf("x: %w", base), fs.ErrNotExist) {
		t.Error("Wrap hides the wrapped error from errors.Is")
	}
}

func TestSet(t *testing.T) {
	err := fmt.Errorf("obtain: %w", Wrap(errors.New("404"), "generic"))
	Set(err, "specific")
	if got := Of(err); got != "specific" {
		t.Errorf("Of after Set = %q", got)
	}
	plain := Set(errors.New("x"), "new")
	if Of(plain) != "new" {
		t.Errorf("Set on a plain error gave no hint")
	}
}
