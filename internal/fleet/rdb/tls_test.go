package rdb

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/lbcert/lbcert/internal/testenv"
)

// writeCA makes a private CA and a server certificate for 127.0.0.1.
func writeCA(t *testing.T, dir string) *testenv.RedisTLS {
	t.Helper()
	caKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	ca := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "test redis CA"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour), IsCA: true,
		KeyUsage: x509.KeyUsageCertSign, BasicConstraintsValid: true}
	caDER, err := x509.CreateCertificate(rand.Reader, ca, ca, &caKey.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	caCert, _ := x509.ParseCertificate(caDER)
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	leaf := &x509.Certificate{SerialNumber: big.NewInt(2), Subject: pkix.Name{CommonName: "127.0.0.1"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IPAddresses: []net.IP{net.ParseIP("127.0.0.1")}, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}
	der, err := x509.CreateCertificate(rand.Reader, leaf, caCert, &key.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	kder, _ := x509.MarshalPKCS8PrivateKey(key)
	w := func(name, typ string, b []byte) string {
		p := filepath.Join(dir, name)
		os.WriteFile(p, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: b}), 0o600)
		return p
	}
	return &testenv.RedisTLS{CA: w("ca.pem", "CERTIFICATE", caDER), Cert: w("cert.pem", "CERTIFICATE", der), Key: w("key.pem", "PRIVATE KEY", kder)}
}

// rediss:// verifies the server's certificate: with --redis-ca for the
// private CA it connects; without it, it refuses.
func TestTLSVerifiesTheServer(t *testing.T) {
	dir := t.TempDir()
	tl := writeCA(t, dir)
	r, err := testenv.StartRedisTLS(filepath.Join(dir, "data"), "tls-pw", tl)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(r.Stop)
	url := "rediss://" + r.Addr() + "/0"
	s, err := Dial(context.Background(), Options{URL: url, Password: "tls-pw", CAFile: tl.CA})
	if err != nil {
		t.Fatalf("rediss with the private CA: %v", err)
	}
	if err := s.Ping(context.Background()); err != nil {
		t.Fatal(err)
	}
	s.Close()
	_, err = Dial(context.Background(), Options{URL: url, Password: "tls-pw"})
	if err == nil || !strings.Contains(err.Error(), "certificate") {
		t.Fatalf("rediss without the CA: %v, want a certificate error", err)
	}
	if _, err := Dial(context.Background(), Options{URL: "redis://" + r.Addr() + "/0", CAFile: tl.CA}); err == nil || !strings.Contains(err.Error(), "rediss://") {
		t.Errorf("--redis-ca with redis://: %v", err)
	}
}
