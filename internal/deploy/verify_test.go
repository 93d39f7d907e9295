package deploy

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"fmt"
	"math/big"
	"net"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/lbcert/lbcert/internal/store"
)

// A TLS server that serves one fixed certificate and counts the TLS
// handshakes in progress at once.
func wrongCertServer(t *testing.T) (addr string, maxAtOnce *atomic.Int32) {
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(0xabc), Subject: pkix.Name{CommonName: "old"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour)}
	der, _ := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	var now, max atomic.Int32
	conf := &tls.Config{Certificates: []tls.Certificate{{Certificate: [][]byte{der}, PrivateKey: key}},
		GetConfigForClient: func(*tls.ClientHelloInfo) (*tls.Config, error) {
			n := now.Add(1)
			for m := max.Load(); n > m && !max.CompareAndSwap(m, n); m = max.Load() {
			}
			time.Sleep(100 * time.Millisecond) // hold the handshake open, so overlap shows
			now.Add(-1)
			return nil, nil
		}}
	ln, err := tls.Listen("tcp", "127.0.0.1:0", conf)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() { c.(*tls.Conn).Handshake(); c.Close() }()
		}
	}()
	return ln.Addr().(*net.TCPAddr).String(), &max
}

// The verify step checks many certificates at once under one deadline
// for the whole step, and reports each mismatch by serial.
func TestVerifyRunsInParallel(t *testing.T) {
	addr, max := wrongCertServer(t)
	var changes []Change
	results := make([]Result, 40)
	for i := range results {
		changes = append(changes, Change{Name: fmt.Sprintf("v%d.test", i), Domains: []string{fmt.Sprintf("v%d.test", i)},
			Serial: "def", Deploy: deployTo("nginx", addr)})
		results[i] = Result{Name: changes[i].Name, Deployed: true}
	}
	r := &Runner{Opts: Options{VerifyTimeout: 3 * time.Second, VerifyConcurrency: 8}}
	r.verifyAll(context.Background(), changes, results)
	for _, res := range results {
		if res.Verify != "failed" || !strings.Contains(res.Err.Error(), "served serial abc, want the new def") {
			t.Fatalf("%s: verify %q err %v", res.Name, res.Verify, res.Err)
		}
	}
	if m := max.Load(); m < 2 || m > 8 {
		t.Fatalf("%d TLS checks at once, want several and at most --verify-concurrency 8", m)
	}
}

func deployTo(target, verifyAddr string) store.Deploy {
	return store.Deploy{Target: target, VerifyAddr: verifyAddr}
}
