package batch

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"

	"github.com/lbcert/lbcert/internal/store"
)

var defaults = Defaults{HTTPAddr: "127.0.0.1:80", VIPHost: "127.0.0.1"}

func problems(r *Result) string {
	var b strings.Builder
	for _, p := range r.Problems {
		fmt.Fprintf(&b, "%d: %s\n", p.Line, p.Msg)
	}
	return b.String()
}

func TestSeedFormat(t *testing.T) {
	in := "\xEF\xBB\xBFDOMAIN,VIPPort,ACMEPort,FROMAddr,TOAddr,RELAYAddr,RELAYPort\r\n" +
		"foo.moo.com,443,8888,lb1@example.com,rob@example.com,mx.example.com,25\r\n" +
		"\r\n" +
		"# a comment line\r\n" +
		"\"Bar.Example.COM.\",8443,,,,,\r\n" +
		"baz.example.com\r\n" +
		"bad_name!.example.com,443,8888\r\n" +
		"port.example.com,70000\r\n" +
		"cols.example.com,1,2,a@b.c,d@e.f,g,3,extra\r\n" +
		"foo.moo.com,443\r\n" +
		"mail.example.com,,,not-an-address\r\n"
	r := Parse(strings.NewReader(in), defaults)
	if r.Format != Seed {
		t.Fatalf("format %s", r.Format)
	}
	want := map[int]string{
		7:  `"bad_name!.example.com"`,
		8:  `VIPPort "70000": want a port number 1-65535`,
		9:  "8 columns, want at most 7",
		10: "foo.moo.com is already in line 2",
		11: `FROMAddr "not-an-address" is not an email address`,
	}
	if len(r.Problems) != len(want) {
		t.Fatalf("problems:\n%s", problems(r))
	}
	for _, p := range r.Problems {
		if !strings.Contains(p.Msg, want[p.Line]) || want[p.Line] == "" {
			t.Errorf("line %d: %q, want it to say %q", p.Line, p.Msg, want[p.Line])
		}
	}
	if len(r.Rows) != 3 || r.Total != 8 {
		t.Fatalf("rows %+v total %d", r.Rows, r.Total)
	}
	foo := r.Rows[0]
	if foo.Line != 2 || foo.Name != "foo.moo.com" || foo.VerifyAddr != "127.0.0.1:443" ||
		foo.Challenge.Mode != "standalone" || foo.Challenge.HTTPAddr != "127.0.0.1:8888" ||
		foo.MailFrom != "lb1@example.com" || foo.MailTo[0] != "rob@example.com" || foo.SMTPHost != "mx.example.com" || foo.SMTPPort != 25 {
		t.Errorf("row 2: %+v", foo)
	}
	bar := r.Rows[1]
	if bar.Line != 5 || bar.Domains[0] != "bar.example.com" || bar.Challenge.Mode != "" || bar.VerifyAddr != "127.0.0.1:8443" {
		t.Errorf("row 5: %+v", bar)
	}
	if r.Rows[2].Line != 6 || r.Rows[2].Domains[0] != "baz.example.com" {
		t.Errorf("row 6: %+v", r.Rows[2])
	}
}

func TestSeedWithoutHeader(t *testing.T) {
	r := Parse(strings.NewReader("a.example.com,443,8888\nb.example.com,443,8888\n"), defaults)
	if r.Format != Seed || len(r.Rows) != 2 || len(r.Problems) != 0 || r.Rows[0].Line != 1 {
		t.Fatalf("%+v\n%s", r, problems(r))
	}
}

