package renewal

import (
	"testing"
	"time"
)

// A certificate's remaining life reads in days, and in hours or minutes
// once under two days: step-ca's fresh 24-hour certificate is "23
// hours", not "0 days".
func TestTimeLeft(t *testing.T) {
	for d, want := range map[time.Duration]string{
		90 * 24 * time.Hour:           "90 days",
		48 * time.Hour:                "2 days",
		24*time.Hour - time.Second:    "23 hours",
		2 * time.Hour:                 "2 hours",
		2*time.Hour - time.Nanosecond: "119 minutes",
		90 * time.Second:              "under 2 minutes",
		0:                             "expired",
		-time.Hour:                    "expired",
	} {
		if got := TimeLeft(d); got != want {
			t.Errorf("TimeLeft(%v) = %q, want %q", d, got, want)
		}
	}
}
