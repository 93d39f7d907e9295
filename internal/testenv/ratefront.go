package testenv

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io"
	"log"
	"math"
	"net/http"
	"slices"
	"strings"
	"sync"
	"time"

	"golang.org/x/net/publicsuffix"
)

// FrontLimits are the limits a RateFront enforces, N per Per in the
// front's own (possibly sped-up) time; N == 0 turns one off.
type FrontLimits struct {
	Orders, Domain, ExactSet, FailedAuthz struct {
		N   int
		Per time.Duration
	}
}

// LetsEncryptLimits are Let's Encrypt's published limits.
func LetsEncryptLimits() FrontLimits {
	var l FrontLimits
	l.Orders.N, l.Orders.Per = 300, 3*time.Hour
	l.Domain.N, l.Domain.Per = 50, 7*24*time.Hour
	l.ExactSet.N, l.ExactSet.Per = 5, 7*24*time.Hour
	l.FailedAuthz.N, l.FailedAuthz.Per = 5, time.Hour
	return l
}

// RateFront is a reverse proxy in front of Pebble that enforces Let's
// Encrypt's rate limits the way Let's Encrypt documents them, which
// Pebble does not:
//
//   - new orders per account, counted when the order is created;
//   - new certificates per registered domain, counted at issuance; an
//     order for an exact set of names issued before is a renewal and
//     exempt;
//   - certificates per exact set of names, counted at issuance;
//   - failed authorizations per name per account, counted when an
//     authorization turns invalid;
//   - orders carrying ARI "replaces" are exempt from all four.
//
// All are token buckets that refill continuously. Over a limit, a new
// order gets what Let's Encrypt sends: HTTP 429, a rateLimited problem
// whose detail is worded as Boulder words it (count, period, the
// rate-limit page's anchor), and Retry-After. Its clock runs Speed times
// faster than the wall clock, so an hour of limits passes in seconds;
// the periods it states and its Retry-After are in wall-clock time, so
// a client budget set to Per/Speed agrees with it.
type RateFront struct {
	// DirectoryURL is the ACME directory through the front.
	DirectoryURL string
	// PlainWording, set before the first request, words rateLimited
	// answers as other CAs do: no count, no period, no link to Let's
	// Encrypt's rate-limit page; only the Retry-After header says when.
	PlainWording bool

	limits FrontLimits
	speed  float64
	start  time.Time
	*front

	mu      sync.Mutex
	buckets map[string]frontBucket
	issued  map[string]bool // exact sets issued before: their next order is a renewal
	orders  map[string]*frontOrder
	failed  map[string]bool // authorization URLs already counted as failed
	events  []FrontEvent
	// life and owner follow each order's life (frontlog.go): order ID
	// to order, and authorization, challenge or certificate ID to its
	// order's ID.
	life  map[string]*FrontOrder
	owner map[string]string
}

// FrontEvent is one new-order request the front answered.
type FrontEvent struct {
	At      time.Time // wall clock
	Account string
	Names   []string
	ARI     bool
	// Limited is the scope of a rateLimited answer ("orders", "domain
	// NAME", "exact_set", "failed_authz NAME"); empty when the order
	// went through to Pebble.
	Limited    string
	RetryAfter time.Duration // wall clock
}

type frontOrder struct {
	account string
	names   []string
	ari     bool
	counted bool
}

type frontBucket struct {
	tokens float64
	at     time.Time // front time
}

// StartRateFront starts a front for p with limits, its clock running
// speed times the wall clock (1 for real time).
func StartRateFront(p *Pebble, limits FrontLimits, speed float64) (*RateFront, error) {
	if speed <= 0 {
		speed = 1
	}
	f := &RateFront{
		limits: limits, speed: speed, start: time.Now(),
		buckets: map[string]frontBucket{}, issued: map[string]bool{}, orders: map[string]*frontOrder{}, failed: map[string]bool{},
	}
	var err error
	if f.front, err = startFront(p, f); err != nil {
		return nil, err
	}
	f.DirectoryURL = f.dirURL
	return f, nil
}

// Stop closes the front.
func (f *RateFront) Stop() { f.srv.Close() }

// Events returns every new-order request the front answered so far.
func (f *RateFront) Events() []FrontEvent {
	f.mu.Lock()
	defer f.mu.Unlock()
	return slices.Clone(f.events)
}

// RateLimited counts the rateLimited answers sent so far.
func (f *RateFront) RateLimited() int {
	n := 0
	for _, e := range f.Events() {
		if e.Limited != "" {
			n++
		}
	}
	return n
}

// now is the front's clock: the wall clock since start, sped up.
func (f *RateFront) now() time.Time {
	return f.start.Add(time.Duration(float64(time.Since(f.start)) * f.speed))
}

