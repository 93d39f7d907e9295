package names

import (
	"fmt"
	"strings"
	"testing"
)

func TestDomain(t *testing.T) {
	long63 := strings.Repeat("a", 63)
	tests := []struct {
		in, want, err string
	}{
		{in: "Example.COM", want: "example.com"},
		{in: "example.com.", want: "example.com"},
		{in: " www.example.com ", want: "www.example.com"},
		{in: "bücher.example", want: "xn--bcher-kva.example"},
		{in: "xn--bcher-kva.example", want: "xn--bcher-kva.example"},
		{in: "a-b.example", want: "a-b.example"},
		{in: long63 + ".example", want: long63 + ".example"},
		{in: "", err: "empty name"},
		{in: "*.example.com", err: "wildcard"},
		{in: "foo.*.example.com", err: "wildcard"},
		// RFC 8738 addresses, canonical, and the forms that are refused.
		{in: "192.0.2.1", want: "192.0.2.1"},
		{in: "127.0.0.1.", want: "127.0.0.1"},
		{in: "2001:DB8:0:0::1", want: "2001:db8::1"},
		{in: "[::1]", want: "::1"},
		{in: "127.000.000.001", err: "leading zero"},
		{in: "10.0.0.0/8", err: "an address range"},
		{in: "2001:db8::/32", err: "an address range"},
		{in: "fe80::1%eth0", err: "an IPv6 zone"},
		{in: "::ffff:192.0.2.1", err: "give it as 192.0.2.1"},
		{in: "0.0.0.0", err: "not an address a client connects to"},
		{in: "::", err: "not an address a client connects to"},
		{in: "224.0.0.1", err: "not an address a client connects to"},
		{in: "192.0.2", err: "not a valid IP address"},
		{in: "1.2.3.4.5", err: "not a valid IP address"},
		{in: "a..example", err: "empty label"},
		{in: ".example.com", err: "empty label"},
		{in: "example.com..", err: "empty label"},
		{in: "a" + long63 + ".example", err: "longer than 63"},
		{in: strings.Repeat("abcdefghi.", 25) + "example", err: "longer than the 253"},
		{in: "under_score.example", err: `character '_' is not allowed`},
		{in: "sp ace.example", err: `character ' ' is not allowed`},
		{in: "-lead.example", err: "starts or ends with a hyphen"},
		{in: "trail-.example", err: "starts or ends with a hyphen"},
		{in: "../etc/passwd", err: "path separator"},
		{in: `a\b.example`, err: "path separator"},
		{in: "ex$mple.com", err: `character '$'`},
		// What people paste: a URL, a name or an address with a port.
		{in: "https://bar.example.com/", err: "looks like a URL; give the name alone: -d bar.example.com"},
		{in: "http://bar.example.com:8080/x", err: "looks like a URL; give the name alone: -d bar.example.com"},
		{in: "https://[2001:db8::1]/", err: "looks like a URL; give the name alone: -d 2001:db8::1"},
		{in: "bar.example.com:443", err: "has a port; give the name alone, -d bar.example.com"},
		{in: "192.0.2.1:80", err: "has a port; give the name alone, -d 192.0.2.1"},
		{in: "[2001:db8::1]:443", err: "has a port; give the name alone, -d 2001:db8::1"},
	}
	for _, tt := range tests {
		got, err := Domain(tt.in)
		if tt.err != "" {
			if err == nil || !strings.Contains(err.Error(), tt.err) {
				t.Errorf("Domain(%q) = %q, %v; want error containing %q", tt.in, got, err, tt.err)
			}
			if err != nil && strings.Contains(err.Error(), "\n") {
				t.Errorf("Domain(%q): error is not one line: %q", tt.in, err)
			}
			continue
		}
		if err != nil || got != tt.want {
			t.Errorf("Domain(%q) = %q, %v; want %q", tt.in, got, err, tt.want)
		}
	}
}

func TestDomainsDedupesInOrder(t *testing.T) {
	got, err := Domains([]string{"B.example", "a.example", "b.example.", "A.EXAMPLE"})
	if err != nil {
		t.Fatal(err)
	}
	if strings.Join(got, ",") != "b.example,a.example" {
		t.Fatalf("got %v", got)
	}
	if _, err := Domains(nil); err == nil {
		t.Fatal("no domains: want error")
	}
}

