// Package challenge answers ACME HTTP-01 challenges (RFC 8555 section 8.3),
// either by writing token files under a webroot that nginx already serves,
// or from lbcert's own standalone listener.
//
// Both implement lego's challenge.Provider and are safe for concurrent
// orders: batch runs many orders through one standalone listener per port.
// Neither talks to the CA.
package challenge

import (
	"fmt"
	"net"
	"net/netip"
	"strings"
)

// PathPrefix is where HTTP-01 tokens live on every validated name.
const PathPrefix = "/.well-known/acme-challenge/"

// checkToken refuses tokens that are not base64url (RFC 8555 section 8.3),
// so that a hostile or broken CA cannot make lbcert write outside the
// challenge directory.
func checkToken(token string) error {
	if token == "" || len(token) > 256 {
		return fmt.Errorf("challenge token has length %d", len(token))
	}
	for _, c := range token {
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-' || c == '_') {
			return fmt.Errorf("challenge token %q is not base64url", token)
		}
	}
	return nil
}

// hostOnly strips a port and a trailing dot from a Host header and
// lowercases it, so that "Shop.Example.net.:8888" matches "shop.example.net".
func hostOnly(host string) string {
	if h, _, err := net.SplitHostPort(host); err == nil {
		host = h // "name:port", "1.2.3.4:port", "[v6]:port"
	}
	host = strings.TrimPrefix(strings.TrimSuffix(host, "]"), "[")
	if a, err := netip.ParseAddr(host); err == nil {
		return a.String() // an RFC 8738 address, however the client wrote it
	}
	return strings.ToLower(strings.TrimSuffix(host, "."))
}
