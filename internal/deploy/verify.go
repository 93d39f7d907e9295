package deploy

import (
	"context"
	"crypto/tls"
	"fmt"
	"log/slog"
	"net"
	"time"
)

// verify connects to the serving address with SNI set to each name and
// checks that the leaf has the new serial. A reload takes effect
// asynchronously (nginx starts new workers, HAProxy a new process), so it
// retries for a few seconds before calling it a mismatch.
func (r *Runner) verify(ctx context.Context, c Change, res *Result) {
	timeout := r.Opts.VerifyTimeout
	if timeout == 0 {
		timeout = 10 * time.Second
	}
	deadline := time.Now().Add(timeout)
	for _, name := range c.Domains {
		var got string
		var err error
		for {
			got, err = servedSerial(ctx, c.Deploy.VerifyAddr, name)
			if err == nil && got == c.Serial {
				break
			}
			if time.Now().After(deadline) || ctx.Err() != nil {
				break
			}
			time.Sleep(250 * time.Millisecond)
		}
		if err != nil {
			res.Verify = "failed"
			res.Err = fmt.Errorf("verify %s at %s: %v", name, c.Deploy.VerifyAddr, err)
			return
		}
		if got != c.Serial {
			res.Verify = "failed"
			res.Err = fmt.Errorf("verify %s at %s: served serial %s, want the new %s", name, c.Deploy.VerifyAddr, got, c.Serial)
			return
		}
	}
	res.Verify = "ok"
	slog.Info("verified new certificate is served", "name", c.Name, "addr", c.Deploy.VerifyAddr, "serial", c.Serial)
}

// ServedSerial returns the serial (hex) of the leaf served at addr for
// SNI name. It does not check the chain: the question is which
// certificate is served, not whether the client trusts it.
func servedSerial(ctx context.Context, addr, name string) (string, error) {
	d := &tls.Dialer{
		NetDialer: &net.Dialer{Timeout: 3 * time.Second},
		Config:    &tls.Config{ServerName: name, InsecureSkipVerify: true},
	}
	conn, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return "", err
	}
	defer conn.Close()
	certs := conn.(*tls.Conn).ConnectionState().PeerCertificates
	if len(certs) == 0 {
		return "", fmt.Errorf("no certificate served")
	}
	return fmt.Sprintf("%x", certs[0].SerialNumber), nil
}