func (f *RateFront) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	arrived := time.Now()
	var body []byte
	if r.Body != nil {
		body, _ = io.ReadAll(io.LimitReader(r.Body, 1<<20))
		r.Body.Close()
	}
	jws := parseJWS(body)
	if r.Method == http.MethodPost && r.URL.Path == "/order-plz" {
		if limited := f.admit(jws); limited != nil {
			f.refuse(w, limited)
			return
		}
	}
	rec := &recorder{header: http.Header{}}
	r.Body = io.NopCloser(bytes.NewReader(body))
	r.ContentLength = int64(len(body))
	f.proxy(rec, r)
	if r.Method == http.MethodPost {
		f.observe(r.URL.Path, jws, rec)
		f.track(r.URL.Path, jws, arrived, rec)
	}
	for k, v := range rec.header {
		w.Header()[k] = v
	}
	w.WriteHeader(rec.code())
	w.Write(rec.body.Bytes())
}

// refusal is a rateLimited answer about to be sent.
type refusal struct {
	scope  string
	detail string
	wait   time.Duration // wall clock
}

// admit decides a new order: nil lets it through (spending its order
// token), a refusal says which limit it would pass.
func (f *RateFront) admit(jws jwsRequest) *refusal {
	var p struct {
		Identifiers []struct{ Value string } `json:"identifiers"`
		Replaces    string                   `json:"replaces"`
	}
	json.Unmarshal(jws.payload, &p)
	var names []string
	for _, id := range p.Identifiers {
		names = append(names, strings.ToLower(id.Value))
	}
	set := frontSet(names)
	ari := p.Replaces != ""
	f.mu.Lock()
	defer f.mu.Unlock()
	now := f.now()
	ev := FrontEvent{At: time.Now(), Account: jws.kid, Names: names, ARI: ari}
	var ref *refusal
	check := func(key string, n int, per time.Duration, scope, detail string) {
		if ref != nil || n == 0 {
			return
		}
		if wait := f.bucket(key, n, per, now).wait(n, per); wait > 0 {
			ref = &refusal{scope: scope, wait: f.wall(wait),
				detail: fmt.Sprintf(detail, n) + fmt.Sprintf(" in the last %s, retry after %s", f.wall(per), time.Now().Add(f.wall(wait)).UTC().Format("2006-01-02 15:04:05 MST"))}
		}
	}
	l := f.limits
	if !ari {
		check("orders "+jws.kid, l.Orders.N, l.Orders.Per, "orders", "too many new orders (%d) from this account")
		for _, n := range names {
			check("failed "+jws.kid+" "+n, l.FailedAuthz.N, l.FailedAuthz.Per, "failed_authz "+n, `too many failed authorizations (%d) for "`+n+`"`)
		}
		if !f.issued[set] {
			for _, d := range frontDomains(names) {
				check("domain "+d, l.Domain.N, l.Domain.Per, "domain "+d, `too many certificates (%d) already issued for "`+d+`"`)
			}
		}
		check("set "+set, l.ExactSet.N, l.ExactSet.Per, "exact_set", "too many certificates (%d) already issued for this exact set of identifiers")
	}
	if ref != nil {
		ref.detail += ": see https://letsencrypt.org/docs/rate-limits/#" + map[string]string{
			"orders": "new-orders-per-account", "domain": "new-certificates-per-registered-domain",
			"exact_set": "new-certificates-per-exact-set-of-identifiers", "failed_authz": "authorization-failures-per-identifier-per-account",
		}[strings.Fields(ref.scope)[0]]
		if f.PlainWording {
			ref.detail = "Request rejected: this account is over its limit. Please retry later."
		}
		ev.Limited, ev.RetryAfter = ref.scope, ref.wait
		f.events = append(f.events, ev)
		return ref
	}
	if !ari && l.Orders.N > 0 {
		f.take("orders "+jws.kid, l.Orders.N, l.Orders.Per, now)
	}
	f.events = append(f.events, ev)
	return nil
}

// refuse answers a refused new order as Let's Encrypt does, with a fresh
// nonce from Pebble so the client's next request is not a badNonce.
func (f *RateFront) refuse(w http.ResponseWriter, r *refusal) {
	w.Header().Set("Replay-Nonce", f.nonce())
	w.Header().Set("Content-Type", "application/problem+json")
	w.Header().Set("Retry-After", fmt.Sprint(int(math.Ceil(r.wait.Seconds()))))
	w.WriteHeader(http.StatusTooManyRequests)
	json.NewEncoder(w).Encode(map[string]any{
		"type": "urn:ietf:params:acme:error:rateLimited", "detail": r.detail, "status": http.StatusTooManyRequests,
	})
}

