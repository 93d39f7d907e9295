package catalog_test

import (
	"bytes"
	"context"
	"errors"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/lbcert/lbcert/internal/catalog"
	"github.com/lbcert/lbcert/internal/catalog/catalogtest"
	"github.com/lbcert/lbcert/internal/store"
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
		names, others, err := catalog.NamesBeside(context.Background(), w, other, "the names never issued are not retried this run")
		if !slices.Equal(names, []string{"a.example", "b.example"}) || !slices.Equal(others, []string{"never.example"}) || err != catErr {
			t.Errorf("NamesBeside = %v, %v, %v; want both lists and the catalog's error %v", names, others, err, catErr)
		}
		if !strings.Contains(warned.String(), "not retried") || !strings.Contains(warned.String(), "renewal/: unreadable") {
			t.Errorf("the other listing's error was not warned about: %q", warned.String())
		}
		warned.Reset()
	}
}

// A name that is both a lineage and on record as never issued (its
// first version saved, its link in live/ not made: a deploy owed, and
// failures on record) comes back once, as a lineage: a renew pass ran
// it twice. A name whose archive holds no version (its first save
// killed) stays never issued, so that the next pass orders it again.
func TestNamesBesideListsANameOnce(t *testing.T) {
	st := store.New(t.TempDir())
	for _, n := range []string{"live.example", "owed.example"} {
		l, f := catalogtest.Cert(t, n, time.Now())
		save := st.Save
		if n == "owed.example" {
			save = func(l *store.Lineage, f store.Files) (int, int, error) {
				v, err := st.SaveVersion(l, f)
				return v, 0, err
			}
		}
		if _, _, err := save(l, f); err != nil {
			t.Fatal(err)
		}
	}
	// killed.example's first save was killed: its archive holds only
	// the temporary directory of a version never finished.
	if err := os.MkdirAll(filepath.Join(st.Dir, "archive", "killed.example", ".tmp-1-4242"), 0o700); err != nil {
		t.Fatal(err)
	}
	for _, n := range []string{"owed.example", "never.example", "killed.example"} {
		if err := st.WriteStatus(n, store.Status{Failures: 1, LastError: "refused"}); err != nil {
			t.Fatal(err)
		}
	}
	names, others, err := catalog.NamesBeside(context.Background(), catalog.NewDir(st), st.FailedNames, "not listed")
	slices.Sort(names)
	slices.Sort(others)
	if err != nil || !slices.Equal(names, []string{"live.example", "owed.example"}) || !slices.Equal(others, []string{"killed.example", "never.example"}) {
		t.Errorf("NamesBeside = %v, %v, %v; want the two lineages, and killed.example and never.example as never issued", names, others, err)
	}
}
