package secret

import (
	"encoding/base64"
	"errors"
	"strings"
	"testing"
)

func TestEnvStripsSecretsAndKeepsTheRest(t *testing.T) {
	t.Setenv("LBCERT_SMTP_PASSWORD", "hunter2-smtp")
	t.Setenv("LBCERT_EAB_HMAC_KEY", "eab-key-value")
	t.Setenv("LBCERT_REDIS_PASSWORD", "redis-pass")
	t.Setenv("LBCERT_DIR", "/etc/lbcert")
	t.Setenv("RENEWED_LINEAGE", "/etc/lbcert/live/x")
	env := strings.Join(Env("LBCERT_NAME=x"), "\n")
	for _, bad := range []string{"hunter2-smtp", "eab-key-value", "redis-pass"} {
		if strings.Contains(env, bad) {
			t.Errorf("child environment holds %q", bad)
		}
	}
	for _, good := range []string{"LBCERT_DIR=/etc/lbcert", "RENEWED_LINEAGE=", "LBCERT_NAME=x", "PATH="} {
		if !strings.Contains(env, good) {
			t.Errorf("child environment lost %q", good)
		}
	}
}

func TestScrub(t *testing.T) {
	Add("s3cret-pass")
	plain := base64.StdEncoding.EncodeToString([]byte("\x00lbcert\x00s3cret-pass"))
	for _, in := range []string{
		"hook printed s3cret-pass here",
		"AUTH PLAIN " + plain,
		"raw " + base64.StdEncoding.EncodeToString([]byte("s3cret-pass")),
	} {
		if out := Scrub(in); strings.Contains(out, "s3cret-pass") || strings.Contains(out, plain) || !strings.Contains(out, "[secret]") {
			t.Errorf("Scrub(%q) = %q", in, out)
		}
	}
	if out := Scrub("nothing to see"); out != "nothing to see" {
		t.Errorf("Scrub changed clean text: %q", out)
	}
}

// OneLine flattens and scrubs in one step, so no caller can do one and
// forget the other.
func TestOneLine(t *testing.T) {
	Add("hunter2-redis")
	err := errors.New("dial redis://:hunter2-redis@10.0.0.1:6379:\n  connection   refused")
	if got := OneLine(err); got != "dial redis://:[secret]@10.0.0.1:6379: connection refused" {
		t.Errorf("OneLine = %q", got)
	}
	if OneLine(nil) != "" {
		t.Error("OneLine(nil) is not empty")
	}
}
