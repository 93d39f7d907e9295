// Package batch reads the CSV files of "lbcert batch" and checks every row
// before anything is sent to a CA: a typo must cost an error message, not
// a failed validation that counts against the CA's limits (seed 000).
//
// Two formats, one certificate per row, told apart by the first line:
//
//   - seed 004's, by position, with or without its header line:
//     DOMAIN,VIPPort,ACMEPort,FROMAddr,TOAddr,RELAYAddr,RELAYPort
//   - a header-named one, read with gocsv, whose header has a "domains"
//     column: domains,name,challenge,webroot,http_addr,key_type,profile,
//     deploy,verify_addr,mail_to (and mail_from, smtp_host, smtp_port).
//
// Parse streams the file, so a 100,000-row file costs its rows, not its
// text. It never stops at a bad row: it returns every problem with its
// line number, and the good rows, and the caller decides (--strict).
package batch

import (
	"bufio"
	"bytes"
	"encoding/csv"
	"errors"
	"fmt"
	"io"
	"net"
	"net/mail"
	"path/filepath"
	"strconv"
	"strings"
	"unicode/utf8"

	"github.com/gocarina/gocsv"

	"github.com/lbcert/lbcert/internal/names"
	"github.com/lbcert/lbcert/internal/store"
)

// SeedHeader is seed 004's column list.
var SeedHeader = []string{"DOMAIN", "VIPPort", "ACMEPort", "FROMAddr", "TOAddr", "RELAYAddr", "RELAYPort"}

// Format says which of the two formats a file is in.
type Format string

const (
	Seed  Format = "positional" // DOMAIN,VIPPort,ACMEPort,... by position (a load-balancer vendor's format, seed 004)
	Named Format = "named"      // header with a domains column
)

// Row is one checked certificate request. Empty fields mean "use the
// command line's setting".
type Row struct {
	Line       int
	Name       string
	Domains    []string
	Challenge  store.Challenge // Mode "" when the row names none
	KeyType    string
	Profile    string
	Deploy     string // "", "none", "nginx" or "haproxy"
	VerifyAddr string
	MailTo     []string
	MailFrom   string
	SMTPHost   string
	SMTPPort   int
}

// Problem is one bad row, or a problem with the whole file (Line 0).
type Problem struct {
	Line int
	Msg  string
}

// Defaults are the command line's settings that rows fall back on and
// that some columns are relative to.
type Defaults struct {
	// HTTPAddr is --http-addr; an ACMEPort column keeps its host and
	// replaces its port.
	HTTPAddr string
	// VIPHost is where a VIPPort is checked after deploy: the load
	// balancer's own address, since lbcert runs on it (seed 004).
	VIPHost string
	// KeyTypeOK and CheckWebroot check a key type and a webroot; nil
	// accepts anything (the fuzz test has no disk).
	KeyTypeOK    func(string) error
	CheckWebroot func(dir string) error
}

// Result is a parsed file.
type Result struct {
	Format   Format
	Rows     []*Row
	Problems []Problem
	Total    int // data rows seen, good and bad
}

// MaxRows bounds a file: well past any real import, short of running the
// machine out of memory on a runaway file.
const MaxRows = 1_000_000

// namedRow is the header-named format, as gocsv fills it. Every field is
// a string so that a bad value gets our message with its line, not a
// reflection error.
type namedRow struct {
	Domains    string `csv:"domains"`
	Name       string `csv:"name"`
	Challenge  string `csv:"challenge"`
	Webroot    string `csv:"webroot"`
	HTTPAddr   string `csv:"http_addr"`
	KeyType    string `csv:"key_type"`
	Profile    string `csv:"profile"`
	Deploy     string `csv:"deploy"`
	VerifyAddr string `csv:"verify_addr"`
	MailTo     string `csv:"mail_to"`
	MailFrom   string `csv:"mail_from"`
	SMTPHost   string `csv:"smtp_host"`
	SMTPPort   string `csv:"smtp_port"`
}

// NamedColumns lists the header-named format's columns, for help text.
var NamedColumns = []string{"domains", "name", "challenge", "webroot", "http_addr", "key_type", "profile", "deploy", "verify_addr", "mail_to", "mail_from", "smtp_host", "smtp_port"}

// Parse reads a whole CSV file from r and checks every row.
func Parse(r io.Reader, d Defaults) *Result {
	p := &parser{d: d, res: &Result{}, names: map[string]int{}, lineages: map[string]int{}}
	p.parse(r)
	return p.res
}

