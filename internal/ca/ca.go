// Package ca owns lbcert's list of certificate authorities: the primary
// and the fallbacks tried after it, in order, each with its own
// directory, account (email, EAB key ID and HMAC key), CA bundle,
// preferred chain, profile mapping and roots; which CA a lineage orders
// from first (its primary, even while a fallback's certificate is live);
// and a breaker per CA (breaker.go), saved across runs and shared by a
// fleet, so that once a CA is down the orders after it go straight to
// the next one until it answers again.
//
// It promises that a lineage's primary is always tried first unless its
// breaker is open, that a fallback never orders under settings meant
// for another CA (its own account, chain and profile), and that with no
// fallback configured nothing here changes what a run does. It never
// talks to a CA and never decides what is due; whether an error is the
// CA's fault or the names' is package acme's call (acme.CAFault).
package ca

import (
	"fmt"
	"github.com/lbcert/lbcert/internal/acme"
	"net"
	"net/url"
	"os"
	"regexp"
	"slices"
	"strings"

	"github.com/lbcert/lbcert/internal/store"
)

// CA is one certificate authority a lineage may order from.
type CA struct {
	Name   string // as the settings name it: "zerossl", "stepca"
	Server string // its ACME directory URL
	// Email is the account's contact; empty takes the lineage's.
	Email string
	// EABKid and EABHMACFile are its external account binding; the
	// HMAC key comes from the file or from HMACEnv, never from argv.
	EABKid, EABHMACFile string
	CABundle            string // PEM roots for its HTTPS, beside the system's
	PreferredChain      string
	// Profiles maps a lineage's profile to this CA's ("" orders under
	// its default). A profile not listed is asked for by the same name
	// when the CA offers it, else the CA's default.
	Profiles map[string]string
	// Roots is a PEM file of the roots its certificates chain to, for
	// the deploy check (--verify-roots); empty means the system's.
	Roots string
}

// HMACEnv is the environment variable that holds the CA's EAB HMAC key
// when no file names it: LBCERT_EAB_HMAC_KEY_ and the name in capitals.
func (c CA) HMACEnv() string {
	return "LBCERT_EAB_HMAC_KEY_" + strings.ToUpper(strings.ReplaceAll(c.Name, "-", "_"))
}

// Known are directories a fallback may name by name alone.
var Known = map[string]string{
	"letsencrypt":         "https://acme-v02.api.letsencrypt.org/directory",
	"letsencrypt-staging": "https://acme-staging-v02.api.letsencrypt.org/directory",
	"zerossl":             "https://acme.zerossl.com/v2/DV90",
	"google":              "https://dv.acme-v02.api.pki.goog/directory",
	"google-staging":      "https://dv.acme-v02.test-api.pki.goog/directory",
}

var nameRe = regexp.MustCompile(`^[a-z0-9][a-z0-9-]{0,31}$`)

// Parse reads one fallback's setting: its name, its directory URL
// (optional for a Known name), then key=value pairs:
//
//	zerossl eab-kid=KID eab-hmac-key-file=/etc/lbcert/zerossl.hmac
//	stepca https://ca.internal:9000/acme/acme/directory ca-bundle=/etc/step/root.crt verify-roots=/etc/step/root.crt
//
// Keys: email, eab-kid, eab-hmac-key-file, ca-bundle, preferred-chain,
// verify-roots, and profile=FROM:TO (repeatable; TO empty for the CA's
// default). A value with spaces is double-quoted:
// preferred-chain="ISRG Root X1". Files are checked to exist, not read:
// a run with nothing to order reads no secret.
func Parse(spec string) (CA, error) {
	f, err := fields(spec)
	if err != nil {
		return CA{}, err
	}
	if len(f) == 0 {
		return CA{}, fmt.Errorf("an empty fallback: want NAME [URL] [key=value...]")
	}
	c := CA{Name: f[0]}
	if !nameRe.MatchString(c.Name) || c.Name == "primary" {
		return CA{}, fmt.Errorf("fallback name %q: want lowercase letters, digits and dashes (not \"primary\"), like zerossl", c.Name)
	}
	rest := f[1:]
	if len(rest) > 0 && strings.Contains(rest[0], "://") {
		c.Server, rest = rest[0], rest[1:]
	} else if c.Server = Known[c.Name]; c.Server == "" {
		return CA{}, fmt.Errorf("fallback %s: no directory URL: give it after the name (known by name alone: %s)", c.Name, strings.Join(knownNames(), ", "))
	}
	if err := CheckURL(c.Server); err != nil {
		return CA{}, fmt.Errorf("fallback %s: %v", c.Name, err)
	}
	for _, kv := range rest {
		if err := c.set(kv); err != nil {
			return CA{}, fmt.Errorf("fallback %s: %v", c.Name, err)
		}
	}
	if c.EABHMACFile != "" && c.EABKid == "" {
		return CA{}, fmt.Errorf("fallback %s: eab-hmac-key-file without eab-kid", c.Name)
	}
	return c, nil
}

