package notify

import (
	"bytes"
	"cmp"
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	mail "github.com/wneessen/go-mail"

	"github.com/lbcert/lbcert/internal/argfile"
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
	set, err := s.settings(env.Relay)
	if err != nil {
		return err
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

	last := &lastVerb{}
	client, err := newClient(ctx, set, last)
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
	return failure(env.To, server, tries, set, last.get(), err)
}

// failure is the error of a mail that could not be sent: the server,
// the tries, its reply, and a hint when TLS is what failed.
func failure(to, server string, tries int, set Settings, verb string, err error) error {
	tried := "1 try"
	if tries > 1 {
		tried = fmt.Sprintf("%d tries", tries)
	}
	reply := scrub(err.Error(), set.Password)
	if verb == "STARTTLS" {
		// A relay that offers STARTTLS and then refuses it (454, "TLS
		// not available"): its reply alone reads like any refusal.
		err = fmt.Errorf("mail to %s through %s failed after %s: the relay refused STARTTLS: %s", to, server, tried, reply)
		return hint.Wrap(err, "the relay %s offers STARTTLS but cannot start it (often its certificate is missing or broken): fix its TLS; on a network you trust, --smtp-tls none sends without it", server)
	}
	err = fmt.Errorf("mail to %s through %s failed after %s: %s", to, server, tried, reply)
	if strings.Contains(err.Error(), "STARTTLS") && (set.TLS == "" || set.TLS == "starttls") {
		return hint.Wrap(err, "the relay %s offers no STARTTLS: if it speaks TLS from the first byte (often port 465) use --smtp-tls tls; on a network you trust, --smtp-tls opportunistic (TLS when offered) or none", server)
	}
	return err
}

// settings are the sender's settings for relay r (a lineage's or a CSV
// row's, or none: the configured one). Credentials belong to the relay
// they were configured for: another relay gets no login, unless it was
// saved with its own (issue --smtp-host H --smtp-user U), which logs in
// with the run's password as issue did. The password of a run that logs
// in to another relay itself never goes to it.
func (s *Sender) settings(r Relay) (Settings, error) {
	set := s.Settings
	other := (r.Host != "" && r.Host != set.Host) || (r.Port != 0 && r.Port != set.Port)
	switch {
	case r.User != "" && other && set.User != "":
		return set, fmt.Errorf("relay %s:%d logs in as %s (saved with the certificate), but this run's password is --smtp-user %s's on %s:%d: mail that certificate's reports from a run given its own relay's password", r.Host, r.Port, r.User, set.User, set.Host, set.Port)
	case r.User != "" && set.User == "":
		set.User = r.User
	case other:
		set.User, set.Password = "", ""
	}
	set.Host, set.Port, set.From = cmp.Or(r.Host, set.Host), cmp.Or(r.Port, set.Port), cmp.Or(r.From, set.From)
	set.TLS, set.CABundle = cmp.Or(r.TLS, set.TLS), cmp.Or(r.CABundle, set.CABundle)
	if set.User != "" && set.Password == "" {
		return set, hint.Wrap(fmt.Errorf("relay %s:%d: login %s has no password", set.Host, set.Port, set.User), "set LBCERT_SMTP_PASSWORD, or pass --smtp-password-file FILE, for the run that mails")
	}
	if set.User != "" && !tlsAlways(set.TLS) {
		// A lineage's saved mode can differ from the flags checked up
		// front: a login goes only where TLS is certain, else nowhere.
		return set, fmt.Errorf("relay %s:%d: refusing to log in with --smtp-tls %s, which can send the password in the clear; use starttls or tls for it", set.Host, set.Port, set.TLS)
	}
	return set, nil
}

// tlsAlways says whether mode guarantees TLS before anything is sent
// ("" is the default, starttls).
func tlsAlways(mode string) bool { return mode == "" || mode == "starttls" || mode == "tls" }

// TLSAlways is tlsAlways for the commands' up-front check.
func TLSAlways(mode string) bool { return tlsAlways(mode) }

func newClient(ctx context.Context, s Settings, last *lastVerb) (*mail.Client, error) {
	timeout := orDefault(s.Timeout, 30*time.Second)
	opts := []mail.Option{mail.WithPort(s.Port), mail.WithTimeout(timeout)}
	tlsConf := &tls.Config{ServerName: s.Host, MinVersion: tls.VersionTLS12}
	if s.CABundle != "" {
		pool, err := x509.SystemCertPool()
		if err != nil || pool == nil {
			pool = x509.NewCertPool()
		}
		pem, err := argfile.Read(s.CABundle, argfile.Bundle)
		if err != nil {
			return nil, fmt.Errorf("--smtp-ca-bundle %s: %v", s.CABundle, err)
		}
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("--smtp-ca-bundle %s: no PEM certificates", s.CABundle)
		}
		tlsConf.RootCAs = pool
	}
	opts = append(opts, mail.WithTLSConfig(tlsConf), mail.WithDialContextFunc(sessionDialer(ctx, s.TLS == "tls", tlsConf, timeout, last)))
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
func sessionDialer(run context.Context, implicitTLS bool, conf *tls.Config, timeout time.Duration, last *lastVerb) mail.DialContextFunc {
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
		return &sessionConn{Conn: conn, stop: stop, last: last}, nil
	}
}

type sessionConn struct {
	net.Conn
	stop func() bool
	last *lastVerb
}

// Write notes each SMTP command sent in the clear: an error then says
// which step the relay refused (a 454 to STARTTLS reads like a 454 to
// AUTH). Bytes sent through TLS start with a record header, no verb;
// QUIT and RSET, sent to clean up after a refusal, are not the step.
func (c *sessionConn) Write(p []byte) (int, error) {
	i := bytes.IndexAny(p, " \r")
	if verb := string(p[:max(i, 0)]); i >= 4 && i <= 8 && verb != "QUIT" && verb != "RSET" &&
		strings.IndexFunc(verb, func(r rune) bool { return r < 'A' || r > 'Z' }) < 0 {
		c.last.set(verb)
	}
	return c.Conn.Write(p)
}

// lastVerb is the last SMTP command of a session.
type lastVerb struct {
	mu   sync.Mutex
	verb string
}

func (l *lastVerb) set(v string) {
	l.mu.Lock()
	l.verb = v
	l.mu.Unlock()
}

func (l *lastVerb) get() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.verb
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