type parser struct {
	d        Defaults
	res      *Result
	names    map[string]int // domain -> line that has it
	lineages map[string]int // lineage name -> line
}

// maxLine bounds one line of the file: no row of either format comes
// near it, and a 200 MB "cell" must not cost minutes and gigabytes.
const maxLine = 64 << 10

// maxProblem bounds one problem's text: a bad 10 MB cell quoted whole
// would make a 10 MB error line.
const maxProblem = 300

func (p *parser) problem(line int, format string, args ...any) {
	msg := fmt.Sprintf(format, args...)
	if len(msg) > maxProblem {
		cut := maxProblem
		for cut > 0 && !utf8.RuneStart(msg[cut]) {
			cut--
		}
		msg = msg[:cut] + "…"
	}
	p.res.Problems = append(p.res.Problems, Problem{Line: line, Msg: msg})
}

// lineLimit fails a read once a line passes maxLine bytes. It keeps
// the reader's first error: the peeks that choose the format swallow
// one (a pipe no one wrote to would read as an empty file).
type lineLimit struct {
	r      io.Reader
	run    int // bytes since the last newline
	line   int
	failed error
}

type lineTooLong struct{ line int }

func (e *lineTooLong) Error() string {
	return fmt.Sprintf("line %d is longer than %d KiB: no row is that long; is this the right file?", e.line, maxLine>>10)
}

func (l *lineLimit) Read(b []byte) (int, error) {
	n, err := l.r.Read(b)
	for i := range n {
		if b[i] == '\n' {
			l.run = 0
			l.line++
			continue
		}
		l.run++
		if l.run > maxLine {
			return i, &lineTooLong{line: l.line + 1}
		}
	}
	if err != nil && err != io.EOF && l.failed == nil {
		l.failed = err
	}
	return n, err
}

func (p *parser) parse(r io.Reader) {
	ll := &lineLimit{r: r}
	br := bufio.NewReaderSize(ll, 64*1024)
	head, _ := br.Peek(4)
	switch {
	case bytes.HasPrefix(head, []byte("\xEF\xBB\xBF")):
		br.Discard(3) // a UTF-8 byte order mark, as Excel writes
	case bytes.HasPrefix(head, []byte("\xFF\xFE")), bytes.HasPrefix(head, []byte("\xFE\xFF")):
		p.problem(0, "the file is UTF-16 text; save it as UTF-8 (in Excel: CSV UTF-8)")
		return
	}
	first := firstLine(br)
	cr := csv.NewReader(br)
	cr.Comment = '#'
	cr.TrimLeadingSpace = true
	cr.FieldsPerRecord = -1

	switch header := splitHeader(first); {
	case header == nil && ll.failed != nil:
		p.problem(0, "read: %v", ll.failed)
	case header == nil:
		p.problem(0, "no rows: the file is empty or holds only comments")
	case strings.EqualFold(header[0], "domain"):
		p.res.Format = Seed
		rec, err := cr.Read() // the header line itself
		if err == nil && !isSeedHeader(rec) {
			line, _ := cr.FieldPos(0)
			p.problem(line, "header %q is not the positional format's %s; for named columns, include a \"domains\" column", strings.Join(rec, ","), strings.Join(SeedHeader, ","))
			return
		}
		p.seed(cr)
	case hasColumn(header, "domains") || looksLikeHeader(header):
		p.res.Format = Named
		p.named(cr)
	default:
		p.res.Format = Seed
		p.seed(cr)
	}
	if p.res.Total == 0 && len(p.res.Problems) == 0 {
		p.problem(0, "no rows: the file has a header but no certificates")
	}
}

// firstLine peeks at the first line that is neither blank nor a comment,
// without consuming it, to pick the format.
func firstLine(br *bufio.Reader) string {
	buf, _ := br.Peek(br.Size())
	for len(buf) > 0 {
		line := buf
		if i := bytes.IndexByte(buf, '\n'); i >= 0 {
			line, buf = buf[:i], buf[i+1:]
		} else {
			buf = nil
		}
		s := strings.TrimSpace(string(line))
		if s != "" && !strings.HasPrefix(s, "#") {
			return s
		}
	}
	return ""
}

func splitHeader(line string) []string {
	if line == "" {
		return nil
	}
	rec, err := csv.NewReader(strings.NewReader(line)).Read()
	if err != nil || len(rec) == 0 {
		return []string{line}
	}
	for i := range rec {
		rec[i] = strings.TrimSpace(rec[i])
	}
	return rec
}

