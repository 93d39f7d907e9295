package testenv

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/emersion/go-sasl"
	"github.com/emersion/go-smtp"
)

// Message is one mail the test SMTP server accepted.
type Message struct {
	From string
	To   []string
	Data string
	User string // who authenticated
	TLS  bool   // whether the session was encrypted
}

// SMTP is a real SMTP server (emersion/go-smtp) on loopback, offering
// STARTTLS with a certificate from its own test CA and requiring AUTH
// PLAIN with one user, so tests exercise what a production relay does.
type SMTP struct {
	Addr     string
	Host     string
	Port     int
	CABundle string // PEM of the CA that signed the server's certificate
	User     string
	Password string

	srv  *smtp.Server
	mu   sync.Mutex
	msgs []Message
	// Auths counts successful logins; AuthAttempts counts every AUTH a
	// client sent, right or wrong, so a test can prove none was sent.
	Auths, AuthAttempts int
	// EchoAuth makes the server refuse every login with a 535 reply that
	// quotes what the client sent, base64 as on the wire and the
	// password's own base64, as some relays' error replies do.
	EchoAuth bool
}

// SetEchoAuth turns EchoAuth on or off for the sessions that follow.
func (s *SMTP) SetEchoAuth(on bool) {
	s.mu.Lock()
	s.EchoAuth = on
	s.mu.Unlock()
}

// StartSMTP starts the server; dir receives the CA bundle. With an empty
// user it is a relay that needs no login (as a row's own relay may be).
// Every server of one test binary has its certificate from the same CA.
func StartSMTP(dir, user, password string) (*SMTP, error) {
	return startSMTP(dir, user, password, true)
}

// StartSMTPWithoutTLS starts a relay that offers no STARTTLS and needs
// no login: a relay on a trusted network, which --smtp-tls's default
// (starttls, required) refuses.
func StartSMTPWithoutTLS(dir string) (*SMTP, error) { return startSMTP(dir, "", "", false) }

func startSMTP(dir, user, password string, offerTLS bool) (*SMTP, error) {
	caPEM, tlsConf, err := sharedSMTPCert()
	if err != nil {
		return nil, err
	}
	s := &SMTP{CABundle: filepath.Join(dir, "smtp-ca.pem"), User: user, Password: password}
	if err := os.WriteFile(s.CABundle, caPEM, 0o644); err != nil {
		return nil, err
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	s.Addr = ln.Addr().String()
	s.Host = "127.0.0.1"
	s.Port = ln.Addr().(*net.TCPAddr).Port
	s.srv = smtp.NewServer(smtp.BackendFunc(func(c *smtp.Conn) (smtp.Session, error) {
		return &smtpSession{s: s, conn: c}, nil
	}))
	s.srv.Domain = "localhost"
	if offerTLS {
		s.srv.TLSConfig = tlsConf
	}
	s.srv.ReadTimeout = 10 * time.Second
	s.srv.WriteTimeout = 10 * time.Second
	go s.srv.Serve(ln)
	return s, nil
}

// Stop stops the server.
func (s *SMTP) Stop() { s.srv.Close() }

// Messages returns what was delivered so far.
func (s *SMTP) Messages() []Message {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]Message(nil), s.msgs...)
}

type smtpSession struct {
	s    *SMTP
	conn *smtp.Conn
	user string
	msg  Message
}

func (ss *smtpSession) AuthMechanisms() []string { return []string{sasl.Plain} }

func (ss *smtpSession) Auth(mech string) (sasl.Server, error) {
	ss.s.mu.Lock()
	ss.s.AuthAttempts++
	echo := ss.s.EchoAuth
	ss.s.mu.Unlock()
	if echo {
		return echoServer{}, nil
	}
	return sasl.NewPlainServer(func(identity, username, password string) error {
		if username != ss.s.User || password != ss.s.Password {
			return errors.New("invalid credentials")
		}
		ss.user = username
		ss.s.mu.Lock()
		ss.s.Auths++
		ss.s.mu.Unlock()
		return nil
	}), nil
}

// echoServer is a SASL exchange that refuses the login and quotes it.
type echoServer struct{}

func (echoServer) Next(response []byte) ([]byte, bool, error) {
	if response == nil {
		return []byte{}, false, nil // ask for the initial response
	}
	parts := strings.Split(string(response), "\x00")
	pw := parts[len(parts)-1]
	return nil, true, &smtp.SMTPError{Code: 535, EnhancedCode: smtp.EnhancedCode{5, 7, 8},
		Message: fmt.Sprintf("Authentication failed for AUTH PLAIN %s (password %s)",
			base64.StdEncoding.EncodeToString(response), base64.StdEncoding.EncodeToString([]byte(pw)))}
}

func (ss *smtpSession) Mail(from string, _ *smtp.MailOptions) error {
	if ss.user == "" && ss.s.User != "" {
		return &smtp.SMTPError{Code: 530, EnhancedCode: smtp.EnhancedCode{5, 7, 0}, Message: "Authentication required"}
	}
	ss.msg = Message{From: from, User: ss.user}
	return nil
}

func (ss *smtpSession) Rcpt(to string, _ *smtp.RcptOptions) error {
	ss.msg.To = append(ss.msg.To, to)
	return nil
}

func (ss *smtpSession) Data(r io.Reader) error {
	data, err := io.ReadAll(r)
	if err != nil {
		return err
	}
	ss.msg.Data = string(data)
	_, ss.msg.TLS = ss.conn.TLSConnectionState()
	ss.s.mu.Lock()
	ss.s.msgs = append(ss.s.msgs, ss.msg)
	ss.s.mu.Unlock()
	return nil
}

func (ss *smtpSession) Reset()        { ss.msg = Message{} }
func (ss *smtpSession) Logout() error { return nil }

// smtpCert makes a test CA and a server certificate for 127.0.0.1.
var smtpCertOnce struct {
	sync.Once
	pem  []byte
	conf *tls.Config
	err  error
}

func sharedSMTPCert() ([]byte, *tls.Config, error) {
	c := &smtpCertOnce
	c.Do(func() { c.pem, c.conf, c.err = smtpCert() })
	return c.pem, c.conf, c.err
}

func smtpCert() ([]byte, *tls.Config, error) {
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, err
	}
	caTmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "lbcert test SMTP CA"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		return nil, nil, err
	}
	caCert, _ := x509.ParseCertificate(caDER)
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, err
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(2), Subject: pkix.Name{CommonName: "127.0.0.1"},
		IPAddresses: []net.IP{net.ParseIP("127.0.0.1")}, DNSNames: []string{"localhost"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, caCert, &key.PublicKey, caKey)
	if err != nil {
		return nil, nil, err
	}
	cert := tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: caDER}), &tls.Config{Certificates: []tls.Certificate{cert}}, nil
}
