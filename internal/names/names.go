// Package names normalises and checks the names users give lbcert: DNS
// names for certificates and lineage names for the state directory.
//
// Everything here is pure and runs before any request to the CA, so that a
// typo costs an error message, not a failed validation that counts against
// the CA's rate limits (seed 000). Errors name the offending input and say
// why it was refused, in one line.
package names

import (
	"fmt"
	"net"
	"net/netip"
	"strings"
	"unicode"
	"unicode/utf8"

	"golang.org/x/net/idna"
)

// Limits from RFC 1035 section 2.3.4. 253 is the longest name in text form
// without the trailing dot.
const (
	maxLabel = 63
	maxName  = 253
	// MaxNames is the most names one certificate may carry at Let's
	// Encrypt (and most CAs): a 101st is refused before the CA is asked.
	MaxNames = 100
	// maxQuote is how much of a bad value an error repeats: a 10 MB
	// cell must not become a 10 MB error line.
	maxQuote = 100
)

// registration checks a name the way a registry would (IDNA 2008):
// valid punycode, no symbols or emoji, which Let's Encrypt refuses too.
var registration = idna.New(idna.ValidateForRegistration(), idna.BidiRule(), idna.StrictDomainName(true))

// Quote is %q of s, cut to about maxQuote characters with "…".
func Quote(s string) string {
	if len(s) > maxQuote {
		cut := maxQuote
		for cut > 0 && !utf8.RuneStart(s[cut]) {
			cut--
		}
		return fmt.Sprintf("%q…", s[:cut])
	}
	return fmt.Sprintf("%q", s)
}

// toASCII converts IDN labels to punycode without applying any mapping
// beyond what lookup needs; our own checks below give clearer errors than
// the idna package's, so it only converts.
var toASCII = idna.New(idna.MapForLookup(), idna.Transitional(false), idna.BidiRule())

