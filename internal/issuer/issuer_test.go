package issuer

import (
	"context"
	"errors"
	"net"
	"strconv"
	"strings"
	"testing"

	"github.com/lbcert/lbcert/internal/acme"
	"github.com/lbcert/lbcert/internal/hint"
	"github.com/lbcert/lbcert/internal/store"
)

// With the CA down, the hint names the server that failed (a lineage's
// saved one), not --server, which renew does not use.
func TestCADownHintNamesTheServer(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	server := "https://" + ln.Addr().String() + "/dir"
	ln.Close() // nothing listens there now
	st := store.New(t.TempDir())
	is := &Issuer{Account: func(s, e string) (acme.Options, error) {
		return acme.Options{Server: s, Email: e, AgreeTOS: true, Store: st}, nil
	}}
	_, err = is.Client(context.Background(), server, "")
	if err == nil {
		t.Fatal("no error from a closed port")
	}
	if !errors.As(err, new(*AccountError)) {
		t.Fatalf("not an account error: %v", err)
	}
	if h := hint.Of(err); !strings.Contains(h, server) || strings.Contains(h, "--server and") {
		t.Fatalf("hint %q does not name %s", h, server)
	}
}

// One listener per port: ":P" and "127.0.0.1:P" are bound once, as a
// wildcard, and both challenge addresses get the same responder.
func TestBindAllOnePerPort(t *testing.T) {
	ln, _ := net.Listen("tcp", "127.0.0.1:0")
	port := ln.Addr().(*net.TCPAddr).Port
	ln.Close()
	is := &Issuer{}
	defer is.Close()
	a, b := ":"+itoa(port), "127.0.0.1:"+itoa(port)
	if errs := is.BindAll([]string{a, b}); len(errs) != 0 {
		t.Fatalf("bind: %v", errs)
	}
	ra, err1 := is.Responder(store.Challenge{Mode: "standalone", HTTPAddr: a})
	rb, err2 := is.Responder(store.Challenge{Mode: "standalone", HTTPAddr: b})
	if err1 != nil || err2 != nil || ra != rb {
		t.Fatalf("responders %p %p, %v %v", ra, rb, err1, err2)
	}
}

func itoa(n int) string { return strconv.Itoa(n) }

// After the CA lost an account that was registered (so its terms were
// accepted), the new registration needs no --agree-tos; an account
// never registered still does.
func TestReRegisterKeepsTheAcceptedTerms(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	server := "https://" + ln.Addr().String() + "/dir"
	ln.Close()
	st := store.New(t.TempDir())
	is := &Issuer{Account: func(s, e string) (acme.Options, error) {
		return acme.Options{Server: s, Email: e, Store: st}, nil // no --agree-tos
	}}
	if _, err := is.Client(context.Background(), server, "a@example.com"); err == nil || !strings.Contains(err.Error(), "terms of service") {
		t.Fatalf("never registered, no --agree-tos: want the terms refusal, got %v", err)
	}
	if err := st.WriteAccountKey(server, "a@example.com", []byte("key")); err != nil {
		t.Fatal(err)
	}
	if err := st.WriteAccount(server, "a@example.com", []byte(`{"uri":"https://ca/acct/1"}`)); err != nil {
		t.Fatal(err)
	}
	if err := is.ResetAccount(server, "a@example.com"); err != nil {
		t.Fatal(err)
	}
	if st.HasAccount(server, "a@example.com") {
		t.Fatal("the lost account is still saved")
	}
	_, err = is.Client(context.Background(), server, "a@example.com")
	if err == nil || strings.Contains(err.Error(), "terms of service") {
		t.Fatalf("re-registering a lost account asked about the terms again: %v", err)
	}
}

// Rows that share a webroot share one responder, and so its lock.
func TestOneResponderPerWebroot(t *testing.T) {
	is := &Issuer{}
	a, _ := is.Responder(store.Challenge{Mode: "webroot", Webroot: "/var/www/a"})
	b, _ := is.Responder(store.Challenge{Mode: "webroot", Webroot: "/var/www/a"})
	c, _ := is.Responder(store.Challenge{Mode: "webroot", Webroot: "/var/www/c"})
	if a != b || a == c {
		t.Fatalf("responders %p %p %p: want one per webroot", a, b, c)
	}
}
