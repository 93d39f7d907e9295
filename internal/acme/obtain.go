package acme

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/rsa"
	"crypto/x509"
	"encoding/base64"
	"encoding/pem"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"sort"
	"strconv"
	"strings"

	legoacme "github.com/go-acme/lego/v4/acme"
	"github.com/go-acme/lego/v4/certcrypto"
	"github.com/go-acme/lego/v4/certificate"
	"github.com/go-acme/lego/v4/challenge"

	"github.com/lbcert/lbcert/internal/hint"
	"github.com/lbcert/lbcert/internal/store"
)

// KeyTypes are the accepted --key-type values, default first.
var KeyTypes = []string{"ec256", "ec384", "rsa2048", "rsa3072", "rsa4096"}

var keyTypes = map[string]certcrypto.KeyType{
	"ec256":   certcrypto.EC256,
	"ec384":   certcrypto.EC384,
	"rsa2048": certcrypto.RSA2048,
	"rsa3072": certcrypto.RSA3072,
	"rsa4096": certcrypto.RSA4096,
}

// CheckKeyType refuses an unknown --key-type.
func CheckKeyType(s string) error {
	if _, ok := keyTypes[s]; !ok {
		return fmt.Errorf("--key-type %q: want one of %s", s, strings.Join(KeyTypes, ", "))
	}
	return nil
}

// Request is one certificate order.
type Request struct {
	Domains  []string
	KeyType  string
	Profile  string
	Key      []byte // PEM; reuse this private key instead of making one
	Provider challenge.Provider
	Replaces string // RFC 9773 ARI CertID of the certificate this replaces
	// PreferredChain is the issuer common name of the chain to pick
	// among those the CA offers.
	PreferredChain string
	// ProfileOptional orders under the CA's default when it does not
	// offer Profile, instead of refusing: a fallback CA takes the
	// lineage whatever profiles it has.
	ProfileOptional bool
}

// Result is a checked certificate, ready for store.Save.
type Result struct {
	Files store.Files
	Info  store.CertInfo
	// Profile is the profile ordered under: the one asked for, or the
	// one lbcert picked (shortlived for an IP address).
	Profile string
	// NoARI says the CA's directory has no renewalInfo (step-ca): the
	// lifetime rule renews this certificate, and list can say so at
	// once instead of "ARI not asked yet".
	NoARI bool
}

// Obtain orders a certificate for r.Domains, answers the HTTP-01
// challenges through r.Provider and checks the result.
func (c *Client) Obtain(r Request) (*Result, error) {
	kt, ok := keyTypes[r.KeyType]
	if !ok {
		return nil, CheckKeyType(r.KeyType)
	}
	var key crypto.PrivateKey
	var err error
	if len(r.Key) > 0 {
		if key, err = certcrypto.ParsePEMPrivateKey(r.Key); err != nil {
			return nil, fmt.Errorf("reuse key: %v", err)
		}
	} else if key, err = certcrypto.GeneratePrivateKey(kt); err != nil {
		return nil, err
	}
	profile, err := c.pickProfile(r)
	if err != nil {
		return nil, &notPlacedError{err} // before any order
	}
	if err := c.router.set(r.Domains, r.Provider); err != nil {
		return nil, err
	}
	defer c.router.clear(r.Domains)

	req := certificate.ObtainRequest{
		Domains:        r.Domains,
		PrivateKey:     key,
		Bundle:         true,
		Profile:        profile,
		ReplacesCertID: r.Replaces,
		PreferredChain: r.PreferredChain,
		MustStaple:     false, // never: Let's Encrypt runs no OCSP, so a Must-Staple certificate fails in browsers
	}
	res, err := c.orderWatched(req)
	if err != nil {
		return nil, explain("obtain "+strings.Join(r.Domains, ","), err)
	}
	out, err := check(res.Certificate, res.PrivateKey, r.Domains)
	if err != nil {
		return nil, err
	}
	out.Profile = profile
	if offered, known := c.offersARI(); known && !offered {
		out.NoARI = true
	}
	return out, nil
}

// replacesRejected reports whether err is the CA's error response to an
// order that carried "replaces", rather than a failed validation or a
// rate limit (which an order without it would meet just the same).
// Only the answer to the new-order request (at newOrder, the directory's
// URL) can be about "replaces": a finalize or an authorization that
// fails with a 5xx is the CA's own fault, retried as such, and dropping
// "replaces" for it would cost the renewal its ARI exemption.
func replacesRejected(err error, newOrder string) bool {
	var ar *legoacme.AlreadyReplacedError
	var pd *legoacme.ProblemDetails
	if errors.As(err, &ar) {
		return true
	}
	if !errors.As(err, &pd) || pd.HTTPStatus < 400 {
		return false
	}
	if pd.URL != "" && newOrder != "" && pd.URL != newOrder {
		return false
	}
	if _, limited := RateLimited(err); limited || FailedValidation(err) || AccountGone(err) {
		return false
	}
	// Problems about the account or the names, which the same order
	// without "replaces" would meet just the same.
	switch strings.TrimPrefix(pd.Type, "urn:ietf:params:acme:error:") {
	case "userActionRequired", "externalAccountRequired", "rejectedIdentifier",
		"unsupportedIdentifier", "badCSR", "caa", "dns", "invalidContact", "unsupportedContact":
		return false
	}
	return true
}

