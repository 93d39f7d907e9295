package catalog_test

import (
	"bytes"
	"context"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/lbcert/lbcert/internal/catalog"
	"github.com/lbcert/lbcert/internal/catalog/catalogtest"
	"github.com/lbcert/lbcert/internal/store"
)

func TestDirContract(t *testing.T) {
	catalogtest.Run(t, func(t *testing.T) catalog.Catalog { return catalog.NewDir(store.New(t.TempDir())) })
}

// A heads index that cannot be saved costs the next pass time, never a
// decision: it is not a warning, which cron's -q would mail every night.
func TestPassThatCannotSaveItsIndexDoesNotWarn(t *testing.T) {
	old := store.Margin
	store.Margin = 0
	defer func() { store.Margin = old }()
	dir := t.TempDir()
	st := store.New(dir)
	l := &store.Lineage{Name: "w.example", Domains: []string{"w.example"}, Server: "https://ca.test/dir", KeyType: "ec256"}
	if _, err := st.SaveVersion(l, store.Files{Cert: []byte("c"), Chain: []byte("ch"), Fullchain: []byte("cch"), Key: []byte("k")}); err != nil {
		t.Fatal(err)
	}
	os.Symlink(t.TempDir(), filepath.Join(dir, "cache")) // refused: the store never writes through links
	var warned, said bytes.Buffer
	prev := slog.Default()
	defer slog.SetDefault(prev)
	slog.SetDefault(slog.New(slog.NewTextHandler(&warned, &slog.HandlerOptions{Level: slog.LevelWarn})))
	d := catalog.NewDir(st)
	time.Sleep(10 * time.Millisecond)
	end := d.Pass()
	d.Names(context.Background())
	if _, err := d.Head(context.Background(), "w.example"); err != nil {
		t.Fatal(err)
	}
	end()
	if warned.Len() > 0 {
		t.Errorf("a heads index that could not be saved was a warning: %s", warned.String())
	}
	slog.SetDefault(slog.New(slog.NewTextHandler(&said, &slog.HandlerOptions{Level: slog.LevelInfo})))
	end = d.Pass()
	d.Names(context.Background())
	d.Head(context.Background(), "w.example")
	end()
	if !strings.Contains(said.String(), "could not save the heads index") {
		t.Errorf("a heads index that could not be saved is not said at info level: %q", said.String())
	}
}
