package schedule

import (
	"regexp"
	"strings"
	"testing"
	"time"
)

// Each state directory has its own cron entry: the default one keeps
// /etc/cron.d/lbcert, any other gets a name of its own that cron.d
// accepts (no dots), so installing or deleting for one never touches
// another's.
func TestCronFilePerStateDir(t *testing.T) {
	if got := CronFileFor("/etc/cron.d", "/etc/lbcert"); got != "/etc/cron.d/lbcert" {
		t.Fatalf("default: %s", got)
	}
	a, b := CronFileFor("/etc/cron.d", "/srv/lbcert-a"), CronFileFor("/etc/cron.d", "/srv/lbcert-b")
	re := regexp.MustCompile(`^/etc/cron\.d/lbcert-[0-9a-f]{8}$`)
	if a == b || !re.MatchString(a) || !re.MatchString(b) {
		t.Fatalf("%s and %s", a, b)
	}
	if CronFileFor("/etc/cron.d", "/srv/lbcert-a/") != a {
		t.Fatal("the same directory, spelt with a trailing slash, got another entry")
	}
	if !strings.HasSuffix(Marker("/srv/lbcert-a"), "dir=/srv/lbcert-a") {
		t.Fatal("crontab marker does not name the directory")
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
		if got := PerDayFor(life); got != want {
			t.Errorf("PerDayFor(%v) = %d, want %d", life, got, want)
		}
	}
}