// check splits the bundle lego returned and refuses a certificate whose
// key or names are not what was asked for: a CA bug must not reach live/.
func check(bundle, keyPEM []byte, domains []string) (*Result, error) {
	var certs [][]byte
	var leaf *x509.Certificate
	rest := bundle
	for {
		var b *pem.Block
		b, rest = pem.Decode(rest)
		if b == nil {
			break
		}
		if b.Type != "CERTIFICATE" {
			continue
		}
		if leaf == nil {
			c, err := x509.ParseCertificate(b.Bytes)
			if err != nil {
				return nil, fmt.Errorf("CA returned an unreadable certificate: %v", err)
			}
			leaf = c
		}
		certs = append(certs, pem.EncodeToMemory(b))
	}
	if leaf == nil {
		return nil, errors.New("CA returned no certificate")
	}
	key, err := certcrypto.ParsePEMPrivateKey(keyPEM)
	if err != nil {
		return nil, fmt.Errorf("private key: %v", err)
	}
	if !publicKeyMatches(leaf.PublicKey, key) {
		return nil, errors.New("CA returned a certificate that does not match our private key")
	}
	got := slices.Clone(leaf.DNSNames)
	for _, ip := range leaf.IPAddresses { // RFC 8738 identifiers, canonical as names.Domain keeps them
		if a, ok := netip.AddrFromSlice(ip); ok {
			got = append(got, a.Unmap().String())
		}
	}
	want := slices.Clone(domains)
	sort.Strings(got)
	sort.Strings(want)
	if !slices.Equal(got, want) {
		return nil, fmt.Errorf("CA returned a certificate for %v, not %v", got, want)
	}
	ari, err := certificate.MakeARICertID(leaf)
	if err != nil {
		ari = "" // a CA without AKI; renew falls back to lifetime rules
	}
	return &Result{
		Files: store.Files{
			Cert:      certs[0],
			Chain:     bytes.Join(certs[1:], nil),
			Fullchain: bytes.Join(certs, nil),
			Key:       keyPEM,
		},
		Info: store.CertInfo{
			Serial:    SerialHex(leaf),
			NotBefore: leaf.NotBefore.UTC(),
			NotAfter:  leaf.NotAfter.UTC(),
			ARICertID: ari,
			Issuer:    leaf.Issuer.String(),
		},
	}, nil
}

// SerialHex formats a serial the way the CA and openssl show it, so users
// can grep logs for it.
func SerialHex(c *x509.Certificate) string {
	return fmt.Sprintf("%x", c.SerialNumber)
}

func publicKeyMatches(pub crypto.PublicKey, key crypto.PrivateKey) bool {
	switch k := key.(type) {
	case *ecdsa.PrivateKey:
		return k.PublicKey.Equal(pub)
	case *rsa.PrivateKey:
		return k.PublicKey.Equal(pub)
	}
	return false
}

// Explain wraps an ACME error with a hint matched to the
// problem type, and makes lego's multi-line errors one line.
func Explain(err error) error {
	return explain("", err)
}

// explain is Explain with a prefix saying what was being done. When the
// CA sent an RFC 7807 problem, the message is the prefix, the problem type
// and its detail, instead of lego's nested wrapping of the same facts.
func explain(prefix string, err error) error {
	if err == nil {
		return nil
	}
	msg := flatten(err.Error())
	var rl *legoacme.RateLimitedError
	var pd *legoacme.ProblemDetails
	var stalled *StalledChallengeError
	if errors.As(err, &stalled) && prefix != "" {
		// The CA's detail may not name the name (step-ca's does not).
		msg = fmt.Sprintf("%s: %s for %s: %s: %s", prefix, stalled.Type, stalled.Identifier, problemType(stalled.Problem.Type), flatten(stalled.Problem.Detail))
	} else if errors.As(err, &pd) && prefix != "" {
		msg = fmt.Sprintf("%s: %s: %s", prefix, problemType(pd.Type), flatten(pd.Detail))
	} else if prefix != "" {
		msg = prefix + ": " + msg
	}
	e := &hint.Error{Err: errors.New(msg)}
	switch {
	case errors.As(err, &rl):
		e.Text = "the CA's rate limit was hit; wait"
		if rl.RetryAfter != "" {
			e.Text += fmt.Sprintf(" (Retry-After: %s)", rl.RetryAfter)
		}
		e.Text += " before trying again, and use --staging while testing"
	case errors.As(err, &pd) && challengeAnswer(err) && strings.HasSuffix(pd.Type, ":rejectedIdentifier"):
		// A challenge, not the order, refused: the CA fetched the token
		// and did not like the answer (step-ca's word for a wrong key
		// authorization), which no policy or blocklist is behind.
		e.Text = hintFor(":incorrectResponse")
	case errors.As(err, &pd) && dnsDetail(pd):
		// The CA files some DNS failures under "connection": the name
		// has no address, which no firewall or route can fix.
		e.Text = hintFor(":dns")
	case errors.As(err, &pd):
		e.Text = hintFor(pd.Type)
		for _, sp := range pd.SubProblems {
			if e.Text == "" {
				e.Text = hintFor(sp.Type)
			}
		}
	case strings.Contains(msg, "certificate signed by unknown authority"):
		e.Text = "the ACME server's TLS certificate is not trusted: pass its root with --ca-bundle"
	case strings.Contains(msg, "connection refused") || strings.Contains(msg, "no such host"):
		e.Text = "check --server and that this host can reach the ACME server"
	}
	if e.Text == "" {
		e.Text = hintFor(msg)
	}
	if MayHaveIssued(err) {
		// Said first: the operator's next step depends on it (the CA's
		// limits for these names may already carry this certificate).
		t := "the finalize reached the CA, which may have issued a certificate lbcert did not receive; it counts against the CA's limits for these names, so this run does not order them again (the next run does)"
		if e.Text != "" {
			t += "; " + e.Text
		}
		e.Text = t
	}
	if stalled != nil && strings.HasSuffix(stalled.Problem.Type, ":connection") {
		// Such a CA files an HTTP error status under "connection" too,
		// with one detail for both.
		e.Text += ", and that /.well-known/acme-challenge/ reaches lbcert (this CA reports an HTTP error such as 404 as a connection failure)"
	}
	return &caError{explained: e, cause: err, challenge: challengeAnswer(err), server: serverFault(err)}
}

