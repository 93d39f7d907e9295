package acme

import (
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"slices"
	"strings"

	"github.com/lbcert/lbcert/internal/names"
)

// ShortLived is the profile name Let's Encrypt (and Pebble's test
// config) give 6-day certificates; Let's Encrypt issues certificates for
// IP addresses only under it.
const ShortLived = "shortlived"

// directory is what lbcert reads of the CA's directory itself (lego
// reads it too, but keeps it to itself).
type directory struct {
	Meta struct {
		Profiles map[string]string `json:"profiles"`
	} `json:"meta"`
	RenewalInfo string `json:"renewalInfo"`
}

// directory returns the CA's directory, read once per client. A failed
// read is not kept: the next order asks again.
func (c *Client) directory() (*directory, error) {
	c.dirMu.Lock()
	defer c.dirMu.Unlock()
	if c.dir != nil {
		return c.dir, nil
	}
	resp, err := c.hc.Get(c.opts.Server)
	if err != nil {
		return nil, Explain(fmt.Errorf("ACME server %s: %w", c.opts.Server, err))
	}
	defer resp.Body.Close()
	var d directory
	if err := json.NewDecoder(io.LimitReader(resp.Body, 1<<20)).Decode(&d); err != nil || resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("ACME server %s: could not read its directory (HTTP %d)", c.opts.Server, resp.StatusCode)
	}
	c.dir = &d
	return c.dir, nil
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
