package acme

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// Account settings are refused offline, each with the flag it is about.
func TestSettingsRefusedOffline(t *testing.T) {
	dir := t.TempDir()
	key := filepath.Join(dir, "hmac")
	os.WriteFile(key, []byte("not base64url!\n"), 0o600)
	cases := []struct {
		s    Settings
		want string
	}{
		{Settings{Staging: true, Server: "https://ca.example/dir"}, "--staging and --server"},
		{Settings{Server: "not a url"}, "is not a URL"},
		{Settings{Server: "http://ca.example/dir"}, "ACME requires https"},
		{Settings{Email: "ops@localhost"}, "--email"},
		{Settings{EABHMACFile: key}, "without --eab-kid"},
		{Settings{EABKid: "kid"}, "needs the HMAC key"},
		{Settings{EABKid: "kid", EABHMACFile: key}, "not base64url"},
		{Settings{CABundle: filepath.Join(dir, "missing.pem")}, "missing.pem"},
	}
	for _, c := range cases {
		_, err := c.s.ServerURL()
		if err == nil {
			_, err = c.s.Options(context.Background(), nil)
		}
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%+v: err %v, want %q", c.s, err, c.want)
		}
	}
	o, err := Settings{EABKid: "kid", EABHMAC: "c2VjcmV0LWtleQ"}.Options(context.Background(), nil)
	if err != nil || o.EABHMAC != "c2VjcmV0LWtleQ" {
		t.Fatalf("a good key: %+v, %v", o, err)
	}
	if u, _ := (Settings{}).ServerURL(); u != LetsEncrypt {
		t.Fatalf("default server %s", u)
	}
}
