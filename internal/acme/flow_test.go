package acme

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	legoacme "github.com/go-acme/lego/v4/acme"
	"github.com/go-acme/lego/v4/acme/api"
	"github.com/go-acme/lego/v4/certificate"
	"github.com/go-acme/lego/v4/challenge"

	"github.com/lbcert/lbcert/internal/hint"
)

// fakeCA is an ACME server for the order's waits: it answers each
// object from a script and logs every request. It checks no signature.
type fakeCA struct {
	t   *testing.T
	srv *httptest.Server

	mu  sync.Mutex
	log []string // "POST /authz/a.example", ...
	// authz answers the n-th poll (from 1) of name's authorization:
	// status and Retry-After.
	authz func(name string, n int) (string, string)
	polls map[string]int
	// challenge answers name's challenge POST, before which it calls
	// onChallenge (the CA's fetch of the token).
	challenge   func(name string) (string, string)
	onChallenge func(name string)
	// finalize and order answer the finalize POST and the n-th order poll.
	finalize func() (string, string)
	order    func(n int) (string, string)
	orders   int
	// newOrder, when set, may refuse an order: a problem document and
	// its status, or "" to accept it.
	newOrder func(payload string) (int, string)
	// finalizeProblem and orderProblem, when set, answer the finalize
	// POST or the order's polls with an error instead: its status,
	// content type and body.
	finalizeProblem, orderProblem func() (int, string, string)
	// certProblem, when set, answers the certificate's download.
	certProblem func() (int, string, string)
}

func newFakeCA(t *testing.T) *fakeCA {
	f := &fakeCA{t: t, polls: map[string]int{},
		authz:     func(string, int) (string, string) { return "valid", "" },
		challenge: func(string) (string, string) { return "processing", "" },
		finalize:  func() (string, string) { return "valid", "" },
		order:     func(int) (string, string) { return "valid", "" },
	}
	f.srv = httptest.NewTLSServer(http.HandlerFunc(f.serve)) // lego speaks HTTPS only
	t.Cleanup(f.srv.Close)
	return f
}

func (f *fakeCA) requests(prefix string) int {
	f.mu.Lock()
	defer f.mu.Unlock()
	n := 0
	for _, l := range f.log {
		if strings.HasPrefix(l, prefix) {
			n++
		}
	}
	return n
}

