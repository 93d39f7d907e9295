package fleet

import (
	"context"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/lbcert/lbcert/internal/store"
)

// A name deleted on lb1 just before Redis was emptied, before lb2 saw
// the delete (e2e TestFleetDefectDeleteSurvivesFlushall, in full test
// runs): lb1 looked at the rebuilt Redis, then lb2 saw lb1's look and
// published its certificates, the deleted name among them, before lb1
// put its tombstone back. A node's tombstones are in Redis before it
// says it has looked, so lb2's copy is refused and the name is never
// back in the fleet (I3).
func TestTombstonesGoInBeforeTheLook(t *testing.T) {
	lookWait = 10 * time.Second
	defer func() { lookWait = 0 }()
	_, sh := startRedis(t)
	ctx := context.Background()
	dir := t.TempDir()
	lb1, err := Init(ctx, sh, store.New(filepath.Join(dir, "lb1")), "lb1")
	if err != nil {
		t.Fatal(err)
	}
	lb2 := joinApproved(t, sh, lb1, dir, "lb2")
	issued := time.Now().Add(-time.Minute)
	for _, n := range []*Node{lb1, lb2} {
		if _, _, err := n.Local.Save(&store.Lineage{Name: "gone.example", Domains: []string{"gone.example"}, IssuedAt: issued, Cert: store.CertInfo{Serial: "0a", NotBefore: issued, NotAfter: issued.Add(time.Hour)}},
			store.Files{Cert: []byte("C"), Chain: []byte("CH"), Fullchain: []byte("F"), Key: []byte("K")}); err != nil {
			t.Fatal(err)
		}
	}
	if err := (&Catalog{N: lb1}).Delete(ctx, "gone.example"); err != nil {
		t.Fatal(err)
	}
	sh.Client().FlushAll(ctx)

	// lb1 rebuilds, looks, and waits for lb2's look.
	done := make(chan error, 1)
	go func() { done <- lb1.CheckSeeded(ctx) }()
	waitFor(t, func() bool {
		gen, _ := sh.HGet(ctx, "meta", "gen")
		looked, _ := sh.Looked(ctx, gen)
		return gen != "" && looked["lb1"]
	})
	time.Sleep(100 * time.Millisecond) // lb1 is in its wait between two looks
	if err := lb2.CheckSeeded(ctx); err != nil {
		t.Fatalf("lb2's catch-up: %v", err)
	}
	if names, _ := sh.Names(ctx); slices.Contains(names, "gone.example") {
		t.Errorf("lb2 published a name lb1 deleted before Redis was emptied: %v", names)
	}
	if err := <-done; err != nil {
		t.Fatalf("lb1's rebuild: %v", err)
	}
	if names, _ := sh.Names(ctx); slices.Contains(names, "gone.example") {
		t.Errorf("after both rebuilt: %v", names)
	}
	if gone, _ := sh.IsDeleted(ctx, "gone.example"); !gone {
		t.Error("the tombstone is not in the rebuilt Redis")
	}
}
