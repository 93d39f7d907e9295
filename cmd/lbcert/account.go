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
	"github.com/lbcert/lbcert/internal/exit"
	"github.com/lbcert/lbcert/internal/secret"
	"github.com/lbcert/lbcert/internal/store"
)

// serverURL resolves --server and --staging into one directory URL.
func (a *app) serverURL() (string, error) {
	g := a.global
	if g.Staging && g.Server != "" {
		return "", exit.Errorf("--staging and --server %s contradict each other: give one", g.Server)
	}
	if g.Staging {
		return acme.LetsEncryptStaging, nil
	}
	if g.Server == "" {
		return acme.LetsEncrypt, nil
	}
	u, err := url.Parse(g.Server)
	if err != nil || u.Host == "" || (u.Scheme != "https" && u.Scheme != "http") {
		return "", exit.Errorf("--server %q is not a URL: want the CA's directory, like %s", g.Server, acme.LetsEncrypt)
	}
	if u.Scheme != "https" {
		return "", exit.Errorf("--server %s: ACME requires https (RFC 8555 section 6.1)", g.Server)
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
		return acme.Options{}, exit.Errorf("no terminal to ask about the CA's terms of service: pass --agree-tos to accept them")
	}
	return o, a.checkFallbackTOS(o)
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
			return acme.Options{}, exit.Errorf("an EAB HMAC key was given without --eab-kid")
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
			return exit.Errorf("--email %q is not an email address", g.Email)
		}
	}
	if g.CABundle != "" {
		if _, err := acme.HTTPClient(a.ctx, g.CABundle); err != nil {
			return exit.Errorf("%w", err)
		}
	}
	if g.EABHMACFile != "" && g.EABKid == "" {
		return exit.Errorf("an EAB HMAC key file was given without --eab-kid")
	}
	return nil
}

// eabHMAC reads the EAB HMAC key from LBCERT_EAB_HMAC_KEY or the file named
// by --eab-hmac-key-file. It is a secret, so it never comes from argv.
func (a *app) eabHMAC() (string, error) {
	return a.readHMAC(config.EnvName("eab-hmac-key"), a.global.EABHMACFile, "--eab-hmac-key-file",
		"--eab-kid needs the HMAC key: set LBCERT_EAB_HMAC_KEY or pass --eab-hmac-key-file")
}

// readHMAC reads an EAB HMAC key from file (named by setting in
// messages) or, without one, from the environment variable env; missing
// is the error when there is none.
func (a *app) readHMAC(env, file, setting, missing string) (string, error) {
	key := a.getenv(env)
	if file != "" {
		data, err := os.ReadFile(file)
		if err != nil {
			return "", exit.Errorf("%s %s: %w", setting, file, unwrapPath(err))
		}
		key = strings.TrimSpace(string(data))
	}
	secret.Add(key)
	if key == "" {
		return "", exit.Errorf("%s", missing)
	}
	if _, err := base64.RawURLEncoding.DecodeString(strings.TrimRight(key, "=")); err != nil {
		return "", exit.Errorf("the EAB HMAC key is not base64url, as CAs issue it")
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

// lock takes the state directory lock, or fails with exit code Locked.
func (a *app) lock(st *store.Store) (*store.Lock, error) {
	l, err := st.TryLock()
	if err != nil {
		if le, ok := err.(*store.LockedError); ok {
			return nil, (&exit.Error{Code: exit.Locked, Msg: le.Error()}).
				WithHint("wait for the other run to finish; the lock is released when it exits, even if it is killed")
		}
		return nil, dirError(st, err)
	}
	return l, nil
}

// dirError explains a state directory lbcert cannot use.
func dirError(_ *store.Store, err error) error {
	e := exit.Errorf("%w", err)
	if errors.Is(err, fs.ErrPermission) {
		e = e.WithHint("run lbcert as root (the default --dir /etc/lbcert is root's), or pass --dir (or set LBCERT_DIR) to a directory you can write")
	}
	return e
}

func unwrapPath(err error) error {
	if pe, ok := err.(*os.PathError); ok {
		return pe.Err
	}
	return err
}