func (f *fakeCA) serve(w http.ResponseWriter, r *http.Request) {
	u := f.srv.URL
	w.Header().Set("Replay-Nonce", fmt.Sprintf("n%d", time.Now().UnixNano()))
	if r.URL.Path == "/dir" {
		fmt.Fprintf(w, `{"newNonce":%q,"newAccount":%q,"newOrder":%q,"revokeCert":%q,"renewalInfo":%q}`, u+"/nonce", u+"/acct", u+"/new-order", u+"/revoke", u+"/ari")
		return
	}
	if r.URL.Path == "/nonce" {
		return
	}
	var jws struct{ Payload string }
	json.NewDecoder(r.Body).Decode(&jws)
	payload, _ := base64.RawURLEncoding.DecodeString(jws.Payload)
	f.mu.Lock()
	f.log = append(f.log, r.Method+" "+r.URL.Path+" "+string(payload))
	f.mu.Unlock()
	name := r.URL.Path[strings.LastIndex(r.URL.Path, "/")+1:]
	answer := func(status, retry string, body string) {
		w.Header().Set("Content-Type", "application/json")
		if retry != "" {
			w.Header().Set("Retry-After", retry)
		}
		fmt.Fprintf(w, body, status)
	}
	order := func(status string) string {
		return `{"status":"%s","identifiers":[{"type":"dns","value":"a.example"},{"type":"dns","value":"b.example"}],` +
			fmt.Sprintf(`"authorizations":[%q,%q],"finalize":%q,"certificate":%q}`, u+"/authz/a.example", u+"/authz/b.example", u+"/finalize", u+"/cert")
	}
	switch {
	case r.URL.Path == "/new-order":
		if f.newOrder != nil {
			if status, problem := f.newOrder(string(payload)); problem != "" {
				w.Header().Set("Content-Type", "application/problem+json")
				w.WriteHeader(status)
				io.WriteString(w, problem)
				return
			}
		}
		w.Header().Set("Location", u+"/order")
		w.WriteHeader(http.StatusCreated)
		answer("pending", "", order(""))
	case strings.HasPrefix(r.URL.Path, "/authz/"):
		if strings.Contains(string(payload), "deactivated") {
			answer("deactivated", "", `{"status":"%s"}`)
			return
		}
		f.mu.Lock()
		n := f.polls[name]
		f.polls[name]++
		f.mu.Unlock()
		status, retry := "pending", ""
		if n > 0 {
			status, retry = f.authz(name, n)
		}
		chStatus, chErr := status, ""
		if status == "invalid" {
			chErr = `,"error":{"type":"urn:ietf:params:acme:error:unauthorized","detail":"404 for the token","status":403}`
		}
		answer(status, retry, `{"status":"%s","identifier":{"type":"dns","value":"`+name+`"},"challenges":[`+
			fmt.Sprintf(`{"type":"http-01","url":%q,"token":"tok-%s","status":%q%s}]}`, u+"/chall/"+name, name, chStatus, chErr))
	case strings.HasPrefix(r.URL.Path, "/chall/"):
		if f.onChallenge != nil {
			f.onChallenge(name)
		}
		w.Header().Set("Link", fmt.Sprintf(`<%s>;rel="up"`, u+"/authz/"+name))
		status, retry := f.challenge(name)
		answer(status, retry, `{"type":"http-01","status":"%s","token":"tok-`+name+`"}`)
	case r.URL.Path == "/finalize" && f.finalizeProblem != nil && f.problemAnswer(w, f.finalizeProblem):
	case r.URL.Path == "/order" && f.orderProblem != nil && f.problemAnswer(w, f.orderProblem):
	case r.URL.Path == "/finalize":
		status, retry := f.finalize()
		answer(status, retry, order(status))
	case r.URL.Path == "/order":
		f.mu.Lock()
		f.orders++
		n := f.orders
		f.mu.Unlock()
		status, retry := f.order(n)
		answer(status, retry, order(status))
	case r.URL.Path == "/cert" && f.certProblem != nil && f.problemAnswer(w, f.certProblem):
	case r.URL.Path == "/cert":
		w.Header().Set("Content-Type", "application/pem-certificate-chain")
		io.WriteString(w, "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
	default:
		http.NotFound(w, r)
	}
}

// problemAnswer answers with what problem says (status, content type,
// body), unless its status is 0: then the request is answered as usual.
func (f *fakeCA) problemAnswer(w http.ResponseWriter, problem func() (int, string, string)) bool {
	status, ctype, body := problem()
	if status == 0 {
		return false
	}
	w.Header().Set("Content-Type", ctype)
	w.WriteHeader(status)
	io.WriteString(w, body)
	return true
}

// wait is one wait the order asked for: how long (from when it asked),
// and whether it was told of a token fetch to watch.
type wait struct {
	d       time.Duration
	watched bool
}

// client is an acme.Client on f whose waits are recorded, not slept.
func (f *fakeCA) client(p challenge.Provider) (*Client, *[]wait) {
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	hints := &retryHints{}
	bundle := filepath.Join(f.t.TempDir(), "ca.pem")
	os.WriteFile(bundle, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: f.srv.Certificate().Raw}), 0o644)
	hc, err := httpClient(context.Background(), bundle, 90*time.Second, hints)
	if err != nil {
		f.t.Fatal(err)
	}
	core, err := api.New(hc, "", f.srv.URL+"/dir", f.srv.URL+"/acct/1", key)
	if err != nil {
		f.t.Fatal(err)
	}
	var mu sync.Mutex
	var waits []wait
	c := &Client{ctx: context.Background(), core: core, hints: hints, router: &router{byDomain: map[string]challenge.Provider{}}}
	c.waiter = func(t time.Time, fetched, stop <-chan struct{}) error {
		select {
		case <-stop:
			return errStopped
		default:
		}
		mu.Lock()
		defer mu.Unlock()
		w := wait{d: time.Until(t)}
		if fetched != nil {
			<-fetched // the fake CA fetched during the challenge POST
			w.watched = true
		}
		waits = append(waits, w)
		return nil
	}
	c.router.set([]string{"a.example", "b.example"}, p)
	return c, &waits
}