// fields splits spec at spaces, except inside double quotes, which go.
func fields(spec string) ([]string, error) {
	var out []string
	var cur strings.Builder
	quoted, have := false, false
	for _, r := range spec {
		switch {
		case r == '"':
			quoted, have = !quoted, true
		case !quoted && (r == ' ' || r == '\t' || r == '\n'):
			if have {
				out = append(out, cur.String())
				cur.Reset()
				have = false
			}
		default:
			cur.WriteRune(r)
			have = true
		}
	}
	if quoted {
		return nil, fmt.Errorf("%q: a double quote is not closed", spec)
	}
	if have {
		out = append(out, cur.String())
	}
	return out, nil
}

func (c *CA) set(kv string) error {
	k, v, ok := strings.Cut(kv, "=")
	if !ok || v == "" && k != "profile" {
		return fmt.Errorf("%q: want key=value", kv)
	}
	switch k {
	case "email":
		c.Email = v
	case "eab-kid":
		c.EABKid = v
	case "eab-hmac-key-file":
		c.EABHMACFile = v
		return exists(k, v)
	case "ca-bundle":
		c.CABundle = v
		return exists(k, v)
	case "verify-roots":
		c.Roots = v
		return exists(k, v)
	case "preferred-chain":
		c.PreferredChain = v
	case "profile":
		from, to, ok := strings.Cut(v, ":")
		if !ok || from == "" {
			return fmt.Errorf("profile=%s: want profile=FROM:TO, like profile=shortlived: (TO empty for the CA's default)", v)
		}
		if c.Profiles == nil {
			c.Profiles = map[string]string{}
		}
		c.Profiles[from] = to
	default:
		return fmt.Errorf("unknown key %q: want email, eab-kid, eab-hmac-key-file, ca-bundle, preferred-chain, verify-roots or profile", k)
	}
	return nil
}

// exists checks a file setting names a readable file.
func exists(key, path string) error {
	shown := path
	if key == "eab-hmac-key-file" {
		shown = acme.ShownKeyFile(path)
	}
	st, err := os.Stat(path)
	if err != nil {
		return fmt.Errorf("%s=%s: %v", key, shown, unwrap(err))
	}
	if st.IsDir() {
		return fmt.Errorf("%s=%s: a directory, want a file", key, shown)
	}
	return nil
}

func unwrap(err error) error {
	if pe, ok := err.(*os.PathError); ok {
		return pe.Err
	}
	return err
}

// CheckURL refuses a directory URL ACME cannot use.
func CheckURL(s string) error {
	u, err := url.Parse(s)
	if err != nil || u.Host == "" || u.Scheme != "https" {
		return fmt.Errorf("%q is not an https URL: want the CA's ACME directory (RFC 8555 requires https)", s)
	}
	return nil
}

func knownNames() []string {
	var out []string
	for n := range Known {
		out = append(out, n)
	}
	slices.Sort(out)
	return out
}

// Set is a run's CAs: the fallbacks in the order they are tried after
// each lineage's primary, and their breakers.
type Set struct {
	Fallbacks []CA
	breakers  *Breakers
	getenv    func(string) string // where the fallbacks' HMAC keys may be
	primary   string              // --server's directory ("" when not known)
}

// Breakers are the set's breakers; nil (every method a no-op) for a
// nil Set.
func (s *Set) Breakers() *Breakers {
	if s == nil {
		return nil
	}
	return s.breakers
}

// Len is how many CAs a lineage may order from: its primary and the
// fallbacks.
func (s *Set) Len() int {
	if s == nil {
		return 1
	}
	return 1 + len(s.Fallbacks)
}

// Canonical is one CA's directory, however it is spelt: a trailing
// slash, a capital or a trailing dot in the host, or the scheme's
// default port makes no other CA.
func Canonical(s string) string {
	u, err := url.Parse(strings.TrimRight(s, "/"))
	if err != nil || u.Host == "" {
		return s
	}
	host, port := strings.ToLower(strings.TrimSuffix(u.Hostname(), ".")), u.Port()
	if (u.Scheme == "https" && port == "443") || (u.Scheme == "http" && port == "80") {
		port = ""
	}
	u.Host = host
	if port != "" {
		u.Host = net.JoinHostPort(host, port)
	}
	return u.String()
}

