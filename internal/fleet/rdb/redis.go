// Package rdb is the shared half of the storage seam in Redis, for
// fleet mode: lineage bundles, statuses, accounts, per-name leases with
// fencing tokens, the issuance ledger, HTTP-01 tokens, agent heartbeats
// and the fleet's membership records.
//
// It stores bytes. It never sees a private key in the clear: package
// fleet seals keys before they get here and opens them after. Every
// read-check-write is one Lua script, so it is atomic on the server; a
// GET-then-SET lock (lua-resty-auto-ssl's) lets two holders in.
//
// Redis Cluster is refused at Dial: the scripts touch several keys of one
// lineage at once (lease and fence counter; bundle, version counter and
// the set of names), which Cluster allows only within one hash slot, and
// a fleet's whole state (10,000 lineages are about 60 MB) fits one
// primary. High availability is Sentinel's job (redis-sentinel://).
package rdb

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/url"
	"regexp"
	"strconv"
	"strings"
	"time"

	goredis "github.com/redis/go-redis/v9"

	"github.com/lbcert/lbcert/internal/argfile"
)

// Options say how to reach the fleet's Redis.
type Options struct {
	// URL is redis://host:port/db, rediss://host:port/db (TLS, server
	// certificate verified), or redis-sentinel://s1:26379,s2:26379/master/db
	// (rediss-sentinel:// for TLS), optionally with user@ before the host.
	URL string
	// Password is the AUTH password (also for the Sentinels). It never
	// comes from the URL: a password in argv is visible to every user.
	Password string
	// CAFile is a PEM file of roots for rediss://; empty uses the
	// system's roots.
	CAFile string
	// Prefix starts every key (default "lbcert:"), so that a Redis
	// shared with other software keeps lbcert's keys apart.
	Prefix string
}

// Unavailable is a Redis that did not answer. Commands map it to exit
// code 4 (README "Exit codes").
type Unavailable struct {
	Addr string
	Err  error
}

func (u *Unavailable) Error() string {
	return fmt.Sprintf("the fleet's Redis at %s is unreachable: %v", u.Addr, u.Err)
}
func (u *Unavailable) Unwrap() error { return u.Err }

// HintText makes *Unavailable a hint.Hinter.
func (u *Unavailable) HintText() string {
	return "certificates already on this node keep being served; no order is placed without Redis; check that Redis runs and that --redis, the password and --redis-ca are right"
}

// NoBackoff: Redis being away is not the names' fault; the next run may
// try them at once.
func (u *Unavailable) NoBackoff() bool { return true }

// Shared is a connection to the fleet's Redis.
type Shared struct {
	c      goredis.UniversalClient
	prefix string
	addr   string // for messages, without credentials
}

// quietLog sends go-redis's own log lines (pool dial retries) to debug
// level: the error that matters reaches the caller, once, in lbcert's
// voice; the library's copies would print on stderr beside it.
type quietLog struct{}

func (quietLog) Printf(_ context.Context, format string, v ...any) {
	slog.Debug("redis: " + fmt.Sprintf(format, v...))
}

func init() { goredis.SetLogger(quietLog{}) }

// Dial connects and checks that Redis answers and is not a Cluster.
func Dial(ctx context.Context, o Options) (*Shared, error) {
	u, err := parseURL(o.URL)
	if err != nil {
		return nil, err
	}
	tlsConf, err := tlsFor(u.Scheme, o)
	if err != nil {
		return nil, err
	}
	db, rest, err := dbOf(u.Path, strings.HasSuffix(u.Scheme, "sentinel"))
	if err != nil {
		return nil, fmt.Errorf("--redis %q: %v", redact(o.URL), err)
	}
	c, err := newClient(u, db, rest, tlsConf, o)
	if err != nil {
		return nil, err
	}
	prefix := o.Prefix
	if prefix == "" {
		prefix = "lbcert:"
	}
	s := &Shared{c: c, prefix: prefix, addr: redact(o.URL)}
	info, err := c.Info(ctx, "server", "cluster").Result()
	if err != nil {
		c.Close()
		return nil, s.dialFailed(err, db, rest)
	}
	if strings.Contains(info, "redis_mode:sentinel") {
		c.Close()
		return nil, fmt.Errorf("--redis %s: the server there is a Sentinel, not a Redis: name it as redis-sentinel://HOST:PORT/MASTER/DB", s.addr)
	}
	if strings.Contains(info, "cluster_enabled:1") {
		c.Close()
		return nil, fmt.Errorf("%s is a Redis Cluster, which lbcert does not support: use one primary with replicas and Sentinel (redis-sentinel://)", s.addr)
	}
	return s, nil
}

