package main

import (
	"crypto/tls"
	"encoding/json"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/lbcert/lbcert/internal/testenv"
)

// traceFront records every request of an order with its times: a TLS
// reverse proxy in front of Pebble's ACME port (what the client asks and
// what the CA answers, its Retry-After and the object's status) and a
// plain one on Pebble's validation port in front of the client's HTTP-01
// responder (when the CA fetches the token). Both clients of the
// per-order timeline go through the same two fronts, so the proxies'
// own cost is the same on both sides.
type traceFront struct {
	DirectoryURL string // the ACME directory through the front
	// Backend is where the client under trace must answer HTTP-01: the
	// front on Pebble's validation port forwards there.
	Backend int

	acme, val *http.Server
	mu        sync.Mutex
	events    []traceEvent
}

// traceEvent is one request through a front.
type traceEvent struct {
	start, end time.Time
	fromCA     bool   // the CA's validation fetch, not a client request
	what       string // the kind of request, from Pebble's paths
	status     int
	retryAfter string
	object     string // the status field of the JSON answer
}

// startTraceFront puts the two fronts before p. p must have been started
// with its validation port free of any client (the front takes it).
func startTraceFront(p *testenv.Pebble) (*traceFront, error) {
	cert, pool, err := testenv.FrontTLS(p)
	if err != nil {
		return nil, err
	}
	target, _ := url.Parse(p.DirectoryURL)
	target.Path = ""
	f := &traceFront{}
	if f.Backend, err = testenv.FreePort(); err != nil {
		return nil, err
	}
	acmeLn, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	valLn, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", p.HTTPPort))
	if err != nil {
		acmeLn.Close()
		return nil, err
	}
	f.DirectoryURL = "https://" + acmeLn.Addr().String() + "/dir"
	quiet := log.New(io.Discard, "", 0)
	acmeProxy := &httputil.ReverseProxy{
		Rewrite: func(pr *httputil.ProxyRequest) {
			pr.SetURL(target)
			pr.Out.Host = pr.In.Host // Pebble builds its URLs, and checks the JWS url, from Host
		},
		Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}, MaxIdleConnsPerHost: 64},
		ErrorLog:  quiet,
	}
	backend, _ := url.Parse(fmt.Sprintf("http://127.0.0.1:%d", f.Backend))
	valProxy := &httputil.ReverseProxy{
		Rewrite:  func(pr *httputil.ProxyRequest) { pr.SetURL(backend); pr.Out.Host = pr.In.Host },
		ErrorLog: quiet,
	}
	f.acme = &http.Server{Handler: f.record(acmeProxy, false), TLSConfig: &tls.Config{Certificates: []tls.Certificate{cert}}, ErrorLog: quiet}
	f.val = &http.Server{Handler: f.record(valProxy, true), ErrorLog: quiet}
	go f.acme.ServeTLS(acmeLn, "", "")
	go f.val.Serve(valLn)
	return f, nil
}

func (f *traceFront) Stop() {
	f.acme.Close()
	f.val.Close()
}

// Reset forgets what was recorded: the timeline starts at the next request.
func (f *traceFront) Reset() {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.events = nil
}

// Events are the requests recorded since the last Reset, by start.
func (f *traceFront) Events() []traceEvent {
	f.mu.Lock()
	evs := append([]traceEvent(nil), f.events...)
	f.mu.Unlock()
	sort.Slice(evs, func(i, j int) bool { return evs[i].start.Before(evs[j].start) })
	return evs
}

// record passes each request to next and keeps its times and answer.
func (f *traceFront) record(next http.Handler, fromCA bool) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		ev := traceEvent{start: time.Now(), fromCA: fromCA, what: traceKind(r.Method, r.URL.Path)}
		rec := &traceRecorder{ResponseWriter: w, status: http.StatusOK}
		next.ServeHTTP(rec, r)
		ev.end = time.Now()
		ev.status = rec.status
		ev.retryAfter = rec.Header().Get("Retry-After")
		var obj struct {
			Status string `json:"status"`
		}
		if json.Unmarshal(rec.body, &obj) == nil {
			ev.object = obj.Status
		}
		if fromCA && !strings.Contains(r.UserAgent(), "Pebble") {
			ev.fromCA = false // the client's own pre-flight fetch of the token
			ev.what = "pre-flight fetch of the token"
		}
		f.mu.Lock()
		f.events = append(f.events, ev)
		f.mu.Unlock()
	})
}

// traceRecorder keeps the start of an answer as it streams to the client.
type traceRecorder struct {
	http.ResponseWriter
	status int
	body   []byte
}

func (r *traceRecorder) WriteHeader(code int) { r.status = code; r.ResponseWriter.WriteHeader(code) }

func (r *traceRecorder) Write(b []byte) (int, error) {
	if len(r.body) < 64<<10 {
		r.body = append(r.body, b...)
	}
	return r.ResponseWriter.Write(b)
}

