package renewal

import (
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/lbcert/lbcert/internal/store"
)

var t0 = time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)

func cert(days int) store.CertInfo {
	return store.CertInfo{Serial: "aa", NotBefore: t0, NotAfter: t0.Add(time.Duration(days) * 24 * time.Hour), ARICertID: "id"}
}

func day(n float64) time.Time { return t0.Add(time.Duration(n * 24 * float64(time.Hour))) }

func TestDecide(t *testing.T) {
	ari := store.Status{ARISerial: "aa", ARIRenewAt: day(50), ARINextCheck: day(10)}
	tests := []struct {
		name   string
		cert   store.CertInfo
		st     store.Status
		now    time.Time
		o      Options
		due    bool
		reason Reason
		check  bool
	}{
		{"90d fresh", cert(90), store.Status{}, day(1), Options{}, false, Lifetime, false},
		{"90d at 2/3", cert(90), store.Status{}, day(60), Options{}, true, Lifetime, false},
		{"90d before half left", cert(90), store.Status{}, day(44.9), Options{}, false, Lifetime, false},
		{"6d short-lived before 2/3 left", cert(6), store.Status{}, day(1.9), Options{}, false, Lifetime, false},
		{"6d short-lived at half", cert(6), store.Status{}, day(3), Options{}, true, Lifetime, false},
		{"10d is short-lived", cert(10), store.Status{}, day(5), Options{}, true, Lifetime, false},
		{"11d uses thirds", cert(11), store.Status{}, day(5.4), Options{}, false, Lifetime, false},
		{"expired", cert(90), store.Status{}, day(90), Options{}, true, Expired, false},
		{"days: not yet", cert(90), store.Status{}, day(59), Options{Days: 30}, false, Days, false},
		{"days: due", cert(90), store.Status{}, day(61), Options{Days: 30}, true, Days, false},
		{"days overrides lifetime", cert(90), store.Status{}, day(65), Options{Days: 10}, false, Days, false},
		{"days overrides ARI", cert(90), ari, day(55), Options{Days: 10, ARIOffered: true}, false, Days, false},
		{"critical beats days", cert(90), store.Status{}, day(86), Options{Days: 1}, true, Critical, false},
		{"critical beats ARI", cert(90), store.Status{ARISerial: "aa", ARIRenewAt: day(89), ARINextCheck: day(100)}, day(86), Options{ARIOffered: true}, true, Critical, false},
		{"ARI before moment", cert(90), ari, day(5), Options{ARIOffered: true}, false, ARI, false},
		{"ARI at moment", cert(90), ari, day(50), Options{ARIOffered: true}, true, ARI, true},
		{"ARI window moved into the past", cert(90), store.Status{ARISerial: "aa", ARIWindowStart: day(3), ARIWindowEnd: day(4), ARIRenewAt: day(3.5), ARINextCheck: day(11)}, day(5), Options{ARIOffered: true}, true, ARIPast, false},
		{"ARI earlier than lifetime", cert(90), store.Status{ARISerial: "aa", ARIRenewAt: day(20), ARINextCheck: day(30)}, day(21), Options{ARIOffered: true}, true, ARI, false},
		{"ARI retry-after passed", cert(90), ari, day(11), Options{ARIOffered: true}, false, ARI, true},
		{"ARI for old serial: ask again", cert(90), store.Status{ARISerial: "old", ARIRenewAt: day(1)}, day(2), Options{ARIOffered: true}, false, Lifetime, true},
		{"ARI never asked", cert(90), store.Status{}, day(2), Options{ARIOffered: true}, false, Lifetime, true},
		{"ARI ignored when not offered", cert(90), ari, day(44), Options{}, false, Lifetime, false},
	}
	for _, tt := range tests {
		d := Decide(tt.cert, tt.st, tt.now, tt.o)
		if d.Due != tt.due || d.Reason != tt.reason || d.CheckARI != tt.check {
			t.Errorf("%s: got due=%v reason=%s check=%v, want due=%v reason=%s check=%v", tt.name, d.Due, d.Reason, d.CheckARI, tt.due, tt.reason, tt.check)
		}
	}
}

// TestLifetimeMomentIsTheLineagesOwn: under the lifetime rule each name
// has its moment, between half and a third of the lifetime left (2/3 and
// 1/2 when short-lived), the same every time it is asked, and names
// spread over that window.
func TestLifetimeMomentIsTheLineagesOwn(t *testing.T) {
	for _, life := range []time.Duration{90 * 24 * time.Hour, 47 * 24 * time.Hour, 6 * 24 * time.Hour} {
		c := store.CertInfo{NotBefore: t0, NotAfter: t0.Add(life)}
		lo, hi := life/3, life/2
		if life <= shortLived {
			lo, hi = life/2, life*2/3
		}
		seen := map[time.Duration]bool{}
		for i := range 1000 {
			name := fmt.Sprintf("site%d.example.com", i)
			left := c.NotAfter.Sub(Moment(c, name))
			if left < lo || left > hi || !Moment(c, name).Equal(Moment(c, name)) {
				t.Fatalf("%s, life %v: %v left, want the same value in [%v, %v]", name, life, left, lo, hi)
			}
			seen[left.Truncate(life/100)] = true
		}
		// 1,000 names over 1/6 of the lifetime: most of its hundredths used.
		if len(seen) < 14 {
			t.Fatalf("life %v: 1000 names fall in only %d slots", life, len(seen))
		}
	}
	c := cert(90)
	d := Decide(c, store.Status{}, day(0), Options{Name: "a.example.com"})
	if !d.At.Equal(Moment(c, "a.example.com")) {
		t.Fatalf("Decide's moment %v, want %v", d.At, Moment(c, "a.example.com"))
	}
	// Renewed a little after its moment, the next certificate's moment
	// is a whole number of cycles after the last: same phase.
	renewed := store.CertInfo{NotBefore: d.At.Add(5 * time.Hour), NotAfter: d.At.Add(5*time.Hour + 90*24*time.Hour)}
	if gap := Moment(renewed, "a.example.com").Sub(d.At); gap%(15*24*time.Hour) != 0 {
		t.Fatalf("next moment %v after the last, not a whole number of 15-day cycles", gap)
	}
}

