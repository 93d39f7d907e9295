package acme

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"math/big"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/go-acme/lego/v4/acme/api"
)

// testCA is a root and a key that signs leaf certificates for servers.
type testCA struct {
	cert *x509.Certificate
	key  *ecdsa.PrivateKey
}

func newTestCA(t *testing.T, name string) testCA {
	t.Helper()
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: name},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	c, _ := x509.ParseCertificate(der)
	return testCA{c, key}
}

// server starts a TLS server whose certificate, signed by ca, names ip
// (nil: only the DNS name other.test), counting requests and keeping
// the last body.
func (ca testCA) server(t *testing.T, ip net.IP, hits *atomic.Int32, body *atomic.Value) *httptest.Server {
	t.Helper()
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(2), Subject: pkix.Name{CommonName: "leaf"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}, DNSNames: []string{"other.test"}}
	if ip != nil {
		tmpl.IPAddresses = []net.IP{ip}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, &key.PublicKey, ca.key)
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		hits.Add(1)
		b, _ := io.ReadAll(r.Body)
		body.Store(string(b))
	}))
	srv.TLS = &tls.Config{Certificates: []tls.Certificate{{Certificate: [][]byte{der}, PrivateKey: key}}}
	srv.StartTLS()
	t.Cleanup(srv.Close)
	return srv
}

