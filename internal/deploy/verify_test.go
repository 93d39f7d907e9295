package deploy

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/lbcert/lbcert/internal/store"
)

// serveTLS accepts TLS on loopback until the test ends, completing each
// handshake and closing, and returns the address.
func serveTLS(t *testing.T, conf *tls.Config) string {
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
	return ln.Addr().(*net.TCPAddr).String()
}

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
	return serveTLS(t, conf), &max
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
	// Counted where the checks are made: the server's own count also
	// holds handshakes whose client gave up at the step's deadline.
	var now, atOnce atomic.Int32
	orig := dialTLS
	t.Cleanup(func() { dialTLS = orig })
	dialTLS = func(ctx context.Context, addr string, conf *tls.Config) (net.Conn, error) {
		n := now.Add(1)
		for m := atOnce.Load(); n > m && !atOnce.CompareAndSwap(m, n); m = atOnce.Load() {
		}
		defer now.Add(-1)
		return orig(ctx, addr, conf)
	}
	r := &Runner{Opts: Options{VerifyTimeout: 3 * time.Second, VerifyConcurrency: 8}}
	r.verifyAll(context.Background(), changes, results)
	for _, res := range results {
		if res.Verify != "failed" || !strings.Contains(res.Err.Error(), "served serial abc, want the new def") {
			t.Fatalf("%s: verify %q err %v", res.Name, res.Verify, res.Err)
		}
	}
	if m := atOnce.Load(); m < 2 || m > 8 || max.Load() < 2 {
		t.Fatalf("%d TLS checks at once, want several and at most --verify-concurrency 8", m)
	}
}

func deployTo(target, verifyAddr string) store.Deploy {
	return store.Deploy{Target: target, VerifyAddr: verifyAddr}
}

// Hooks run one after another by default, as certbot runs them, and
// HookConcurrency at a time when asked.
func TestHookConcurrency(t *testing.T) {
	for _, n := range []int{0, 3} {
		dir := t.TempDir()
		log := filepath.Join(dir, "log")
		hook := fmt.Sprintf("echo start >> %s; sleep 0.3; echo end >> %s", log, log)
		changes := make([]Change, 3)
		results := make([]Result, 3)
		for i := range changes {
			changes[i] = Change{Name: fmt.Sprintf("h%d.test", i), Deploy: store.Deploy{Hook: hook, HookTimeout: 10}}
			results[i] = Result{Name: changes[i].Name, Deployed: true}
		}
		s := store.New(filepath.Join(dir, "state"))
		(&Runner{Store: s, Opts: Options{HookConcurrency: n}}).hooks(context.Background(), changes, results)
		data, _ := os.ReadFile(log)
		got := strings.Join(strings.Fields(string(data)), " ")
		want := "start end start end start end"
		if n == 3 {
			want = "start start start end end end"
		}
		if got != want {
			t.Errorf("HookConcurrency %d: hooks ran %q, want %q", n, got, want)
		}
		for _, r := range results {
			if r.Hook != "ok" {
				t.Errorf("%s: hook %q err %v", r.Name, r.Hook, r.Err)
			}
		}
	}
}

// A hook is judged by its own exit: children it leaves behind holding
// its output do not make it "timed out"; its output is bounded; and it
// never sees lbcert's secrets, though it sees everything else.
func TestHookHygiene(t *testing.T) {
	t.Setenv("LBCERT_SMTP_PASSWORD", "smtp-secret-value")
	t.Setenv("LBCERT_EAB_HMAC_KEY", "eab-secret-value")
	t.Setenv("SOME_OPERATOR_VAR", "kept")
	out, err := run(context.Background(), 5*time.Second, nil, "sleep 30 & echo started")
	if err != nil || out != "started" {
		t.Fatalf("a hook that leaves a child: %q, %v", out, err)
	}
	out, err = run(context.Background(), 5*time.Second, nil, "setsid sleep 40 & exit 0")
	if err != nil {
		t.Fatalf("setsid child: %v", err)
	}
	out, _ = run(context.Background(), 30*time.Second, nil, "head -c 100000000 /dev/zero | tr '\\\\0' x; echo END")
	if len(out) > maxOutput+3 || !strings.HasSuffix(out, "END") {
		t.Fatalf("100 MB of output kept %d bytes (ends %q)", len(out), out[max(0, len(out)-5):])
	}
	out, err = run(context.Background(), 5*time.Second, nil, "env")
	if err != nil || strings.Contains(out, "secret-value") || !strings.Contains(out, "SOME_OPERATOR_VAR=kept") {
		t.Fatalf("hook environment: %v\n%s", err, out)
	}
	// A hook that itself runs too long is still killed.
	if _, err := run(context.Background(), time.Second, nil, "sleep 20"); err == nil || !strings.Contains(err.Error(), "timed out") {
		t.Fatalf("slow hook: %v", err)
	}
}

// testCA is a root or intermediate that signs.
type testCA struct {
	cert *x509.Certificate
	key  *ecdsa.PrivateKey
	der  []byte
}

