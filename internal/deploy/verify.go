package deploy

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"log/slog"
	"net"
	"os"
	"time"
)

// verify connects to the serving address with SNI set to each name and
// checks that the leaf has the new serial (CheckServed), and notes the
// outcome in res.
func (r *Runner) verify(ctx context.Context, c Change, res *Result) {
	if err := CheckServed(ctx, c); err != nil {
		res.Verify = "failed"
		res.Err = err
		return
	}
	res.Verify = "ok"
	slog.Info("verified new certificate is served", "name", c.Name, "addr", c.Deploy.VerifyAddr, "serial", c.Serial)
}

// CheckServed is the deploy's TLS check on its own: every domain of c
// is served at c.Deploy.VerifyAddr with c.Serial, its chain verified
// when there are roots to verify it to. A staged rollout's soak repeats
// it. A reload takes effect asynchronously (nginx starts new workers,
// HAProxy a new process), so it retries until ctx ends before it calls
// it a mismatch.
func CheckServed(ctx context.Context, c Change) error {
	for _, name := range c.Domains {
		var got string
		var err error
		for attempt := 0; ; attempt++ {
			actx := ctx
			if attempt == 0 && ctx.Err() != nil {
				// The step's deadline passed while this change waited
				// for a worker: it still gets one honest look.
				var cancel context.CancelFunc
				actx, cancel = context.WithTimeout(context.WithoutCancel(ctx), 3*time.Second)
				defer cancel()
			}
			g, e := servedSerial(actx, c.Deploy.VerifyAddr, name, c.roots())
			if attempt > 0 && ctx.Err() != nil {
				break // keep the last full answer, not "deadline exceeded"
			}
			got, err = g, e
			// The new serial with a chain that does not verify is final:
			// no reload in progress will change the chain it serves.
			if got == c.Serial || ctx.Err() != nil {
				break
			}
			select {
			case <-time.After(250 * time.Millisecond):
			case <-ctx.Done():
			}
		}
		if err != nil {
			return fmt.Errorf("verify %s at %s: %v", name, c.Deploy.VerifyAddr, err)
		}
		if got != c.Serial {
			return fmt.Errorf("verify %s at %s: served serial %s, want the new %s", name, c.Deploy.VerifyAddr, got, c.Serial)
		}
	}
	return nil
}

// servedSerial returns the serial (hex) of the leaf served at addr for
// SNI name. It does not check the chain: the question is which
// certificate is served, not whether the client trusts it.
func servedSerial(ctx context.Context, addr, name, rootsFile string) (string, error) {
	conn, err := dialTLS(ctx, addr, &tls.Config{ServerName: name, InsecureSkipVerify: true})
	if err != nil {
		return "", err
	}
	defer conn.Close()
	certs := conn.(*tls.Conn).ConnectionState().PeerCertificates
	if len(certs) == 0 {
		return "", fmt.Errorf("no certificate served")
	}
	serial := fmt.Sprintf("%x", certs[0].SerialNumber)
	if rootsFile != "" {
		if err := verifyChain(certs, name, rootsFile); err != nil {
			return serial, err
		}
	}
	return serial, nil
}

// roots is the roots file the served chain must verify to: the issuing
// CA's when the change names them, --verify-roots otherwise; "" when
// the chain is not checked.
func (c Change) roots() string {
	if c.Deploy.VerifyRoots == "" {
		return ""
	}
	if c.Roots != "" {
		return c.Roots
	}
	return c.Deploy.VerifyRoots
}

// SystemRoots names the system's roots as a roots "file".
const SystemRoots = "system"

// verifyChain checks that the served chain leads from the leaf, for
// name, to one of the roots in rootsFile, through whatever intermediates
// the server sent. It never compares them with a saved chain: Let's
// Encrypt picks its issuing intermediate at random, so a pinned one
// would fail on a good renewal.
func verifyChain(certs []*x509.Certificate, name, rootsFile string) error {
	roots, err := LoadRoots(rootsFile)
	if rootsFile == SystemRoots {
		roots, err = x509.SystemCertPool()
	}
	if err != nil {
		return err
	}
	inter := x509.NewCertPool()
	for _, c := range certs[1:] {
		inter.AddCert(c)
	}
	if _, err := certs[0].Verify(x509.VerifyOptions{DNSName: name, Roots: roots, Intermediates: inter}); err != nil {
		return fmt.Errorf("served chain does not verify to %s: %v", rootsWords(rootsFile), err)
	}
	return nil
}

// LoadRoots reads a PEM file of root certificates.
func LoadRoots(path string) (*x509.CertPool, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(data) {
		return nil, fmt.Errorf("%s: no PEM certificates in it", path)
	}
	return pool, nil
}

// dialTLS connects and completes the handshake; a variable so a test can
// count the checks in flight from the client's side.
var dialTLS = func(ctx context.Context, addr string, conf *tls.Config) (net.Conn, error) {
	d := &tls.Dialer{NetDialer: &net.Dialer{Timeout: 3 * time.Second}, Config: conf}
	return d.DialContext(ctx, "tcp", addr)
}

func rootsWords(file string) string {
	if file == SystemRoots {
		return "the system's roots (the issuing fallback CA names no verify-roots)"
	}
	return "--verify-roots " + file
}
