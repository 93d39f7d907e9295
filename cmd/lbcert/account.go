package main

import (
	"bufio"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"runtime/debug"
	"strings"

	"github.com/lbcert/lbcert/internal/acme"
	"github.com/lbcert/lbcert/internal/catalog"
	"github.com/lbcert/lbcert/internal/config"
	"github.com/lbcert/lbcert/internal/hint"
	"github.com/lbcert/lbcert/internal/store"
)

// account is the account settings as given, for package acme to check.
func (a *app) account() acme.Settings {
	s := a.global.acct
	s.EABHMAC, s.UserAgent = a.getenv(config.EnvName("eab-hmac-key")), userAgent()
	return s
}

// acmeOptions checks every account setting that can be checked without the
// network, so that bad input never reaches the CA, including whether a
// new account on the chosen server could accept the terms of service.
func (a *app) acmeOptions(st catalog.Accounts) (acme.Options, error) {
	server, err := a.account().ServerURL()
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

// accountBase is the account options for any server, with a question
// about the terms on a terminal.
func (a *app) accountBase(st catalog.Accounts) (acme.Options, error) {
	o, err := a.account().Options(a.ctx, st)
	if err == nil && a.stdinTTY && a.stderrTTY {
		o.ConfirmTOS = a.confirmTOS
	}
	return o, err
}

// userAgent is what lbcert calls itself to the CA.
func userAgent() string { return "lbcert/" + buildVersion(debug.ReadBuildInfo()) }

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
