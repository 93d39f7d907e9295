// Package preflight checks, before anything is ordered, what the CA is
// about to check: that each name's DNS points at this load balancer
// (seed 000's allow_domain) and that an HTTP request for the name reaches
// lbcert's own challenge responder. A failure here costs one line of
// output; the same failure at the CA costs a failed authorization, and
// five of those an hour lock the name out.
package preflight

import (
	"context"
	"crypto/rand"
	"crypto/tls"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/lbcert/lbcert/internal/challenge"
	"github.com/lbcert/lbcert/internal/hint"
	lbnames "github.com/lbcert/lbcert/internal/names"
	"github.com/lbcert/lbcert/internal/secret"
)

// Responder is where a token is put for the route check: the same
// webroot or standalone listener the order will use.
type Responder interface {
	Present(domain, token, keyAuth string) error
	CleanUp(domain, token, keyAuth string) error
}

// Checker holds the pre-flight settings.
type Checker struct {
	// Resolver is a DNS server (host:port) to ask instead of the
	// system's, so the check sees what the CA's resolvers see.
	Resolver string
	// ExpectIPs and ExpectCNAME: when set, each name must resolve only
	// to these addresses, or be a CNAME to ExpectCNAME.
	ExpectIPs   []netip.Addr
	ExpectCNAME string
	// HTTPPort is where the CA will connect: 80 in production.
	HTTPPort int
	// Timeout bounds each name's checks (default 10s).
	Timeout time.Duration
}

// DNSEnabled reports whether the DNS check has anything to check.
func (c *Checker) DNSEnabled() bool { return len(c.ExpectIPs) > 0 || c.ExpectCNAME != "" }

func (c *Checker) resolver() *net.Resolver {
	if c.Resolver == "" {
		return net.DefaultResolver
	}
	return &net.Resolver{PreferGo: true, Dial: func(ctx context.Context, network, _ string) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, network, c.Resolver)
	}}
}

func (c *Checker) timeout() time.Duration {
	if c.Timeout > 0 {
		return c.Timeout
	}
	return 10 * time.Second
}

// Check runs the DNS check (when enabled) and then the HTTP route check
// for every name. The error says which name failed and why, with a hint.
func (c *Checker) Check(ctx context.Context, names []string, r Responder) error {
	for _, n := range names {
		// An RFC 8738 address has no DNS to check; the route is still
		// fetched through it below, as the CA will.
		if c.DNSEnabled() && !lbnames.IsAddress(n) {
			if err := c.DNS(ctx, n); err != nil {
				return err
			}
		}
	}
	for _, n := range names {
		if err := c.HTTP(ctx, n, r); err != nil {
			return err
		}
	}
	return nil
}

// DNS checks that name resolves to ExpectIPs only, or is a CNAME to
// ExpectCNAME.
func (c *Checker) DNS(ctx context.Context, name string) error {
	ctx, cancel := context.WithTimeout(ctx, c.timeout())
	defer cancel()
	res := c.resolver()
	var why []string
	if c.ExpectCNAME != "" {
		want := strings.TrimSuffix(strings.ToLower(c.ExpectCNAME), ".")
		cname, err := res.LookupCNAME(ctx, name)
		got := strings.TrimSuffix(strings.ToLower(cname), ".")
		switch {
		case err == nil && got == want:
			return nil
		case err != nil:
			why = append(why, fmt.Sprintf("CNAME lookup failed: %v", dnsErr(err)))
		case got == name:
			why = append(why, "it is not a CNAME")
		default:
			why = append(why, fmt.Sprintf("it is a CNAME to %s, not %s", got, want))
		}
	}
	if len(c.ExpectIPs) > 0 {
		addrs, err := res.LookupNetIP(ctx, "ip", name)
		if err != nil {
			why = append(why, fmt.Sprintf("lookup failed: %v", dnsErr(err)))
		} else {
			var stray []string
			for _, a := range addrs {
				if !slices.Contains(c.ExpectIPs, a.Unmap()) {
					stray = append(stray, a.Unmap().String())
				}
			}
			if len(stray) == 0 && len(addrs) > 0 {
				return nil
			}
			why = append(why, fmt.Sprintf("it resolves to %s, which is not --expect-ip", strings.Join(stray, ", ")))
		}
	}
	return hint.Errorf(fmt.Sprintf("point %s at this load balancer (A/AAAA to --expect-ip, or CNAME to --expect-cname) before ordering; nothing was sent to the CA", name),
		"pre-flight DNS %s: %s", name, strings.Join(why, "; "))
}

// dnsFailure is a name that resolved to no address during the fetch.
type dnsFailure struct{ host, why string }