// CheckURL refuses a --redis URL that is no URL or that holds a secret
// (a password, a query), before anything uses it: no command may write
// it into a cron line or a unit, nor print it back.
func CheckURL(raw string) error {
	_, err := parseURL(raw)
	return err
}

func parseURL(raw string) (*url.URL, error) {
	u, err := url.Parse(raw)
	if err != nil {
		// url.Parse's own message quotes the whole URL, password and all.
		return nil, fmt.Errorf("--redis %q is not a URL: want redis://HOST:PORT/DB, rediss:// or redis-sentinel://; the password never goes in it", redact(raw))
	}
	if _, set := u.User.Password(); set {
		return nil, fmt.Errorf("--redis: the URL holds a password; remove it and use LBCERT_REDIS_PASSWORD or --redis-password-file (argv is visible to every user of this host)")
	}
	if u.RawQuery != "" || u.Fragment != "" {
		// go-redis would read some options from a query; lbcert reads
		// none, and a password put there must neither be used from argv
		// nor printed back.
		return nil, fmt.Errorf("--redis %q: the URL has a query or fragment, which lbcert does not read; remove it (a password goes in LBCERT_REDIS_PASSWORD or --redis-password-file, never in the URL)", redact(raw))
	}
	if err := checkHosts(u.Host); err != nil {
		return nil, fmt.Errorf("--redis %q: %v", redact(raw), err)
	}
	return u, nil
}

// checkHosts refuses a host list (one, or a Sentinel's several) with a
// port that is no port or a host that is no host name: bad input, said
// as such, not "Redis unreachable" after a dial. A missing host or port
// is left to the checks that know the scheme.
func checkHosts(hosts string) error {
	for _, a := range strings.Split(hosts, ",") {
		h, p, err := net.SplitHostPort(a)
		if err != nil {
			h, p = strings.TrimSuffix(strings.TrimPrefix(a, "["), "]"), "-" // no port: the default's
		}
		if n, err := strconv.Atoi(p); p != "-" && (err != nil || n < 1 || n > 65535) {
			return fmt.Errorf("port %q is not a port (1 to 65535)", p)
		}
		ip := h
		if strings.Contains(h, ":") {
			ip, _, _ = strings.Cut(h, "%") // an IPv6 address may name its zone
		}
		if h != "" && net.ParseIP(ip) == nil && (!hostName.MatchString(h) || strings.Trim(h, "0123456789.") == "") {
			return fmt.Errorf("%q is not a host name or an IP address", h)
		}
	}
	return nil
}

// hostName is a DNS name's syntax (underscores allowed, as resolvers do).
var hostName = regexp.MustCompile(`^[A-Za-z0-9_]([A-Za-z0-9_-]*[A-Za-z0-9_])?(\.[A-Za-z0-9_]([A-Za-z0-9_-]*[A-Za-z0-9_])?)*\.?$`)

// dialFailed is the error for a first call that failed: a URL that names
// the wrong thing is said as such, anything else is Redis unreachable.
func (s *Shared) dialFailed(err error, db int, master string) error {
	msg := err.Error()
	switch {
	case strings.Contains(msg, "DB index is out of range"):
		return fmt.Errorf("--redis %s: this Redis has no database %d (its 'databases' setting); use a smaller /DB in the URL", s.addr, db)
	case strings.Contains(msg, "unknown command 'sentinel'"):
		return fmt.Errorf("--redis %s: the server there is a Redis, not a Sentinel: use redis://HOST:PORT/DB for it, or name the Sentinels (usually port 26379)", s.addr)
	case master != "" && strings.HasSuffix(msg, goredis.Nil.Error()):
		// The Sentinels answered, but none monitors a master by that name.
		return fmt.Errorf("--redis %s: no Sentinel there monitors a master named %q: use the name of their 'sentinel monitor' line (redis-cli -p 26379 SENTINEL MASTERS lists them)", s.addr, master)
	}
	return s.unavailable(err)
}

