package fleet

import (
	"context"
	"testing"

	"github.com/lbcert/lbcert/internal/catalog"
	"github.com/lbcert/lbcert/internal/catalog/catalogtest"
	"github.com/lbcert/lbcert/internal/store"
)

// The fleet's catalog keeps the same contract as a single host's.
func TestCatalogContract(t *testing.T) {
	catalogtest.Run(t, func(t *testing.T) catalog.Catalog {
		_, sh := startRedis(t)
		n, err := Init(context.Background(), sh, store.New(t.TempDir()), "lb1")
		if err != nil {
			t.Fatal(err)
		}
		return NewCatalog(n)
	})
}