func (e *dnsFailure) Error() string { return fmt.Sprintf("resolve %s: %s", e.host, e.why) }

func dnsErr(err error) string {
	var de *net.DNSError
	if errors.As(err, &de) {
		if de.IsNotFound {
			return "no such name"
		}
		return de.Err
	}
	return err.Error()
}

// HTTP puts a random token on name's challenge path through r and fetches
// it the way the CA will: http://<name>:<HTTPPort>/.well-known/acme-challenge/<token>,
// with redirects followed.
func (c *Checker) HTTP(ctx context.Context, name string, r Responder) error {
	ctx, cancel := context.WithTimeout(ctx, c.timeout())
	defer cancel()
	token, value := randomToken(), "lbcert-preflight."+randomToken()
	if err := r.Present(name, token, value); err != nil {
		return fmt.Errorf("pre-flight HTTP %s: %w", name, err)
	}
	defer r.CleanUp(name, token, value)

	port := c.HTTPPort
	if port == 0 {
		port = 80
	}
	url := "http://" + net.JoinHostPort(name, strconv.Itoa(port)) + challenge.PathPrefix + token
	res := c.resolver()
	resolverName := "the system's resolver"
	if c.Resolver != "" {
		resolverName = "--resolver " + c.Resolver
	}
	var dialed string // the address the name resolved to, once it did
	client := &http.Client{Transport: transport(res, &dialed)}
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	req.Header.Set("User-Agent", "lbcert-preflight")
	route := fmt.Sprintf("the CA will fetch http://%s:%d%s<token>: route that path to lbcert (HAProxy: an ACL on path_beg %s; nginx: a location serving the webroot); if this host cannot reach its own public address, pass --preflight=false",
		name, port, challenge.PathPrefix, challenge.PathPrefix)
	resp, err := client.Do(req)
	var dnsErr *dnsFailure
	switch {
	case errors.As(err, &dnsErr):
		// No address at all: a DNS matter, not a route.
		return hint.Errorf(fmt.Sprintf("add an A or AAAA record for %s pointing at this load balancer (asked %s); nothing was sent to the CA", dnsErr.host, resolverName),
			"pre-flight DNS %s: %s resolves to nothing at %s: %s", name, dnsErr.host, resolverName, dnsErr.why)
	case err != nil:
		listener := ""
		if l, ok := r.(interface{ ListenAddr() string }); ok {
			listener = fmt.Sprintf(" lbcert's own listener is on --http-addr %s: the CA's port %d must reach it.", l.ListenAddr(), port)
		}
		where := "it"
		if dialed != "" {
			where = dialed
		}
		return hint.Errorf(fmt.Sprintf("%s resolved to %s, and nothing answered there on port %d: check the firewall and that the load balancer listens on it.%s", name, where, port, listener),
			"pre-flight HTTP %s: %s", name, secret.OneLine(err))
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
	switch resp.StatusCode {
	case http.StatusOK:
	case http.StatusForbidden:
		return hint.Errorf(fmt.Sprintf("the web server refused to serve %s<token>: check that its worker may read the webroot and the token files (permissions, SELinux/AppArmor)", challenge.PathPrefix),
			"pre-flight HTTP %s: GET %s: %s", name, url, resp.Status)
	default:
		return hint.Errorf(route, "pre-flight HTTP %s: GET %s: %s", name, url, resp.Status)
	}
	if strings.TrimSpace(string(body)) != value {
		return hint.Errorf(route, "pre-flight HTTP %s: GET %s answered, but not with lbcert's token", name, url)
	}
	return nil
}

// transport fetches as the CA does: names resolved by res (IPv4 first),
// the address it dialed put in dialed.
func transport(res *net.Resolver, dialed *string) *http.Transport {
	dialer := &net.Dialer{Timeout: 5 * time.Second}
	return &http.Transport{
		// The CA does not check the certificate of an HTTPS redirect
		// target, so neither does this check.
		TLSClientConfig:   &tls.Config{InsecureSkipVerify: true},
		DisableKeepAlives: true,
		DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
			host, p, err := net.SplitHostPort(addr)
			if err != nil {
				return nil, err
			}
			ips, err := res.LookupNetIP(ctx, "ip4", host)
			if err != nil || len(ips) == 0 {
				ips, err = res.LookupNetIP(ctx, "ip", host)
			}
			if err != nil {
				return nil, &dnsFailure{host: host, why: dnsErr(err)}
			}
			*dialed = net.JoinHostPort(ips[0].Unmap().String(), p)
			return dialer.DialContext(ctx, network, *dialed)
		},
	}
}

func randomToken() string {
	b := make([]byte, 24)
	rand.Read(b)
	return base64.RawURLEncoding.EncodeToString(b)
}
