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

// directoryMeta is what lbcert reads of the directory's meta object.
type directoryMeta struct {
	Profiles map[string]string `json:"profiles"`
}

// profiles returns the profiles the CA's directory offers (RFC draft
// "ACME profiles", meta.profiles), read once per client.
// A failed read is not kept: the next order asks again.
func (c *Client) profiles() (map[string]string, error) {
	c.dirMu.Lock()
	defer c.dirMu.Unlock()
	if c.dirMeta != nil {
		return c.dirMeta.Profiles, nil
	}
	resp, err := c.hc.Get(c.opts.Server)
	if err != nil {
		return nil, Explain(fmt.Errorf("ACME server %s: %w", c.opts.Server, err))
	}
	defer resp.Body.Close()
	var d struct {
		Meta directoryMeta `json:"meta"`
	}
	if err := json.NewDecoder(io.LimitReader(resp.Body, 1<<20)).Decode(&d); err != nil || resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("ACME server %s: could not read its directory (HTTP %d)", c.opts.Server, resp.StatusCode)
	}
	c.dirMeta = &d.Meta
	return d.Meta.Profiles, nil
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
		return "", fmt.Errorf("--profile %q: %s offers no profiles; leave --profile unset", r.Profile, c.opts.Server)
	}
	var list []string
	for name := range offered {
		list = append(list, name)
	}
	slices.Sort(list)
	return "", fmt.Errorf("--profile %q: %s offers %s; nothing was ordered", r.Profile, c.opts.Server, strings.Join(list, ", "))
}
