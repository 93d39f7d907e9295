package acme

import (
	"fmt"
	"log/slog"
	"slices"
	"strings"

	"github.com/lbcert/lbcert/internal/names"
)

// ShortLived is the profile name Let's Encrypt (and Pebble's test
// config) give 6-day certificates; Let's Encrypt issues certificates for
// IP addresses only under it.
const ShortLived = "shortlived"

// directory is what lbcert reads of the CA's directory.
type directory struct {
	Meta struct {
		Profiles map[string]string
	}
	RenewalInfo string
}

// directory returns the CA's directory as the client read it when it
// was made (New fails when it cannot be read): reading it again costs a
// request per run for nothing.
func (c *Client) directory() (*directory, error) {
	d := c.core.GetDirectory()
	var out directory
	out.Meta.Profiles, out.RenewalInfo = d.Meta.Profiles, d.RenewalInfo
	return &out, nil
}

// profiles returns the profiles the CA's directory offers (RFC draft
// "ACME profiles", meta.profiles).
func (c *Client) profiles() (map[string]string, error) {
	d, err := c.directory()
	if err != nil {
		return nil, err
	}
	return d.Meta.Profiles, nil
}

// offersARI reports whether the CA's directory has a renewalInfo
// endpoint (RFC 9773), and false when the directory cannot be read.
func (c *Client) offersARI() (offered, known bool) {
	d, err := c.directory()
	if err != nil {
		return false, false
	}
	return d.RenewalInfo != "", true
}

// pickProfile checks a requested profile against the directory before
// anything is ordered, and picks "shortlived" for a certificate that
// names an IP address when none was asked for and the CA offers it.
func (c *Client) pickProfile(r Request) (string, error) {
	hasAddress := slices.ContainsFunc(r.Domains, names.IsAddress)
	if r.Profile == "" && !hasAddress {
		return "", nil // no directory read needed
	}
	offered, err := c.profiles()
	if err != nil {
		return "", err
	}
	if r.Profile == "" {
		if _, ok := offered[ShortLived]; ok {
			slog.Info("the certificate names an IP address: using the CA's shortlived profile (Let's Encrypt issues IP certificates only under it); pass --profile to choose another",
				"domains", strings.Join(r.Domains, ","))
			return ShortLived, nil
		}
		return "", nil
	}
	if _, ok := offered[r.Profile]; ok {
		return r.Profile, nil
	}
	if r.ProfileOptional {
		slog.Info("the CA does not offer the lineage's profile; ordering under its default", "server", c.opts.Server, "profile", r.Profile)
		return "", nil
	}
	if len(offered) == 0 {
		return "", &ProfileError{fmt.Sprintf("--profile %q: %s offers no profiles; leave --profile unset", r.Profile, c.opts.Server)}
	}
	var list []string
	for name := range offered {
		list = append(list, name)
	}
	slices.Sort(list)
	return "", &ProfileError{fmt.Sprintf("--profile %q: %s offers %s; nothing was ordered", r.Profile, c.opts.Server, strings.Join(list, ", "))}
}

// ProfileError is a --profile the CA does not offer, refused before any
// order. It is the setting's fault, not the names': no failure backoff
// (a run with the profile fixed goes ahead at once, where a CA that has
// no profiles, as step-ca, would otherwise hold the lineage an hour) and
// the rate-budget token is given back.
type ProfileError struct{ msg string }

func (e *ProfileError) Error() string { return e.msg }

// NoBackoff tells the engine the names are not to blame.
func (e *ProfileError) NoBackoff() bool { return true }
