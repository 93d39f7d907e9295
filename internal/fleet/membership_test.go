package fleet

import (
	"context"
	"strings"
	"testing"
)

// Approve and remove name what is wrong with the node they are given
// (hostile review: approving a member said it had no join request, and
// 'fleet remove ""' said "has no member " with nothing after it).
func TestApproveAndRemoveSayWhatIsWrong(t *testing.T) {
	_, sh := startRedis(t)
	ctx := context.Background()
	dir := t.TempDir()
	lb1 := firstNode(t, sh, dir)
	joinApproved(t, sh, lb1, dir, "lb2")
	for _, tc := range []struct{ node, want string }{
		{"lb2", "lb2 is already a member"},
		{"../../x", `"../../x" cannot name a node`},
		{"lb9", "has no join request from lb9"},
	} {
		if err := lb1.Approve(ctx, tc.node, "age1x"); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("approve %q: %v, want %q", tc.node, err, tc.want)
		}
	}
	if _, err := lb1.Remove(ctx, ""); err == nil || !strings.Contains(err.Error(), `has no member ""`) {
		t.Errorf(`remove "": %v`, err)
	}
}