func TestNamedFormat(t *testing.T) {
	root := t.TempDir()
	d := defaults
	d.CheckWebroot = func(dir string) error {
		if _, err := os.Stat(dir); err != nil {
			return errors.New("webroot " + dir + " does not exist")
		}
		return nil
	}
	d.KeyTypeOK = func(s string) error {
		if s != "ec256" && s != "rsa2048" {
			return errors.New("bad key type")
		}
		return nil
	}
	in := "# exported from the customer database\n" +
		"Domains,name,challenge,webroot,http_addr,key_type,deploy,verify_addr,mail_to\n" +
		"\"shop.example.net www.shop.example.net\",shop,,," + ",rsa2048,nginx,127.0.0.1:443,\"a@example.net;b@example.net\"\n" +
		"blog.example.org,,webroot," + root + ",,,none,,\n" +
		"api.example.org,,standalone,,,,,,\n" +
		"x.example.org,,,," + "127.0.0.1:8888,,haproxy,,\n" +
		"missing.example.org,,webroot," + filepath.Join(root, "nope") + ",,,,,\n" +
		"k.example.org,,,,,dsa,,,\n" +
		"short.example.org,,,\n" +
		"dup.example.org,shop,,,,,,,\n" +
		"v.example.org,,,,,,,:443,\n" +
		"c.example.org,,carrier-pigeon,,,,,,\n"
	r := Parse(strings.NewReader(in), d)
	if r.Format != Named {
		t.Fatalf("format %s: %s", r.Format, problems(r))
	}
	want := map[int]string{
		7:  "does not exist",
		8:  "key_type: bad key type",
		9:  "wrong number of columns: want 9",
		10: "lineage shop is already line 3's",
		11: `verify_addr ":443"`,
		12: `challenge "carrier-pigeon"`,
	}
	if len(r.Problems) != len(want) {
		t.Fatalf("problems:\n%s", problems(r))
	}
	for _, p := range r.Problems {
		if want[p.Line] == "" || !strings.Contains(p.Msg, want[p.Line]) {
			t.Errorf("line %d: %q, want %q", p.Line, p.Msg, want[p.Line])
		}
	}
	if len(r.Rows) != 4 {
		t.Fatalf("rows: %+v", r.Rows)
	}
	shop := r.Rows[0]
	if shop.Line != 3 || shop.Name != "shop" || len(shop.Domains) != 2 || shop.KeyType != "rsa2048" || shop.Deploy != "nginx" ||
		shop.VerifyAddr != "127.0.0.1:443" || len(shop.MailTo) != 2 || shop.Challenge.Mode != "" {
		t.Errorf("shop: %+v", shop)
	}
	if b := r.Rows[1]; b.Challenge.Mode != "webroot" || b.Challenge.Webroot != root || b.Deploy != "none" {
		t.Errorf("blog: %+v", b)
	}
	if a := r.Rows[2]; a.Challenge.Mode != "standalone" || a.Challenge.HTTPAddr != "127.0.0.1:80" {
		t.Errorf("api: %+v", a)
	}
	if x := r.Rows[3]; x.Challenge.HTTPAddr != "127.0.0.1:8888" || x.Deploy != "haproxy" {
		t.Errorf("x: %+v", x)
	}
}

func TestNamedUnknownColumn(t *testing.T) {
	r := Parse(strings.NewReader("domains,domian_name\na.example.com,x\n"), defaults)
	if len(r.Rows) != 0 || len(r.Problems) != 1 || !strings.Contains(r.Problems[0].Msg, `unknown column "domian_name"`) || r.Problems[0].Line != 1 {
		t.Fatalf("%s", problems(r))
	}
}

// TestMalformed: whole-file problems get one message, never a panic.
func TestMalformed(t *testing.T) {
	for _, tc := range []struct{ name, in, want string }{
		{"empty", "", "no rows"},
		{"only comments", "# nothing\n\n   \n", "no rows"},
		{"header only", "DOMAIN,VIPPort\n", "header but no certificates"},
		{"utf16", "\xFF\xFEa\x00", "UTF-16"},
		{"latin1", "caf\xE9.example.com,443\n", "1: not UTF-8"},
		{"bad quote", "a.example.com,\"443\n", "unbalanced quotes"},
		{"bare quote", "a.exa\"mple.com,443\n", "quote inside an unquoted field"},
		{"bad seed header", "Domain,Port,Foo\n", "is not the positional format's"},
		{"named no domains", "domains,name\n,x\n", "domains: empty"},
		{"two names in seed", "a.example.com b.example.com,443\n", "one name per row"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := Parse(strings.NewReader(tc.in), defaults)
			got := problems(r)
			if !strings.Contains(got, tc.want) {
				t.Fatalf("problems %q, want %q", got, tc.want)
			}
			if len(r.Rows) != 0 {
				t.Fatalf("rows from bad input: %+v", r.Rows)
			}
		})
	}
}

// TestLarge parses 100,000 rows and checks the memory they cost stays
// far below the 100 MiB the whole process may use (the RSS figure itself
// is measured by make bench).
func TestLarge(t *testing.T) {
	if testing.Short() {
		t.Skip("large file")
	}
	var b strings.Builder
	b.WriteString("DOMAIN,VIPPort,ACMEPort,FROMAddr,TOAddr,RELAYAddr,RELAYPort\n")
	for i := range 100_000 {
		fmt.Fprintf(&b, "host%d.customer%d.example.com,443,8888,lb@example.com,ops@example.com,mx.example.com,25\n", i, i%997)
	}
	runtime.GC()
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	r := Parse(strings.NewReader(b.String()), defaults)
	runtime.GC()
	runtime.ReadMemStats(&after)
	if len(r.Problems) != 0 || len(r.Rows) != 100_000 {
		t.Fatalf("%d rows, problems:\n%.500s", len(r.Rows), problems(r))
	}
	if grown := int64(after.HeapAlloc) - int64(before.HeapAlloc); grown > 80<<20 {
		t.Fatalf("100,000 rows hold %d MiB of heap", grown>>20)
	}
}

