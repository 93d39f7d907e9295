package challenge

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// Standalone is lbcert's own HTTP-01 responder. It answers
// GET /.well-known/acme-challenge/<token> only for a token presented for
// the name in the Host header, and 404 for anything else, so that behind
// an HAProxy ACL (seed 004) it never becomes an open web server.
type Standalone struct {
	Addr string

	ln  net.Listener
	srv *http.Server

	mu     sync.RWMutex
	tokens map[string]map[string]*token // host -> token

	connMu sync.Mutex
	unused map[net.Conn]bool // connected, no whole request header read yet
}

// token is one presented token: its key authorization, and a channel
// closed when it has been served (Fetched).
type token struct {
	keyAuth string
	fetched chan struct{}
	once    sync.Once
}

// CheckAddr checks a listen address offline: host:port (the host may be
// empty), a port of 1-65535. Port 0 is refused too: the kernel would
// pick a random port, where the CA's validation never connects.
func CheckAddr(addr string) error {
	_, port, err := net.SplitHostPort(addr)
	n, perr := strconv.Atoi(port)
	if err != nil || perr != nil || n < 1 || n > 65535 {
		return fmt.Errorf("--http-addr %q: want [host]:port with a port of 1-65535, like :80 or 127.0.0.1:8888", addr)
	}
	return nil
}

// Probe binds addr and lets it go: a command calls it before it writes
// anything, so that a port in use is bad input like any other (the
// listener itself is bound later, inside the run's lock).
func Probe(addr string) error {
	ln, err := listen(addr)
	if err != nil {
		return err
	}
	return ln.Close()
}

func listen(addr string) (net.Listener, error) {
	ln, err := net.Listen("tcp", addr)
	switch {
	case err == nil:
		return ln, nil
	case errors.Is(err, syscall.EADDRINUSE):
		return nil, fmt.Errorf("--http-addr %s is already in use: stop what listens there, or pick another address", addr)
	case errors.Is(err, syscall.EACCES):
		return nil, fmt.Errorf("--http-addr %s: permission denied (ports below 1024 need root)", addr)
	}
	return nil, fmt.Errorf("--http-addr %s: %v", addr, err)
}

// Listen binds addr now, so that "address already in use" is reported
// before any request to the CA and the port cannot be taken in between.
func Listen(addr string) (*Standalone, error) {
	ln, err := listen(addr)
	if err != nil {
		return nil, err
	}
	s := &Standalone{Addr: ln.Addr().String(), ln: ln, tokens: map[string]map[string]*token{}}
	s.srv = &http.Server{
		Handler:           s,
		ReadHeaderTimeout: 10 * time.Second,
		ErrorLog:          slog.NewLogLogger(slog.Default().Handler(), slog.LevelDebug),
		ConnState:         s.track,
	}
	go s.srv.Serve(ln)
	return s, nil
}

// ListenAddr is where the listener is bound, for hints that must name it.
func (s *Standalone) ListenAddr() string { return s.Addr }

// Close stops the listener and waits briefly for requests in flight.
// Connections that have not sent a whole request header are closed at
// once (net/http calls them new until then): an HTTP client (the CA's)
// may dial one more connection than it ends up using, and Shutdown would
// wait its whole two seconds for it. Close comes at the end of a run,
// once every order is done, so no request on such a connection could be
// for a token anyone still waits on.
func (s *Standalone) Close() error {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	s.connMu.Lock()
	for c := range s.unused {
		c.Close()
	}
	s.connMu.Unlock()
	return s.srv.Shutdown(ctx)
}

// track keeps the connections that have not sent a whole request
// header yet.
func (s *Standalone) track(c net.Conn, state http.ConnState) {
	s.connMu.Lock()
	defer s.connMu.Unlock()
	if state == http.StateNew {
		if s.unused == nil {
			s.unused = map[net.Conn]bool{}
		}
		s.unused[c] = true
		return
	}
	delete(s.unused, c)
}

// Present registers the key authorization for token on domain.
func (s *Standalone) Present(domain, tok, keyAuth string) error {
	if err := checkToken(tok); err != nil {
		return err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	host := hostOnly(domain)
	if s.tokens[host] == nil {
		s.tokens[host] = map[string]*token{}
	}
	s.tokens[host][tok] = &token{keyAuth: keyAuth, fetched: make(chan struct{})}
	return nil
}

// Fetched returns a channel closed once the listener has served token
// for domain (to the CA, presumably: lbcert's own pre-flight fetches a
// token of its own), or nil when token is not presented. The order
// polls its authorization then, not before (RFC 8555 section 7.5.1).
func (s *Standalone) Fetched(domain, tok string) <-chan struct{} {
	s.mu.RLock()
	defer s.mu.RUnlock()
	if t := s.tokens[hostOnly(domain)][tok]; t != nil {
		return t.fetched
	}
	return nil
}

// CleanUp forgets token.
func (s *Standalone) CleanUp(domain, token, keyAuth string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	host := hostOnly(domain)
	delete(s.tokens[host], token)
	if len(s.tokens[host]) == 0 {
		delete(s.tokens, host)
	}
	return nil
}

// ServeHTTP implements http.Handler.
func (s *Standalone) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	token, ok := strings.CutPrefix(r.URL.Path, PathPrefix)
	if !ok || (r.Method != http.MethodGet && r.Method != http.MethodHead) || strings.Contains(token, "/") {
		http.NotFound(w, r)
		return
	}
	host := hostOnly(r.Host)
	s.mu.RLock()
	t, found := s.tokens[host][token]
	s.mu.RUnlock()
	if !found {
		slog.Debug("http-01: no token for request", "host", host, "path", r.URL.Path, "from", r.RemoteAddr)
		http.NotFound(w, r)
		return
	}
	slog.Debug("http-01: served token", "host", host, "from", r.RemoteAddr)
	w.Header().Set("Content-Type", "application/octet-stream")
	t.once.Do(func() { close(t.fetched) }) // before the answer: the client has it once the CA does
	w.Write([]byte(t.keyAuth))
}