func newCA(t *testing.T, name string, parent *testCA) *testCA {
	t.Helper()
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(time.Now().UnixNano()), Subject: pkix.Name{CommonName: name},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour), IsCA: true, BasicConstraintsValid: true,
		KeyUsage: x509.KeyUsageCertSign}
	signer, signKey := tmpl, key
	if parent != nil {
		signer, signKey = parent.cert, parent.key
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, signer, &key.PublicKey, signKey)
	if err != nil {
		t.Fatal(err)
	}
	c, _ := x509.ParseCertificate(der)
	return &testCA{cert: c, key: key, der: der}
}

// serveChain serves a leaf for name issued by inter, with inter in the
// chain, and returns the address and the leaf's serial.
func serveChain(t *testing.T, name string, inter *testCA) (string, string) {
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(time.Now().UnixNano()), DNSNames: []string{name},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour), ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, inter.cert, &key.PublicKey, inter.key)
	if err != nil {
		t.Fatal(err)
	}
	addr := serveTLS(t, &tls.Config{Certificates: []tls.Certificate{{Certificate: [][]byte{der, inter.der}, PrivateKey: key}}})
	return addr, fmt.Sprintf("%x", tmpl.SerialNumber)
}

// With --verify-roots the check verifies the served chain to the roots,
// whichever intermediate the CA picked (none is pinned), and fails a
// chain to another root.
func TestVerifyChainToRoots(t *testing.T) {
	root, other := newCA(t, "Root X", nil), newCA(t, "Root Y", nil)
	dir := t.TempDir()
	rootsFile := filepath.Join(dir, "roots.pem")
	os.WriteFile(rootsFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: root.der}), 0o644)
	r := &Runner{Opts: Options{VerifyTimeout: 2 * time.Second}}
	for _, tc := range []struct {
		inter *testCA
		ok    bool
	}{
		{newCA(t, "Intermediate E5", root), true},
		{newCA(t, "Intermediate E6", root), true}, // another intermediate, same root: fine
		{newCA(t, "Intermediate Z", other), false},
	} {
		addr, serial := serveChain(t, "lb.example.com", tc.inter)
		c := Change{Name: "lb.example.com", Domains: []string{"lb.example.com"}, Serial: serial,
			Deploy: store.Deploy{Target: "nginx", VerifyAddr: addr, VerifyRoots: rootsFile}}
		res := Result{Name: c.Name, Deployed: true}
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second) // the step's deadline, as verifyAll sets it
		r.verify(ctx, c, &res)
		cancel()
		if ok := res.Verify == "ok"; ok != tc.ok {
			t.Fatalf("chain via %s: verify %q (%v), want ok=%v", tc.inter.cert.Subject.CommonName, res.Verify, res.Err, tc.ok)
		}
		if !tc.ok && !strings.Contains(res.Err.Error(), "served chain does not verify to --verify-roots") {
			t.Fatalf("error %v", res.Err)
		}
	}
}

// A certificate from a fallback CA is checked against that CA's roots
// (Change.Roots), not --verify-roots, which are the primary's; the
// system's roots when the fallback names none, which a private root is
// not among.
func TestVerifyChainToTheIssuingCAsRoots(t *testing.T) {
	primary, fallback := newCA(t, "Primary Root", nil), newCA(t, "Fallback Root", nil)
	dir := t.TempDir()
	write := func(name string, ca *testCA) string {
		p := filepath.Join(dir, name)
		os.WriteFile(p, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: ca.der}), 0o644)
		return p
	}
	primaryRoots, fallbackRoots := write("primary.pem", primary), write("fallback.pem", fallback)
	addr, serial := serveChain(t, "lb.example.com", newCA(t, "Fallback Intermediate", fallback))
	r := &Runner{Opts: Options{VerifyTimeout: 2 * time.Second}}
	for _, tc := range []struct {
		roots string
		ok    bool
		err   string
	}{
		{"", false, "--verify-roots " + primaryRoots},
		{fallbackRoots, true, ""},
		{SystemRoots, false, "the system's roots"},
	} {
		c := Change{Name: "lb.example.com", Domains: []string{"lb.example.com"}, Serial: serial, Roots: tc.roots,
			Deploy: store.Deploy{Target: "nginx", VerifyAddr: addr, VerifyRoots: primaryRoots}}
		res := Result{Name: c.Name, Deployed: true}
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		r.verify(ctx, c, &res)
		cancel()
		if ok := res.Verify == "ok"; ok != tc.ok || !tc.ok && !strings.Contains(res.Err.Error(), tc.err) {
			t.Fatalf("roots %q: verify %q (%v), want ok=%v", tc.roots, res.Verify, res.Err, tc.ok)
		}
	}
	// Without --verify-roots the chain is not checked at all, whatever
	// the issuing CA's roots.
	c := Change{Name: "lb.example.com", Domains: []string{"lb.example.com"}, Serial: serial, Roots: primaryRoots,
		Deploy: store.Deploy{Target: "nginx", VerifyAddr: addr}}
	res := Result{Name: c.Name, Deployed: true}
	r.verify(context.Background(), c, &res)
	if res.Verify != "ok" {
		t.Fatalf("no --verify-roots: %q %v", res.Verify, res.Err)
	}
}
