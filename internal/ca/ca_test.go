package ca

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/lbcert/lbcert/internal/store"
)

func TestParse(t *testing.T) {
	dir := t.TempDir()
	file := filepath.Join(dir, "f.pem")
	os.WriteFile(file, []byte("x"), 0o600)
	good := []struct {
		spec string
		want CA
	}{
		{"zerossl", CA{Name: "zerossl", Server: Known["zerossl"]}},
		{"stepca https://ca.internal:9000/acme/acme/directory ca-bundle=" + file + " verify-roots=" + file + " email=pki@example.com",
			CA{Name: "stepca", Server: "https://ca.internal:9000/acme/acme/directory", CABundle: file, Roots: file, Email: "pki@example.com"}},
		{"google eab-kid=K eab-hmac-key-file=" + file + ` preferred-chain="GTS Root R1" profile=shortlived: profile=tlsserver:tls`,
			CA{Name: "google", Server: Known["google"], EABKid: "K", EABHMACFile: file, PreferredChain: "GTS Root R1", Profiles: map[string]string{"shortlived": "", "tlsserver": "tls"}}},
	}
	for _, g := range good {
		got, err := Parse(g.spec)
		if err != nil {
			t.Fatalf("%q: %v", g.spec, err)
		}
		if got.Name != g.want.Name || got.Server != g.want.Server || got.CABundle != g.want.CABundle || got.Roots != g.want.Roots ||
			got.Email != g.want.Email || got.EABKid != g.want.EABKid || got.EABHMACFile != g.want.EABHMACFile ||
			got.PreferredChain != g.want.PreferredChain || len(got.Profiles) != len(g.want.Profiles) {
			t.Fatalf("%q: got %+v", g.spec, got)
		}
		for k, v := range g.want.Profiles {
			if got.Profiles[k] != v {
				t.Fatalf("%q: profile %s -> %q", g.spec, k, got.Profiles[k])
			}
		}
	}
	if got, _ := Parse("stepca-2 https://x/dir"); got.HMACEnv() != "LBCERT_EAB_HMAC_KEY_STEPCA_2" {
		t.Fatalf("HMACEnv %s", got.HMACEnv())
	}
	for spec, want := range map[string]string{
		"":                               "an empty fallback",
		"Zero":                           `fallback name "Zero"`,
		"primary https://x/dir":          `fallback name "primary"`,
		"mine":                           "fallback mine: no directory URL",
		"mine http://ca/dir":             "not an https URL",
		"mine https://ca/dir colour=red": `unknown key "colour"`,
		"mine https://ca/dir ca-bundle=/nope.pem":       "ca-bundle=/nope.pem: no such file",
		"mine https://ca/dir eab-hmac-key-file=" + file: "eab-hmac-key-file without eab-kid",
		"mine https://ca/dir profile=x":                 "want profile=FROM:TO",
		"mine https://ca/dir email":                     `"email": want key=value`,
		`mine https://ca/dir preferred-chain="X`:        "a double quote is not closed",
	} {
		if _, err := Parse(spec); err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("%q: error %v, want %q", spec, err, want)
		}
	}
}

func TestNewSetRefusesDuplicates(t *testing.T) {
	a := CA{Name: "a", Server: "https://a/dir"}
	if _, err := NewSet("https://a/dir", []CA{a}, nil); err == nil || !strings.Contains(err.Error(), "the primary") {
		t.Fatalf("a fallback equal to the primary: %v", err)
	}
	if _, err := NewSet("https://p/dir", []CA{a, {Name: "a", Server: "https://b/dir"}}, nil); err == nil {
		t.Fatal("a name given twice")
	}
	if _, err := NewSet("https://p/dir", []CA{a, {Name: "b", Server: "https://A/dir/"}}, nil); err == nil {
		t.Fatal("a directory given twice")
	}
}

// A lineage tries its primary first (the recorded one, when a fallback
// issued its certificate), then every other fallback in order.
func TestFor(t *testing.T) {
	s, _ := NewSet("https://p/dir", []CA{{Name: "a", Server: "https://a/dir", Email: "a@example.com"}, {Name: "b", Server: "https://b/dir", Profiles: map[string]string{"short": "six"}}}, nil)
	l := &store.Lineage{Server: "https://a/dir", Email: "a@example.com", Profile: "short",
		Fallback: store.Fallback{Primary: "https://p/dir", Email: "ops@example.com", CA: "a"}}
	got := s.For(l)
	if len(got) != 3 || got[0].Server != "https://p/dir" || !got[0].Primary || got[0].Email != "ops@example.com" || got[0].Profile != "short" ||
		got[1].Name != "a" || got[1].Email != "a@example.com" || !got[1].ProfileOptional ||
		got[2].Name != "b" || got[2].Email != "ops@example.com" || got[2].Profile != "six" {
		t.Fatalf("%+v", got)
	}
	// A lineage whose primary is one of the fallbacks does not try it twice.
	if got := s.For(&store.Lineage{Server: "https://b/dir"}); len(got) != 2 || got[0].Server != "https://b/dir" || got[1].Server != "https://a/dir" {
		t.Fatalf("%+v", got)
	}
	var none *Set
	if got := none.For(l); len(got) != 1 || got[0].Server != "https://p/dir" {
		t.Fatalf("no fallbacks: %+v", got)
	}
	if r := s.RootsFor(l); r != SystemRoots {
		t.Fatalf("roots %q", r)
	}
	if r := s.RootsFor(&store.Lineage{Server: "https://p/dir"}); r != "" {
		t.Fatalf("roots of the primary's certificate %q", r)
	}
}

// Breakers open after three faults, pass the CA over for the backoff,
// then let one order try it: a fault doubles the backoff, an answer
// closes it. A second process on the same store sees the breaker.
func TestBreakers(t *testing.T) {
	now := time.Date(2026, 5, 8, 10, 0, 0, 0, time.UTC)
	clock := func() time.Time { return now }
	dir := t.TempDir()
	b := &Breakers{Store: FileStore{Dir: dir}, Now: clock, Backoff: time.Minute}
	const s = "https://p/dir"
	for range 2 {
		b.Fault(s, "did not answer")
	}
	if ok, _ := b.Allow(s); !ok {
		t.Fatal("open after two faults")
	}
	b.Fault(s, "did not answer")
	other := &Breakers{Store: FileStore{Dir: dir}, Now: clock, Backoff: time.Minute}
	if ok, why := other.Allow(s); ok || !strings.Contains(why, "passed over until 2026-05-08T10:01:00Z: did not answer") {
		t.Fatalf("another run: %v %q", ok, why)
	}
	now = now.Add(time.Minute)
	if ok, _ := b.Allow(s); !ok {
		t.Fatal("no try after the backoff")
	}
	if ok, _ := b.Allow(s); ok {
		t.Fatal("two orders try it at once")
	}
	b.Fault(s, "still down")
	if ok, why := b.Allow(s); ok || !strings.Contains(why, "until 2026-05-08T10:03:00Z") {
		t.Fatalf("after a failed try: %v %q (want twice the backoff)", ok, why)
	}
	now = now.Add(2 * time.Minute)
	if ok, _ := b.Allow(s); !ok {
		t.Fatal("no second try")
	}
	b.Success(s)
	if all, _ := (FileStore{Dir: dir}).Load(context.Background()); len(all) != 0 {
		t.Fatalf("closed but saved: %+v", all)
	}
	if ok, _ := b.Allow(s); !ok {
		t.Fatal("closed but passed over")
	}
}
