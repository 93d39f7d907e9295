package main

import (
	"bytes"
	"os"
	"path/filepath"
	"sort"
	"testing"
	"time"
)

// TestDocsUpToDate fails when man/ or completions/ differ from what the
// commands generate: run "make docs" and commit the result.
func TestDocsUpToDate(t *testing.T) {
	a := &app{out: &bytes.Buffer{}, err: &bytes.Buffer{}, getenv: func(string) string { return "" }, now: time.Now}
	files, err := generateDocs(a.newRootCmd())
	if err != nil {
		t.Fatal(err)
	}
	var stale []string
	for name, want := range files {
		dir := "../../completions"
		if filepath.Ext(name) == ".1" {
			dir = "../../man"
		}
		got, err := os.ReadFile(filepath.Join(dir, name))
		if err != nil || !bytes.Equal(got, want) {
			stale = append(stale, filepath.Join(filepath.Base(dir), name))
		}
	}
	// A committed page for a command that no longer exists is stale too.
	for _, dir := range []string{"../../man", "../../completions"} {
		entries, _ := os.ReadDir(dir)
		for _, e := range entries {
			if _, ok := files[e.Name()]; !ok && e.Name() != ".keep" {
				stale = append(stale, filepath.Join(filepath.Base(dir), e.Name())+" (no longer generated)")
			}
		}
	}
	sort.Strings(stale)
	if len(stale) > 0 {
		t.Fatalf("generated docs are stale; run 'make docs' and commit:\n%v", stale)
	}
	if _, ok := files["lbcert-renew.1"]; !ok {
		t.Fatal("no man page for lbcert renew")
	}
}
