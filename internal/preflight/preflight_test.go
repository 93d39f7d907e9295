package preflight

import (
	"context"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"strconv"
	"strings"
	"testing"

	"github.com/miekg/dns"

	"github.com/lbcert/lbcert/internal/challenge"
	"github.com/lbcert/lbcert/internal/hint"
)

func listen(t *testing.T) (*challenge.Standalone, int) {
	t.Helper()
	l, err := challenge.Listen("127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	_, p, _ := net.SplitHostPort(l.Addr)
	port, _ := strconv.Atoi(p)
	return l, port
}

// TestHTTPRoute: the token put on the responder comes back through the
// port the CA will use; a responder that is not behind that port fails
// with a hint, and the token is gone afterwards.
func TestHTTPRoute(t *testing.T) {
	ctx := context.Background()
	good, port := listen(t)
	other, _ := listen(t)
	c := &Checker{HTTPPort: port}
	if err := c.HTTP(ctx, "localhost", good); err != nil {
		t.Fatalf("route to the listener: %v", err)
	}
	err := c.HTTP(ctx, "localhost", other)
	if err == nil || !strings.Contains(err.Error(), "404 Not Found") || !strings.Contains(hint.Of(err), "path_beg /.well-known/acme-challenge/") {
		t.Fatalf("route to another listener: %v (hint %q)", err, hint.Of(err))
	}
	closed := &Checker{HTTPPort: 1}
	if err := closed.HTTP(ctx, "localhost", good); err == nil || !strings.Contains(err.Error(), "refused") {
		t.Fatalf("nothing listening: %v", err)
	}
}

func TestDNS(t *testing.T) {
	ctx := context.Background()
	loop := []netip.Addr{netip.MustParseAddr("127.0.0.1"), netip.MustParseAddr("::1")}
	if err := (&Checker{ExpectIPs: loop}).DNS(ctx, "localhost"); err != nil {
		t.Fatalf("localhost to loopback: %v", err)
	}
	err := (&Checker{ExpectIPs: []netip.Addr{netip.MustParseAddr("192.0.2.10")}}).DNS(ctx, "localhost")
	if err == nil || !strings.Contains(err.Error(), "which is not --expect-ip") || !strings.Contains(hint.Of(err), "nothing was sent to the CA") {
		t.Fatalf("wrong address: %v", err)
	}
	if (&Checker{}).DNSEnabled() {
		t.Fatal("DNS check on without expectations")
	}
}

// Each cause gets its own message and hint: a name with no address (and
// the resolver asked), nothing answering where it points (that address
// and lbcert's own listener), and a 403 (permissions).
func TestHTTPCauses(t *testing.T) {
	ctx := context.Background()
	// A loopback DNS server that knows no names: every query is NXDOMAIN.
	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &dns.Server{PacketConn: pc, Handler: dns.HandlerFunc(func(w dns.ResponseWriter, r *dns.Msg) {
		m := new(dns.Msg)
		m.SetRcode(r, dns.RcodeNameError)
		w.WriteMsg(m)
	})}
	go srv.ActivateAndServe()
	defer srv.Shutdown()
	l, _ := listen(t)

	c := &Checker{HTTPPort: 80, Resolver: pc.LocalAddr().String()}
	err = c.HTTP(ctx, "nxdomain.example.com", l)
	if err == nil || !strings.Contains(err.Error(), "pre-flight DNS nxdomain.example.com") ||
		!strings.Contains(hint.Of(err), "add an A or AAAA record") || !strings.Contains(hint.Of(err), pc.LocalAddr().String()) ||
		strings.Contains(hint.Of(err), "path_beg") {
		t.Fatalf("no address: %v (hint %q)", err, hint.Of(err))
	}

	closed, _ := net.Listen("tcp", "127.0.0.1:0")
	port := closed.Addr().(*net.TCPAddr).Port
	closed.Close()
	c = &Checker{HTTPPort: port}
	err = c.HTTP(ctx, "localhost", l)
	if err == nil || !strings.Contains(hint.Of(err), "127.0.0.1:"+strconv.Itoa(port)) || !strings.Contains(hint.Of(err), "--http-addr "+l.Addr) {
		t.Fatalf("refused: %v (hint %q)", err, hint.Of(err))
	}

	forbidden := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { w.WriteHeader(http.StatusForbidden) }))
	defer forbidden.Close()
	_, fp, _ := net.SplitHostPort(strings.TrimPrefix(forbidden.URL, "http://"))
	fport, _ := strconv.Atoi(fp)
	c = &Checker{HTTPPort: fport}
	err = c.HTTP(ctx, "localhost", l)
	if err == nil || !strings.Contains(err.Error(), "403") || !strings.Contains(hint.Of(err), "permissions") {
		t.Fatalf("403: %v (hint %q)", err, hint.Of(err))
	}
}

// An address needs no DNS: with --expect-ip set to something else, the
// DNS step is skipped for it (a literal resolves to itself), and the
// route is still fetched through the address.
func TestAddressSkipsDNS(t *testing.T) {
	ctx := context.Background()
	good, port := listen(t)
	c := &Checker{HTTPPort: port, ExpectIPs: []netip.Addr{netip.MustParseAddr("192.0.2.10")}, Resolver: "127.0.0.1:1"}
	if err := c.Check(ctx, []string{"127.0.0.1"}, good); err != nil {
		t.Fatalf("address: %v", err)
	}
	other, _ := listen(t)
	if err := c.Check(ctx, []string{"127.0.0.1"}, other); err == nil || !strings.Contains(err.Error(), "GET http://127.0.0.1:") {
		t.Fatalf("the route was not fetched through the address: %v", err)
	}
}
