package catalog_test

import (
	"testing"

	"github.com/lbcert/lbcert/internal/catalog"
	"github.com/lbcert/lbcert/internal/catalog/catalogtest"
	"github.com/lbcert/lbcert/internal/store"
)

func TestDirContract(t *testing.T) {
	catalogtest.Run(t, func(t *testing.T) catalog.Catalog { return catalog.NewDir(store.New(t.TempDir())) })
}
