package notify

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"time"

	mail "github.com/wneessen/go-mail"

	"github.com/lbcert/lbcert/internal/hint"
	"github.com/lbcert/lbcert/internal/secret"
	"github.com/lbcert/lbcert/internal/store"
)

// TLS modes for --smtp-tls.
var TLSModes = []string{"starttls", "tls", "opportunistic", "none"}

// Settings is how to reach the SMTP server. Password is a secret: it
// comes from LBCERT_SMTP_PASSWORD or --smtp-password-file, is never saved
// with a lineage, and never printed.
type Settings struct {
	Host     string
	Port     int
	From     string
	User     string
	Password string
	TLS      string // starttls (default, verified), tls, opportunistic, none
	CABundle string // extra roots for the server's certificate
	Timeout  time.Duration
	// Tries and Backoff shape the retries; zero means 3 tries, 2s apart
	// and doubling.
	Tries   int
	Backoff time.Duration
}

// Sender mails envelopes.
type Sender struct {
	Settings Settings
	Now      func() time.Time
}

// Send mails one envelope, retrying with backoff. The error names the
// server and carries its SMTP reply, never the password.
func (s *Sender) Send(ctx context.Context, env Envelope) error {
	set := s.Settings
	// Credentials belong to the relay they were configured for. A relay
	// named by a lineage or a CSV row is another server: it gets no login,
	// so the configured password can never go to it.
	if other := (env.Relay.Host != "" && env.Relay.Host != set.Host) || (env.Relay.Port != 0 && env.Relay.Port != set.Port); other {
		set.User, set.Password = "", ""
	}
	if env.Relay.Host != "" {
		set.Host = env.Relay.Host
	}
	if env.Relay.Port != 0 {
		set.Port = env.Relay.Port
	}
	if env.Relay.From != "" {
		set.From = env.Relay.From
	}
	if env.Relay.TLS != "" {
		set.TLS = env.Relay.TLS
	}
	if env.Relay.CABundle != "" {
		set.CABundle = env.Relay.CABundle
	}
	if set.User != "" && !tlsAlways(set.TLS) {
		// A lineage's saved mode can differ from the flags checked up
		// front: a login goes only where TLS is certain, else nowhere.
		return fmt.Errorf("relay %s:%d: refusing to log in with --smtp-tls %s, which can send the password in the clear; use starttls or tls for it", set.Host, set.Port, set.TLS)
	}
	msg := mail.NewMsg()
	if err := msg.From(set.From); err != nil {
		return fmt.Errorf("mail from %q: %v", set.From, err)
	}
	if err := msg.To(env.To); err != nil {
		return fmt.Errorf("mail to %q: %v", env.To, err)
	}
	msg.Subject(env.Report.Subject())
	msg.SetDateWithValue(env.Report.Time)
	msg.SetMessageID()
	msg.SetBodyString(mail.TypeTextPlain, secret.Scrub(env.Report.Body()))

	client, err := newClient(ctx, set)
	if err != nil {
		return err
	}
	tries, backoff := set.Tries, set.Backoff
	if tries <= 0 {
		tries = 3
	}
	if backoff <= 0 {
		backoff = 2 * time.Second
	}
	server := fmt.Sprintf("%s:%d", set.Host, set.Port)
	for i := 1; ; i++ {
		err = client.DialAndSendWithContext(ctx, msg)
		if err == nil {
			return nil
		}
		if i >= tries || ctx.Err() != nil {
			break
		}
		select {
		case <-time.After(backoff):
		case <-ctx.Done():
		}
		backoff *= 2
	}
	tried := "1 try"
	if tries > 1 {
		tried = fmt.Sprintf("%d tries", tries)
	}
	err = fmt.Errorf("mail to %s through %s failed after %s: %s", env.To, server, tried, scrub(err.Error(), set.Password))
	if strings.Contains(err.Error(), "STARTTLS") && (set.TLS == "" || set.TLS == "starttls") {
		return hint.Wrap(err, "the relay %s offers no STARTTLS: if it speaks TLS from the first byte (often port 465) use --smtp-tls tls; on a network you trust, --smtp-tls opportunistic (TLS when offered) or none", server)
	}
	return err
}

// tlsAlways says whether mode guarantees TLS before anything is sent
// ("" is the default, starttls).
func tlsAlways(mode string) bool { return mode == "" || mode == "starttls" || mode == "tls" }

// TLSAlways is tlsAlways for the commands' up-front check.
func TLSAlways(mode string) bool { return tlsAlways(mode) }

