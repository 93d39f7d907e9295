package catalog_test

import (
	"bytes"
	"context"
	"errors"
	"log/slog"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/lbcert/lbcert/internal/catalog"
)

// waitingNames is a catalog whose Names waits until the other listing
// has started, and the other listing waits for Names: read one after
// the other, in either order, one of them gives up.
type waitingNames struct {
	catalog.Catalog
	started, other chan struct{}
	err            error
}

func (w waitingNames) Names(ctx context.Context) ([]string, error) {
	close(w.started)
	if !within(w.other) {
		return nil, errors.New("the other listing never started")
	}
	return []string{"a.example", "b.example"}, w.err
}

func within(c chan struct{}) bool {
	select {
	case <-c:
		return true
	case <-time.After(5 * time.Second):
		return false
	}
}

// TestNamesBesideReadsBothAtOnce checks the two listings run at the
// same time, that each one's answer (and only the catalog's error) comes
// back, and that the other listing's error is a warning, not silence.
func TestNamesBesideReadsBothAtOnce(t *testing.T) {
	var warned bytes.Buffer
	prev := slog.Default()
	defer slog.SetDefault(prev)
	slog.SetDefault(slog.New(slog.NewTextHandler(&warned, &slog.HandlerOptions{Level: slog.LevelWarn})))
	for _, catErr := range []error{nil, errors.New("archive/: permission denied")} {
		w := waitingNames{started: make(chan struct{}), other: make(chan struct{}), err: catErr}
		other := func() ([]string, error) {
			close(w.other)
			if !within(w.started) {
				return nil, nil
			}
			return []string{"never.example"}, errors.New("renewal/: unreadable")
		}
		names, others, err := catalog.NamesBeside(context.Background(), w, other)
		if !slices.Equal(names, []string{"a.example", "b.example"}) || !slices.Equal(others, []string{"never.example"}) || err != catErr {
			t.Errorf("NamesBeside = %v, %v, %v; want both lists and the catalog's error %v", names, others, err, catErr)
		}
		if !strings.Contains(warned.String(), "not retried") || !strings.Contains(warned.String(), "renewal/: unreadable") {
			t.Errorf("the other listing's error was not warned about: %q", warned.String())
		}
		warned.Reset()
	}
}