// problemType is an ACME problem type without its RFC 8555 namespace.
func problemType(t string) string { return strings.TrimPrefix(t, "urn:ietf:params:acme:error:") }

// dnsDetail reports whether a CA problem, whatever its type, says the
// name did not resolve.
func dnsDetail(pd *legoacme.ProblemDetails) bool {
	texts := []string{pd.Detail}
	for _, sp := range pd.SubProblems {
		texts = append(texts, sp.Detail)
	}
	for _, t := range texts {
		t = strings.ToLower(t)
		if strings.Contains(t, "nxdomain") || strings.Contains(t, "no such host") || strings.Contains(t, "no valid a records") || strings.Contains(t, "no valid ip addresses") {
			return true
		}
	}
	return false
}

func hintFor(problem string) string {
	switch {
	case strings.Contains(problem, ":unauthorized"), strings.Contains(problem, ":incorrectResponse"):
		return "the CA fetched /.well-known/acme-challenge/ and got the wrong answer: does the web server route that path to lbcert's --webroot or --http-addr for every name?"
	case strings.Contains(problem, ":connection"):
		return "the CA could not connect on port 80: check DNS points at this host and the firewall allows port 80"
	case strings.Contains(problem, ":dns"):
		return "the CA could not resolve the name: check its DNS A/AAAA records"
	case strings.Contains(problem, ":rejectedIdentifier"):
		return "the CA will not issue for this name (policy or blocklist)"
	case strings.Contains(problem, ":externalAccountRequired"):
		return "this CA requires external account binding: pass --eab-kid and LBCERT_EAB_HMAC_KEY"
	case strings.Contains(problem, ":invalidProfile"):
		return "the CA does not offer that --profile"
	}
	return ""
}

// RevocationReasons are the RFC 5280 section 5.3.1 reason codes that
// ACME subscribers may use (RFC 8555 section 7.6).
var RevocationReasons = map[string]uint{
	"unspecified":          0,
	"keyCompromise":        1,
	"affiliationChanged":   3,
	"superseded":           4,
	"cessationOfOperation": 5,
}

// Revoke revokes the certificate in certPEM (its first certificate) with
// reason (RFC 8555 section 7.6).
func (c *Client) Revoke(certPEM []byte, reason uint) error {
	certs, err := certcrypto.ParsePEMBundle(certPEM)
	if err != nil {
		return explain("revoke", err)
	}
	if certs[0].IsCA {
		return explain("revoke", errors.New("certificate bundle starts with a CA certificate"))
	}
	msg := legoacme.RevokeCertMessage{Certificate: base64.RawURLEncoding.EncodeToString(certs[0].Raw), Reason: &reason}
	if err := c.core.Certificates.Revoke(msg); err != nil {
		return explain("revoke", err)
	}
	return nil
}

// ReasonNames lists RevocationReasons' names in code order.
func ReasonNames() []string {
	var out []string
	for k := range RevocationReasons {
		out = append(out, k)
	}
	sort.Slice(out, func(i, j int) bool { return RevocationReasons[out[i]] < RevocationReasons[out[j]] })
	return out
}

// ParseReason reads --reason: a reason's name, or its code.
func ParseReason(s string) (uint, error) {
	if r, ok := RevocationReasons[s]; ok {
		return r, nil
	}
	if n, err := strconv.Atoi(s); err == nil {
		for _, r := range RevocationReasons {
			if uint(n) == r {
				return r, nil
			}
		}
	}
	return 0, fmt.Errorf("--reason %q: want one of %s", s, strings.Join(ReasonNames(), ", "))
}