// newClient is the go-redis client for the parsed --redis URL u: a
// Sentinel-backed one for redis-sentinel://, a plain one otherwise.
func newClient(u *url.URL, db int, rest string, tlsConf *tls.Config, o Options) (goredis.UniversalClient, error) {
	if strings.HasSuffix(u.Scheme, "sentinel") {
		addrs := strings.Split(u.Host, ",")
		for i, a := range addrs {
			addrs[i] = withPort(a, "26379")
			if h, _, _ := net.SplitHostPort(addrs[i]); h == "" {
				return nil, fmt.Errorf("--redis %q: a Sentinel without a host: want redis-sentinel://HOST:PORT[,HOST:PORT...]/MASTER[/DB]", redact(o.URL))
			}
		}
		if rest == "" || u.Host == "" {
			return nil, fmt.Errorf("--redis %q: want redis-sentinel://HOST:PORT[,HOST:PORT...]/MASTER[/DB], naming at least one Sentinel", redact(o.URL))
		}
		if tlsConf != nil {
			tlsConf.ServerName = ""
		}
		return goredis.NewFailoverClient(&goredis.FailoverOptions{
			MasterName: rest, SentinelAddrs: addrs, DB: db,
			Username: u.User.Username(), Password: o.Password, SentinelPassword: o.Password,
			TLSConfig:   tlsConf,
			DialTimeout: 3 * time.Second, ReadTimeout: 5 * time.Second, WriteTimeout: 5 * time.Second,
			MaxRetries: 2,
		}), nil
	}
	if rest != "" {
		return nil, fmt.Errorf("--redis %q: want redis://HOST:PORT[/DB]", redact(o.URL))
	}
	if u.Hostname() == "" {
		return nil, fmt.Errorf("--redis %q: no host: want redis://HOST:PORT[/DB]", redact(o.URL))
	}
	host := withPort(u.Host, "6379")
	if tlsConf != nil {
		tlsConf.ServerName = u.Hostname()
	}
	return goredis.NewClient(&goredis.Options{
		Addr: host, DB: db, Username: u.User.Username(), Password: o.Password, TLSConfig: tlsConf,
		DialTimeout: 3 * time.Second, ReadTimeout: 5 * time.Second, WriteTimeout: 5 * time.Second,
		MaxRetries: 2,
	}), nil
}

// withPort is hostport with port added when it has none; an IPv6
// address comes bracketed ("[::1]") or not.
func withPort(hostport, port string) string {
	if _, _, err := net.SplitHostPort(hostport); err == nil {
		return hostport
	}
	return net.JoinHostPort(strings.TrimSuffix(strings.TrimPrefix(hostport, "["), "]"), port)
}

// tlsFor is the TLS configuration for a URL's scheme: nil for plain
// redis://, the --redis-ca roots for rediss://.
func tlsFor(scheme string, o Options) (*tls.Config, error) {
	switch scheme {
	case "rediss", "rediss-sentinel":
		conf := &tls.Config{MinVersion: tls.VersionTLS12}
		if o.CAFile != "" {
			pem, err := argfile.Read(o.CAFile, argfile.Bundle)
			if err != nil {
				return nil, fmt.Errorf("--redis-ca %s: %v", o.CAFile, err)
			}
			pool := x509.NewCertPool()
			if !pool.AppendCertsFromPEM(pem) {
				return nil, fmt.Errorf("--redis-ca %s: no PEM certificate in it", o.CAFile)
			}
			conf.RootCAs = pool
		}
		return conf, nil
	case "redis", "redis-sentinel":
		if o.CAFile != "" {
			return nil, fmt.Errorf("--redis-ca is for TLS: use rediss:// (or rediss-sentinel://)")
		}
		return nil, nil
	}
	return nil, fmt.Errorf("--redis %q: scheme %q: want redis://, rediss://, redis-sentinel:// or rediss-sentinel://", redact(o.URL), scheme)
}

