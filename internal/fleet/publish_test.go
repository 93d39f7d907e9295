package fleet

import (
	"context"
	"testing"
	"time"

	"github.com/lbcert/lbcert/internal/catalog/catalogtest"
	"github.com/lbcert/lbcert/internal/store"
)

// A run that ordered before Redis lost its data (restarted without it,
// or FLUSHALL) publishes into a Redis that names no data key epoch: it
// rebuilds Redis from this node first, as opening the fleet would, and
// publishes, instead of throwing away a certificate the CA counted.
// Found by TestFleetRandomFaults seed 1 (short mode): an issue's publish
// 50 ms after redis-server came back empty was refused ("sealed under a
// data key that is no longer the fleet's").
func TestPublishIntoAnEmptiedRedisRebuildsFirst(t *testing.T) {
	_, sh := startRedis(t)
	ctx := context.Background()
	n, err := Init(ctx, sh, store.New(t.TempDir()), "lb1")
	if err != nil {
		t.Fatal(err)
	}
	c := NewCatalog(n)
	lease, err := c.Acquire(ctx, "a.test", time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	defer lease.Release()
	l, files := catalogtest.Cert(t, "a.test", time.Now().UTC().Truncate(time.Second))
	sh.Client().FlushAll(ctx)
	v, err := c.Publish(ctx, lease, l, files)
	if err != nil {
		t.Fatalf("publish into an emptied Redis: %v", err)
	}
	if id, _ := sh.HGet(ctx, "meta", "id"); id != n.ID {
		t.Errorf("Redis holds fleet %q after the publish, want %s rebuilt", id, n.ID)
	}
	b, err := sh.Bundle(ctx, "a.test")
	if err != nil || b.Version != v || b.Serial != l.Cert.Serial {
		t.Fatalf("the fleet's a.test after the publish: %+v, %v; want version %d serial %s", b, err, v, l.Cert.Serial)
	}
}
