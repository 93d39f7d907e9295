package preflight

import (
	"fmt"
	"net"
	"net/netip"
	"strconv"
	"strings"

	"github.com/lbcert/lbcert/internal/names"
)

// Flags are the pre-flight flags as given: --preflight, --expect-ip,
// --expect-cname, --resolver, --http-port.
type Flags struct {
	On          bool
	ExpectIP    []string
	ExpectCNAME string
	Resolver    string
	HTTPPort    int
}

// Checker returns the configured checks, or nil when pre-flight is off.
// --expect-ip and --expect-cname turn it on.
func (p Flags) Checker() (*Checker, error) {
	if !p.On && len(p.ExpectIP) == 0 && p.ExpectCNAME == "" {
		return nil, nil
	}
	c := &Checker{HTTPPort: p.HTTPPort, Resolver: p.Resolver}
	for _, s := range p.ExpectIP {
		for _, f := range strings.FieldsFunc(s, func(r rune) bool { return r == ',' || r == ' ' }) {
			ip, err := netip.ParseAddr(f)
			if err != nil {
				return nil, fmt.Errorf("--expect-ip %q is not an IP address", f)
			}
			c.ExpectIPs = append(c.ExpectIPs, ip.Unmap())
		}
	}
	if p.ExpectCNAME != "" {
		if _, err := names.Domain(p.ExpectCNAME); err != nil {
			return nil, fmt.Errorf("--expect-cname: %w", err)
		}
		c.ExpectCNAME = p.ExpectCNAME
	}
	if p.HTTPPort < 1 || p.HTTPPort > 65535 {
		return nil, fmt.Errorf("--http-port %d: want 1-65535", p.HTTPPort)
	}
	if p.Resolver != "" {
		host, port, err := net.SplitHostPort(p.Resolver)
		n, perr := strconv.Atoi(port)
		if err != nil || host == "" || perr != nil || n < 1 || n > 65535 {
			return nil, fmt.Errorf("--resolver %q: want host:port, like 127.0.0.1:53", p.Resolver)
		}
	}
	return c, nil
}