func (f *fakeCA) obtain(c *Client) (*certificate.Resource, error) {
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	return c.obtainOrder(certificate.ObtainRequest{Domains: []string{"a.example", "b.example"}, PrivateKey: key, Bundle: true})
}

// watcher is a provider that can tell when the CA fetched a token.
type watcher struct {
	mu      sync.Mutex
	fetched map[string]chan struct{}
}

func (w *watcher) Present(domain, token, _ string) error {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.fetched[domain] = make(chan struct{})
	return nil
}
func (w *watcher) CleanUp(string, string, string) error { return nil }
func (w *watcher) Fetched(domain, _ string) <-chan struct{} {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.fetched[domain]
}
func (w *watcher) fetch(domain string) {
	w.mu.Lock()
	defer w.mu.Unlock()
	close(w.fetched[domain])
}

// near reports whether a wait is d, less what the test itself took
// between the CA's answer and the wait (well under a second).
func near(got, d time.Duration) bool { return got <= d && got > d-time.Second }

// TestOrderWaitsWhereTheCASays: both names' challenges are answered at
// once (the CA holds the first until the second arrives); each first
// authorization poll watches the token fetch; a "pending" answer with
// Retry-After is polled again at that time, not before; a processing
// order is polled at its Retry-After, and the certificate fetched as
// soon as the order is valid.
func TestOrderWaitsWhereTheCASays(t *testing.T) {
	f := newFakeCA(t)
	w := &watcher{fetched: map[string]chan struct{}{}}
	var gate sync.WaitGroup
	gate.Add(2)
	f.onChallenge = func(name string) {
		w.fetch(name)
		gate.Done()
		both := make(chan struct{})
		go func() { gate.Wait(); close(both) }()
		select { // the other name's challenge must come while this one is held
		case <-both:
		case <-time.After(10 * time.Second):
			t.Errorf("%s: the other name's challenge did not come while this one was held: validations run one after the other", name)
		}
	}
	f.authz = func(name string, n int) (string, string) {
		if name == "a.example" && n == 1 {
			return "pending", "30"
		}
		return "valid", ""
	}
	f.finalize = func() (string, string) { return "processing", "20" }
	c, waits := f.client(w)
	res, err := f.obtain(c)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(res.Certificate), "BEGIN CERTIFICATE") {
		t.Fatalf("certificate: %q", res.Certificate)
	}
	var watched, ra30, ra20 int
	for _, wt := range *waits {
		switch {
		case wt.watched:
			watched++
		case near(wt.d, 30*time.Second):
			ra30++
		case near(wt.d, 20*time.Second):
			ra20++
		default:
			t.Errorf("a wait of %v the CA did not ask for", wt.d)
		}
	}
	if watched != 2 || ra30 != 1 || ra20 != 1 {
		t.Errorf("waits %+v: want each name's first poll on its token fetch, a's second at its Retry-After (30 s), the order's poll at finalize's (20 s)", *waits)
	}
	if n := f.requests("POST /order"); n != 1 {
		t.Errorf("%d order polls, want 1", n)
	}
}

// TestOrderValidAtFinalize: an order the finalize answer says is valid
// is not polled and not waited on; a challenge answer's Retry-After is
// the first poll's time, whatever the provider can tell; without either,
// polls follow the schedule.
func TestOrderValidAtFinalize(t *testing.T) {
	f := newFakeCA(t)
	f.challenge = func(string) (string, string) { return "processing", "10" }
	c, waits := f.client(&watcher{fetched: map[string]chan struct{}{}})
	if _, err := f.obtain(c); err != nil {
		t.Fatal(err)
	}
	if n := f.requests("POST /order"); n != 0 {
		t.Errorf("%d order polls after a valid finalize answer, want 0", n)
	}
	if len(*waits) != 2 || !near((*waits)[0].d, 10*time.Second) || !near((*waits)[1].d, 10*time.Second) || (*waits)[0].watched {
		t.Errorf("waits %+v: want each name's first poll at the challenge's Retry-After (10 s)", *waits)
	}

	// A webroot cannot tell: 250 ms, then doubling.
	f = newFakeCA(t)
	f.authz = func(_ string, n int) (string, string) {
		if n < 3 {
			return "pending", ""
		}
		return "valid", ""
	}
	c, waits = f.client(nopProvider{})
	if _, err := f.obtain(c); err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, wt := range *waits {
		got = append(got, wt.d.Round(50*time.Millisecond).String())
	}
	sort.Strings(got)
	if strings.Join(got, " ") != "1s 1s 250ms 250ms 500ms 500ms" {
		t.Errorf("waits without Retry-After or fetch signal: %v, want 250ms, 500ms, 1s per name", got)
	}
}

