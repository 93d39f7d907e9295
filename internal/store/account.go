package store

import (
	"encoding/json"
	"errors"
	"io/fs"
	"net/url"
	"os"
	"path/filepath"
	"strings"
)

// Account file names inside an account directory.
const (
	AccountKeyFile = "account.key"
	AccountFile    = "account.json"
)

// AccountDir is the directory of the account for (server, email). One
// account per pair: the same email at two CAs is two accounts, and so is
// staging versus production.
func (s *Store) AccountDir(server, email string) string {
	who := email
	if who == "" {
		who = "default"
	}
	return filepath.Join(s.Dir, "accounts", serverDirName(server), safeName(who))
}

// ReadAccount returns the account key PEM and the registration JSON, or
// ErrNotFound when the account was never registered.
func (s *Store) ReadAccount(server, email string) (key, reg []byte, err error) {
	dir := s.AccountDir(server, email)
	key, err = os.ReadFile(filepath.Join(dir, AccountKeyFile))
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil, ErrNotFound
	}
	if err != nil {
		return nil, nil, err
	}
	reg, err = os.ReadFile(filepath.Join(dir, AccountFile))
	if errors.Is(err, fs.ErrNotExist) {
		// A key without a registration is a crash between the two writes;
		// the caller registers again with the same key, which ACME servers
		// answer with the existing account.
		return key, nil, nil
	}
	return key, reg, err
}

// HasAccount reports whether an account is registered for (server, email),
// without reading it.
func (s *Store) HasAccount(server, email string) bool {
	_, err := os.Stat(filepath.Join(s.AccountDir(server, email), AccountFile))
	return err == nil
}

// WriteAccountKey saves the account key (0600) before registration, so a
// registration that succeeds at the CA is never lost to a crash.
func (s *Store) WriteAccountKey(server, email string, key []byte) error {
	dir := s.AccountDir(server, email)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	return WriteFile(filepath.Join(dir, AccountKeyFile), key, 0o600)
}

// WriteAccount saves the registration JSON, and beside it which server
// and email it is for (the directory names are not reversible), so that
// a fleet node can give every account it holds back to a rebuilt Redis.
func (s *Store) WriteAccount(server, email string, reg []byte) error {
	dir := s.AccountDir(server, email)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	who, _ := json.Marshal(accountWho{Server: server, Email: email})
	if err := WriteFile(filepath.Join(dir, accountWhoFile), who, 0o600); err != nil {
		return err
	}
	return WriteFile(filepath.Join(dir, AccountFile), reg, 0o600)
}

const accountWhoFile = "account-for.json"

type accountWho struct {
	Server string `json:"server"`
	Email  string `json:"email"`
}

// serverDirName turns a directory URL into one readable path element:
// https://acme-v02.api.letsencrypt.org/directory becomes
// acme-v02.api.letsencrypt.org_directory.
func serverDirName(server string) string {
	u, err := url.Parse(server)
	if err != nil || u.Host == "" {
		return safeName(server)
	}
	return safeName(u.Host + strings.TrimSuffix(u.Path, "/"))
}

// safeName maps anything outside a conservative set to '_' so that the
// result is one path element that cannot climb out of its parent.
func safeName(s string) string {
	b := []byte(s)
	for i, c := range b {
		ok := c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '.' || c == '-' || c == '@' || c == '+'
		if !ok {
			b[i] = '_'
		}
	}
	out := string(b)
	if out == "" || strings.Trim(out, ".") == "" {
		out = "_" + out
	}
	return strings.TrimLeft(out, ".")
}

// RemoveAccount forgets the account for (server, email): the CA said it
// no longer knows it, and the next use registers a new one.
func (s *Store) RemoveAccount(server, email string) error {
	err := os.RemoveAll(s.AccountDir(server, email))
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	return nil
}

// AccountList lists (server, email) of every registered account in the
// state directory, as its account.json records them.
func (s *Store) AccountList() ([][2]string, error) {
	servers, err := os.ReadDir(filepath.Join(s.Dir, "accounts"))
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var out [][2]string
	for _, sv := range servers {
		emails, _ := os.ReadDir(filepath.Join(s.Dir, "accounts", sv.Name()))
		for _, em := range emails {
			dir := filepath.Join(s.Dir, "accounts", sv.Name(), em.Name())
			data, err := os.ReadFile(filepath.Join(dir, accountWhoFile))
			if err != nil {
				continue
			}
			if _, err := os.Stat(filepath.Join(dir, AccountFile)); err != nil {
				continue
			}
			var who accountWho
			if json.Unmarshal(data, &who) == nil && who.Server != "" {
				out = append(out, [2]string{who.Server, who.Email})
			}
		}
	}
	return out, nil
}