// Domain returns the normalised form of a DNS name (lowercase, no trailing
// dot, IDN converted to punycode) or an error saying why HTTP-01 cannot
// validate it.
func Domain(raw string) (string, error) {
	name := strings.TrimSpace(raw)
	q := Quote(raw)
	if name == "" {
		return "", fmt.Errorf("domain %s: empty name", q)
	}
	name = strings.TrimSuffix(name, ".")
	if strings.Contains(name, "*") {
		return "", fmt.Errorf("domain %s: wildcard names need DNS-01 validation, which HTTP-01 cannot do", q)
	}
	if err := notAName(name, q); err != nil {
		return "", err
	}
	if looksLikeAddress(name) {
		return address(name, q)
	}
	if strings.ContainsAny(name, `/\`) {
		return "", fmt.Errorf("domain %s: contains a path separator", q)
	}
	if hasNonASCII(name) {
		// Check the Unicode labels' shape first, so "a..b" with an umlaut
		// still says "empty label" rather than an idna error.
		if err := checkLabels(raw, name, false); err != nil {
			return "", err
		}
		ascii, err := toASCII.ToASCII(name)
		if err != nil {
			return "", fmt.Errorf("domain %s: not a valid internationalised name: %v", q, trimIDNAErr(err))
		}
		name = ascii
	}
	name = strings.ToLower(name)
	if err := checkLabels(raw, name, true); err != nil {
		return "", err
	}
	labels := strings.Split(name, ".")
	if last := labels[len(labels)-1]; strings.Trim(last, "0123456789") == "" {
		return "", fmt.Errorf("domain %s: its last label is all digits, so it is neither a DNS name nor an IP address", q)
	}
	for _, l := range labels {
		if !strings.HasPrefix(l, "xn--") {
			continue
		}
		u, err := registration.ToUnicode(l)
		if err != nil {
			return "", fmt.Errorf("domain %s: label %q is not valid IDNA 2008 (bad punycode): %v", q, l, trimIDNAErr(err))
		}
		// IDNA 2008 allows letters, marks and digits (and the hyphen):
		// a symbol or an emoji is refused by Let's Encrypt, so here.
		for _, r := range u {
			if r != '-' && !unicode.IsLetter(r) && !unicode.IsDigit(r) && !unicode.Is(unicode.M, r) {
				return "", fmt.Errorf("domain %s: %q is a symbol, which IDNA 2008 and the CA refuse in a name", q, r)
			}
		}
	}
	return name, nil
}

// Domains normalises every name, drops duplicates (keeping the first
// occurrence, so the order users typed is the order in the certificate)
// and returns the first error met.
func Domains(raw []string) ([]string, error) {
	if len(raw) == 0 {
		return nil, fmt.Errorf("no domain given: use -d NAME, once for each name the certificate covers")
	}
	seen := make(map[string]bool, len(raw))
	out := make([]string, 0, len(raw))
	for _, r := range raw {
		d, err := Domain(r)
		if err != nil {
			return nil, err
		}
		if !seen[d] {
			seen[d] = true
			out = append(out, d)
		}
	}
	if len(out) > MaxNames {
		return nil, fmt.Errorf("%d names in one certificate: the CA allows at most %d; split them over several lineages", len(out), MaxNames)
	}
	return out, nil
}

func checkLabels(raw, name string, ascii bool) error {
	q := Quote(raw)
	if ascii && len(name) > maxName {
		return fmt.Errorf("domain %s: %d characters, longer than the %d a DNS name may have", q, len(name), maxName)
	}
	for _, label := range strings.Split(name, ".") {
		if label == "" {
			return fmt.Errorf("domain %s: empty label (two dots in a row, or a leading dot)", q)
		}
		if !ascii {
			continue
		}
		if len(label) > maxLabel {
			return fmt.Errorf("domain %s: label %q is %d characters, longer than %d", q, label, len(label), maxLabel)
		}
		for _, c := range label {
			if !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '-') {
				return fmt.Errorf("domain %s: character %q is not allowed (only letters, digits and hyphens)", q, c)
			}
		}
		if label[0] == '-' || label[len(label)-1] == '-' {
			return fmt.Errorf("domain %s: label %q starts or ends with a hyphen", q, label)
		}
	}
	return nil
}

// looksLikeAddress reports whether s is meant as an IP address (RFC 8738)
// rather than a DNS name: it has a colon (IPv6; a DNS name never does),
// brackets, or only digits and dots with a dot in it. "127.000.000.001"
// and "10.0.0.0/8" are addresses meant, and refused as such below.
// notAName refuses what people paste where a name goes, with what to
// type instead: a URL ("https://shop.example.com/"), or a name or
// address with a port ("shop.example.com:443"); HTTP-01 is always
// validated on port 80.
func notAName(s, q string) error {
	if _, rest, ok := strings.Cut(s, "://"); ok {
		host, _, _ := strings.Cut(rest, "/")
		if h, _, err := net.SplitHostPort(host); err == nil {
			host = h
		}
		return fmt.Errorf("domain %s: looks like a URL; give the name alone: -d %s", q, strings.Trim(host, "[]"))
	}
	host, port, err := net.SplitHostPort(s)
	if err == nil && port != "" && strings.Trim(port, "0123456789") == "" {
		return fmt.Errorf("domain %s: has a port; give the name alone, -d %s (the CA validates HTTP-01 on port 80)", q, host)
	}
	return nil
}

func looksLikeAddress(s string) bool {
	if strings.ContainsAny(s, ":[]") {
		return true
	}
	s, _, _ = strings.Cut(s, "/")
	return strings.Contains(s, ".") && strings.ContainsAny(s, "0123456789") && strings.Trim(s, "0123456789.") == ""
}

// address returns an IP address in its canonical form (IPv6 compressed
// and lower-case), or says in one line why it cannot be a certificate's.
func address(s, q string) (string, error) {
	inner := strings.TrimSuffix(strings.TrimPrefix(s, "["), "]")
	switch {
	case strings.Contains(inner, "/"):
		return "", fmt.Errorf("domain %s: an address range; a certificate names single addresses", q)
	case strings.Contains(inner, "%"):
		return "", fmt.Errorf("domain %s: an IPv6 zone (%%…) only means something on this host; give the address alone", q)
	}
	a, err := netip.ParseAddr(inner)
	if err != nil {
		reason := strings.TrimPrefix(err.Error(), "ParseAddr("+fmt.Sprintf("%q", inner)+"): ")
		if strings.Contains(reason, "leading zero") {
			reason = "a leading zero (some read it as octal); write each part without one"
		}
		return "", fmt.Errorf("domain %s: not a valid IP address: %s", q, reason)
	}
	switch {
	case a.Is4In6():
		return "", fmt.Errorf("domain %s: an IPv4-mapped IPv6 address; give it as %s", q, a.Unmap())
	case a.IsUnspecified(), a.IsMulticast():
		return "", fmt.Errorf("domain %s: not an address a client connects to, so no CA can validate it", q)
	}
	return a.String(), nil
}

// IsAddress reports whether a normalised name (from Domain) is an IP
// address.
func IsAddress(name string) bool {
	_, err := netip.ParseAddr(name)
	return err == nil
}

// LineageFor is the default lineage name for a certificate whose first
// name is first: the name itself, or for an IPv6 address the address
// with its colons as hyphens, which is safe as a path component and a
// file name everywhere ("2001:db8::1" -> "2001-db8--1").
func LineageFor(first string) string {
	return strings.ReplaceAll(first, ":", "-")
}

func hasNonASCII(s string) bool {
	for i := 0; i < len(s); i++ {
		if s[i] >= 0x80 {
			return true
		}
	}
	return false
}

func trimIDNAErr(err error) string {
	return strings.TrimPrefix(err.Error(), "idna: ")
}

// maxLineage keeps lineage names well inside NAME_MAX (255) even after
// lbcert adds a prefix or suffix for temporary files.
const maxLineage = 200

// Lineage checks a lineage name, which becomes a directory under live/ and
// archive/ and a file name under the HAProxy certificate directory. It must
// not be able to escape the state directory, so only a conservative set of
// characters is allowed and it may not start with a dot.
func Lineage(name string) error {
	q := fmt.Sprintf("%q", name)
	switch {
	case name == "":
		return fmt.Errorf("lineage name is empty")
	case strings.ContainsAny(name, `/\`):
		return fmt.Errorf("lineage name %s: contains a path separator", q)
	case name[0] == '.':
		return fmt.Errorf("lineage name %s: may not start with a dot", q)
	case len(name) > maxLineage:
		return fmt.Errorf("lineage name %s: longer than %d characters", q, maxLineage)
	}
	for _, c := range name {
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-' || c == '_' || c == '.') {
			return fmt.Errorf("lineage name %s: character %q is not allowed (letters, digits, '.', '-', '_')", q, c)
		}
	}
	return nil
}