type nopProvider struct{}

func (nopProvider) Present(string, string, string) error { return nil }
func (nopProvider) CleanUp(string, string, string) error { return nil }

// TestOrderFailedValidation: an invalid authorization fails the order
// with the CA's problem (a failed validation, as the engine's backoff
// and budget read it); the other name, still pending, is deactivated.
func TestOrderFailedValidation(t *testing.T) {
	f := newFakeCA(t)
	f.authz = func(name string, _ int) (string, string) {
		if name == "a.example" {
			return "invalid", ""
		}
		return "pending", "1"
	}
	c, _ := f.client(nopProvider{})
	_, err := f.obtain(c)
	var pd *legoacme.ProblemDetails
	if err == nil || !errors.As(err, &pd) || !FailedValidation(err) || !strings.Contains(err.Error(), "a.example: invalid authorization: ") {
		t.Fatalf("err %v: want a.example's invalid authorization with the CA's problem", err)
	}
	if n := f.requests(`POST /authz/b.example {"status":"deactivated"`); n != 1 {
		t.Errorf("b.example deactivated %d times, want 1", n)
	}
	if n := f.requests("POST /finalize"); n != 0 {
		t.Errorf("finalized a failed order")
	}
}

// TestPollAfter: only the Retry-After of an undecided object is noted.
func TestPollAfter(t *testing.T) {
	for _, tc := range []struct {
		status, retry string
		want          time.Duration
		ok            bool
	}{
		{"processing", "1", time.Second, true},
		{"pending", "30", 30 * time.Second, true},
		{"valid", "1", 0, false},
		{"processing", "", 0, false},
		{"processing", "soon", 0, false},
	} {
		h := http.Header{}
		if tc.retry != "" {
			h.Set("Retry-After", tc.retry)
		}
		d, ok := pollAfter(h, []byte(fmt.Sprintf(`{"status":%q}`, tc.status)))
		if d != tc.want || ok != tc.ok {
			t.Errorf("%s, Retry-After %q: %v %v, want %v %v", tc.status, tc.retry, d, ok, tc.want, tc.ok)
		}
	}
}