// NewSet checks fallbacks against each other and against the primary
// (--server's directory, "" when unknown).
func NewSet(primary string, fallbacks []CA, b *Breakers) (*Set, error) {
	key := Canonical
	seen := map[string]string{key(primary): "the primary's directory (--server)"}
	names := map[string]bool{}
	for _, c := range fallbacks {
		if names[c.Name] {
			return nil, fmt.Errorf("fallback %s is named twice: give each CA once", c.Name)
		}
		names[c.Name] = true
		if other, dup := seen[key(c.Server)]; dup {
			return nil, fmt.Errorf("fallback %s: %s is %s: a fallback must be another CA", c.Name, c.Server, other)
		}
		seen[key(c.Server)] = "fallback " + c.Name + "'s directory"
	}
	return &Set{Fallbacks: fallbacks, breakers: b, primary: primary}, nil
}

// Fallback is the configured fallback whose directory is server.
func (s *Set) Fallback(server string) (CA, bool) {
	if s == nil {
		return CA{}, false
	}
	for _, c := range s.Fallbacks {
		if Canonical(c.Server) == Canonical(server) {
			return c, true
		}
	}
	return CA{}, false
}

// Candidate is one CA to try for a lineage, with what to order there.
type Candidate struct {
	Name           string // for reports
	Server, Email  string
	Profile        string
	PreferredChain string
	// ProfileOptional: a CA that does not offer Profile orders under
	// its default instead of refusing (fallbacks only: the primary
	// refuses a profile it does not offer before anything is ordered).
	ProfileOptional bool
	Primary         bool
}

// For lists the CAs to try for l, in order: its primary (l.Home()) with
// the lineage's own profile and chain, then the configured primary
// (--server) when that is another CA, then every other fallback, each
// with its own account, chain and mapped profile. A lineage whose home
// is now one of the fallbacks (an operator who moved to a new primary
// and kept the old CA behind it) tries the configured primary first and
// its old CA in the fallbacks' order: the configuration says which CA
// comes first.
func (s *Set) For(l *store.Lineage) []Candidate {
	home, email := l.Home()
	first := Candidate{Name: s.Label(home), Server: home, Email: email, Profile: l.Profile, PreferredChain: l.PreferredChain, Primary: true}
	if s == nil {
		return []Candidate{first}
	}
	out := []Candidate{first}
	if _, demoted := s.Fallback(home); demoted && s.primary != "" && Canonical(s.primary) != Canonical(home) {
		// The lineage's profile and chain were its old CA's: the new
		// primary orders under its default profile if it lacks it.
		out = []Candidate{{Name: s.Label(s.primary), Server: s.primary, Email: email, Profile: l.Profile, ProfileOptional: true, Primary: true}}
	} else if s.primary != "" && Canonical(s.primary) != Canonical(home) {
		out = append(out, Candidate{Name: s.Label(s.primary), Server: s.primary, Email: email, Profile: l.Profile, ProfileOptional: true, Primary: true})
	}
	for _, c := range s.Fallbacks {
		if Canonical(c.Server) == Canonical(out[0].Server) || (len(out) > 1 && Canonical(c.Server) == Canonical(out[1].Server)) {
			continue
		}
		cand := Candidate{Name: c.Name, Server: c.Server, Email: c.Email, PreferredChain: c.PreferredChain, Profile: l.Profile, ProfileOptional: true}
		if cand.Email == "" {
			cand.Email = email
		}
		if to, ok := c.Profiles[l.Profile]; ok && l.Profile != "" {
			cand.Profile = to
		}
		out = append(out, cand)
	}
	return out
}

// Label names a CA for people: a fallback's name, a known CA's, or the
// host of its directory.
func (s *Set) Label(server string) string {
	if c, ok := s.Fallback(server); ok {
		return c.Name
	}
	for name, u := range Known {
		if u == server {
			return name
		}
	}
	if u, err := url.Parse(server); err == nil && u.Host != "" {
		return u.Host
	}
	return server
}

// SystemRoots is what RootsFor returns for a fallback that names no
// roots of its own: the served chain is checked against the system's.
const SystemRoots = "system"

// RootsFor is the roots the deploy check verifies l's served chain to,
// when the check is on: "" for a certificate from its primary (the
// lineage's own --verify-roots), the fallback's verify-roots file, or
// SystemRoots for a fallback that names none.
func (s *Set) RootsFor(l *store.Lineage) string {
	if l.Fallback.Primary == "" {
		return ""
	}
	if c, ok := s.Fallback(l.Server); ok && c.Roots != "" {
		return c.Roots
	}
	return SystemRoots
}