// looksLikeHeader: every cell is a word, none a name or an address, so a
// misspelt header is reported as one instead of as a row of bad names.
func looksLikeHeader(cells []string) bool {
	for _, c := range cells {
		if c == "" {
			return false
		}
		for _, r := range c {
			if !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r == '_' || r == '-' || r == ' ') {
				return false
			}
		}
	}
	return true
}

func hasColumn(header []string, col string) bool {
	for _, h := range header {
		if normColumn(h) == col {
			return true
		}
	}
	return false
}

// normColumn lets "Domains", " key-type " and "KEY_TYPE" all mean key_type.
func normColumn(h string) string {
	return strings.ReplaceAll(strings.ToLower(strings.TrimSpace(h)), "-", "_")
}

func isSeedHeader(rec []string) bool {
	if len(rec) == 0 || len(rec) > len(SeedHeader) {
		return false
	}
	for i, h := range rec {
		if !strings.EqualFold(strings.TrimSpace(h), SeedHeader[i]) {
			return false
		}
	}
	return true
}

// next reads one record. It returns ok=false at the end of the file, and
// line=0 with a problem already recorded for a record it could not read.
func (p *parser) next(cr *csv.Reader) (rec []string, line int, ok bool) {
	rec, err := cr.Read()
	if errors.Is(err, io.EOF) {
		return nil, 0, false
	}
	var pe *csv.ParseError
	if errors.As(err, &pe) && !errors.Is(err, csv.ErrFieldCount) {
		p.res.Total++
		p.problem(pe.StartLine, "%s", csvReason(pe))
		return nil, 0, true
	}
	var long *lineTooLong
	if errors.As(err, &long) {
		p.problem(long.line, "%v", long)
		return nil, 0, false
	}
	if err != nil && !errors.Is(err, csv.ErrFieldCount) {
		p.problem(0, "read: %v", err)
		return nil, 0, false
	}
	p.res.Total++
	line, _ = cr.FieldPos(0)
	if !validUTF8(rec...) {
		p.problem(line, "not UTF-8 text; save the file as UTF-8")
		return nil, 0, true
	}
	if p.res.Total > MaxRows {
		p.problem(line, "more than %d rows; split the file", MaxRows)
		return nil, 0, false
	}
	return rec, line, true
}

func csvReason(pe *csv.ParseError) string {
	switch {
	case errors.Is(pe.Err, csv.ErrQuote):
		return "unbalanced quotes: a quoted field must end with a quote, and quotes inside it must be doubled (\"\")"
	case errors.Is(pe.Err, csv.ErrBareQuote):
		return "a quote inside an unquoted field: quote the whole field, and double the quote (\"\")"
	}
	return pe.Err.Error()
}

// seed reads seed 004's positional rows.
func (p *parser) seed(cr *csv.Reader) {
	for {
		rec, line, ok := p.next(cr)
		if !ok {
			return
		}
		if rec == nil {
			continue
		}
		if len(rec) > len(SeedHeader) {
			p.problem(line, "%d columns, want at most %d: %s", len(rec), len(SeedHeader), strings.Join(SeedHeader, ","))
			continue
		}
		col := func(i int) string {
			if i < len(rec) {
				return strings.TrimSpace(rec[i])
			}
			return ""
		}
		row := Row{Line: line}
		c := &checker{p: p, line: line}
		domain := col(0)
		if strings.ContainsAny(domain, " ;") {
			c.fail("DOMAIN %q: one name per row in this format; use the header format's domains column for several", domain)
			continue
		}
		row.Domains = c.domains("DOMAIN", domain)
		if vip := c.port("VIPPort", col(1)); vip > 0 {
			row.VerifyAddr = net.JoinHostPort(p.d.VIPHost, strconv.Itoa(vip))
		}
		if acme := c.port("ACMEPort", col(2)); acme > 0 {
			host, _, err := net.SplitHostPort(p.d.HTTPAddr)
			if err != nil {
				host = ""
			}
			row.Challenge = store.Challenge{Mode: "standalone", HTTPAddr: net.JoinHostPort(host, strconv.Itoa(acme))}
		}
		row.MailFrom = c.address("FROMAddr", col(3))
		row.MailTo = c.addresses("TOAddr", col(4))
		row.SMTPHost = c.host("RELAYAddr", col(5))
		row.SMTPPort = c.port("RELAYPort", col(6))
		p.finish(c, row)
	}
}

