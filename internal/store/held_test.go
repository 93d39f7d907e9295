package store

import (
	"errors"
	"os"
	"path/filepath"
	"testing"
)

// Held says whether another holds the lock, and writes nothing: not the
// directory when there is none, not the lock file.
func TestHeldWritesNothing(t *testing.T) {
	s := New(filepath.Join(t.TempDir(), "state"))
	if err := s.Held(); err != nil {
		t.Fatalf("no directory: %v", err)
	}
	if _, err := os.Stat(s.Dir); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("Held created the directory: %v", err)
	}
	l, err := s.TryLock()
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Held(); !errors.Is(err, ErrLocked) {
		t.Fatalf("held: %v", err)
	}
	l.Unlock()
	if err := s.Held(); err != nil {
		t.Fatalf("released: %v", err)
	}
	if _, err := s.TryLock(); err != nil {
		t.Fatalf("Held left the lock taken: %v", err)
	}
}

// FailedNames finds the names whose first order failed: failures on
// record, no lineage.
func TestFailedNames(t *testing.T) {
	s := New(t.TempDir())
	if err := s.WriteStatus("never.example.com", Status{Failures: 2, LastError: "refused"}); err != nil {
		t.Fatal(err)
	}
	if err := s.WriteStatus("quiet.example.com", Status{}); err != nil {
		t.Fatal(err)
	}
	got, err := s.FailedNames()
	if err != nil || len(got) != 1 || got[0] != "never.example.com" {
		t.Fatalf("FailedNames = %v, %v", got, err)
	}
}
