// Package secret knows lbcert's secrets, so that none of them reaches a
// child process or a text lbcert stores or mails.
//
// Secrets come from the environment (LBCERT_SMTP_PASSWORD,
// LBCERT_EAB_HMAC_KEY, LBCERT_REDIS_PASSWORD, and any LBCERT_ variable
// whose name says PASSWORD, SECRET, TOKEN or HMAC) or from files named by
// flags; whoever reads one registers its value with Add. Env builds a
// child environment without them (everything else is kept, so certbot
// hooks keep working); Scrub removes their values, in the literal and
// base64 forms an SMTP AUTH exchange or a careless hook might print, from
// any text.
package secret

import (
	"encoding/base64"
	"os"
	"strings"
	"sync"
)

var (
	mu     sync.RWMutex
	values = map[string]bool{}
)

// IsSecretEnv reports whether an environment variable holds one of
// lbcert's secrets.
func IsSecretEnv(name string) bool {
	if !strings.HasPrefix(name, "LBCERT_") {
		return false
	}
	for _, w := range []string{"PASSWORD", "SECRET", "TOKEN", "HMAC"} {
		if strings.Contains(name, w) {
			return true
		}
	}
	return false
}

// Add registers a secret value; short ones (under 4 bytes) are ignored,
// since scrubbing them would garble ordinary text.
func Add(v string) {
	v = strings.TrimSpace(v)
	if len(v) < 4 {
		return
	}
	mu.Lock()
	values[v] = true
	mu.Unlock()
}

// FromEnviron registers the secrets held in the process environment.
func FromEnviron() {
	for _, kv := range os.Environ() {
		if k, v, ok := strings.Cut(kv, "="); ok && IsSecretEnv(k) {
			Add(v)
		}
	}
}

// Env is os.Environ without lbcert's secrets, plus extra.
func Env(extra ...string) []string {
	var out []string
	for _, kv := range os.Environ() {
		if k, _, _ := strings.Cut(kv, "="); IsSecretEnv(k) {
			continue
		}
		out = append(out, kv)
	}
	return append(out, extra...)
}

// Scrub replaces every registered secret in s, literal or base64 (as in
// SMTP AUTH PLAIN, with or without a user), with "[secret]".
func Scrub(s string) string {
	mu.RLock()
	defer mu.RUnlock()
	for v := range values {
		forms := []string{v, base64.StdEncoding.EncodeToString([]byte(v)), base64.RawStdEncoding.EncodeToString([]byte(v))}
		for _, f := range forms {
			if f != "" && strings.Contains(s, f) {
				s = strings.ReplaceAll(s, f, "[secret]")
			}
		}
	}
	// AUTH PLAIN sends base64("\x00user\x00password"), where the password
	// is not aligned to a base64 boundary: look for it inside decoded
	// base64 words too.
	if len(values) > 0 {
		words := strings.Fields(s)
		for _, w := range words {
			if len(w) < 8 {
				continue
			}
			dec, err := base64.StdEncoding.DecodeString(w)
			if err != nil {
				continue
			}
			for v := range values {
				if strings.Contains(string(dec), v) {
					s = strings.ReplaceAll(s, w, "[secret]")
				}
			}
		}
	}
	return s
}

// OneLine is err's text on one line (a CA's multi-line problem detail,
// a hook's output) without any known secret: the one way lbcert
// flattens an error for a status file, a report, a mail or stderr.
func OneLine(err error) string {
	if err == nil {
		return ""
	}
	return Scrub(strings.Join(strings.Fields(err.Error()), " "))
}
