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
	tokens map[string]map[string]string // host -> token -> key authorization
}

// CheckAddr checks a listen address offline: host:port (the host may be
// empty), a port of 1-65535.
func CheckAddr(addr string) error {
	_, port, err := net.SplitHostPort(addr)
	n, perr := strconv.Atoi(port)
	if err != nil || perr != nil || n < 0 || n > 65535 {
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
	s := &Standalone{Addr: ln.Addr().String(), ln: ln, tokens: map[string]map[string]string{}}
	s.srv = &http.Server{
		Handler:           s,
		ReadHeaderTimeout: 10 * time.Second,
		ErrorLog:          slog.NewLogLogger(slog.Default().Handler(), slog.LevelDebug),
	}
	go s.srv.Serve(ln)
	return s, nil
}

// ListenAddr is where the listener is bound, for hints that must name it.
func (s *Standalone) ListenAddr() string { return s.Addr }

// Close stops the listener and waits briefly for requests in flight.
func (s *Standalone) Close() error {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	return s.srv.Shutdown(ctx)
}

// Present registers the key authorization for token on domain.
func (s *Standalone) Present(domain, token, keyAuth string) error {
	if err := checkToken(token); err != nil {
		return err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	host := hostOnly(domain)
	if s.tokens[host] == nil {
		s.tokens[host] = map[string]string{}
	}
	s.tokens[host][token] = keyAuth
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
	keyAuth, found := s.tokens[host][token]
	s.mu.RUnlock()
	if !found {
		slog.Debug("http-01: no token for request", "host", host, "path", r.URL.Path, "from", r.RemoteAddr)
		http.NotFound(w, r)
		return
	}
	slog.Debug("http-01: served token", "host", host, "from", r.RemoteAddr)
	w.Header().Set("Content-Type", "application/octet-stream")
	w.Write([]byte(keyAuth))
}