// named reads the header-named format through gocsv.
func (p *parser) named(cr *csv.Reader) {
	um, err := gocsv.NewUnmarshaller(cr, namedRow{})
	if err != nil {
		p.problem(0, "header: %v", err)
		return
	}
	headerLine, _ := cr.FieldPos(0)
	seen := map[string]bool{}
	for _, h := range um.Headers {
		seen[normColumn(h)] = true
	}
	if err := um.RenormalizeHeaders(func(hs []string) []string {
		out := make([]string, len(hs))
		for i, h := range hs {
			out[i] = normColumn(h)
		}
		return out
	}); err != nil {
		p.problem(headerLine, "header: %v", err)
		return
	}
	bad := false
	for _, h := range um.Headers {
		if !known(h) {
			p.problem(headerLine, "unknown column %q; the columns are %s", h, strings.Join(NamedColumns, ","))
			bad = true
		}
	}
	if !seen["domains"] {
		p.problem(headerLine, "the header has no domains column; the columns are %s (or the positional format's %s)", strings.Join(NamedColumns, ","), strings.Join(SeedHeader, ","))
		bad = true
	}
	if len(um.Headers) != len(seen) {
		p.problem(headerLine, "a column is named twice")
		bad = true
	}
	if bad {
		return
	}
	// From here on the reader refuses rows of another width, with the
	// line number; gocsv would silently fill or drop columns.
	cr.FieldsPerRecord = len(um.Headers)
	for {
		v, err := um.Read()
		if errors.Is(err, io.EOF) {
			return
		}
		p.res.Total++
		if p.res.Total > MaxRows {
			p.problem(0, "more than %d rows; split the file", MaxRows)
			return
		}
		var pe *csv.ParseError
		switch {
		case errors.As(err, &pe) && errors.Is(err, csv.ErrFieldCount):
			p.problem(pe.StartLine, "wrong number of columns: want %d like the header (a comma inside a value needs quotes)", len(um.Headers))
			continue
		case errors.As(err, &pe):
			p.problem(pe.StartLine, "%s", csvReason(pe))
			continue
		case errors.As(err, new(*lineTooLong)):
			var long *lineTooLong
			errors.As(err, &long)
			p.problem(long.line, "%v", long)
			return
		case err != nil:
			p.problem(0, "read: %v", err)
			return
		}
		line, _ := cr.FieldPos(0)
		n := v.(namedRow)
		if !validUTF8(n.Domains, n.Name, n.Challenge, n.Webroot, n.HTTPAddr, n.KeyType, n.Profile, n.Deploy, n.VerifyAddr, n.MailTo, n.MailFrom, n.SMTPHost, n.SMTPPort) {
			p.problem(line, "not UTF-8 text; save the file as UTF-8")
			continue
		}
		p.namedRow(line, n)
	}
}

func validUTF8(fields ...string) bool {
	for _, f := range fields {
		if !utf8.ValidString(f) {
			return false
		}
	}
	return true
}

func known(col string) bool {
	for _, c := range NamedColumns {
		if c == col {
			return true
		}
	}
	return false
}

func (p *parser) namedRow(line int, n namedRow) {
	c := &checker{p: p, line: line}
	row := Row{Line: line, Name: strings.TrimSpace(n.Name)}
	row.Domains = c.domains("domains", n.Domains)
	if row.Name != "" {
		if err := names.Lineage(row.Name); err != nil {
			c.fail("name: %v", err)
		}
	}
	webroot, httpAddr := strings.TrimSpace(n.Webroot), strings.TrimSpace(n.HTTPAddr)
	switch mode := strings.ToLower(strings.TrimSpace(n.Challenge)); {
	case mode != "" && mode != "webroot" && mode != "standalone":
		c.fail("challenge %q: want webroot or standalone", n.Challenge)
	case webroot != "" && httpAddr != "":
		c.fail("both webroot and http_addr: a row answers HTTP-01 one way")
	case mode == "webroot" && webroot == "":
		c.fail("challenge webroot needs the webroot column")
	case webroot != "" && mode == "standalone":
		c.fail("challenge standalone with a webroot: drop one")
	case webroot != "":
		abs, err := filepath.Abs(webroot)
		if err == nil && p.d.CheckWebroot != nil {
			err = p.d.CheckWebroot(abs)
		}
		if err != nil {
			c.fail("%v", err)
		}
		row.Challenge = store.Challenge{Mode: "webroot", Webroot: abs}
	case httpAddr != "" || mode == "standalone":
		if httpAddr == "" {
			httpAddr = p.d.HTTPAddr
		}
		c.hostPort("http_addr", httpAddr, true)
		row.Challenge = store.Challenge{Mode: "standalone", HTTPAddr: httpAddr}
	}
	if kt := strings.ToLower(strings.TrimSpace(n.KeyType)); kt != "" {
		if p.d.KeyTypeOK != nil {
			if err := p.d.KeyTypeOK(kt); err != nil {
				c.fail("key_type: %v", err)
			}
		}
		row.KeyType = kt
	}
	row.Profile = strings.TrimSpace(n.Profile)
	switch dep := strings.ToLower(strings.TrimSpace(n.Deploy)); dep {
	case "", "none", "nginx", "haproxy":
		row.Deploy = dep
	default:
		c.fail("deploy %q: want nginx, haproxy or none", n.Deploy)
	}
	if va := strings.TrimSpace(n.VerifyAddr); va != "" {
		c.hostPort("verify_addr", va, false)
		row.VerifyAddr = va
	}
	row.MailTo = c.addresses("mail_to", n.MailTo)
	row.MailFrom = c.address("mail_from", n.MailFrom)
	row.SMTPHost = c.host("smtp_host", n.SMTPHost)
	row.SMTPPort = c.port("smtp_port", n.SMTPPort)
	p.finish(c, row)
}