func TestApplyARIPicksOnceAndHonoursRetryAfter(t *testing.T) {
	start, end := day(55), day(65)
	calls := 0
	rnd := func(n int64) int64 { calls++; return n / 4 }
	st := ApplyARI(store.Status{}, "aa", start, end, 6*time.Hour, day(1), rnd)
	if !st.ARIRenewAt.Equal(day(57.5)) || !st.ARINextCheck.Equal(day(1).Add(6*time.Hour)) || calls != 1 {
		t.Fatalf("first answer: %+v calls %d", st, calls)
	}
	// Same window a day later: keep the moment, move the next check.
	st = ApplyARI(st, "aa", start, end, 3*time.Hour, day(2), rnd)
	if !st.ARIRenewAt.Equal(day(57.5)) || calls != 1 || !st.ARINextCheck.Equal(day(2).Add(3*time.Hour)) {
		t.Fatalf("same window re-picked or retry-after ignored: %+v calls %d", st, calls)
	}
	// The CA moves the window (revocation): pick again.
	st = ApplyARI(st, "aa", day(3), day(3), 0, day(3), rnd)
	if !st.ARIRenewAt.Equal(day(3)) || !st.ARINextCheck.Equal(day(3).Add(6*time.Hour)) {
		t.Fatalf("moved window: %+v", st)
	}
	// Retry-After is clamped to [1m, 24h].
	st = ApplyARI(st, "aa", day(3), day(3), 72*time.Hour, day(3), rnd)
	if !st.ARINextCheck.Equal(day(4)) {
		t.Fatalf("retry-after not capped: %v", st.ARINextCheck)
	}
}

func TestBackoff(t *testing.T) {
	want := []time.Duration{0, time.Hour, 2 * time.Hour, 4 * time.Hour, 8 * time.Hour, 16 * time.Hour, MaxBackoff, MaxBackoff}
	for n, w := range want {
		if got := Backoff(n); got != w {
			t.Errorf("Backoff(%d) = %v, want %v", n, got, w)
		}
	}
	st := Failed(store.Status{}, "boom", t0)
	st = Failed(st, "boom again", t0.Add(time.Hour))
	if st.Failures != 2 || !st.NextAttempt.Equal(t0.Add(3*time.Hour)) || st.LastError != "boom again" {
		t.Fatalf("%+v", st)
	}
	if !InBackoff(st, t0.Add(2*time.Hour)) || InBackoff(st, t0.Add(3*time.Hour)) {
		t.Fatal("InBackoff wrong around NextAttempt")
	}
}

func BenchmarkDecide(b *testing.B) {
	c := cert(90)
	st := store.Status{ARISerial: "aa", ARIRenewAt: day(50), ARINextCheck: day(10)}
	for i := 0; i < b.N; i++ {
		Decide(c, st, day(5), Options{ARIOffered: true})
	}
}

// The schedule as it ran against each certificate's window: a weekly
// run over 6-day certificates is flagged with the gap it needs; a daily
// one over 90-day certificates is not.
func TestCadence(t *testing.T) {
	d := 24 * time.Hour
	if g := RunGap([]time.Time{day(0), day(1), day(8)}, time.Time{}); g != 7*d {
		t.Fatalf("RunGap %v, want the longest, 7 days", g)
	}
	if g := RunGap([]time.Time{day(0)}, day(0).Add(20*time.Hour)); g != 20*time.Hour {
		t.Fatalf("RunGap with now %v", g)
	}
	if g := RunGap(nil, day(3)); g != 0 {
		t.Fatalf("RunGap with one moment %v", g)
	}
	six := cert(6)
	at := Moment(six, "short.example.com") // 3 to 4 days before expiry
	w := CadenceWarning(six, at, 7*d)
	if w == "" || !strings.Contains(w, "renew runs every 7.0 days") || !strings.Contains(w, "run renew at least every") {
		t.Fatalf("weekly over 6-day certificates: %q", w)
	}
	if w := CadenceWarning(six, at, 6*time.Hour); w != "" {
		t.Fatalf("every 6 h over 6-day certificates: %q", w)
	}
	ninety := cert(90)
	if w := CadenceWarning(ninety, Moment(ninety, "a.example.com"), d); w != "" {
		t.Fatalf("daily over 90-day certificates: %q", w)
	}
	if w := CadenceWarning(ninety, Moment(ninety, "a.example.com"), 0); w != "" {
		t.Fatal("no runs known: no warning")
	}
}
