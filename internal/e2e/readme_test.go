package e2e

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/lbcert/lbcert/internal/testenv"
)

// TestREADMESnippets: every nginx and HAProxy config snippet in the
// README passes the real "nginx -t" and "haproxy -c", without a single
// warning, so a snippet that breaks (or that HAProxy warns about) fails
// the build. Paths under /etc/lbcert, /var/www and /run/haproxy point at
// files the test makes.
func TestREADMESnippets(t *testing.T) {
	root, err := testenv.ModuleRoot()
	if err != nil {
		t.Fatal(err)
	}
	readme, err := os.ReadFile(filepath.Join(root, "README.md"))
	if err != nil {
		t.Fatal(err)
	}
	work := t.TempDir()
	state := filepath.Join(work, "etc-lbcert")
	os.MkdirAll(filepath.Join(state, "haproxy"), 0o700)
	for _, name := range []string{"example.com", "203.0.113.10"} { // the README's name and address lineages
		live := filepath.Join(state, "live", name)
		os.MkdirAll(live, 0o700)
		certPEM, keyPEM := selfSigned(t, "example.com")
		os.WriteFile(filepath.Join(live, "fullchain.pem"), certPEM, 0o644)
		os.WriteFile(filepath.Join(live, "privkey.pem"), keyPEM, 0o600)
		os.WriteFile(filepath.Join(state, "haproxy", name+".pem"), append(append([]byte{}, certPEM...), keyPEM...), 0o600)
	}
	os.MkdirAll(filepath.Join(work, "www", "acme"), 0o755)
	paths := strings.NewReplacer("/etc/lbcert", state, "/var/www", filepath.Join(work, "www"), "/run/haproxy", work)

	block := regexp.MustCompile("(?s)```(nginx|haproxy)\n(.*?)```")
	nginxBin, err := testenv.NginxBin()
	if err != nil {
		t.Fatal(err)
	}
	haproxyBin, err := testenv.HAProxyBin()
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for i, m := range block.FindAllStringSubmatch(string(readme), -1) {
		kind, text := m[1], paths.Replace(m[2])
		n++
		switch kind {
		case "nginx":
			if !strings.Contains(text, "server {") { // bare directives go inside a TLS server
				text = "server {\n    listen 127.0.0.1:8443 ssl;\n" + text + "}\n"
			}
			prefix := filepath.Join(work, "nginx", string(rune('a'+i)))
			os.MkdirAll(prefix, 0o755)
			conf := filepath.Join(prefix, "nginx.conf")
			os.WriteFile(conf, []byte(testenv.NginxConfig(prefix, text)), 0o644)
			out, err := exec.Command(nginxBin, "-t", "-q", "-c", conf).CombinedOutput()
			if err != nil || strings.Contains(string(out), "[warn]") {
				t.Errorf("README nginx snippet %d fails nginx -t: %v\n%s\n--- snippet\n%s", n, err, out, m[2])
			}
		case "haproxy":
			if !strings.Contains(text, "defaults") {
				text = "defaults\n    mode http\n    timeout connect 5s\n    timeout client 30s\n    timeout server 30s\n\n" + text
			}
			conf := filepath.Join(work, "haproxy-"+string(rune('a'+i))+".cfg")
			os.WriteFile(conf, []byte(text), 0o644)
			out, err := exec.Command(haproxyBin, "-c", "-f", conf).CombinedOutput()
			if err != nil || strings.Contains(string(out), "[WARNING]") {
				t.Errorf("README HAProxy snippet %d fails haproxy -c or warns: %v\n%s\n--- snippet\n%s", n, err, out, m[2])
			}
		}
	}
	if n < 4 {
		t.Fatalf("found only %d nginx/HAProxy snippets in the README", n)
	}
}

func selfSigned(t *testing.T, name string) (certPEM, keyPEM []byte) {
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: name}, DNSNames: []string{name},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour)}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	kd, _ := x509.MarshalECPrivateKey(key)
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kd})
}
