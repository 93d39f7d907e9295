package testenv

import (
	"bufio"
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"io"
	"math/big"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"
)

// StepCA is a running smallstep step-ca, a second real ACME server beside
// Pebble, as an operator runs it for a private PKI: a root and an
// intermediate of its own, its defaults (24-hour certificates, no ARI, no
// profiles), a CRL, and two ACME provisioners, "acme" and "acme-eab"
// (which requires external account binding).
type StepCA struct {
	// DirectoryURL is the "acme" provisioner's directory, for --server.
	DirectoryURL string
	// EABDirectoryURL is the "acme-eab" provisioner's directory.
	EABDirectoryURL string
	// CABundle is the root (PEM) of step-ca's TLS certificate and of
	// every certificate it issues, for --ca-bundle.
	CABundle string
	// URL is step-ca's HTTPS address (https://127.0.0.1:port).
	URL string
	// HTTPPort is where step-ca sends HTTP-01 validation requests.
	HTTPPort int
	// DNSAddr is the DNS server step-ca resolves names through; every
	// name is 127.0.0.1 unless SetA says otherwise.
	DNSAddr string
	// EAB are the keys of the acme-eab provisioner, made before start.
	EAB []EABKey

	dns *challDNS
	ca  *proc
}

// EABKey is one external account binding key: the key ID and the HMAC
// key, base64url as a CA's account page shows it.
type EABKey struct {
	Reference, KID, HMAC string
}

// StepCAOptions tune a step-ca instance.
type StepCAOptions struct {
	Dir      string // working directory for the PKI, config, database and logs
	HTTPPort int    // 0 picks a free port
	// EABKeys is how many keys to make for the acme-eab provisioner.
	EABKeys int
	// CertLifetime, when set, replaces step-ca's 24-hour default (and
	// its one-minute backdating), so that a test sees the lifetime rule
	// come due within a minute.
	CertLifetime time.Duration
}

// The ACME provisioners' names, as they appear in their directory URLs.
const (
	StepCAProvisioner    = "acme"
	StepCAEABProvisioner = "acme-eab"
)

// StartStepCA writes step-ca's PKI, ca.json and database (with the EAB
// keys), and
// starts step-ca with pebble-challtestsrv as its DNS server.
//
// step-ca validates HTTP-01 on port 80 unless it runs with --insecure
// --acme-http-port; --resolver makes its validation look names up in
// the tests' DNS server instead of the system's (it replaces Go's
// default resolver, which its validation client dials through), so no
// /etc/hosts entry is needed.
func StartStepCA(o StepCAOptions) (*StepCA, error) {
	bins, err := BuildStepCA()
	if err != nil {
		return nil, err
	}
	port, err := FreePort()
	if err != nil {
		return nil, err
	}
	if o.HTTPPort == 0 {
		if o.HTTPPort, err = FreePort(); err != nil {
			return nil, err
		}
	}
	dir := filepath.Join(o.Dir, "step-ca")
	if err := writeStepCAConfig(dir, port, o.CertLifetime); err != nil {
		return nil, err
	}
	s := &StepCA{
		URL:      fmt.Sprintf("https://127.0.0.1:%d", port),
		CABundle: filepath.Join(dir, "certs", "root_ca.crt"),
		HTTPPort: o.HTTPPort,
	}
	s.DirectoryURL = s.URL + "/acme/" + StepCAProvisioner + "/directory"
	s.EABDirectoryURL = s.URL + "/acme/" + StepCAEABProvisioner + "/directory"
	if s.EAB, err = initDB(bins.DBInit, filepath.Join(dir, "config", "ca.json"), o.EABKeys); err != nil {
		return nil, err
	}
	if s.dns, err = startChallDNS(o.Dir); err != nil {
		return nil, err
	}
	s.DNSAddr = s.dns.addr
	// STEPPATH keeps step-ca from reading or creating ~/.step.
	env := []string{"STEPPATH=" + filepath.Join(dir, "steppath"), "STEPDEBUG=1"}
	s.ca, err = start(filepath.Join(o.Dir, "step-ca.log"), env, bins.StepCA,
		filepath.Join(dir, "config", "ca.json"),
		"--insecure", "--acme-http-port", fmt.Sprint(o.HTTPPort),
		"--resolver", s.DNSAddr)
	if err != nil {
		s.Stop()
		return nil, err
	}
	if err := waitTCP(fmt.Sprintf("127.0.0.1:%d", port), 30*time.Second, s.ca.done, "step-ca", s.ca.log); err != nil {
		s.Stop()
		return nil, err
	}
	return s, nil
}

