package testenv

import (
	"crypto/tls"
	"crypto/x509"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"os"
	"path/filepath"
	"time"
)

// front is what a proxy in front of Pebble needs: Pebble's address, a
// transport that trusts it, and an HTTPS listener with Pebble's own test
// certificate, so the client's --ca-bundle trusts the front too.
type front struct {
	dirURL string // Pebble's directory through the front
	target *url.URL
	tr     *http.Transport
	srv    *http.Server
}

// startFront serves h in front of p.
func startFront(p *Pebble, h http.Handler) (*front, error) {
	root, err := ModuleRoot()
	if err != nil {
		return nil, err
	}
	certs := filepath.Join(root, "testdata", "pebble")
	cert, err := tls.LoadX509KeyPair(filepath.Join(certs, "cert.pem"), filepath.Join(certs, "key.pem"))
	if err != nil {
		return nil, err
	}
	caPEM, err := os.ReadFile(p.CABundle)
	if err != nil {
		return nil, err
	}
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(caPEM)
	target, err := url.Parse(p.DirectoryURL)
	if err != nil {
		return nil, err
	}
	target.Path = ""
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	f := &front{
		dirURL: "https://" + ln.Addr().String() + "/dir",
		target: target,
		tr:     &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}, MaxIdleConnsPerHost: 64},
		srv:    &http.Server{Handler: h, TLSConfig: &tls.Config{Certificates: []tls.Certificate{cert}}, ErrorLog: nullLogger()},
	}
	go f.srv.ServeTLS(ln, "", "")
	return f, nil
}

// proxy is a reverse proxy to Pebble that keeps the client's Host, from
// which Pebble builds its URLs and checks the JWS url.
func (f *front) proxy(rw http.ResponseWriter, r *http.Request) {
	(&httputil.ReverseProxy{
		Rewrite: func(pr *httputil.ProxyRequest) {
			pr.SetURL(f.target)
			pr.Out.Host = pr.In.Host
		},
		Transport: f.tr,
		ErrorLog:  nullLogger(),
	}).ServeHTTP(rw, r)
}

// nonce is a fresh nonce from Pebble, for an answer the front gives
// itself: the client's next request must not be a badNonce.
func (f *front) nonce() string {
	resp, err := (&http.Client{Transport: f.tr, Timeout: 10 * time.Second}).Head(f.target.String() + "/nonce-plz")
	if err != nil {
		return ""
	}
	resp.Body.Close()
	return resp.Header.Get("Replay-Nonce")
}
