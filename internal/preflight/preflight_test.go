package preflight

import (
	"context"
	"net"
	"net/netip"
	"strconv"
	"strings"
	"testing"

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