func writeBundle(t *testing.T, cas ...testCA) string {
	t.Helper()
	var b []byte
	for _, ca := range cas {
		b = append(b, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: ca.cert.Raw})...)
	}
	p := filepath.Join(t.TempDir(), "bundle.pem")
	if err := os.WriteFile(p, b, 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

// A run given --ca-bundle trusts the bundle and the system's roots, as
// one pool of both would, but reads the system's only when a server is
// not trusted by the bundle; a request refused by the bundle's
// connections reaches the server once, body and all.
func TestBundleFirstThenSystemRoots(t *testing.T) {
	private, public, unknown := newTestCA(t, "private CA"), newTestCA(t, "public CA"), newTestCA(t, "nobody's CA")
	loopback := net.ParseIP("127.0.0.1")
	var loads atomic.Int32
	saved := systemRoots
	t.Cleanup(func() { systemRoots = saved })
	systemRoots = func() *x509.CertPool {
		loads.Add(1)
		p := x509.NewCertPool()
		p.AddCert(public.cert)
		return p
	}
	var hitsA, hitsB, hitsC, hitsD atomic.Int32
	var body atomic.Value
	srvA := private.server(t, loopback, &hitsA, &body)
	srvB := public.server(t, loopback, &hitsB, &body)
	srvC := unknown.server(t, loopback, &hitsC, &body)
	srvD := private.server(t, nil, &hitsD, &body) // its certificate does not name 127.0.0.1

	hc, err := HTTPClient(context.Background(), writeBundle(t, private))
	if err != nil {
		t.Fatal(err)
	}
	if resp, err := hc.Get(srvA.URL); err != nil {
		t.Fatalf("a server the bundle trusts: %v", err)
	} else {
		resp.Body.Close()
	}
	if loads.Load() != 0 {
		t.Fatalf("the system roots were read %d times for a server the bundle trusts, want 0", loads.Load())
	}
	// A certificate the bundle trusts that does not name the server is
	// refused without looking further.
	if _, err := hc.Get(srvD.URL); err == nil || !errors.As(err, &x509.HostnameError{}) {
		t.Fatalf("a certificate for another name: %v, want a hostname error", err)
	}
	if loads.Load() != 0 || hitsD.Load() != 0 {
		t.Fatalf("a hostname mismatch read the system roots %d times and reached the server %d times, want 0 and 0", loads.Load(), hitsD.Load())
	}

	resp, err := hc.Post(srvB.URL, "application/jose+json", strings.NewReader("the signed request"))
	if err != nil {
		t.Fatalf("a server the system roots trust: %v", err)
	}
	resp.Body.Close()
	if hitsB.Load() != 1 || body.Load() != "the signed request" || loads.Load() != 1 {
		t.Fatalf("the public CA's server got %d requests (last body %q), system roots read %d times; want 1, the body, 1",
			hitsB.Load(), body.Load(), loads.Load())
	}
	// From then on both are trusted, and the roots are not read again.
	for _, u := range []string{srvA.URL, srvB.URL} {
		resp, err := hc.Get(u)
		if err != nil {
			t.Fatalf("after the fallback, %s: %v", u, err)
		}
		resp.Body.Close()
	}
	if loads.Load() != 1 {
		t.Fatalf("system roots read %d times, want 1", loads.Load())
	}

	hc2, err := HTTPClient(context.Background(), writeBundle(t, private))
	if err != nil {
		t.Fatal(err)
	}
	_, err = hc2.Post(srvC.URL, "application/jose+json", strings.NewReader("x"))
	if err == nil || !strings.Contains(err.Error(), "certificate signed by unknown authority") || hitsC.Load() != 0 {
		t.Fatalf("a server neither trusts: %v (%d requests reached it), want unknown authority and none", err, hitsC.Load())
	}
}

// A CA bundle given as a pipe (the shell's <(...)) is read; a FIFO no
// one writes to, a directory or a socket is refused at once: a FIFO used
// to block the read, and the run, past every signal.
func TestCABundleFromAPipeOrRefused(t *testing.T) {
	pem, err := os.ReadFile(writeBundle(t, newTestCA(t, "pipe")))
	if err != nil {
		t.Fatal(err)
	}
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	go func() { w.Write(pem); w.Close() }()
	if _, err := HTTPClient(context.Background(), fmt.Sprintf("/proc/self/fd/%d", r.Fd())); err != nil {
		t.Fatalf("a bundle from a pipe: %v", err)
	}

	dir := t.TempDir()
	fifo := filepath.Join(dir, "bundle.pem")
	if err := syscall.Mkfifo(fifo, 0o600); err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(dir, "sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	for p, want := range map[string]string{
		fifo: "a pipe with nothing written to it",
		dir:  "a directory, not a file",
		sock: "not a regular file or a pipe: give a PEM file of the CA's root certificates",
	} {
		done := make(chan error, 1)
		go func() { _, err := HTTPClient(context.Background(), p); done <- err }()
		select {
		case err := <-done:
			if err == nil || !strings.Contains(err.Error(), "--ca-bundle "+p+": "+want) {
				t.Errorf("%s: %v", p, err)
			}
		case <-time.After(5 * time.Second):
			t.Fatalf("%s: still reading after 5 s", p)
		}
	}
}

// A CA whose TLS certificate is not trusted answered nothing: its error
// ("tls: failed to verify certificate", as lego reports reading the
// directory) is not a failed validation, which would spend the name's
// failed-validation budget and keep a fallback CA from the order; it is
// the CA's fault.
func TestUntrustedCAIsNotAFailedValidation(t *testing.T) {
	var hits atomic.Int32
	srv := newTestCA(t, "untrusted").server(t, net.ParseIP("127.0.0.1"), &hits, nil)
	hc, err := HTTPClient(context.Background(), writeBundle(t, newTestCA(t, "other")))
	if err != nil {
		t.Fatal(err)
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	_, err = api.New(hc, "lbcert-test", srv.URL+"/dir", "", key)
	if err == nil || !strings.Contains(err.Error(), "tls: failed to verify certificate") {
		t.Fatalf("reading the directory: %v", err)
	}
	if FailedValidation(err) {
		t.Errorf("counted as a failed validation: %v", err)
	}
	if why, ok := CAFault(err); !ok || !strings.HasPrefix(why, "showed a certificate this host does not trust") {
		t.Errorf("CAFault %q %v: want the CA's fault", why, ok)
	}
}
