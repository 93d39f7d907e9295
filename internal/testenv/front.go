package testenv

import (
	"crypto/tls"
	"crypto/x509"
	"os"
	"path/filepath"
)

// FrontTLS is what a proxy in front of p needs: the TLS certificate to
// serve (Pebble's own, which p.CABundle verifies, so a client of the
// front needs no other bundle) and the roots to verify Pebble with.
func FrontTLS(p *Pebble) (tls.Certificate, *x509.CertPool, error) {
	root, err := ModuleRoot()
	if err != nil {
		return tls.Certificate{}, nil, err
	}
	certs := filepath.Join(root, "testdata", "pebble")
	cert, err := tls.LoadX509KeyPair(filepath.Join(certs, "cert.pem"), filepath.Join(certs, "key.pem"))
	if err != nil {
		return tls.Certificate{}, nil, err
	}
	caPEM, err := os.ReadFile(p.CABundle)
	if err != nil {
		return tls.Certificate{}, nil, err
	}
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(caPEM)
	return cert, pool, nil
}