// initDB writes step-ca's database before it starts: ca.json's
// provisioners, and n EAB keys for acme-eab (see stepca/dbinit for why
// step-ca cannot do either itself).
func initDB(bin, caJSON string, n int) ([]EABKey, error) {
	var stderr bytes.Buffer
	cmd := exec.Command(bin, "-config", caJSON, "-eab", fmt.Sprint(n))
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return nil, fmt.Errorf("dbinit: %v: %s", err, bytes.TrimSpace(stderr.Bytes()))
	}
	var keys []EABKey
	sc := bufio.NewScanner(bytes.NewReader(out))
	for sc.Scan() {
		var k struct{ Reference, KID, HMAC string }
		if err := json.Unmarshal(sc.Bytes(), &k); err != nil {
			return nil, fmt.Errorf("dbinit: %v", err)
		}
		keys = append(keys, EABKey(k))
	}
	if len(keys) != n {
		return nil, fmt.Errorf("dbinit made %d EAB keys, want %d", len(keys), n)
	}
	return keys, nil
}

// Stop stops step-ca and its DNS server.
func (s *StepCA) Stop() {
	s.ca.stop()
	s.dns.stop()
}

// Dump makes step-ca print every goroutine's stack (SIGQUIT, which also
// ends it) and returns what it printed, so a hung test names where
// step-ca was.
func (s *StepCA) Dump() string { return s.ca.quitDump() }

// PID is step-ca's process ID, for the benchmarks' CPU accounting.
func (s *StepCA) PID() int { return s.ca.cmd.Process.Pid }

// Log returns the end of step-ca's log, for failure messages.
func (s *StepCA) Log() string { return tail(s.ca.log) }

// FullLog returns all of step-ca's log.
func (s *StepCA) FullLog() string { return s.ca.fullLog() }

// SetA makes step-ca's DNS answer host's A queries with addrs instead of
// 127.0.0.1.
func (s *StepCA) SetA(host string, addrs ...string) error { return s.dns.SetA(host, addrs...) }

// Requests counts the requests step-ca has logged for an ACME path of
// either provisioner, such as "new-order" or "new-account".
func (s *StepCA) Requests(path string) int {
	n := 0
	for _, line := range strings.Split(s.FullLog(), "\n") {
		if strings.Contains(line, "path=/acme/"+StepCAProvisioner+"/"+path) ||
			strings.Contains(line, "path=/acme/"+StepCAEABProvisioner+"/"+path) {
			n++
		}
	}
	return n
}

// ServerErrors counts the ACME requests step-ca answered with a 5xx
// (its "internal error" for concurrent updates of one account's
// orders, among others).
func (s *StepCA) ServerErrors() int {
	n := 0
	for _, line := range strings.Split(s.FullLog(), "\n") {
		if strings.Contains(line, " path=/acme/") && strings.Contains(line, " status=5") {
			n++
		}
	}
	return n
}

// Orders counts the new orders step-ca has received so far.
func (s *StepCA) Orders() int { return s.Requests("new-order") }

// CRL fetches and checks step-ca's certificate revocation list: signed
// by its intermediate, which chains to the root.
func (s *StepCA) CRL() (*x509.RevocationList, error) {
	pool := x509.NewCertPool()
	root, err := os.ReadFile(s.CABundle)
	if err != nil {
		return nil, err
	}
	pool.AppendCertsFromPEM(root)
	c := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}}}
	resp, err := c.Get(s.URL + "/crl")
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	der, err := io.ReadAll(resp.Body)
	if err != nil {
		return nil, err
	}
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("GET /crl: %s: %s", resp.Status, bytes.TrimSpace(der))
	}
	crl, err := x509.ParseRevocationList(der)
	if err != nil {
		return nil, fmt.Errorf("step-ca's CRL: %v", err)
	}
	inter, err := readCert(filepath.Join(filepath.Dir(s.CABundle), "intermediate_ca.crt"))
	if err != nil {
		return nil, err
	}
	if err := crl.CheckSignatureFrom(inter); err != nil {
		return nil, fmt.Errorf("step-ca's CRL is not signed by its intermediate: %v", err)
	}
	return crl, nil
}

// Revoked reports whether step-ca's CRL lists the serial (hex).
func (s *StepCA) Revoked(serialHex string) (bool, error) {
	want, ok := new(big.Int).SetString(serialHex, 16)
	if !ok {
		return false, fmt.Errorf("serial %q is not hex", serialHex)
	}
	crl, err := s.CRL()
	if err != nil {
		return false, err
	}
	for _, e := range crl.RevokedCertificateEntries {
		if e.SerialNumber.Cmp(want) == 0 {
			return true, nil
		}
	}
	return false, nil
}

