package challenge

import (
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

func get(t *testing.T, addr, host, path string) (int, string) {
	t.Helper()
	req, _ := http.NewRequest("GET", "http://"+addr+path, nil)
	req.Host = host
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

func TestStandaloneAnswersOnlyPresentedTokens(t *testing.T) {
	s, err := Listen("127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if err := s.Present("shop.example.net", "tok_1-A", "tok_1-A.thumb"); err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		host, path string
		code       int
		body       string
	}{
		{"shop.example.net", "/.well-known/acme-challenge/tok_1-A", 200, "tok_1-A.thumb"},
		{"SHOP.example.net.:8888", "/.well-known/acme-challenge/tok_1-A", 200, "tok_1-A.thumb"},
		{"other.example.net", "/.well-known/acme-challenge/tok_1-A", 404, ""},
		{"shop.example.net", "/.well-known/acme-challenge/nope", 404, ""},
		{"shop.example.net", "/", 404, ""},
		{"shop.example.net", "/index.html", 404, ""},
		{"shop.example.net", "/.well-known/acme-challenge/tok_1-A/x", 404, ""},
	}
	for _, c := range cases {
		code, body := get(t, s.Addr, c.host, c.path)
		if code != c.code || (c.body != "" && body != c.body) {
			t.Errorf("GET %s %s = %d %q, want %d %q", c.host, c.path, code, body, c.code, c.body)
		}
	}
	s.CleanUp("shop.example.net", "tok_1-A", "")
	if code, _ := get(t, s.Addr, "shop.example.net", "/.well-known/acme-challenge/tok_1-A"); code != 404 {
		t.Errorf("after CleanUp: %d", code)
	}
	if err := s.Present("x.test", "../../etc", "k"); err == nil {
		t.Error("path-like token accepted")
	}
}

// TestStandaloneFetched: the fetch signal of a token closes when that
// token is served, not at another token's fetch (lbcert's pre-flight
// fetches a token of its own) nor at a 404; an unknown token has none.
func TestStandaloneFetched(t *testing.T) {
	s, err := Listen("127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	s.Present("shop.example.net", "acme-tok", "acme-tok.thumb")
	s.Present("shop.example.net", "preflight-tok", "preflight-tok.x")
	fetched := s.Fetched("SHOP.example.net", "acme-tok")
	if fetched == nil || s.Fetched("shop.example.net", "nope") != nil {
		t.Fatal("Fetched: want a channel for a presented token and nil for another")
	}
	closed := func() bool {
		select {
		case <-fetched:
			return true
		default:
			return false
		}
	}
	get(t, s.Addr, "shop.example.net", "/.well-known/acme-challenge/preflight-tok")
	get(t, s.Addr, "other.example.net", "/.well-known/acme-challenge/acme-tok")
	if closed() {
		t.Fatal("closed by another token's fetch, or by a 404")
	}
	for range 2 { // fetched from several places, as a CA does
		if code, _ := get(t, s.Addr, "shop.example.net", "/.well-known/acme-challenge/acme-tok"); code != 200 {
			t.Fatalf("GET: %d", code)
		}
	}
	if !closed() {
		t.Fatal("not closed after the token was served")
	}
}

func TestListenInUse(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	_, err = Listen(ln.Addr().String())
	if err == nil || !strings.Contains(err.Error(), "already in use") {
		t.Fatalf("Listen on busy port = %v", err)
	}
}

func TestWebrootPresentCleanUp(t *testing.T) {
	root := t.TempDir()
	w := &Webroot{Root: root}
	if err := w.Present("a.test", "tok", "tok.key"); err != nil {
		t.Fatal(err)
	}
	p := filepath.Join(root, ".well-known", "acme-challenge", "tok")
	got, err := os.ReadFile(p)
	fi, _ := os.Stat(p)
	if err != nil || string(got) != "tok.key" || fi.Mode().Perm() != 0o644 {
		t.Fatalf("token file: %q %v %v", got, err, fi.Mode())
	}
	if err := w.CleanUp("a.test", "tok", "tok.key"); err != nil {
		t.Fatal(err)
	}
	entries, _ := os.ReadDir(root)
	if len(entries) != 0 {
		t.Fatalf("webroot not left as found: %v", entries)
	}
	// An existing .well-known that we did not create stays.
	os.MkdirAll(filepath.Join(root, ".well-known"), 0o755)
	w.Present("a.test", "tok", "k")
	w.CleanUp("a.test", "tok", "k")
	if _, err := os.Stat(filepath.Join(root, ".well-known")); err != nil {
		t.Fatalf("removed a directory it did not create: %v", err)
	}
	if err := w.Present("a.test", "a/../../b", "k"); err == nil {
		t.Fatal("path-like token accepted")
	}
}

func TestCheckWebroot(t *testing.T) {
	dir := t.TempDir()
	file := filepath.Join(dir, "f")
	os.WriteFile(file, nil, 0o644)
	for path, want := range map[string]string{
		filepath.Join(dir, "missing"): "does not exist",
		file:                          "not a directory",
		"":                            "empty",
	} {
		if err := CheckWebroot(path); err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("CheckWebroot(%q) = %v, want %q", path, err, want)
		}
	}
	if err := CheckWebroot(dir); err != nil {
		t.Fatal(err)
	}
	entries, _ := os.ReadDir(dir)
	if len(entries) != 1 {
		t.Fatalf("CheckWebroot left files: %v", entries)
	}
}

// Under umask 077 the directories and token files lbcert creates in a
// webroot are still readable by the web server (0755, 0644), and a
// webroot the web server cannot read is refused before the CA is asked.
func TestWebrootUnderUmask077(t *testing.T) {
	old := syscall.Umask(0o077)
	defer syscall.Umask(old)
	root := t.TempDir()
	os.Chmod(root, 0o755)
	w := &Webroot{Root: root}
	token := "abcDEF-123_xyz"
	if err := w.Present("a.example.com", token, "key-auth"); err != nil {
		t.Fatal(err)
	}
	for path, want := range map[string]os.FileMode{
		filepath.Join(root, ".well-known"):                          0o755,
		filepath.Join(root, ".well-known", "acme-challenge"):        0o755,
		filepath.Join(root, ".well-known", "acme-challenge", token): 0o644,
	} {
		fi, err := os.Stat(path)
		if err != nil || fi.Mode().Perm() != want {
			t.Errorf("%s: mode %v, want %04o (%v)", path, fi.Mode().Perm(), want, err)
		}
	}
	private := t.TempDir()
	os.Chmod(private, 0o700)
	if err := CheckWebroot(private); err == nil || !strings.Contains(err.Error(), "the web server cannot read it") {
		t.Fatalf("a 0700 webroot: %v", err)
	}
	os.Chmod(private, 0o750)
	if err := CheckWebroot(private); err != nil {
		t.Fatalf("a 0750 webroot (group may read): %v", err)
	}
}

// The responder finds a token by the Host the CA sends: a name or an
// RFC 8738 address, with or without a port, in any case or IPv6 form.
func TestHostOnly(t *testing.T) {
	for in, want := range map[string]string{
		"Shop.Example.net.:8888": "shop.example.net",
		"shop.example.net":       "shop.example.net",
		"127.0.0.1":              "127.0.0.1",
		"127.0.0.1:80":           "127.0.0.1",
		"2001:db8::1":            "2001:db8::1",
		"[2001:DB8::1]:80":       "2001:db8::1",
		"[2001:db8:0:0::1]":      "2001:db8::1",
		"[::1]:8888":             "::1",
	} {
		if got := hostOnly(in); got != want {
			t.Errorf("hostOnly(%q) = %q, want %q", in, got, want)
		}
	}
}

// Many tokens presented and cleaned up at once in one webroot: none is
// lost to another's clean-up removing the directory it is written to.
func TestWebrootConcurrent(t *testing.T) {
	w := &Webroot{Root: t.TempDir()}
	var wg sync.WaitGroup
	errs := make(chan error, 400)
	for i := range 200 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			tok := fmt.Sprintf("tok%d", i)
			if err := w.Present("a.example.com", tok, "ka"); err != nil {
				errs <- err
				return
			}
			errs <- w.CleanUp("a.example.com", tok, "ka")
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
	if _, err := os.Stat(filepath.Join(w.Root, ".well-known")); !os.IsNotExist(err) {
		t.Fatalf("webroot not left as found: %v", err)
	}
}

// A listen address is checked before anything is written: its shape
// offline, and whether the port is free by binding it for a moment
// (issue #26 item 18).
func TestCheckAddrAndProbe(t *testing.T) {
	for _, bad := range []string{"127.0.0.1:99999", "127.0.0.1", ":-1", ":http", "a:b:c", ":0", "127.0.0.1:0"} {
		if err := CheckAddr(bad); err == nil || !strings.Contains(err.Error(), "--http-addr") {
			t.Errorf("CheckAddr(%q) = %v", bad, err)
		}
	}
	for _, good := range []string{":80", "127.0.0.1:8888", "[::1]:80"} {
		if err := CheckAddr(good); err != nil {
			t.Errorf("CheckAddr(%q) = %v", good, err)
		}
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	if err := Probe(ln.Addr().String()); err == nil || !strings.Contains(err.Error(), "already in use") {
		t.Fatalf("Probe of a busy port: %v", err)
	}
	free := ln.Addr().String()
	ln.Close()
	if err := Probe(free); err != nil {
		t.Fatalf("Probe of a free port: %v", err)
	}
}

// A connection that never sent a request (an HTTP client's spare dial)
// does not hold Close for Shutdown's whole timeout: Close closes it and
// Shutdown ends without its deadline.
func TestCloseDoesNotWaitForUnusedConnections(t *testing.T) {
	s, err := Listen("127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	spare, err := net.Dial("tcp", s.Addr)
	if err != nil {
		t.Fatal(err)
	}
	defer spare.Close()
	used, err := http.Get("http://" + s.Addr + "/.well-known/acme-challenge/x")
	if err != nil {
		t.Fatal(err)
	}
	used.Body.Close()
	for i := 0; i < 500; i++ { // the server has accepted the spare one
		s.connMu.Lock()
		n := len(s.unused)
		s.connMu.Unlock()
		if n > 0 {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	if err := s.Close(); err != nil {
		t.Fatalf("Close waited for a connection that never sent a request: %v", err)
	}
	spare.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := spare.Read(make([]byte, 1)); err == nil {
		t.Fatal("the unused connection is still open")
	}
}
