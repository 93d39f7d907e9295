package testenv

import (
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"net/http"
	"os"
	"testing"
	"time"
)

// The tests' step-ca builds from the module proxy, starts on loopback
// with the PKI and ca.json the harness writes, serves both provisioners'
// directories over TLS under its own root, offers neither ARI nor
// profiles, asks for EAB on acme-eab only, and serves a CRL signed by
// its intermediate.
func TestStepCAStarts(t *testing.T) {
	s, err := StartStepCA(StepCAOptions{Dir: t.TempDir(), EABKeys: 2})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Stop()
	if len(s.EAB) != 2 || s.EAB[0].KID == "" || len(s.EAB[0].HMAC) != 43 || s.EAB[0].KID == s.EAB[1].KID {
		t.Fatalf("EAB keys: %+v", s.EAB)
	}
	pool := x509.NewCertPool()
	root, err := os.ReadFile(s.CABundle)
	if err != nil {
		t.Fatal(err)
	}
	pool.AppendCertsFromPEM(root)
	c := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}}}
	for url, eab := range map[string]bool{s.DirectoryURL: false, s.EABDirectoryURL: true} {
		resp, err := c.Get(url)
		if err != nil {
			t.Fatal(err)
		}
		var dir map[string]any
		err = json.NewDecoder(resp.Body).Decode(&dir)
		resp.Body.Close()
		if err != nil || resp.StatusCode != 200 || dir["newOrder"] == nil {
			t.Fatalf("%s: %s %v %v", url, resp.Status, err, dir)
		}
		if dir["renewalInfo"] != nil {
			t.Errorf("%s offers ARI: %v", url, dir)
		}
		meta, _ := dir["meta"].(map[string]any)
		if meta["profiles"] != nil || (meta["externalAccountRequired"] == true) != eab {
			t.Errorf("%s: meta %v", url, meta)
		}
	}
	crl, err := s.CRL()
	if err != nil {
		t.Fatal(err)
	}
	if len(crl.RevokedCertificateEntries) != 0 {
		t.Errorf("a new CA's CRL lists %d certificates", len(crl.RevokedCertificateEntries))
	}
}
