package acme

import (
	"context"
	"encoding/base64"
	"errors"
	"fmt"
	"net/mail"
	"net/url"
	"strings"
	"sync"

	"github.com/lbcert/lbcert/internal/argfile"
	"github.com/lbcert/lbcert/internal/catalog"
	"github.com/lbcert/lbcert/internal/secret"
)

// Settings are the account settings as a command was given them
// (--server, --staging, --email, --eab-*): checked offline, so that bad
// input never reaches the CA, and turned into Options only when an
// order needs them, so that a run with nothing due reads no secret.
type Settings struct {
	Server      string
	Staging     bool
	CABundle    string
	Email       string
	AgreeTOS    bool
	EABKid      string
	EABHMACFile string
	// EABHMAC is the key from the environment (LBCERT_EAB_HMAC_KEY);
	// the file, when given, wins.
	EABHMAC   string
	UserAgent string
}

// ServerURL resolves --server and --staging into one directory URL.
func (s Settings) ServerURL() (string, error) {
	if s.Staging && s.Server != "" {
		return "", fmt.Errorf("--staging and --server %s contradict each other: give one", s.Server)
	}
	if s.Staging {
		return LetsEncryptStaging, nil
	}
	if s.Server == "" {
		return LetsEncrypt, nil
	}
	u, err := url.Parse(s.Server)
	if err != nil || u.Host == "" || (u.Scheme != "https" && u.Scheme != "http") {
		return "", fmt.Errorf("--server %q is not a URL: want the CA's directory, like %s", s.Server, LetsEncrypt)
	}
	if u.Scheme != "https" {
		return "", fmt.Errorf("--server %s: ACME requires https (RFC 8555 section 6.1)", s.Server)
	}
	return s.Server, nil
}

// Check checks the settings that hold no secret, so that bad input is
// refused before any lineage is tried.
func (s Settings) Check(ctx context.Context) error {
	if s.Email != "" {
		if addr, err := mail.ParseAddress(s.Email); err != nil || addr.Address != s.Email || !strings.Contains(s.Email, ".") {
			return fmt.Errorf("--email %q is not an email address", s.Email)
		}
	}
	if s.CABundle != "" {
		if _, err := HTTPClient(ctx, s.CABundle); err != nil {
			return err
		}
	}
	if s.EABHMACFile != "" && s.EABKid == "" {
		return fmt.Errorf("an EAB HMAC key file was given without --eab-kid")
	}
	return nil
}

// Options checks the settings and reads the EAB key: the account
// options for any server (Server is left to the caller).
func (s Settings) Options(ctx context.Context, accounts catalog.Accounts) (Options, error) {
	if err := s.Check(ctx); err != nil {
		return Options{}, err
	}
	o := Options{CABundle: s.CABundle, Email: s.Email, AgreeTOS: s.AgreeTOS, EABKid: s.EABKid, UserAgent: s.UserAgent, Store: accounts}
	if s.EABKid == "" && s.EABHMACFile == "" {
		return o, nil
	}
	hmac, err := s.eabHMAC()
	if err != nil {
		return Options{}, err
	}
	if s.EABKid == "" {
		return Options{}, fmt.Errorf("an EAB HMAC key was given without --eab-kid")
	}
	o.EABHMAC = hmac
	return o, nil
}

// eabHMAC reads the EAB HMAC key from the environment or the file named
// by --eab-hmac-key-file. It is a secret, so it never comes from argv.
func (s Settings) eabHMAC() (string, error) {
	return ReadEABHMAC(s.EABHMAC, s.EABHMACFile, "--eab-hmac-key-file",
		"--eab-kid needs the HMAC key: set LBCERT_EAB_HMAC_KEY or pass --eab-hmac-key-file")
}

// ReadEABHMAC is an EAB HMAC key: the content of file (named setting in
// messages) or, without one, key (from the environment); missing is the
// error when there is none. The key is known as a secret from then on.
func ReadEABHMAC(key, file, setting, missing string) (string, error) {
	if file != "" {
		data, err := argfile.Read(file, argfile.Secret)
		if err != nil {
			return "", fmt.Errorf("%s %s: %w", setting, ShownKeyFile(file), err)
		}
		key = strings.TrimSpace(string(data))
	}
	secret.Add(key)
	if key == "" {
		return "", errors.New(missing)
	}
	if _, err := base64.RawURLEncoding.DecodeString(strings.TrimRight(key, "=")); err != nil {
		return "", fmt.Errorf("the EAB HMAC key is not base64url, as CAs issue it")
	}
	return key, nil
}

// ShownKeyFile is how an error shows the name given for a secret's
// file: as given when it could be a path, not at all when it looks like
// a key pasted where its file belongs (a secret is never printed). A
// key is 32 or more base64 characters with no '.' and no leading '/';
// a path such as zerossl.hmac, keys/eab or /etc/lbcert/eab is shown.
func ShownKeyFile(file string) string {
	if looksLikeKey(file) {
		return "(not shown: it looks like a key; give the path of the file holding the key, never the key itself)"
	}
	return file
}

func looksLikeKey(s string) bool {
	if len(s) < 32 || strings.HasPrefix(s, "/") {
		return false
	}
	for _, r := range s {
		if !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || strings.ContainsRune("+/_=-", r)) {
			return false
		}
	}
	return true
}

// DryRunServer is where a dry run orders instead of server: Let's
// Encrypt's staging for its production, so that a dry run stays off
// production's limits; any other CA as it is.
func DryRunServer(server string) string {
	if server == LetsEncrypt {
		return LetsEncryptStaging
	}
	return server
}

// Lazy is the account options for each order's server and email, built
// on the first order and not before: a run with nothing due reads no EAB
// secret (gh's Factory). base builds them (Options, and a terms question
// on a terminal). A dry run against staging accepts the terms for the
// account it needs there.
func Lazy(base func() (Options, error), dryRun bool) func(server, email string) (Options, error) {
	var once sync.Once
	var opts Options
	var err error
	return func(server, email string) (Options, error) {
		once.Do(func() { opts, err = base() })
		if err != nil {
			return Options{}, err
		}
		o := opts
		o.Server, o.Email = server, email
		if dryRun {
			o.AgreeTOS = true
		}
		// No terms check here: New makes it, after the issuer has
		// carried over the terms a lost account had accepted.
		return o, nil
	}
}
