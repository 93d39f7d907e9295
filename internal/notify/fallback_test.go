package notify

import (
	"strings"
	"testing"
	"time"
)

// The mail says which CA issued a certificate and why a fallback did.
func TestBodyNamesTheFallback(t *testing.T) {
	r := &Report{Host: "web1", Command: "renew", Time: time.Date(2026, 5, 8, 10, 0, 0, 0, time.UTC), Items: []Item{
		{Name: "a.example.com", Outcome: "renewed", Serial: "0b", CA: "zerossl", Fallback: "acme-v02.api.letsencrypt.org did not answer (connection refused)"},
		{Name: "b.example.com", Outcome: "renewed", Serial: "0c"},
	}}
	body := r.Body()
	for _, want := range []string{"  ca:         zerossl\n", "  fallback:   acme-v02.api.letsencrypt.org did not answer (connection refused)\n"} {
		if !strings.Contains(body, want) {
			t.Errorf("no %q in\n%s", want, body)
		}
	}
	if strings.Count(body, "ca:") != 1 {
		t.Errorf("a certificate from its own CA gets a ca line without fallbacks configured:\n%s", body)
	}
}
