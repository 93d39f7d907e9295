package acme

import (
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
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

// RenewalInfo asks the CA when to renew the certificate in certPEM.
func (c *Client) RenewalInfo(certPEM []byte) (*RenewalInfo, error) {
	b, _ := pem.Decode(certPEM)
	if b == nil {
		return nil, errors.New("cert.pem is not PEM")
	}
	leaf, err := x509.ParseCertificate(b.Bytes)
	if err != nil {
		return nil, err
	}
	info, err := c.lego.Certificate.GetRenewalInfo(certificate.RenewalInfoRequest{Cert: leaf})
	if errors.Is(err, api.ErrNoARI) {
		return nil, ErrNoARI
	}
	if err != nil {
		return nil, explain("renewal info", err)
	}
	if info.SuggestedWindow.End.Before(info.SuggestedWindow.Start) {
		return nil, fmt.Errorf("renewal info: window ends before it starts")
	}
	return &RenewalInfo{Start: info.SuggestedWindow.Start.UTC(), End: info.SuggestedWindow.End.UTC(), RetryAfter: info.RetryAfter}, nil
}
