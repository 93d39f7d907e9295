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

	"github.com/lbcert/lbcert/internal/deploy"
	"github.com/lbcert/lbcert/internal/store"
	"github.com/lbcert/lbcert/internal/testenv"
)

// TestREADMESnippets: every nginx and HAProxy config snippet in the
// README passes the real "nginx -t" and "haproxy -c", without a single
// warning, so a snippet that breaks (or that HAProxy warns about) fails
// the build. Paths under /etc/lbcert, /etc/nginx, /var/www and
// /run/haproxy point at files the test makes. An nginx snippet whose
// first line is a comment naming a file under /etc/nginx is also written
// there; one that another snippet includes (a server body) is tested
// where it is included. The include file lbcert writes is shown as
// NginxSites renders it for the README's two lineages.
func TestREADMESnippets(t *testing.T) {
	_, readme := readREADME(t)
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
	etcNginx := filepath.Join(work, "etc-nginx")
	os.MkdirAll(filepath.Join(etcNginx, "conf.d"), 0o755)
	paths := strings.NewReplacer("/etc/lbcert", state, "/etc/nginx", etcNginx, "/var/www", filepath.Join(work, "www"), "/run/haproxy", work)

	block := regexp.MustCompile("(?s)```(nginx|haproxy)\n(.*?)```")
	nginxBin, err := testenv.NginxBin()
	if err != nil {
		t.Fatal(err)
	}
	haproxyBin, err := testenv.HAProxyBin()
	if err != nil {
		t.Fatal(err)
	}
	blocks := block.FindAllStringSubmatch(string(readme), -1)
	included := nginxFiles(t, blocks, paths)
	n, generated := 0, 0
	for i, m := range blocks {
		kind, text := m[1], paths.Replace(m[2])
		n++
		switch kind {
		case "nginx":
			if included[firstFile(text)] {
				continue
			}
			if strings.HasPrefix(m[2], "# Written by lbcert") {
				generated++
				sites := []deploy.Site{
					{Name: "example.com", Version: 1, Domains: []string{"example.com", "www.example.com"}},
					{Name: "203.0.113.10", Version: 1, Domains: []string{"203.0.113.10"}},
				}
				if want := string(deploy.NginxSites(store.New(state).LivePaths, filepath.Join(etcNginx, "lbcert-server.conf"), sites)); text != want {
					t.Errorf("README's include file is not what lbcert writes:\n%s\n--- lbcert writes\n%s", text, want)
				}
			}
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
	if n < 4 || generated != 1 {
		t.Fatalf("found only %d nginx/HAProxy snippets in the README, %d of them lbcert's include file", n, generated)
	}
}

// firstFile is the file an nginx snippet's first line names ("# /etc/nginx/x.conf: ..."), or "".
func firstFile(text string) string {
	line, _, _ := strings.Cut(text, "\n")
	f, ok := strings.CutPrefix(line, "# /")
	if !ok {
		return ""
	}
	f, _, _ = strings.Cut(f, ":")
	return "/" + strings.Fields(f)[0]
}

// nginxFiles writes each nginx snippet whose first line names a file to
// that file, and returns those some snippet includes.
func nginxFiles(t *testing.T, blocks [][]string, paths *strings.Replacer) map[string]bool {
	included := map[string]bool{}
	for _, m := range blocks {
		if m[1] != "nginx" {
			continue
		}
		text := paths.Replace(m[2])
		if f := firstFile(text); f != "" {
			os.MkdirAll(filepath.Dir(f), 0o755)
			if err := os.WriteFile(f, []byte(text), 0o644); err != nil {
				t.Fatal(err)
			}
		}
		for _, inc := range regexp.MustCompile(`(?m)^\s*include\s+(\S+);`).FindAllStringSubmatch(text, -1) {
			included[inc[1]] = true
		}
	}
	return included
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