// TestRefusedReplacesIsTheEngines: the client does not drop "replaces"
// and order again on its own, even after a 5xx (which it otherwise
// retries), because the order without it is a new one the rate budget
// must count. It returns at once with an error ReplacesRefused knows,
// through the hint the engine shows; an order without "replaces" that
// meets the same 5xx is retried here.
func TestRefusedReplacesIsTheEngines(t *testing.T) {
	f := newFakeCA(t)
	f.newOrder = func(payload string) (int, string) {
		if strings.Contains(payload, `"replaces"`) {
			return 500, `{"type":"urn:ietf:params:acme:error:serverInternal","detail":"could not find an order for the given certificate","status":500}`
		}
		return 0, ""
	}
	c, _ := f.client(nopProvider{})
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	req := certificate.ObtainRequest{Domains: []string{"a.example", "b.example"}, PrivateKey: key, Bundle: true, ReplacesCertID: "AAAA.AQ"}
	_, err := c.order(req)
	if err == nil || !ReplacesRefused(explain("obtain a.example,b.example", err)) {
		t.Fatalf("order with a refused replaces: %v, want an error ReplacesRefused knows", err)
	}
	if n := f.requests("POST /new-order"); n != 1 {
		t.Fatalf("%d orders sent, want 1: the client ordered again by itself", n)
	}
	// Without "replaces" the same 500 is not about the hint: the CA's
	// fault, which the engine orders again (each order budgeted), and an
	// order the CA never created.
	tries := 0
	f.newOrder = func(string) (int, string) {
		if tries++; tries == 1 {
			return 500, `{"type":"urn:ietf:params:acme:error:serverInternal","detail":"changed since last read","status":500}`
		}
		return 0, ""
	}
	req.ReplacesCertID = ""
	_, err = c.order(req)
	if tries != 1 || err == nil || ReplacesRefused(err) || !ServerFault(err) || OrderNotPlaced(err) {
		t.Fatalf("order without replaces after a 500: %d tries, err %v: want one, the CA's fault, and perhaps created (a gateway's 500 may hide an order the CA made)", tries, err)
	}
	// The CA's own refusal of the new order (4xx): no order created.
	f.newOrder = func(string) (int, string) {
		return 400, `{"type":"urn:ietf:params:acme:error:rejectedIdentifier","detail":"policy forbids","status":400}`
	}
	if _, err = c.order(req); err == nil || !OrderNotPlaced(err) {
		t.Fatalf("order the CA refused with a 400: err %v, want it never placed", err)
	}
	// RFC 9773's own refusal, 409 alreadyReplaced, on which lego would
	// order again by itself without "replaces": that order is not sent.
	f.newOrder = func(payload string) (int, string) {
		if strings.Contains(payload, `"replaces"`) {
			return 409, `{"type":"urn:ietf:params:acme:error:alreadyReplaced","detail":"certificate with serial 01 already has a replacement order","status":409}`
		}
		return 0, ""
	}
	before := f.requests("POST /new-order")
	req.ReplacesCertID = "AAAA.AQ"
	_, err = c.order(req)
	if n := f.requests("POST /new-order") - before; n != 1 || !ReplacesRefused(explain("obtain", err)) {
		t.Fatalf("alreadyReplaced: %d orders sent (want 1), err %v", n, err)
	}
	if msg := explain("obtain a.example", err).Error(); !strings.Contains(msg, "alreadyReplaced") || !strings.Contains(msg, "already has a replacement order") {
		t.Fatalf("the CA's words are lost: %s", msg)
	}
}

