package acme

import (
	"context"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strings"
	"time"

	"github.com/go-acme/lego/v4/acme/api"
	"github.com/go-acme/lego/v4/certificate"
)

// ErrNoARI means the CA does not offer ACME Renewal Information.
var ErrNoARI = errors.New("the CA does not offer renewal information (ARI)")

// RenewalInfo is the CA's suggested renewal window for one certificate
// (RFC 9773 section 4.2) and how long to wait before asking again.
type RenewalInfo struct {
	Start, End time.Time
	RetryAfter time.Duration
}

// ARI asks a CA's renewal information endpoint without an account.
// RFC 9773's renewalInfo is a plain GET, so the daily nothing-due renew
// that asks it reads no account key, registration or EAB secret: those
// are loaded only when something is ordered.
type ARI struct {
	hc        *http.Client
	url       string // the directory's renewalInfo; "" when the CA has none
	userAgent string
}

// NewARI reads server's directory for its renewalInfo endpoint.
func NewARI(ctx context.Context, server, caBundle, userAgent string) (*ARI, error) {
	hc, err := HTTPClient(ctx, caBundle)
	if err != nil {
		return nil, err
	}
	a := &ARI{hc: hc, userAgent: userAgent}
	var dir struct {
		RenewalInfo string `json:"renewalInfo"`
	}
	if err := a.get(ctx, server, &dir, nil); err != nil {
		return nil, Explain(fmt.Errorf("ACME server %s: %w", server, err))
	}
	a.url = strings.TrimRight(dir.RenewalInfo, "/")
	return a, nil
}

// CertID is the RFC 9773 certificate identifier of the certificate in
// certPEM (its authority key identifier and serial).
func CertID(certPEM []byte) (string, error) {
	b, _ := pem.Decode(certPEM)
	if b == nil {
		return "", errors.New("cert.pem is not PEM")
	}
	leaf, err := x509.ParseCertificate(b.Bytes)
	if err != nil {
		return "", err
	}
	return certificate.MakeARICertID(leaf)
}

// RenewalInfo asks the CA when to renew the certificate whose RFC 9773
// identifier is id (saved with every version, so that asking reads no
// certificate file).
func (a *ARI) RenewalInfo(ctx context.Context, id string) (*RenewalInfo, error) {
	if a.url == "" {
		return nil, ErrNoARI
	}
	if id == "" {
		return nil, errors.New("renewal info: the certificate has no ARI identifier")
	}
	var info certificate.RenewalInfoResponse
	var h http.Header
	var err error
	if err = a.get(ctx, a.url+"/"+id, &info, &h); err != nil {
		return nil, fmt.Errorf("renewal info: %w", err)
	}
	if retry := h.Get("Retry-After"); retry != "" {
		if info.RetryAfter, err = api.ParseRetryAfter(retry); err != nil {
			return nil, fmt.Errorf("renewal info: Retry-After %q: %v", retry, err)
		}
	}
	if info.SuggestedWindow.Start.IsZero() || info.SuggestedWindow.End.IsZero() {
		// RFC 9773 requires the window; a zero one would make the
		// certificate due in year 1, at once.
		return nil, fmt.Errorf("renewal info: the CA's answer has no suggestedWindow")
	}
	if info.SuggestedWindow.End.Before(info.SuggestedWindow.Start) {
		return nil, fmt.Errorf("renewal info: window ends before it starts")
	}
	return &RenewalInfo{Start: info.SuggestedWindow.Start.UTC(), End: info.SuggestedWindow.End.UTC(), RetryAfter: info.RetryAfter}, nil
}

// get GETs url and decodes its JSON into v; header, when set, gets the
// response's headers.
func (a *ARI) get(ctx context.Context, url string, v any, header *http.Header) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return err
	}
	req.Header.Set("User-Agent", a.userAgent)
	req.Header.Set("Accept", "application/json")
	resp, err := a.hc.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if err != nil {
		return err
	}
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("GET %s: %s: %s", url, resp.Status, strings.TrimSpace(string(body[:min(len(body), 200)])))
	}
	if header != nil {
		*header = resp.Header
	}
	if err := json.Unmarshal(body, v); err != nil {
		return fmt.Errorf("GET %s: %v", url, err)
	}
	return nil
}