func newClient(ctx context.Context, s Settings) (*mail.Client, error) {
	timeout := orDefault(s.Timeout, 30*time.Second)
	opts := []mail.Option{mail.WithPort(s.Port), mail.WithTimeout(timeout)}
	tlsConf := &tls.Config{ServerName: s.Host, MinVersion: tls.VersionTLS12}
	if s.CABundle != "" {
		pool, err := x509.SystemCertPool()
		if err != nil || pool == nil {
			pool = x509.NewCertPool()
		}
		pem, err := os.ReadFile(s.CABundle)
		if err != nil || !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("--smtp-ca-bundle %s: no PEM certificates", s.CABundle)
		}
		tlsConf.RootCAs = pool
	}
	opts = append(opts, mail.WithTLSConfig(tlsConf), mail.WithDialContextFunc(sessionDialer(ctx, s.TLS == "tls", tlsConf, timeout)))
	switch s.TLS {
	case "", "starttls":
		opts = append(opts, mail.WithTLSPolicy(mail.TLSMandatory))
	case "tls":
		opts = append(opts, mail.WithSSL())
	case "opportunistic":
		opts = append(opts, mail.WithTLSPolicy(mail.TLSOpportunistic))
	case "none":
		opts = append(opts, mail.WithTLSPolicy(mail.NoTLS))
	default:
		return nil, fmt.Errorf("--smtp-tls %q: want one of %s", s.TLS, strings.Join(TLSModes, ", "))
	}
	if s.User != "" {
		opts = append(opts, mail.WithSMTPAuth(mail.SMTPAuthAutoDiscover), mail.WithUsername(s.User), mail.WithPassword(s.Password))
	}
	return mail.NewClient(s.Host, opts...)
}

func orDefault(d, def time.Duration) time.Duration {
	if d > 0 {
		return d
	}
	return def
}

// sessionDialer dials the relay and gives the connection one deadline for
// the whole SMTP session, greeting included: a server that accepts and
// never greets, or drips its greeting a byte at a time, cannot hold the
// run (and its lock and port) past it. Cancelling run, the send's own
// context (SIGTERM), ends the session at once; the context go-mail passes
// for dialing ends with the dial, so it cannot serve for that. With implicit TLS it does the handshake itself, since
// go-mail's own TLS dialing is replaced by this one.
func sessionDialer(run context.Context, implicitTLS bool, conf *tls.Config, timeout time.Duration) mail.DialContextFunc {
	return func(ctx context.Context, network, addr string) (net.Conn, error) {
		d := &net.Dialer{Timeout: timeout}
		var conn net.Conn
		var err error
		if implicitTLS {
			conn, err = (&tls.Dialer{NetDialer: d, Config: conf}).DialContext(ctx, network, addr)
		} else {
			conn, err = d.DialContext(ctx, network, addr)
		}
		if err != nil {
			return nil, err
		}
		conn.SetDeadline(time.Now().Add(timeout))
		stop := context.AfterFunc(run, func() { conn.SetDeadline(time.Now()) })
		return &sessionConn{Conn: conn, stop: stop}, nil
	}
}

type sessionConn struct {
	net.Conn
	stop func() bool
}

func (c *sessionConn) Close() error {
	c.stop()
	return c.Conn.Close()
}

// scrub removes the password from a message, in case a library ever
// echoes it back.
// scrub removes the password and every other known secret, literal or
// base64 (a relay that echoes the AUTH exchange), from s.
func scrub(s, password string) string {
	secret.Add(password)
	return secret.Scrub(s)
}

// Spool writes a report that could not be mailed to dir/reports/, so
// nothing is lost, and returns the file's path.
func Spool(dir string, env Envelope) (string, error) {
	d := filepath.Join(dir, "reports")
	if err := os.MkdirAll(d, 0o700); err != nil {
		return "", err
	}
	name := fmt.Sprintf("%s-%s-%s.txt", env.Report.Time.UTC().Format("20060102T150405Z"), env.Report.Command, safe(env.To))
	p := filepath.Join(d, name)
	content := "To: " + env.To + "\nSubject: " + env.Report.Subject() + "\n\n" + env.Report.Body()
	// Atomic, and never through a link planted at the name.
	return p, store.WriteFile(p, []byte(secret.Scrub(content)), 0o600)
}

func safe(s string) string {
	return strings.Map(func(r rune) rune {
		if r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '.' || r == '@' || r == '-' {
			return r
		}
		return '_'
	}, s)
}

// ErrNoRecipients means mail is configured without --mail-to.
var ErrNoRecipients = errors.New("no --mail-to recipient")