func readCert(path string) (*x509.Certificate, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	b, _ := pem.Decode(data)
	if b == nil {
		return nil, fmt.Errorf("%s: not PEM", path)
	}
	return x509.ParseCertificate(b.Bytes)
}

// writeStepCAConfig writes what `step ca init` would: a root and an
// intermediate (ECDSA P-256, the intermediate's key unencrypted so no
// password file is needed), and ca.json with the ACME provisioners, a
// bbolt database and the CRL on. Certificate lifetimes stay step-ca's
// defaults (24 hours) unless lifetime is set.
func writeStepCAConfig(dir string, port int, lifetime time.Duration) error {
	for _, d := range []string{"certs", "secrets", "config", "db", "steppath"} {
		if err := os.MkdirAll(filepath.Join(dir, d), 0o700); err != nil {
			return err
		}
	}
	now := time.Now().Add(-time.Hour)
	rootKey, root, err := makeCA(nil, nil, "lbcert test step-ca root", now, 1)
	if err != nil {
		return err
	}
	interKey, inter, err := makeCA(root, rootKey, "lbcert test step-ca intermediate", now, 0)
	if err != nil {
		return err
	}
	keyDER, err := x509.MarshalECPrivateKey(interKey)
	if err != nil {
		return err
	}
	files := map[string][]byte{
		"certs/root_ca.crt":           pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: root.Raw}),
		"certs/intermediate_ca.crt":   pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: inter.Raw}),
		"secrets/intermediate_ca_key": pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: keyDER}),
	}
	cfg := map[string]any{
		"root":     filepath.Join(dir, "certs", "root_ca.crt"),
		"crt":      filepath.Join(dir, "certs", "intermediate_ca.crt"),
		"key":      filepath.Join(dir, "secrets", "intermediate_ca_key"),
		"address":  fmt.Sprintf("127.0.0.1:%d", port),
		"dnsNames": []string{"127.0.0.1", "localhost"},
		"logger":   map[string]string{"format": "text"},
		"db":       map[string]string{"type": "bbolt", "dataSource": filepath.Join(dir, "db", "ca.db")},
		"crl":      map[string]any{"enabled": true, "generateOnRevoke": true, "cacheDuration": "24h"},
		"authority": map[string]any{
			// The provisioners live in the database (dbinit copies them
			// there), the only place an EAB key can refer to them.
			"enableAdmin": true,
			"provisioners": []map[string]any{
				{"type": "ACME", "name": StepCAProvisioner},
				{"type": "ACME", "name": StepCAEABProvisioner, "requireEAB": true},
			},
		},
		"tls": map[string]any{
			"cipherSuites":  []string{"TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256", "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256"},
			"minVersion":    1.2,
			"maxVersion":    1.3,
			"renegotiation": false,
		},
	}
	if lifetime > 0 {
		d := lifetime.String()
		auth := cfg["authority"].(map[string]any)
		auth["claims"] = map[string]string{"minTLSCertDuration": d, "defaultTLSCertDuration": d, "maxTLSCertDuration": d}
		auth["backdate"] = "0s"
	}
	data, err := json.MarshalIndent(cfg, "", "  ")
	if err != nil {
		return err
	}
	files["config/ca.json"] = data
	for name, data := range files {
		if err := os.WriteFile(filepath.Join(dir, name), data, 0o600); err != nil {
			return err
		}
	}
	return nil
}

// makeCA makes a CA certificate: self-signed when parent is nil.
func makeCA(parent *x509.Certificate, parentKey *ecdsa.PrivateKey, cn string, from time.Time, pathLen int) (*ecdsa.PrivateKey, *x509.Certificate, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, err
	}
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		return nil, nil, err
	}
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{CommonName: cn, Organization: []string{"lbcert tests"}},
		NotBefore:             from,
		NotAfter:              from.Add(10 * 365 * 24 * time.Hour),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		BasicConstraintsValid: true,
		IsCA:                  true,
		MaxPathLen:            pathLen,
		MaxPathLenZero:        pathLen == 0,
	}
	if parent == nil {
		parent, parentKey = tmpl, key
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, parent, &key.PublicKey, parentKey)
	if err != nil {
		return nil, nil, err
	}
	cert, err := x509.ParseCertificate(der)
	return key, cert, err
}