// Whatever goes wrong once the finalize request was sent may come after
// the CA issued (hostile reviews: a proxy that passed finalize on and
// answered 500, or 502 as HTML, or 409, or failed the order's poll, got
// up to five certificates per run, all refunded). The order is looked
// at: issued, its certificate is fetched; ready, it is finalized again;
// failed (invalid), nothing was issued and another order may go; else
// the error says the CA may have issued, so that the engine keeps what
// it reserved. Never is a second order placed for a finalized one.
func TestFinalizeFaultIsNotOrderedAgain(t *testing.T) {
	problem := func(status int, typ string) func() (int, string, string) {
		return func() (int, string, string) {
			return status, "application/problem+json", fmt.Sprintf(`{"type":"urn:ietf:params:acme:error:%s","detail":"injected","status":%d}`, typ, status)
		}
	}
	html := func() (int, string, string) { return 502, "text/html", "<html><body>502 Bad Gateway</body></html>" }
	nullBody := func() (int, string, string) { return 504, "application/json", "null" }
	gatewayJSON := func() (int, string, string) {
		return 504, "application/json", `{"message":"Endpoint request timed out"}`
	}
	finalizes := 0
	firstHTML := func() (int, string, string) {
		if finalizes++; finalizes == 1 {
			return html()
		}
		return problem(500, "serverInternal")()
	}
	refusedDetail := func() (int, string, string) {
		return 500, "application/problem+json", `{"type":"urn:ietf:params:acme:error:serverInternal","detail":"storing certificate: dial tcp 10.0.0.5:5432: connect: connection refused","status":500}`
	}
	twice := func(p func() (int, string, string)) func() (int, string, string) {
		n := 0
		return func() (int, string, string) {
			if n++; n > 2 {
				return 0, "", ""
			}
			return p()
		}
	}
	status := func(s string) func(int) (string, string) {
		return func(n int) (string, string) {
			switch s {
			case "processing, then valid":
				return map[bool]string{true: "processing", false: "valid"}[n <= 1], ""
			case "ready twice, then valid": // looked at after each failed finalize
				return map[bool]string{true: "ready", false: "valid"}[n <= 2], ""
			}
			return s, ""
		}
	}
	for _, tc := range []struct {
		name            string
		finalize, order func() (int, string, string)
		cert            func() (int, string, string) // the download's answer
		orderStatus     string                       // the order's status when polled
		replaces        string
		want            string // "fetched", "may have issued", "refused" or "failed"
	}{
		{"finalize 500, issued", problem(500, "serverInternal"), nil, nil, "valid", "", "fetched"},
		{"finalize 502 page, issued", html, nil, nil, "valid", "", "fetched"},
		// The CA's detail reads like a connection refused on this side:
		// it answered, so it may have issued (helper-31 finding 1).
		{"finalize 500 reading connection refused, issued", refusedDetail, nil, nil, "valid", "", "fetched"},
		{"finalize 409 on an ARI renewal, issued", problem(409, "alreadyReplaced"), nil, nil, "valid", "AAAA.AQ", "fetched"},
		{"finalize 500, processing then issued", problem(500, "serverInternal"), nil, nil, "processing, then valid", "", "fetched"},
		// Still ready after every finalize the CA itself refused:
		// nothing issued, and not ordered again from this CA.
		{"finalize 500 every time, ready again", problem(500, "serverInternal"), nil, nil, "ready", "", "refused"},
		// A gateway's error page, not the CA's answer: the CA behind it
		// may still take the finalize (helper-32 finding B).
		{"finalize 502 page, ready again", html, nil, nil, "ready", "", "may have issued"},
		// A gateway's JSON answer lego takes for a problem, and a
		// gateway page on the first finalize only (helper-33 finding 1).
		{"finalize 504 JSON, ready again", gatewayJSON, nil, nil, "ready", "", "may have issued"},
		{"finalize 502 page, then 500s, ready again", firstHTML, nil, nil, "ready", "", "may have issued"},
		// A null body, which lego decodes into a nil problem and then
		// dereferences (helper-33 finding 3): an error, not a panic.
		{"finalize 504 null, issued", nullBody, nil, nil, "valid", "", "fetched"},
		// step-ca: a 500 to each of two finalizes of the order, then the
		// third goes through, on the same order.
		{"finalize 500 twice, ready, then finalized", twice(problem(500, "serverInternal")), nil, nil, "ready twice, then valid", "", "fetched"},
		{"finalize 500, order failed", problem(500, "serverInternal"), nil, nil, "invalid", "", "failed"},
		{"order poll 500", nil, problem(500, "serverInternal"), nil, "processing", "", "may have issued"},
		// A download that fails is fetched again: the CA issued.
		{"download 500 twice, then fetched", nil, nil, twice(problem(500, "serverInternal")), "valid", "", "fetched"},
		{"download 500 always", nil, nil, problem(500, "serverInternal"), "valid", "", "may have issued"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel() // several wait out the order's retry pauses
			f := newFakeCA(t)
			f.finalizeProblem, f.orderProblem, f.certProblem, f.order = tc.finalize, tc.order, tc.cert, status(tc.orderStatus)
			f.finalize = func() (string, string) { return "processing", "" }
			tries := 0
			f.newOrder = func(string) (int, string) { tries++; return 0, "" }
			c, _ := f.client(nopProvider{})
			key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
			req := certificate.ObtainRequest{Domains: []string{"a.example", "b.example"}, PrivateKey: key, Bundle: true, ReplacesCertID: tc.replaces}
			_, err := c.order(req)
			explained := explain("obtain a.example,b.example", err)
			orders := f.requests("POST /new-order")
			switch tc.want {
			case "fetched":
				downloads := 1
				if tc.cert != nil {
					downloads = 3 // two failed, then fetched
				}
				if err != nil || orders != 1 || f.requests("POST /cert") != downloads {
					t.Fatalf("issued despite the finalize answer: err %v, %d orders, want its certificate fetched from the one order", err, orders)
				}
			case "may have issued":
				if tc.cert != nil && f.requests("POST /cert") != orderTries {
					t.Fatalf("%d downloads, want %d: an issued certificate is fetched again", f.requests("POST /cert"), orderTries)
				}
				if !strings.Contains(hint.Of(explained), "may have issued") {
					t.Errorf("hint %q: want it to say the CA may have issued", hint.Of(explained))
				}
				if err == nil || !MayHaveIssued(explained) || ReplacesRefused(explained) || orders != 1 {
					t.Fatalf("%d orders, err %v: want one order and an error MayHaveIssued knows, not a refusal of replaces", orders, err)
				}
			case "refused":
				if err == nil || MayHaveIssued(explained) || orders != 1 || f.requests("POST /finalize") != 1+orderTries {
					t.Fatalf("%d orders, %d finalizes, err %v: want one order finalized %d times and an error that is not may-have-issued", orders, f.requests("POST /finalize"), err, 1+orderTries)
				}
				if !ServerFault(explained) {
					t.Errorf("err %v: want the CA's fault (a fallback CA may take the names)", explained)
				}
			case "failed":
				// The order failed: nothing issued, the CA's fault, which
				// the engine orders again (budgeted).
				if err == nil || MayHaveIssued(explained) || !ServerFault(explained) || orders != 1 {
					t.Fatalf("%d orders, err %v: want one, failed as the CA's fault, not may-have-issued", orders, err)
				}
			}
		})
	}
	// A 5xx before finalize issued nothing: the CA's fault, which the
	// engine orders again (budgeted), however the CA's host is named.
	f := newFakeCA(t)
	c, _ := f.client(nopProvider{})
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tries := 0
	f.newOrder = func(string) (int, string) {
		if tries++; tries == 1 {
			return 500, `{"type":"urn:ietf:params:acme:error:serverInternal","detail":"changed since last read","status":500}`
		}
		return 0, ""
	}
	req := certificate.ObtainRequest{Domains: []string{"a.example", "b.example"}, PrivateKey: key, Bundle: true}
	if _, err := c.order(req); tries != 1 || err == nil || MayHaveIssued(err) || !ServerFault(err) {
		t.Fatalf("order after a new-order 500: %d tries, err %v: want one, and the CA's fault", tries, err)
	}
}

