package store

import (
	"errors"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// Writers that wait while a sync runs share the next one: ten writers
// arriving during a held sync cost one more sync, not ten; each returns
// only after a sync that began after it was called.
func TestGroupSyncShares(t *testing.T) {
	g := &groupSync{}
	g.cond = sync.NewCond(&g.mu)
	var calls atomic.Int32
	hold, held := make(chan struct{}), make(chan struct{})
	defer func(f func(int) error) { syncfsCall = f }(syncfsCall)
	syncfsCall = func(int) error {
		if calls.Add(1) == 1 {
			close(held)
			<-hold
		}
		return nil
	}
	first := make(chan error)
	go func() { first <- g.sync() }()
	<-held // the first sync runs, and was begun before the writers below
	var wg sync.WaitGroup
	var returned atomic.Int32
	for range 10 {
		wg.Go(func() {
			if err := g.sync(); err != nil {
				t.Error(err)
			}
			returned.Add(1)
		})
	}
	for deadline := time.Now().Add(10 * time.Second); g.waiting()+int(returned.Load()) < 10; runtime.Gosched() {
		if time.Now().After(deadline) {
			t.Fatalf("%d writers wait for a sync, want 10", g.waiting())
		}
	}
	if returned.Load() != 0 {
		t.Fatal("a writer returned on a sync that began before it")
	}
	close(hold)
	wg.Wait()
	if err := <-first; err != nil {
		t.Fatal(err)
	}
	if n := calls.Load(); n != 2 {
		t.Fatalf("%d syncs for 11 writers, want 2", n)
	}
}

// A failed sync fails every writer it was meant to cover, and not a
// writer that came after it.
func TestGroupSyncError(t *testing.T) {
	g := &groupSync{}
	g.cond = sync.NewCond(&g.mu)
	defer func(f func(int) error) { syncfsCall = f }(syncfsCall)
	bad := errors.New("EIO")
	syncfsCall = func(int) error { return bad }
	if err := g.sync(); !errors.Is(err, bad) {
		t.Fatalf("failed sync: %v", err)
	}
	syncfsCall = func(int) error { return nil }
	if err := g.sync(); err != nil {
		t.Fatalf("a later sync: %v", err)
	}
}

// durable syncs a real directory's file system.
func TestDurable(t *testing.T) {
	if err := durable(t.TempDir()); err != nil {
		t.Fatal(err)
	}
	if err := durable("/nonexistent/lbcert"); err == nil {
		t.Fatal("a missing directory: no error")
	}
}