// traceKind names a request by Pebble's paths (wfe.go).
func traceKind(method, path string) string {
	for _, k := range []struct{ prefix, name string }{
		{"/dir", "directory"}, {"/nonce-plz", "new nonce"}, {"/sign-me-up", "new account"},
		{"/my-account/", "account"}, {"/order-plz", "new order"}, {"/my-order/", "order (poll)"},
		{"/finalize-order/", "finalize"}, {"/authZ/", "authorization"}, {"/chalZ/", "challenge (ready)"},
		{"/certZ/", "certificate"}, {"/draft-ietf-acme-ari-03/renewalInfo/", "ARI renewal info"},
		{"/.well-known/acme-challenge/", "CA fetches the token"},
	} {
		if strings.HasPrefix(path, k.prefix) {
			return k.name
		}
	}
	return method + " " + path
}

// printTimeline prints one client's requests from the first, with the
// gap before each: the time the client (or the CA) left the order idle.
func printTimeline(client string, evs []traceEvent) time.Duration {
	if len(evs) == 0 {
		fmt.Printf("\n%s: no requests recorded\n", client)
		return 0
	}
	t0 := evs[0].start
	fmt.Printf("\n%s, one order (times in ms from its first request):\n\n", client)
	fmt.Println("| start | took | idle before | who | request | answer | Retry-After | status |")
	fmt.Println("|---:|---:|---:|---|---|---:|---|---|")
	var last time.Time
	for _, e := range evs {
		idle := ""
		if !last.IsZero() && e.start.After(last) {
			idle = fmt.Sprintf("%.0f", ms(e.start.Sub(last)))
		}
		who := "client"
		if e.fromCA {
			who = "CA"
		}
		fmt.Printf("| %.0f | %.0f | %s | %s | %s | %d | %s | %s |\n", ms(e.start.Sub(t0)), ms(e.end.Sub(e.start)), idle, who, e.what,
			e.status, retryAfterText(e.retryAfter, e.end), e.object)
		if e.end.After(last) {
			last = e.end
		}
	}
	total := last.Sub(t0)
	fmt.Printf("\nfirst request to last answer: %.0f ms\n", ms(total))
	return total
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

// retryAfterText shows a date Retry-After as the seconds it meant when
// it was sent.
func retryAfterText(ra string, sent time.Time) string {
	if t, err := http.ParseTime(ra); err == nil {
		return fmt.Sprintf("date (%.2f s)", t.Sub(sent).Seconds())
	}
	return ra
}

// traceOneOrder runs one order of lbcert issue and one of the certmagic
// peer through a tracing front, each runs times after an untimed first
// order that registers its account, and prints the timeline of each
// client's median order (by first request to last answer).
func traceOneOrder(bin, cm, work string, runs int) error {
	dir := filepath.Join(work, "trace")
	os.MkdirAll(dir, 0o755)
	p, err := testenv.StartPebble(testenv.PebbleOptions{Dir: dir})
	if err != nil {
		return err
	}
	defer p.Stop()
	f, err := startTraceFront(p)
	if err != nil {
		return err
	}
	defer f.Stop()
	lbcert := func(name string) []string {
		return []string{bin, "--server", f.DirectoryURL, "--ca-bundle", p.CABundle, "--dir", filepath.Join(dir, "lbcert"), "-q",
			"issue", "-d", name, "--standalone", "--http-addr", fmt.Sprintf("127.0.0.1:%d", f.Backend), "--agree-tos",
			"--http-port", strconv.Itoa(p.HTTPPort), "--resolver", p.DNSAddr, "--preflight=false"}
	}
	certmagic := func(name string) []string {
		list := filepath.Join(dir, name+".txt")
		os.WriteFile(list, []byte(name+"\n"), 0o644)
		return []string{cm, "-server", f.DirectoryURL, "-ca-bundle", p.CABundle, "-http-port", strconv.Itoa(f.Backend),
			"-storage", filepath.Join(dir, "certmagic"), "-names", list, "-limit", "off"}
	}
	fmt.Printf("\nOne order from start to certificate, through a front that records each request (median of %d orders each, %s, load average %s)\n",
		runs, time.Now().UTC().Format(time.DateOnly), loadAverage())
	for _, c := range []struct {
		client string
		argv   func(string) []string
	}{{"lbcert issue (--preflight=false)", lbcert}, {"certmagic ManageAsync", certmagic}} {
		var orders [][]traceEvent
		for i := 0; i <= runs; i++ {
			f.Reset()
			argv := c.argv(fmt.Sprintf("t%d-%d.example", i, len(c.client)))
			if out, err := exec.Command(argv[0], argv[1:]...).CombinedOutput(); err != nil {
				return fmt.Errorf("%s: %v\n%s", c.client, err, tail(string(out)))
			}
			if i > 0 { // the first registered the account
				orders = append(orders, f.Events())
			}
		}
		sort.Slice(orders, func(i, j int) bool { return span(orders[i]) < span(orders[j]) })
		var spans []string
		for _, o := range orders {
			spans = append(spans, fmt.Sprintf("%.0f", ms(span(o))))
		}
		printTimeline(c.client, orders[len(orders)/2])
		fmt.Printf("all %d orders, first request to last answer (ms): %s\n", runs, strings.Join(spans, ", "))
	}
	return nil
}

// span is an order's first request to its last answer.
func span(evs []traceEvent) time.Duration {
	if len(evs) == 0 {
		return 0
	}
	var last time.Time
	for _, e := range evs {
		if e.end.After(last) {
			last = e.end
		}
	}
	return last.Sub(evs[0].start)
}