// observe follows Pebble's answers: which order is whose, when an order
// becomes valid (a certificate issued: spend its certificate tokens),
// and when an authorization turns invalid (spend a failed-authz token).
func (f *RateFront) observe(path string, jws jwsRequest, rec *recorder) {
	var body struct {
		Status      string `json:"status"`
		Identifiers []struct {
			Value string `json:"value"`
		} `json:"identifiers"`
		Identifier struct {
			Value string `json:"value"`
		} `json:"identifier"`
		Replaces string `json:"replaces"`
	}
	json.Unmarshal(rec.body.Bytes(), &body)
	f.mu.Lock()
	defer f.mu.Unlock()
	now := f.now()
	switch {
	case path == "/order-plz" && rec.code() == http.StatusCreated:
		o := &frontOrder{account: jws.kid, ari: body.Replaces != ""}
		for _, id := range body.Identifiers {
			o.names = append(o.names, strings.ToLower(id.Value))
		}
		f.orders[orderID(rec.header.Get("Location"))] = o
	case strings.HasPrefix(path, "/my-order/") || strings.HasPrefix(path, "/finalize-order/"):
		o := f.orders[orderID(path)]
		if o == nil || o.counted || body.Status != "valid" {
			return
		}
		o.counted = true
		set := frontSet(o.names)
		if !o.ari {
			l := f.limits
			if !f.issued[set] && l.Domain.N > 0 {
				for _, d := range frontDomains(o.names) {
					f.take("domain "+d, l.Domain.N, l.Domain.Per, now)
				}
			}
			if l.ExactSet.N > 0 {
				f.take("set "+set, l.ExactSet.N, l.ExactSet.Per, now)
			}
		}
		f.issued[set] = true
	case strings.HasPrefix(path, "/authZ/"):
		if body.Status != "invalid" || f.failed[path] || f.limits.FailedAuthz.N == 0 {
			return
		}
		f.failed[path] = true
		f.take("failed "+jws.kid+" "+strings.ToLower(body.Identifier.Value), f.limits.FailedAuthz.N, f.limits.FailedAuthz.Per, now)
	}
}

func nullLogger() *log.Logger { return log.New(io.Discard, "", 0) }

func orderID(u string) string {
	u = strings.TrimRight(u, "/")
	return u[strings.LastIndex(u, "/")+1:]
}

func (f *RateFront) bucket(key string, n int, per time.Duration, now time.Time) frontBucket {
	b, ok := f.buckets[key]
	if !ok {
		return frontBucket{tokens: float64(n), at: now}
	}
	b.tokens = math.Min(float64(n), b.tokens+float64(now.Sub(b.at))*float64(n)/float64(per))
	b.at = now
	return b
}

func (f *RateFront) take(key string, n int, per time.Duration, now time.Time) {
	b := f.bucket(key, n, per, now)
	b.tokens--
	f.buckets[key] = b
}

// wait is front time until the bucket holds a whole token.
func (b frontBucket) wait(n int, per time.Duration) time.Duration {
	if b.tokens >= 1 {
		return 0
	}
	return time.Duration(math.Ceil((1 - b.tokens) * float64(per) / float64(n)))
}

// wall turns front time into wall-clock time.
func (f *RateFront) wall(d time.Duration) time.Duration {
	return time.Duration(float64(d) / f.speed)
}

func frontSet(names []string) string {
	s := slices.Clone(names)
	slices.Sort(s)
	return strings.Join(slices.Compact(s), ",")
}

func frontDomains(names []string) []string {
	var out []string
	for _, n := range names {
		d, err := publicsuffix.EffectiveTLDPlusOne(n)
		if err != nil {
			d = n
		}
		if !slices.Contains(out, d) {
			out = append(out, d)
		}
	}
	return out
}

// jwsRequest is what the front reads of a flattened JWS request body.
type jwsRequest struct {
	kid     string
	payload []byte
}

func parseJWS(body []byte) jwsRequest {
	var j struct {
		Protected string `json:"protected"`
		Payload   string `json:"payload"`
	}
	if json.Unmarshal(body, &j) != nil {
		return jwsRequest{}
	}
	var out jwsRequest
	if h, err := base64.RawURLEncoding.DecodeString(j.Protected); err == nil {
		var ph struct {
			Kid string `json:"kid"`
		}
		json.Unmarshal(h, &ph)
		out.kid = ph.Kid
	}
	out.payload, _ = base64.RawURLEncoding.DecodeString(j.Payload)
	return out
}

// recorder holds Pebble's answer so the front can read it before the
// client does.
type recorder struct {
	header http.Header
	status int
	body   bytes.Buffer
}

func (r *recorder) Header() http.Header         { return r.header }
func (r *recorder) Write(b []byte) (int, error) { return r.body.Write(b) }
func (r *recorder) WriteHeader(code int)        { r.status = code }
func (r *recorder) code() int {
	if r.status == 0 {
		return http.StatusOK
	}
	return r.status
}