// dbOf reads "/0" (or "/master/0" for Sentinel): the database number and
// the master name.
func dbOf(path string, sentinel bool) (db int, master string, err error) {
	parts := strings.Split(strings.TrimSuffix(strings.TrimPrefix(path, "/"), "/"), "/")
	if len(parts) == 1 && parts[0] == "" {
		parts = nil
	}
	if sentinel {
		if len(parts) == 0 {
			return 0, "", nil
		}
		master, parts = parts[0], parts[1:]
		if master == "" {
			return 0, "", fmt.Errorf("the master name is empty: want redis-sentinel://HOST:PORT/MASTER[/DB]")
		}
	}
	switch len(parts) {
	case 0:
		return 0, master, nil
	case 1:
		n, err := strconv.Atoi(parts[0])
		if err != nil || n < 0 {
			return 0, "", fmt.Errorf("database %q: want a number", parts[0])
		}
		return n, master, nil
	}
	return 0, "", fmt.Errorf("path %q: too many parts", path)
}

// redact is raw without the password a user may have put in it, even
// when raw does not parse: everything between "://" and the last "@"
// before the host goes.
func redact(raw string) string {
	u, err := url.Parse(raw)
	if err == nil {
		// Nothing after the path is kept: a query may hold a password.
		u.RawQuery, u.Fragment, u.RawFragment, u.ForceQuery = "", "", "", false
	}
	if err == nil && u.User == nil && (u.Host != "" || !strings.Contains(raw, "@")) {
		return u.String()
	}
	if err == nil && u.User != nil {
		u.User = url.User(u.User.Username())
		return u.String()
	}
	raw, _, _ = strings.Cut(raw, "?")
	raw, _, _ = strings.Cut(raw, "#")
	scheme, rest, ok := strings.Cut(raw, "://")
	if !ok {
		scheme, rest = "", raw
	}
	if at := strings.LastIndex(rest, "@"); at >= 0 {
		rest = "REDACTED@" + rest[at+1:]
	}
	if !ok {
		return rest
	}
	return scheme + "://" + rest
}

// Addr is the Redis URL without credentials, for messages.
func (s *Shared) Addr() string { return s.addr }

// Close closes the connection pool.
func (s *Shared) Close() error { return s.c.Close() }

// Client is the underlying client, for tests and tools.
func (s *Shared) Client() goredis.UniversalClient { return s.c }

func (s *Shared) k(parts ...string) string { return s.prefix + strings.Join(parts, ":") }

// unavailable marks connection failures; a script's own error (a bug, a
// refused write) is returned as it is.
func (s *Shared) unavailable(err error) error {
	if err == nil || errors.Is(err, goredis.Nil) {
		return err
	}
	var ne net.Error
	if errors.As(err, &ne) || errors.Is(err, context.DeadlineExceeded) || strings.Contains(err.Error(), "connection refused") ||
		strings.Contains(err.Error(), "i/o timeout") || errors.Is(err, goredis.ErrClosed) || strings.Contains(err.Error(), "EOF") ||
		strings.Contains(err.Error(), "no such host") || strings.Contains(err.Error(), "all sentinels") ||
		strings.Contains(err.Error(), "LOADING") || strings.Contains(err.Error(), "READONLY") || strings.Contains(err.Error(), "NOAUTH") ||
		strings.Contains(err.Error(), "WRONGPASS") || strings.Contains(err.Error(), "connection reset") {
		return &Unavailable{Addr: s.addr, Err: err}
	}
	return err
}

// Ping checks that Redis answers.
func (s *Shared) Ping(ctx context.Context) error { return s.unavailable(s.c.Ping(ctx).Err()) }
