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
	"syscall"
	"testing"
	"time"

	"github.com/lbcert/lbcert/internal/store"
	"github.com/lbcert/lbcert/internal/testenv"
)

// signedFiles is a certificate for name with serial, and its key; with
// mismatch, the key is another one, which nginx refuses to load.
func signedFiles(t *testing.T, name string, serial int64, mismatch bool) store.Files {
	t.Helper()
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(serial), Subject: pkix.Name{CommonName: name}, DNSNames: []string{name},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour)}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	if mismatch {
		key, _ = ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	}
	kder, _ := x509.MarshalECPrivateKey(key)
	cert := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
	return store.Files{Cert: cert, Chain: nil, Fullchain: cert, Key: pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kder})}
}

// serialAt is the serial addr serves for name, or "".
func serialAt(addr, name string) string {
	conn, err := tls.DialWithDialer(&net.Dialer{Timeout: 2 * time.Second}, "tcp", addr, &tls.Config{ServerName: name, InsecureSkipVerify: true})
	if err != nil {
		return ""
	}
	defer conn.Close()
	return conn.ConnectionState().PeerCertificates[0].SerialNumber.Text(16)
}

// TestLargeIncludeBesideRealNginx runs the test-beside-reload deploy
// against a real nginx (master root, workers nobody): a good
// certificate is served once the test passes; a certificate whose key
// does not match fails "nginx -t" and, signalled beside it, nginx's own
// reload: the deploy rolls back, the file is put back, and the master,
// still the same process, goes on serving the good certificate and
// takes the next good one.
func TestLargeIncludeBesideRealNginx(t *testing.T) {
	defer func(n int) { besideFrom = n }(besideFrom)
	besideFrom = 1
	dir := t.TempDir()
	prefix := filepath.Join(dir, "nginx")
	os.MkdirAll(prefix, 0o755)
	st := store.New(filepath.Join(dir, "state"))
	tlsPort, err1 := testenv.FreePort()
	plainPort, err2 := testenv.FreePort()
	if err1 != nil || err2 != nil {
		t.Fatal(err1, err2)
	}
	tlsAddr, plain := fmt.Sprintf("127.0.0.1:%d", tlsPort), fmt.Sprintf("127.0.0.1:%d", plainPort)
	body, include := filepath.Join(prefix, "body.conf"), filepath.Join(prefix, "lbcert.conf")
	os.WriteFile(body, []byte("listen "+tlsAddr+" ssl;\nreturn 200;\n"), 0o644)
	os.WriteFile(include, nil, 0o644)
	conf := testenv.NginxConfigAs(prefix, "nobody nogroup", fmt.Sprintf("    server { listen %s; return 204; }\n    include %s;", plain, include))
	ng, err := testenv.StartNginx(prefix, conf, plain)
	if err != nil {
		t.Fatal(err)
	}
	defer ng.Stop()
	master := ng.MasterPID()
	// The config test is nginx's own, a second late, so that nginx's
	// reload, signalled beside it, has read the broken file before it is
	// put back: with one server block the master's load takes
	// milliseconds.
	slow := filepath.Join(dir, "nginx-slow-test")
	os.WriteFile(slow, []byte("#!/bin/sh\n[ \"$1\" = -t ] && sleep 1\nexec "+ng.Bin+" \"$@\"\n"), 0o755)
	d := store.Deploy{Target: "nginx", NginxBin: slow, NginxConf: ng.Conf, NginxInclude: include, NginxServerBody: body}
	r := &Runner{Store: st}
	deployVersion := func(serial int64, mismatch bool) Result {
		l := &store.Lineage{Name: "a.example", Domains: []string{"a.example"}, Cert: store.CertInfo{Serial: fmt.Sprintf("%x", serial)}}
		_, prev, err := st.Save(l, signedFiles(t, "a.example", serial, mismatch))
		if err != nil {
			t.Fatal(err)
		}
		return r.Run(context.Background(), []Change{{Name: "a.example", Domains: l.Domains, Previous: prev, Deploy: d}})[0]
	}
	waitServed := func(want string) {
		t.Helper()
		got := ""
		for i := 0; i < 300; i++ {
			if got = serialAt(tlsAddr, "a.example"); got == want {
				return
			}
			time.Sleep(50 * time.Millisecond)
		}
		t.Fatalf("nginx serves serial %q for a.example, want %q", got, want)
	}

	if res := deployVersion(0x10, false); res.Failed() || !res.Deployed {
		t.Fatalf("%+v", res)
	}
	waitServed("10")
	good, _ := os.ReadFile(include)

	res := deployVersion(0x11, true)
	if !res.RolledBack || !strings.Contains(res.Err.Error(), "nginx -t") {
		t.Fatalf("a key that does not match: %+v", res)
	}
	if now, _ := os.ReadFile(include); string(now) != string(good) {
		t.Fatalf("include file not put back:\n%s", now)
	}
	// nginx's error log shows each SIGHUP: the first deploy's, the one
	// beside the failed test (whose reload nginx refused, with the
	// test's error), and the one after the files were put back.
	reloads := func() (int, string) {
		log := readFile(filepath.Join(prefix, "error.log"))
		return strings.Count(log, "(SIGHUP) received"), log
	}
	for i := 0; i < 300; i++ {
		if n, log := reloads(); n >= 3 && strings.Contains(log, "[emerg]") {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	if n, log := reloads(); n != 3 || !strings.Contains(log, "[emerg]") || !strings.Contains(log, "key values mismatch") {
		t.Fatalf("nginx reconfigured %d times, want 3 (the first deploy, beside the failed test, after the rollback), one refused for the key:\n%s", n, log)
	}
	waitServed("10")
	if ng.MasterPID() != master || syscall.Kill(atoi(t, master), 0) != nil {
		t.Fatalf("nginx's master %s is gone (now %q)", master, ng.MasterPID())
	}

	if res := deployVersion(0x12, false); res.Failed() || !res.Deployed {
		t.Fatalf("%+v", res)
	}
	waitServed("12")
}

func readFile(path string) string {
	data, _ := os.ReadFile(path)
	return string(data)
}

func atoi(t *testing.T, s string) int {
	var n int
	if _, err := fmt.Sscan(s, &n); err != nil {
		t.Fatal(err)
	}
	return n
}