// A finalize that never reached the CA (no nonce, no connection: a CA
// killed mid-batch) is a failure like any before it, which a fallback CA
// may take; one that may have reached it is not.
func TestFinalizeNotSent(t *testing.T) {
	for msg, want := range map[string]bool{
		`failed to post JWS message: failed to sign content: go-jose/go-jose: Error generating nonce: failed to get nonce from HEAD https://ca.test/nonce`: true,
		`Post "https://ca.test/finalize/1": dial tcp 127.0.0.1:14000: connect: connection refused`:                                                         true,
		`Post "https://ca.test/finalize/1": EOF`: false,
		`Post "https://ca.test/finalize/1": context deadline exceeded (Client.Timeout exceeded while awaiting headers)`: false,
		// The CA answered: its detail may read like a transport error of
		// its own (helper-31 finding 1: five certificates a run).
		`500 :: POST :: https://ca.test/finalize/1 :: urn:ietf:params:acme:error:serverInternal :: storing certificate: dial tcp 10.0.0.5:5432: connect: connection refused`: false,
	} {
		if got := notSent(errors.New(msg)); got != want {
			t.Errorf("notSent(%q) = %v, want %v", msg, got, want)
		}
	}
	for _, tc := range []struct {
		err  error
		want bool
	}{
		{&url.Error{Op: "Post", URL: "https://ca.test/finalize/1", Err: &net.OpError{Op: "dial", Net: "tcp", Err: syscall.ECONNREFUSED}}, true},
		{&url.Error{Op: "Post", URL: "https://ca.test/finalize/1", Err: &net.DNSError{Err: "no such host", Name: "ca.test", IsNotFound: true}}, true},
		{&url.Error{Op: "Post", URL: "https://ca.test/finalize/1", Err: &net.OpError{Op: "read", Net: "tcp", Err: syscall.ECONNRESET}}, false},
		{&legoacme.ProblemDetails{Type: "urn:ietf:params:acme:error:serverInternal", Detail: "storing certificate: dial tcp 10.0.0.5:5432: connect: connection refused", HTTPStatus: 500}, false},
		{&legoacme.ProblemDetails{Type: "urn:ietf:params:acme:error:serverInternal", Detail: "lookup db.internal: no such host", HTTPStatus: 500}, false},
	} {
		if got := notSent(fmt.Errorf("finalize: %w", tc.err)); got != tc.want {
			t.Errorf("notSent(%v) = %v, want %v", tc.err, got, tc.want)
		}
	}
}
