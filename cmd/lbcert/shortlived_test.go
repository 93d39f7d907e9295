package main

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
		if got := timeLeft(d); got != want {
			t.Errorf("timeLeft(%v) = %q, want %q", d, got, want)
		}
	}
}

// The renew schedule gives the shortest certificate MinChances runs in
// the half of its life it may have left when due: step-ca's 24-hour
// default gets 6 runs a day (every 4 hours), a 6-day certificate 4, a
// 90-day one 2.
func TestPerDayFor(t *testing.T) {
	for life, want := range map[time.Duration]int{
		0:                   2,
		90 * 24 * time.Hour: 2,
		11 * 24 * time.Hour: 2,
		10 * 24 * time.Hour: 4,
		6 * 24 * time.Hour:  4,
		3 * 24 * time.Hour:  4,
		36 * time.Hour:      4,
		30 * time.Hour:      6,
		24 * time.Hour:      6,
		12 * time.Hour:      12,
		time.Hour:           24,
	} {
		if got := perDayFor(life); got != want {
			t.Errorf("perDayFor(%v) = %d, want %d", life, got, want)
		}
	}
}