// FuzzParse: any bytes give rows or problems, never a panic, and every
// row it accepts is complete.
func FuzzParse(f *testing.F) {
	f.Add([]byte("DOMAIN,VIPPort,ACMEPort,FROMAddr,TOAddr,RELAYAddr,RELAYPort\nfoo.com,443,8888,a@b.c,d@e.f,mx.e.f,25\n"))
	f.Add([]byte("domains,name,webroot,deploy\n\"a.com b.com\",x,/tmp,nginx\n"))
	f.Add([]byte("\xEF\xBB\xBF# c\r\na.com\r\n\"b.com\",1,2\r\n"))
	f.Add([]byte("domains\n\xff\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		r := Parse(strings.NewReader(string(data)), defaults)
		if len(r.Rows)+len(r.Problems) == 0 {
			t.Fatalf("no rows and no problems for %q", data)
		}
		for _, row := range r.Rows {
			if row.Line < 1 || row.Name == "" || len(row.Domains) == 0 {
				t.Fatalf("incomplete row %+v from %q", row, data)
			}
		}
	})
}

// Huge input is refused quickly, with a short line: a 200 MB header
// cell, a 10 MB cell in a row.
func TestHugeInput(t *testing.T) {
	huge := strings.Repeat("x", 200<<20)
	res := Parse(strings.NewReader("domains,name\n"+huge+",a\n"), Defaults{HTTPAddr: ":80", VIPHost: "127.0.0.1"})
	if len(res.Problems) == 0 || !strings.Contains(res.Problems[len(res.Problems)-1].Msg, "longer than 64 KiB") || len(res.Problems[len(res.Problems)-1].Msg) > maxProblem+3 {
		t.Fatalf("a 200 MB line: %+v", res.Problems)
	}
	res = Parse(strings.NewReader(strings.Repeat("y", 10<<20)+",header\n"), Defaults{})
	for _, p := range res.Problems {
		if len(p.Msg) > maxProblem+3 {
			t.Fatalf("a %d-byte problem", len(p.Msg))
		}
	}
	cell := strings.Repeat("z", 60<<10) + ".example.com" // under the line limit, still quoted short
	res = Parse(strings.NewReader(cell+",443,8888\n"), Defaults{HTTPAddr: ":80", VIPHost: "127.0.0.1"})
	if len(res.Problems) != 1 || len(res.Problems[0].Msg) > maxProblem+3 || !strings.Contains(res.Problems[0].Msg, "…") {
		t.Fatalf("a 60 KiB cell: %d problems, %d bytes", len(res.Problems), len(fmt.Sprint(res.Problems)))
	}
}

// Addresses are rows like any other: canonical, lineages named safely,
// bad ones refused with their line.
func TestAddressRows(t *testing.T) {
	r := Parse(strings.NewReader("203.0.113.10,443,8888\n2001:DB8::10,443,8888\n127.000.000.001,443,8888\n"), defaults)
	if len(r.Rows) != 2 || r.Rows[0].Name != "203.0.113.10" || r.Rows[1].Name != "2001-db8--10" || r.Rows[1].Domains[0] != "2001:db8::10" {
		t.Fatalf("rows %+v", r.Rows)
	}
	if len(r.Problems) != 1 || r.Problems[0].Line != 3 || !strings.Contains(r.Problems[0].Msg, "leading zero") {
		t.Fatalf("problems %+v", r.Problems)
	}
}

// A row's own relay is another server: the command line's login (and so
// its password) is not saved for it; rows without one keep it.
func TestRowMailDropsLoginForItsOwnRelay(t *testing.T) {
	base := store.Mail{Host: "mx.example.com", Port: 587, User: "mailer"}
	if m := (&Row{}).Mail(base); m.User != "mailer" {
		t.Errorf("a row on the command line's relay lost its login: %+v", m)
	}
	for _, row := range []*Row{{SMTPHost: "relay.customer.example"}, {SMTPPort: 2525}} {
		if m := row.Mail(base); m.User != "" {
			t.Errorf("row %+v: its own relay keeps the command line's login: %+v", row, m)
		}
	}
}
