package main

import (
	"bufio"
	"encoding/base64"
	"errors"
	"fmt"
	"io/fs"
	"net/mail"
	"net/url"
	"os"
	"runtime/debug"
	"strings"

	"github.com/lbcert/lbcert/internal/acme"
	"github.com/lbcert/lbcert/internal/catalog"
	"github.com/lbcert/lbcert/internal/config"
	"github.com/lbcert/lbcert/internal/hint"
	"github.com/lbcert/lbcert/internal/secret"
	"github.com/lbcert/lbcert/internal/store"
)

// serverURL resolves --server and --staging into one directory URL.
func (a *app) serverURL() (string, error) {
	g := a.global
	if g.Staging && g.Server != "" {
		return "", fmt.Errorf("--staging and --server %s contradict each other: give one", g.Server)
	}
	if g.Staging {
		return acme.LetsEncryptStaging, nil
	}
	if g.Server == "" {
		return acme.LetsEncrypt, nil
	}
	u, err := url.Parse(g.Server)
	if err != nil || u.Host == "" || (u.Scheme != "https" && u.Scheme != "http") {
		return "", fmt.Errorf("--server %q is not a URL: want the CA's directory, like %s", g.Server, acme.LetsEncrypt)
	}
	if u.Scheme != "https" {
		return "", fmt.Errorf("--server %s: ACME requires https (RFC 8555 section 6.1)", g.Server)
	}
	return g.Server, nil
}

// acmeOptions checks every account setting that can be checked without the
// network, so that bad input never reaches the CA, including whether a
// new account on the chosen server could accept the terms of service.
func (a *app) acmeOptions(st catalog.Accounts) (acme.Options, error) {
	server, err := a.serverURL()
	if err != nil {
		return acme.Options{}, err
	}
	o, err := a.accountBase(st)
	if err != nil {
		return o, err
	}
	o.Server = server
	if acme.NeedsTOS(o) {
		return acme.Options{}, fmt.Errorf("no terminal to ask about the CA's terms of service: pass --agree-tos to accept them")
	}
	return o, nil
}

// accountBase checks the account settings that do not depend on which
// server is used.
func (a *app) accountBase(st catalog.Accounts) (acme.Options, error) {
	g := a.global
	if err := a.checkAccountSettings(); err != nil {
		return acme.Options{}, err
	}
	o := acme.Options{
		CABundle: g.CABundle, Email: g.Email, AgreeTOS: g.AgreeTOS,
		EABKid: g.EABKid, UserAgent: userAgent(), Store: st,
	}
	if g.EABKid != "" || g.EABHMACFile != "" {
		hmac, err := a.eabHMAC()
		if err != nil {
			return acme.Options{}, err
		}
		if g.EABKid == "" {
			return acme.Options{}, fmt.Errorf("an EAB HMAC key was given without --eab-kid")
		}
		o.EABHMAC = hmac
	}
	if a.stdinTTY && a.stderrTTY {
		o.ConfirmTOS = a.confirmTOS
	}
	return o, nil
}

// userAgent is what lbcert calls itself to the CA.
func userAgent() string { return "lbcert/" + buildVersion(debug.ReadBuildInfo()) }

// checkAccountSettings checks the account settings that hold no secret,
// so that bad input is refused before any lineage is tried.
func (a *app) checkAccountSettings() error {
	g := a.global
	if g.Email != "" {
		if addr, err := mail.ParseAddress(g.Email); err != nil || addr.Address != g.Email || !strings.Contains(g.Email, ".") {
			return fmt.Errorf("--email %q is not an email address", g.Email)
		}
	}
	if g.CABundle != "" {
		if _, err := acme.HTTPClient(a.ctx, g.CABundle); err != nil {
			return err
		}
	}
	if g.EABHMACFile != "" && g.EABKid == "" {
		return fmt.Errorf("an EAB HMAC key file was given without --eab-kid")
	}
	return nil
}

// eabHMAC reads the EAB HMAC key from LBCERT_EAB_HMAC_KEY or the file named
// by --eab-hmac-key-file. It is a secret, so it never comes from argv.
func (a *app) eabHMAC() (string, error) {
	key := a.getenv(config.EnvName("eab-hmac-key"))
	if f := a.global.EABHMACFile; f != "" {
		data, err := os.ReadFile(f)
		if err != nil {
			return "", fmt.Errorf("--eab-hmac-key-file %s: %w", f, unwrapPath(err))
		}
		key = strings.TrimSpace(string(data))
	}
	secret.Add(key)
	if key == "" {
		return "", fmt.Errorf("--eab-kid needs the HMAC key: set LBCERT_EAB_HMAC_KEY or pass --eab-hmac-key-file")
	}
	if _, err := base64.RawURLEncoding.DecodeString(strings.TrimRight(key, "=")); err != nil {
		return "", fmt.Errorf("the EAB HMAC key is not base64url, as CAs issue it")
	}
	return key, nil
}

func (a *app) confirmTOS(tos string) (bool, error) {
	if tos == "" {
		return true, nil // the CA publishes no terms
	}
	fmt.Fprintf(a.err, "The CA's terms of service are at %s\nDo you agree? [y/N] ", tos)
	line, _ := bufio.NewReader(a.in).ReadString('\n')
	ans := strings.ToLower(strings.TrimSpace(line))
	return ans == "y" || ans == "yes", nil
}

// lock takes the state directory lock, or fails with a *store.LockedError
// (exit code 3).
func (a *app) lock(st *store.Store) (*store.Lock, error) {
	l, err := st.TryLock()
	if errors.Is(err, store.ErrLocked) {
		return nil, hint.Wrap(err, "wait for the other run to finish, or pass --wait-lock; the lock is released when it exits, even if it is killed")
	}
	if err != nil {
		return nil, dirError(err)
	}
	return l, nil
}

// dirError explains a state directory lbcert cannot use.
func dirError(err error) error {
	if errors.Is(err, fs.ErrPermission) {
		return hint.Wrap(err, "run lbcert as root (the default --dir /etc/lbcert is root's), or pass --dir (or set LBCERT_DIR) to a directory you can write")
	}
	return err
}

func unwrapPath(err error) error {
	if pe, ok := err.(*os.PathError); ok {
		return pe.Err
	}
	return err
}
