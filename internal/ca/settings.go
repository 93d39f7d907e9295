package ca

import (
	"fmt"
	"net/mail"
	"strings"
	"time"

	"github.com/lbcert/lbcert/internal/acme"
	"github.com/lbcert/lbcert/internal/hint"
)

// Settings are the fallbacks as a command was given them (--fallback-ca,
// in order, and --ca-backoff; README "Certificate authorities"): checked
// before any command runs, so that a bad one is refused before anything
// is written or sent, and made into a run's Set only when a run needs
// one. Checking them reads no secret.
type Settings struct {
	Fallbacks []string
	Backoff   time.Duration

	list   []CA   // the fallbacks, parsed by Check
	server string // the primary's directory (--server), when Check knew it
	getenv func(string) string
}

// Args repeats the fallbacks for a cron line or a unit, which run in
// another directory: each spec with its files (ca-bundle=, verify-roots=,
// eab-hmac-key-file=) made absolute by abs and on one line (the spec may
// be given over several).
func (s *Settings) Args(abs func(string) string) []string {
	var args []string
	for _, spec := range s.Fallbacks {
		args = append(args, "--fallback-ca", carriedSpec(spec, abs))
	}
	return args
}

// Schedulable refuses fallbacks a scheduled run (cron, a systemd timer)
// could not use: one whose EAB HMAC key only the environment holds. The
// line cannot carry a secret and cron passes no environment, so every
// renewal of that run would stop at the check of the fallbacks.
func (s *Settings) Schedulable() error {
	for _, c := range s.list {
		if c.EABKid != "" && c.EABHMACFile == "" {
			return hint.Errorf(fmt.Sprintf("add eab-hmac-key-file=FILE to --fallback-ca %s, the key alone in FILE (mode 0600), then run this again", c.Name),
				"--fallback-ca %s: its EAB HMAC key comes from %s, which a scheduled run does not have", c.Name, c.HMACEnv())
		}
	}
	return nil
}

// carriedSpec is spec on one line, its files absolute: the fields
// again, a value with a space double-quoted as Parse reads it.
func carriedSpec(spec string, abs func(string) string) string {
	f, err := fields(spec)
	if err != nil {
		return spec // Check refused it already
	}
	for i, kv := range f {
		k, v, ok := strings.Cut(kv, "=")
		if !ok {
			v = kv
		}
		if ok && v != "" && (k == "ca-bundle" || k == "verify-roots" || k == "eab-hmac-key-file") {
			v = abs(v)
		}
		v = strings.Join(strings.Fields(v), " ")
		if strings.Contains(v, " ") {
			v = `"` + v + `"`
		}
		if ok {
			f[i] = k + "=" + v
		} else {
			f[i] = v
		}
	}
	return strings.Join(f, " ")
}

// Check parses every fallback and checks them against each other and
// against the primary's directory (when primary names a valid one).
// getenv is where a fallback's EAB HMAC key may be (CA.HMACEnv).
func (s *Settings) Check(primary acme.Settings, getenv func(string) string) error {
	s.list, s.getenv = nil, getenv
	for _, spec := range s.Fallbacks {
		c, err := Parse(spec)
		if err != nil {
			return hint.Wrap(fmt.Errorf("--fallback-ca: %w", err), "one CA per --fallback-ca (a list in the config file), like 'zerossl eab-kid=KID eab-hmac-key-file=/etc/lbcert/zerossl.hmac'")
		}
		if c.EABKid != "" && c.EABHMACFile == "" && getenv(c.HMACEnv()) == "" {
			return fmt.Errorf("--fallback-ca %s has eab-kid but no HMAC key: set %s or add eab-hmac-key-file=FILE", c.Name, c.HMACEnv())
		}
		if c.Email != "" {
			if addr, err := mail.ParseAddress(c.Email); err != nil || addr.Address != c.Email || !strings.Contains(c.Email, ".") {
				return fmt.Errorf("--fallback-ca %s: email=%q is not an email address", c.Name, c.Email)
			}
		}
		s.list = append(s.list, c)
	}
	if s.Backoff < time.Second || s.Backoff > MaxBackoff {
		return fmt.Errorf("--ca-backoff %s: want 1s to %s", s.Backoff, MaxBackoff)
	}
	server, err := primary.ServerURL() // its own error is said where it is used
	if err != nil {
		server = ""
	}
	s.server = server
	if _, err := NewSet(server, s.list, nil); err != nil {
		return fmt.Errorf("--fallback-ca: %w", err)
	}
	return nil
}

// CheckTOS refuses, before anything is ordered, fallbacks whose account
// would have to accept terms of service with nobody to ask: in an
// outage they could take nothing. primary is the primary's account
// options, whose answer to the terms the fallbacks share.
func (s *Settings) CheckTOS(primary acme.Options) error {
	for _, c := range s.list {
		o := primary
		o.Server = c.Server
		if c.Email != "" {
			o.Email = c.Email
		}
		if acme.NeedsTOS(o) {
			return fmt.Errorf("--fallback-ca %s: no account at %s yet, and no terminal to ask about its terms of service: pass --agree-tos to accept them", c.Name, c.Server)
		}
	}
	return nil
}

// Run is a run's CAs with their breakers in st, or nil with no fallback:
// then a lineage orders from its own CA only, as it always did. A dry
// run's fallbacks stay off Let's Encrypt's production limits.
func (s *Settings) Run(st Store, now func() time.Time, dryRun bool) *Set {
	if len(s.list) == 0 {
		return nil
	}
	list := make([]CA, len(s.list))
	for i, c := range s.list {
		if dryRun {
			c.Server = acme.DryRunServer(c.Server)
		}
		list[i] = c
	}
	server := s.server
	if dryRun && server != "" {
		server = acme.DryRunServer(server)
	}
	set, _ := NewSet(server, list, &Breakers{Store: st, Now: now, Backoff: s.Backoff})
	set.getenv = s.getenv
	return set
}

// Known is the fallbacks without their breakers, for what only names
// them (list, show) or checks their roots (a deploy); nil with none.
func (s *Settings) Known() *Set {
	if len(s.list) == 0 {
		return nil
	}
	set, _ := NewSet("", s.list, nil)
	return set
}

// Account is the account options for an order at server, when server
// is a fallback's: the primary's (its answer to the terms, its user
// agent and account store), with the fallback's own contact, CA bundle
// and EAB key, its HMAC key read then and only then. ok is false for
// any other server.
func (s *Set) Account(primary acme.Options, server string) (o acme.Options, ok bool, err error) {
	c, ok := s.Fallback(server)
	if !ok {
		return primary, false, nil
	}
	o = primary
	o.Server, o.CABundle, o.EABKid, o.EABHMAC, o.FailFast = server, c.CABundle, c.EABKid, "", true
	if c.Email != "" {
		o.Email = c.Email
	}
	if c.EABKid == "" {
		return o, true, nil
	}
	getenv := s.getenv
	if getenv == nil {
		getenv = func(string) string { return "" }
	}
	o.EABHMAC, err = acme.ReadEABHMAC(getenv(c.HMACEnv()), c.EABHMACFile, "--fallback-ca "+c.Name+" eab-hmac-key-file",
		"--fallback-ca "+c.Name+" has eab-kid but no HMAC key: set "+c.HMACEnv()+" or add eab-hmac-key-file=FILE")
	return o, true, err
}

// Bundle is the CA bundle for server: a fallback's own, else primary.
func (s *Set) Bundle(server, primary string) string {
	if c, ok := s.Fallback(server); ok {
		return c.CABundle
	}
	return primary
}
