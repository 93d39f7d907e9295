package fleet

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/lbcert/lbcert/internal/argfile"
	"github.com/lbcert/lbcert/internal/fleet/rdb"
	"github.com/lbcert/lbcert/internal/secret"
	"github.com/lbcert/lbcert/internal/store"
)

// LeaseTTLRange is what --lease-ttl takes.
const LeaseTTLRange = "1s to 24h"

// DefaultLeaseTTL is --lease-ttl's default.
const DefaultLeaseTTL = 10 * time.Minute

// Settings are the fleet flags as a command was given them (README "A
// pool of load balancers"). The password is not among them: it comes
// from LBCERT_REDIS_PASSWORD or --redis-password-file, never argv.
type Settings struct {
	Redis        string
	PasswordFile string
	CA           string
	LeaseTTL     time.Duration
	LedgerCap    int
	NoOrder      bool
}

// CheckURL refuses a --redis URL that is no URL or holds a secret, for
// every command, before any writes it into a cron line or a unit.
func (s Settings) CheckURL() error {
	if s.Redis == "" {
		return nil
	}
	return rdb.CheckURL(s.Redis)
}

// Dial checks the settings and connects to the fleet's Redis; password
// is LBCERT_REDIS_PASSWORD's value, which --redis-password-file replaces.
// A Redis that does not answer is an *rdb.Unavailable.
func (s Settings) Dial(ctx context.Context, password string) (*rdb.Shared, error) {
	if s.Redis == "" {
		return nil, fmt.Errorf("fleet commands need --redis (or LBCERT_REDIS, or 'redis' in the config file)")
	}
	if s.PasswordFile != "" {
		data, err := argfile.Read(s.PasswordFile, argfile.Secret)
		if err != nil {
			return nil, fmt.Errorf("--redis-password-file %s: %w", s.PasswordFile, err)
		}
		password = strings.TrimSpace(string(data))
	}
	secret.Add(password)
	if s.LedgerCap < 1 || s.LedgerCap > 4 {
		return nil, fmt.Errorf("--ledger-cap %d: want 1 to 4, below the CA's 5 per week", s.LedgerCap)
	}
	if s.LeaseTTL < time.Second || s.LeaseTTL > 24*time.Hour {
		return nil, fmt.Errorf("--lease-ttl %s: want %s (a node that stalls keeps a name this long before another may order it)", s.LeaseTTL, LeaseTTLRange)
	}
	dctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	return rdb.Dial(dctx, rdb.Options{URL: s.Redis, Password: password, CAFile: s.CA})
}

// Conn is one command's open fleet: the connection and this node.
type Conn struct {
	Shared *rdb.Shared
	Node   *Node
}

// Connect dials and opens this node (st) in the fleet.
func (s Settings) Connect(ctx context.Context, password string, st *store.Store) (*Conn, error) {
	sh, err := s.Dial(ctx, password)
	if err != nil {
		return nil, err
	}
	n, err := Open(ctx, sh, st)
	if err != nil {
		sh.Close()
		return nil, err
	}
	return &Conn{Shared: sh, Node: n}, nil
}

// Close closes the connection; a nil Conn is fine.
func (c *Conn) Close() {
	if c != nil {
		c.Shared.Close()
	}
}

// AdvertiseAddr is where peers reach an agent listening on httpAddr:
// advertise when given, else httpAddr, which then needs a host part.
func AdvertiseAddr(httpAddr, advertise string) (string, error) {
	if httpAddr == "" {
		return "", fmt.Errorf("--http-addr is required: where this node's agent listens, such as 127.0.0.1:8888")
	}
	if advertise != "" {
		return advertise, nil
	}
	host, _, err := net.SplitHostPort(httpAddr)
	if err != nil {
		return "", fmt.Errorf("--http-addr %q: %w", httpAddr, err)
	}
	if host == "" || host == "0.0.0.0" || host == "::" {
		return "", ErrAdvertise
	}
	return httpAddr, nil
}

// Connector is an agent's Connect: it opens the fleet on the agent's
// connect goroutine, which may still be dialling when Run returns, so
// the connection it opened is closed by Close, or by itself when the
// agent is already gone.
type Connector struct {
	Open      func(ctx context.Context) (*Conn, error)
	Connected func(*Node) // told once the fleet is open

	mu   sync.Mutex
	conn *Conn
	done bool
}

// Connect is for Agent.Connect.
func (c *Connector) Connect(ctx context.Context) (*Node, error) {
	opened, err := c.Open(ctx)
	if err != nil {
		return nil, err // the agent retries a *rdb.Unavailable
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.done {
		opened.Close()
		return nil, context.Canceled
	}
	c.conn = opened
	if c.Connected != nil {
		c.Connected(opened.Node)
	}
	return opened.Node, nil
}

// Close closes what Connect opened, and any connection it opens later.
func (c *Connector) Close() {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.done = true
	c.conn.Close()
}

// Args are the fleet flags a unit or cron line must repeat for its run to
// be in the same fleet, with paths made absolute by abs: never a password
// (the run reads it from --redis-password-file, LBCERT_REDIS_PASSWORD or
// the config file).
func (s Settings) Args(abs func(string) string) []string {
	var args []string
	if s.Redis != "" {
		args = append(args, "--redis", s.Redis)
	}
	if s.CA != "" {
		args = append(args, "--redis-ca", abs(s.CA))
	}
	if s.PasswordFile != "" {
		args = append(args, "--redis-password-file", abs(s.PasswordFile))
	}
	if s.Redis == "" {
		return args
	}
	// The node's part in the fleet goes with it: a node set never to
	// order must not start ordering from cron.
	if s.NoOrder {
		args = append(args, "--no-order")
	}
	if s.LedgerCap != DefaultLedgerCap {
		args = append(args, "--ledger-cap", strconv.Itoa(s.LedgerCap))
	}
	if s.LeaseTTL != DefaultLeaseTTL {
		args = append(args, "--lease-ttl", s.LeaseTTL.String())
	}
	return args
}

// Locked runs f with the fleet's Redis, under st's short write lock,
// waited for up to wait: a fleet command (init, join, approve, remove)
// changes only this node's fleet records, and must not wait for, or
// fail on, a long run of this node, which holds the long lock.
func (s Settings) Locked(ctx context.Context, password string, st *store.Store, wait time.Duration, f func(*rdb.Shared) error) error {
	_, statErr := os.Stat(st.Dir)
	err := s.locked(ctx, password, st, wait, f)
	if err != nil && errors.Is(statErr, os.ErrNotExist) {
		// A refused command leaves no state directory it made for
		// nothing: one that holds only the lock file.
		if entries, _ := os.ReadDir(st.Dir); len(entries) == 1 && entries[0].Name() == store.WriteLockFile {
			os.RemoveAll(st.Dir)
		}
	}
	return err
}

func (s Settings) locked(ctx context.Context, password string, st *store.Store, wait time.Duration, f func(*rdb.Shared) error) error {
	sh, err := s.Dial(ctx, password)
	if err != nil {
		return err
	}
	defer sh.Close()
	wctx, cancel := context.WithTimeout(ctx, max(wait, time.Second))
	defer cancel()
	l, err := st.WriteLock(wctx)
	if errors.Is(err, store.ErrLocked) {
		return fmt.Errorf("%w; waited %s", err, wait)
	}
	if err != nil {
		return store.DirError(err)
	}
	defer l.Unlock()
	return f(sh)
}
