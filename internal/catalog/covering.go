package catalog

import (
	"context"
	"fmt"
	"slices"
	"strings"

	"github.com/lbcert/lbcert/internal/hint"
	"github.com/lbcert/lbcert/internal/names"
)

// Covering is the one lineage of c whose certificate covers the name
// raw (delete -d): an error says when none does, or several do.
func Covering(ctx context.Context, c Catalog, raw string) (string, error) {
	d, err := names.Domain(raw)
	if err != nil {
		return "", err
	}
	all, err := c.Names(ctx)
	if err != nil {
		return "", err
	}
	var found []string
	for _, n := range all {
		if l, err := c.Head(ctx, n); err == nil && slices.Contains(l.Domains, d) {
			found = append(found, n)
		}
	}
	switch len(found) {
	case 0:
		return "", hint.Errorf("'lbcert list' shows the lineages", "no lineage covers %s", d)
	case 1:
		return found[0], nil
	}
	return "", fmt.Errorf("%s is covered by %d lineages (%s): say which with --name", d, len(found), strings.Join(found, ", "))
}
