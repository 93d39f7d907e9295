package ca

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/lbcert/lbcert/internal/acme"
)

// A fallback orders under the primary's answer to the terms, user agent
// and account store, with its own directory, contact, bundle and EAB
// key, the key read only when its account is needed; any other server
// keeps the primary's options.
func TestSetAccount(t *testing.T) {
	dir := t.TempDir()
	bundle := filepath.Join(dir, "root.pem")
	os.WriteFile(bundle, []byte("x"), 0o600)
	env := map[string]string{"LBCERT_EAB_HMAC_KEY_STEPCA": "c2VjcmV0LWtleQ"}
	s := &Settings{Backoff: time.Minute, Fallbacks: []string{
		"stepca https://step.test/dir eab-kid=K email=pki@example.com ca-bundle=" + bundle,
		"plain https://plain.test/dir",
	}}
	if err := s.Check(acme.Settings{Server: "https://primary.test/dir"}, func(k string) string { return env[k] }); err != nil {
		t.Fatal(err)
	}
	set := s.Run(nil, time.Now, false)
	primary := acme.Options{Server: "https://primary.test/dir", Email: "ops@example.com", AgreeTOS: true, UserAgent: "ua",
		CABundle: "/primary.pem", EABKid: "PK", EABHMAC: "primary-key"}

	o, ok, err := set.Account(primary, "https://step.test/dir")
	if err != nil || !ok || o.Server != "https://step.test/dir" || o.Email != "pki@example.com" || o.CABundle != bundle ||
		o.EABKid != "K" || o.EABHMAC != "c2VjcmV0LWtleQ" || !o.FailFast || !o.AgreeTOS || o.UserAgent != "ua" {
		t.Fatalf("stepca: %+v %v %v", o, ok, err)
	}
	o, ok, err = set.Account(primary, "https://plain.test/dir")
	if err != nil || !ok || o.Email != "ops@example.com" || o.CABundle != "" || o.EABKid != "" || o.EABHMAC != "" {
		t.Fatalf("plain: %+v %v %v (the primary's bundle and EAB key are not another CA's)", o, ok, err)
	}
	if o, ok, err := set.Account(primary, primary.Server); err != nil || ok || o.EABHMAC != "primary-key" || o.CABundle != "/primary.pem" || o.FailFast {
		t.Fatalf("the primary: %+v %v %v", o, ok, err)
	}
	if b := set.Bundle("https://step.test/dir", "/primary.pem"); b != bundle {
		t.Fatalf("bundle %q", b)
	}

	delete(env, "LBCERT_EAB_HMAC_KEY_STEPCA") // gone between the check and the order
	if _, _, err := set.Account(primary, "https://step.test/dir"); err == nil || !strings.Contains(err.Error(), "--fallback-ca stepca has eab-kid but no HMAC key: set LBCERT_EAB_HMAC_KEY_STEPCA") {
		t.Fatalf("no key: %v", err)
	}
	none := &Settings{Backoff: time.Minute}
	if err := none.Check(acme.Settings{}, func(string) string { return "" }); err != nil || none.Run(nil, time.Now, false) != nil || none.Known() != nil {
		t.Fatal("no fallbacks must make no set")
	}
}

// A dry run's fallbacks stay off Let's Encrypt's production limits.
func TestRunDryRun(t *testing.T) {
	s := &Settings{Backoff: time.Minute, Fallbacks: []string{"letsencrypt"}}
	if err := s.Check(acme.Settings{Server: "https://primary.test/dir"}, func(string) string { return "" }); err != nil {
		t.Fatal(err)
	}
	if got := s.Run(nil, time.Now, true).Fallbacks[0].Server; got != acme.LetsEncryptStaging {
		t.Fatalf("dry run orders at %s", got)
	}
	if got := s.Run(nil, time.Now, false).Fallbacks[0].Server; got != acme.LetsEncrypt {
		t.Fatalf("a run orders at %s", got)
	}
}

// A fallback repeated on a cron line or in a unit: its files absolute,
// on one line (a newline would end the cron entry, and systemd refuses
// it), a value with spaces quoted as Parse reads it; parsed again, it
// is the same fallback.
func TestCarriedSpec(t *testing.T) {
	abs := func(p string) string {
		if strings.HasPrefix(p, "/") {
			return p
		}
		return "/etc/lbcert/" + p
	}
	spec := "stepca https://ca.test/dir\nca-bundle=roots.pem\tverify-roots=/abs/roots.pem eab-kid=K eab-hmac-key-file=k.hmac\npreferred-chain=\"Root\nX1\" email=a@b.test"
	got := carriedSpec(spec, abs)
	want := `stepca https://ca.test/dir ca-bundle=/etc/lbcert/roots.pem verify-roots=/abs/roots.pem eab-kid=K eab-hmac-key-file=/etc/lbcert/k.hmac preferred-chain="Root X1" email=a@b.test`
	if got != want {
		t.Fatalf("carried spec\n got %s\nwant %s", got, want)
	}
	f, err := fields(got)
	if err != nil || len(f) != 8 || f[6] != "preferred-chain=Root X1" {
		t.Fatalf("the carried spec does not read back: %q %v", f, err)
	}
}