func TestLineage(t *testing.T) {
	ok := []string{"example.com", "shop_1", "A-b.c"}
	bad := map[string]string{
		"":                       "empty",
		"../x":                   "path separator",
		"a/b":                    "path separator",
		`a\b`:                    "path separator",
		"..":                     "start with a dot",
		".hidden":                "start with a dot",
		"sp ace":                 "not allowed",
		"x\x00y":                 "not allowed",
		strings.Repeat("a", 201): "longer than",
		"naïve":                  "not allowed",
	}
	for _, n := range ok {
		if err := Lineage(n); err != nil {
			t.Errorf("Lineage(%q) = %v", n, err)
		}
	}
	for n, want := range bad {
		if err := Lineage(n); err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("Lineage(%q) = %v, want error containing %q", n, err, want)
		}
	}
}

// FuzzDomain checks that whatever Domain accepts is a safe, normalised
// ASCII name that is stable under a second pass, and that it never panics.
func FuzzDomain(f *testing.F) {
	for _, s := range []string{"example.com", "*.x", "bücher.de", "a..b", "1.2.3.4", "xn--", "-a.b", "A.B."} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, in string) {
		out, err := Domain(in)
		if err != nil {
			if strings.Contains(err.Error(), "\n") {
				t.Fatalf("multi-line error for %q", in)
			}
			return
		}
		if len(out) > maxName || out != strings.ToLower(out) || strings.ContainsAny(out, "/\\*_ ") {
			t.Fatalf("Domain(%q) = %q: not a safe normalised name", in, out)
		}
		again, err := Domain(out)
		if err != nil || again != out {
			t.Fatalf("Domain(%q) = %q, but Domain(%q) = %q, %v", in, out, out, again, err)
		}
	})
}

// Names the CA or Let's Encrypt would refuse are refused here, before
// anything is sent; bad values are quoted short.
func TestRefusedBeforeTheCA(t *testing.T) {
	for _, c := range []struct{ in, want string }{
		{"xn--zz.example.com", "not valid IDNA 2008"},
		{"💩.example.com", "is a symbol"},
		{"127.000.000.001", "not a valid IP address: a leading zero"},
		{"a.127.000.000.001", "last label is all digits"},
		{"www.example.123", "last label is all digits"},
	} {
		if _, err := Domain(c.in); err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("Domain(%q) = %v, want an error with %q", c.in, err, c.want)
		}
	}
	for _, ok := range []string{"bücher.example", "xn--bcher-kva.example", "3com.example", "example.com"} {
		if _, err := Domain(ok); err != nil {
			t.Errorf("Domain(%q): %v", ok, err)
		}
	}
	var many []string
	for i := range 101 {
		many = append(many, fmt.Sprintf("n%d.example.com", i))
	}
	if _, err := Domains(many); err == nil || !strings.Contains(err.Error(), "101 names in one certificate: the CA allows at most 100") {
		t.Errorf("101 names: %v", err)
	}
	if _, err := Domains(many[:100]); err != nil {
		t.Errorf("100 names: %v", err)
	}
	huge := strings.Repeat("a", 10<<20) + ".example.com"
	_, err := Domain(huge)
	if err == nil || len(err.Error()) > 300 || !strings.Contains(err.Error(), "…") {
		t.Errorf("a 10 MB name gave a %d-byte error", len(fmt.Sprint(err)))
	}
}

func TestLineageFor(t *testing.T) {
	for in, want := range map[string]string{"example.com": "example.com", "192.0.2.1": "192.0.2.1", "2001:db8::1": "2001-db8--1", "::1": "--1"} {
		if got := LineageFor(in); got != want || Lineage(got) != nil {
			t.Errorf("LineageFor(%q) = %q (%v), want %q", in, got, Lineage(got), want)
		}
	}
	if !IsAddress("2001:db8::1") || !IsAddress("127.0.0.1") || IsAddress("example.com") {
		t.Fatal("IsAddress")
	}
}
