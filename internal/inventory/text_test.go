package inventory

import (
	"bytes"
	"strings"
	"testing"
	"time"
)

// One failure is "1 failure", not "1 failures"; the retry time is given.
func TestFailuresPlural(t *testing.T) {
	at := time.Date(2026, 12, 1, 3, 17, 0, 0, time.UTC)
	c := Clock{Now: at.Add(-time.Hour)}
	for n, want := range map[int]string{1: "never issued: 1 failure, retry 2026-12-01T03:17:00Z: refused", 2: "never issued: 2 failures, retry"} {
		var b bytes.Buffer
		Table(&b, []Entry{{Name: "a.example.com", NeverIssued: true, Failures: n, LastError: "refused", BackoffTill: &at}}, c)
		if !strings.Contains(b.String(), want) {
			t.Errorf("%d failures: %q, want %q", n, b.String(), want)
		}
	}
}