// finish records a checked row, or its first problem, and catches names
// that another row already claimed: two lineages for one name would race
// each other at the CA and in the load balancer.
func (p *parser) finish(c *checker, row Row) {
	if c.failed {
		return
	}
	if row.Name == "" {
		row.Name = names.LineageFor(row.Domains[0])
	}
	for _, d := range row.Domains {
		if prev, dup := p.names[d]; dup {
			c.fail("%s is already in line %d; one certificate per name", d, prev)
			return
		}
	}
	if prev, dup := p.lineages[row.Name]; dup {
		c.fail("lineage %s is already line %d's", row.Name, prev)
		return
	}
	p.lineages[row.Name] = row.Line
	for _, d := range row.Domains {
		p.names[d] = row.Line
	}
	p.res.Rows = append(p.res.Rows, &row)
}

// checker collects a row's first problem; later checks of the same row
// are skipped so each bad row is one line of output.
type checker struct {
	p      *parser
	line   int
	failed bool
}

func (c *checker) fail(format string, args ...any) {
	if c.failed {
		return
	}
	c.failed = true
	c.p.problem(c.line, format, args...)
}

func splitList(s string) []string {
	return strings.FieldsFunc(s, func(r rune) bool { return r == ' ' || r == ',' || r == ';' || r == '\t' })
}

func (c *checker) domains(col, cell string) []string {
	raw := splitList(cell)
	if len(raw) == 0 {
		c.fail("%s: empty; every row needs a name", col)
		return nil
	}
	out, err := names.Domains(raw)
	if err != nil {
		c.fail("%v", err)
	}
	return out
}

func (c *checker) port(col, cell string) int {
	if cell == "" {
		return 0
	}
	n, err := strconv.Atoi(strings.TrimSpace(cell))
	if err != nil || n < 1 || n > 65535 {
		c.fail("%s %q: want a port number 1-65535", col, cell)
		return 0
	}
	return n
}

func (c *checker) address(col, cell string) string {
	cell = strings.TrimSpace(cell)
	if cell == "" {
		return ""
	}
	a, err := mail.ParseAddress(cell)
	if err != nil || a.Address != cell {
		c.fail("%s %q is not an email address", col, cell)
		return ""
	}
	return cell
}

func (c *checker) addresses(col, cell string) []string {
	var out []string
	for _, a := range splitList(cell) {
		if v := c.address(col, a); v != "" {
			out = append(out, v)
		}
	}
	return out
}

// host accepts an IP address or a DNS name, as an SMTP relay.
func (c *checker) host(col, cell string) string {
	cell = strings.TrimSpace(cell)
	if cell == "" {
		return ""
	}
	if net.ParseIP(cell) != nil {
		return cell
	}
	if _, err := names.Domain(cell); err != nil || strings.ContainsAny(cell, "/:@") {
		c.fail("%s %q: want a host name or IP address", col, cell)
		return ""
	}
	return cell
}

// hostPort checks host:port; an empty host (":80", all addresses) is fine
// for a listener, not for an address to connect to.
func (c *checker) hostPort(col, v string, listen bool) {
	host, port, err := net.SplitHostPort(v)
	n, perr := strconv.Atoi(port)
	if err != nil || perr != nil || n < 1 || n > 65535 || (host == "" && !listen) {
		want := "host:port, like 127.0.0.1:443"
		if listen {
			want = "[host]:port, like :8888 or 127.0.0.1:8888"
		}
		c.fail("%s %q: want %s", col, v, want)
	}
}
