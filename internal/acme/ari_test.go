package acme

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// ARI needs no account: a directory read and one GET per certificate,
// with the window and the CA's Retry-After as it sent them.
func TestARIWithoutAccount(t *testing.T) {
	var asked []string
	withARI, withWindow := true, true
	var srv *httptest.Server
	srv = httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		asked = append(asked, r.Method+" "+r.URL.Path)
		if r.Method != http.MethodGet || r.Header.Get("User-Agent") != "lbcert/test" {
			http.Error(w, "want a plain GET", http.StatusBadRequest)
			return
		}
		switch {
		case r.URL.Path == "/dir" && withARI:
			fmt.Fprintf(w, `{"newOrder": %q, "renewalInfo": %q}`, srv.URL+"/new-order", srv.URL+"/ari/")
		case r.URL.Path == "/dir":
			fmt.Fprintf(w, `{"newOrder": %q}`, srv.URL+"/new-order")
		case strings.HasPrefix(r.URL.Path, "/ari/") && !withWindow:
			fmt.Fprint(w, `{"explanationURL": "https://ca.test/why"}`)
		case strings.HasPrefix(r.URL.Path, "/ari/"):
			w.Header().Set("Retry-After", "21600")
			fmt.Fprint(w, `{"suggestedWindow": {"start": "2027-01-10T00:00:00Z", "end": "2027-01-12T00:00:00Z"}}`)
		default:
			http.NotFound(w, r)
		}
	}))
	defer srv.Close()
	bundle := filepath.Join(t.TempDir(), "ca.pem")
	os.WriteFile(bundle, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: srv.Certificate().Raw}), 0o644)
	leaf, err := CertID(leafPEM(t))
	if err != nil {
		t.Fatal(err)
	}

	a, err := NewARI(context.Background(), srv.URL+"/dir", bundle, "lbcert/test")
	if err != nil {
		t.Fatal(err)
	}
	info, err := a.RenewalInfo(context.Background(), leaf)
	if err != nil {
		t.Fatal(err)
	}
	if !info.Start.Equal(time.Date(2027, 1, 10, 0, 0, 0, 0, time.UTC)) || !info.End.Equal(time.Date(2027, 1, 12, 0, 0, 0, 0, time.UTC)) || info.RetryAfter != 6*time.Hour {
		t.Fatalf("info %+v", info)
	}
	if len(asked) != 2 || asked[0] != "GET /dir" || !strings.HasPrefix(asked[1], "GET /ari/") {
		t.Fatalf("requests %v, want the directory and one renewalInfo GET", asked)
	}

	// A 200 without the window RFC 9773 requires is an error, not a
	// window in year 1 that makes the certificate due at once.
	withWindow = false
	if _, err := a.RenewalInfo(context.Background(), leaf); err == nil || !strings.Contains(err.Error(), "no suggestedWindow") {
		t.Fatalf("an answer without a window: %v", err)
	}

	withARI = false
	a, err = NewARI(context.Background(), srv.URL+"/dir", bundle, "lbcert/test")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := a.RenewalInfo(context.Background(), leaf); !errors.Is(err, ErrNoARI) {
		t.Fatalf("a CA without renewalInfo: %v, want ErrNoARI", err)
	}
	if _, err := NewARI(context.Background(), srv.URL+"/missing", bundle, "lbcert/test"); err == nil || !strings.Contains(err.Error(), "404") {
		t.Fatalf("a missing directory: %v", err)
	}
}

func leafPEM(t *testing.T) []byte {
	t.Helper()
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(0x1234), Subject: pkix.Name{CommonName: "a.test"}, DNSNames: []string{"a.test"},
		NotBefore: time.Now(), NotAfter: time.Now().Add(90 * 24 * time.Hour), AuthorityKeyId: []byte{1, 2, 3, 4}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
}
