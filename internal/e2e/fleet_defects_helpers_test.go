package e2e

import (
	"bytes"
	"context"
	"crypto/aes"
	"crypto/cipher"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"io"
	"log"
	"math/big"
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
	"syscall"
	"testing"
	"time"

	"filippo.io/age"

	"github.com/lbcert/lbcert/internal/testenv"
)

// Helpers of the issue-25 defect tests (fleet_defects_test.go): a node's
// own HAProxy, what a load balancer really serves, background runs, a
// front before Pebble that lets a test act at one ACME request, and an
// outsider's unseal of what the fleet keeps in Redis.

// nodeLB is one node's HAProxy: TLS on addr, certificates in certs.
type nodeLB struct {
	addr, certs string
	flags       []string // the agent's deploy flags for it
}

// nodeHAProxy gives node n its own HAProxy, serving every PEM in its
// crt directory by SNI. HAProxy cannot start on an empty directory, so
// it holds a self-signed placeholder (for no name of the test) first,
// as an operator's default certificate would.
func (f *fleetEnv) nodeHAProxy(n string) nodeLB {
	f.t.Helper()
	hdir := filepath.Join(f.work, "haproxy-"+n)
	lb := nodeLB{addr: freeAddr(f.t), certs: filepath.Join(hdir, "certs")}
	if err := os.MkdirAll(lb.certs, 0o700); err != nil {
		f.t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(lb.certs, "0-placeholder.pem"), placeholderPEM(f.t), 0o600); err != nil {
		f.t.Fatal(err)
	}
	sock, conf, pidfile := filepath.Join(hdir, "admin.sock"), filepath.Join(hdir, "haproxy.cfg"), filepath.Join(hdir, "haproxy.pid")
	if err := os.WriteFile(conf, []byte(haproxyConfig(sock, lb.addr, lb.certs)), 0o644); err != nil {
		f.t.Fatal(err)
	}
	h, err := testenv.StartHAProxy(hdir, conf, lb.addr)
	if err != nil {
		f.t.Fatalf("start %s's haproxy: %v", n, err)
	}
	f.t.Cleanup(h.Stop)
	lb.flags = []string{"--deploy", "haproxy", "--haproxy-conf", conf, "--haproxy-certs", lb.certs,
		"--haproxy-socket", sock, "--reload-cmd", "kill -USR2 $(cat " + pidfile + ")", "--reconcile", "2s"}
	return lb
}

// placeholderPEM is a self-signed certificate and its key, one PEM.
func placeholderPEM(t *testing.T) []byte {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "placeholder.invalid"},
		DNSNames: []string{"placeholder.invalid"}, NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour)}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	kder, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	return append(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kder})...)
}

// servedLeaf is the certificate addr presents for SNI name, or nil when
// the handshake fails.
func servedLeaf(addr, name string) *x509.Certificate {
	conn, err := tls.DialWithDialer(&net.Dialer{Timeout: 2 * time.Second}, "tcp", addr, &tls.Config{ServerName: name, InsecureSkipVerify: true})
	if err != nil {
		return nil
	}
	defer conn.Close()
	return conn.ConnectionState().PeerCertificates[0]
}

// servesName is the serial addr presents for name when the certificate
// covers name, else "" (nothing, or a default certificate for others).
func servesName(addr, name string) string {
	c := servedLeaf(addr, name)
	if c == nil || c.VerifyHostname(name) != nil {
		return ""
	}
	return fmt.Sprintf("%x", c.SerialNumber)
}

// poll calls cond every 200 ms until it is true or limit passes, and
// says whether it became true.
func poll(limit time.Duration, cond func() bool) bool {
	for deadline := time.Now().Add(limit); ; time.Sleep(200 * time.Millisecond) {
		if cond() {
			return true
		}
		if time.Now().After(deadline) {
			return false
		}
	}
}

// head is the fleet's current version and serial of name in Redis, or
// (0, "") when the fleet has none.
func (f *fleetEnv) head(name string) (int, string) {
	c := f.rdb()
	defer c.Close()
	m, err := c.HMGet(context.Background(), "lbcert:bundle:"+name, "version", "cert").Result()
	if err != nil || m[0] == nil || m[1] == nil {
		return 0, ""
	}
	v, _ := strconv.Atoi(m[0].(string))
	return v, pemSerial([]byte(m[1].(string)))
}

// inFleet says whether Redis lists name among the fleet's lineages.
func (f *fleetEnv) inFleet(name string) bool {
	for _, n := range f.fleetNames() {
		if n == name {
			return true
		}
	}
	return false
}

// pemSerial is the serial of the first certificate in a PEM, "" if none.
func pemSerial(data []byte) string {
	for {
		var b *pem.Block
		b, data = pem.Decode(data)
		if b == nil {
			return ""
		}
		if b.Type != "CERTIFICATE" {
			continue
		}
		c, err := x509.ParseCertificate(b.Bytes)
		if err != nil {
			return ""
		}
		return fmt.Sprintf("%x", c.SerialNumber)
	}
}

// fileSerial is pemSerial of a file, "" when it is missing.
func fileSerial(path string) string {
	data, err := os.ReadFile(path)
	if err != nil {
		return ""
	}
	return pemSerial(data)
}

// archiveSerials maps each version in node dir's archive of name to the
// serial of its certificate.
func archiveSerials(dir, name string) map[int]string {
	out := map[int]string{}
	entries, _ := os.ReadDir(filepath.Join(dir, "archive", name))
	for _, e := range entries {
		v, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		if s := fileSerial(filepath.Join(dir, "archive", name, e.Name(), "cert.pem")); s != "" {
			out[v] = s
		}
	}
	return out
}

// stopAgent stops node n's agent (SIGTERM) and waits for it.
func (f *fleetEnv) stopAgent(n string) {
	node := f.nodes[n]
	node.cancel()
	node.agent.Wait()
}

// bgRun is an lbcert run in the background, its stderr readable while
// it runs.
type bgRun struct {
	cmd    *cmdWithOut
	proc   *os.Process
	done   chan result // the result, once
	exited chan struct{}
}

type cmdWithOut struct {
	mu       sync.Mutex
	out, err bytes.Buffer
}

func (c *cmdWithOut) stderr() string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.err.String()
}

// bg starts lbcert on node n in fleet mode and returns at once. A run
// still going when the test ends gets SIGTERM, as an operator's Ctrl-C.
func (f *fleetEnv) bg(n string, args ...string) *bgRun {
	f.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), runDeadline)
	full := append([]string{"--dir", f.nodes[n].dir, "--redis", f.url}, args...)
	cmd := f.command(ctx, full...)
	cmd.Env = append(cmd.Env, "LBCERT_REDIS_PASSWORD="+fleetPassword)
	return startBG(f.t, cmd, cancel)
}

// startBG starts cmd and returns at once; cancel is called when it
// ends. A run still going when the test ends gets SIGTERM, as an
// operator's Ctrl-C.
func startBG(t *testing.T, cmd *exec.Cmd, cancel context.CancelFunc) *bgRun {
	t.Helper()
	w := &cmdWithOut{}
	cmd.Stdout = &lockedWriter{b: &w.out, mu: &w.mu}
	cmd.Stderr = &lockedWriter{b: &w.err, mu: &w.mu}
	if err := cmd.Start(); err != nil {
		cancel()
		t.Fatal(err)
	}
	r := &bgRun{cmd: w, proc: cmd.Process, done: make(chan result, 1), exited: make(chan struct{})}
	go func() {
		defer cancel()
		err := cmd.Wait()
		res := result{}
		if ee, ok := err.(*exec.ExitError); ok {
			res.code = ee.ExitCode()
		} else if err != nil {
			res.code = -1
		}
		w.mu.Lock()
		res.stdout, res.stderr = w.out.String(), w.err.String()
		w.mu.Unlock()
		r.done <- res
		close(r.exited)
	}()
	t.Cleanup(func() {
		r.stop()
		select {
		case <-r.exited:
		case <-time.After(15 * time.Second):
		}
	})
	return r
}

// stop sends the run SIGTERM.
func (r *bgRun) stop() { r.proc.Signal(syscall.SIGTERM) }

// wait waits for the run to end, up to limit.
func (r *bgRun) wait(t *testing.T, what string, limit time.Duration) result {
	t.Helper()
	select {
	case res := <-r.done:
		t.Logf("$ %s (background)\n%s%s(exit %d)", what, res.stdout, res.stderr, res.code)
		return res
	case <-time.After(limit):
		t.Fatalf("%s still running after %s:\n%s", what, limit, r.cmd.stderr())
	}
	return result{}
}

// leaseHolder is who holds name's fleet lease ("" for nobody).
func (f *fleetEnv) leaseHolder(name string) string {
	c := f.rdb()
	defer c.Close()
	return c.Get(context.Background(), "lbcert:lease:"+name).Val()
}

// front is a reverse proxy before Pebble: onPost, when set, is called
// with each POST's path before it is forwarded, and may block it.
type front struct {
	url string // the ACME directory through the front
	mu  sync.Mutex
	on  func(path string)
}

func (fr *front) onPost(fn func(path string)) {
	fr.mu.Lock()
	fr.on = fn
	fr.mu.Unlock()
}

// startFront puts a front before the env's Pebble and makes every run
// of the test use it (--server).
func (e *env) startFront() *front {
	e.t.Helper()
	root, err := testenv.ModuleRoot()
	if err != nil {
		e.t.Fatal(err)
	}
	certs := filepath.Join(root, "testdata", "pebble")
	cert, err := tls.LoadX509KeyPair(filepath.Join(certs, "cert.pem"), filepath.Join(certs, "key.pem"))
	if err != nil {
		e.t.Fatal(err)
	}
	caPEM, err := os.ReadFile(e.pebble.CABundle)
	if err != nil {
		e.t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(caPEM)
	target, err := url.Parse(e.pebble.DirectoryURL)
	if err != nil {
		e.t.Fatal(err)
	}
	target.Path = ""
	fr := &front{}
	proxy := &httputil.ReverseProxy{
		Rewrite: func(pr *httputil.ProxyRequest) {
			pr.SetURL(target)
			pr.Out.Host = pr.In.Host // Pebble builds its URLs, and checks the JWS url, from Host
		},
		Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}},
		ErrorLog:  nullLog(),
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		e.t.Fatal(err)
	}
	srv := &http.Server{TLSConfig: &tls.Config{Certificates: []tls.Certificate{cert}}, ErrorLog: nullLog(),
		Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			fr.mu.Lock()
			on := fr.on
			fr.mu.Unlock()
			if on != nil && r.Method == http.MethodPost {
				on(r.URL.Path)
			}
			proxy.ServeHTTP(w, r)
		})}
	go srv.ServeTLS(ln, "", "")
	e.t.Cleanup(func() { srv.Close() })
	fr.url = "https://" + ln.Addr().String() + "/dir"
	e.server = fr.url
	return fr
}

// outsider holds what a removed node kept: its age identity and the
// data keys on its disk, plus any key in Redis wrapped for it.
type outsider struct {
	fleetID string
	keys    [][]byte
}

// outsiderOf reads node dir's fleet identity and data keys, as a small
// program of the node's former operator would, with the format of
// internal/fleet/crypto.go (age-wrapped data keys, AES-256-GCM).
func (f *fleetEnv) outsiderOf(dir string) *outsider {
	f.t.Helper()
	fd := filepath.Join(dir, "fleet")
	idData, err := os.ReadFile(filepath.Join(fd, "identity.txt"))
	if err != nil {
		f.t.Fatal(err)
	}
	ids, err := age.ParseIdentities(bytes.NewReader(idData))
	if err != nil {
		f.t.Fatal(err)
	}
	var st struct {
		Fleet string `json:"fleet_id"`
	}
	if data, err := os.ReadFile(filepath.Join(fd, "state.json")); err != nil || json.Unmarshal(data, &st) != nil || st.Fleet == "" {
		f.t.Fatalf("%s: no fleet id in state.json: %v", fd, err)
	}
	o := &outsider{fleetID: st.Fleet}
	unwrap := func(w []byte) {
		r, err := age.Decrypt(bytes.NewReader(w), ids...)
		if err != nil {
			return
		}
		if k, err := io.ReadAll(r); err == nil && len(k) == 32 {
			o.keys = append(o.keys, k)
		}
	}
	files, _ := filepath.Glob(filepath.Join(fd, "datakey-*.age"))
	for _, p := range files {
		if w, err := os.ReadFile(p); err == nil {
			unwrap(w)
		}
	}
	if len(o.keys) == 0 {
		f.t.Fatalf("%s holds no data key its identity opens: the outsider test would prove nothing", fd)
	}
	c := f.rdb()
	defer c.Close()
	ctx := context.Background()
	wrapped, _ := c.Keys(ctx, "lbcert:wrapped:*").Result()
	for _, k := range wrapped {
		for _, w := range c.HGetAll(ctx, k).Val() {
			unwrap([]byte(w))
		}
	}
	return o
}

// opens says whether one of the outsider's keys opens sealed (version
// byte, 12-byte nonce, AES-256-GCM) with associated data ad.
func (o *outsider) opens(sealed, ad []byte) bool {
	for _, k := range o.keys {
		block, err := aes.NewCipher(k)
		if err != nil {
			continue
		}
		gcm, err := cipher.NewGCM(block)
		if err != nil || len(sealed) < 1+gcm.NonceSize()+gcm.Overhead() {
			continue
		}
		if _, err := gcm.Open(nil, sealed[1:1+gcm.NonceSize()], sealed[1+gcm.NonceSize():], ad); err == nil {
			return true
		}
	}
	return false
}

// openedBy lists what in Redis the outsider can open: bundles' keys
// (bound to fleet, name and version) and accounts' keys (fleet, CA and
// email).
func (f *fleetEnv) openedBy(o *outsider) []string {
	c := f.rdb()
	defer c.Close()
	ctx := context.Background()
	var opened []string
	bundles, _ := c.Keys(ctx, "lbcert:bundle:*").Result()
	for _, k := range bundles {
		m := c.HGetAll(ctx, k).Val()
		name := strings.TrimPrefix(k, "lbcert:bundle:")
		ad := "lbcert-bundle-v1\x00" + o.fleetID + "\x00" + name + "\x00" + m["version"]
		if o.opens([]byte(m["key"]), []byte(ad)) {
			opened = append(opened, fmt.Sprintf("%s version %s (epoch %s)", name, m["version"], m["epoch"]))
		}
	}
	accounts, _ := c.Keys(ctx, "lbcert:account:*").Result()
	for _, k := range accounts {
		m := c.HGetAll(ctx, k).Val()
		ad := "lbcert-account-v1\x00" + o.fleetID + "\x00" + m["server"] + "\x00" + m["email"]
		if o.opens([]byte(m["key"]), []byte(ad)) {
			opened = append(opened, fmt.Sprintf("account %s (epoch %s)", k, m["epoch"]))
		}
	}
	sort.Strings(opened)
	return opened
}

// fleetStatusJSON is what the defect tests and the random fault test
// (chaos_check_test.go) read of 'fleet status --json'.
type fleetStatusJSON struct {
	Lineages int          `json:"lineages"`
	OK       bool         `json:"ok"`
	Nodes    []statusNode `json:"nodes"`
}

type statusNode struct {
	Node        string   `json:"node"`
	Newest      int      `json:"newest"`
	Waiting     int      `json:"waiting"`
	Behind      int      `json:"behind"`
	Failed      int      `json:"failed"`
	BehindNames []string `json:"behind_names"`
	Problems    []string `json:"problems"`
}

// status runs 'fleet status --json' on node n.
func (f *fleetEnv) status(n string, extra ...string) (result, fleetStatusJSON) {
	f.t.Helper()
	r := f.on(n, append([]string{"fleet", "status", "--json"}, extra...)...)
	var st fleetStatusJSON
	json.Unmarshal([]byte(r.stdout), &st)
	return r, st
}

// behindSaid says whether fleet status reports node n behind (or failed)
// on anything.
func (st fleetStatusJSON) behindSaid(n string) bool {
	for _, ns := range st.Nodes {
		if ns.Node == n {
			return ns.Behind+ns.Failed > 0
		}
	}
	return false
}

// accountURIs are the distinct ACME account URLs the fleet's Redis and
// every node's disk hold.
func (f *fleetEnv) accountURIs() map[string][]string {
	out := map[string][]string{}
	add := func(where string, reg []byte) {
		var r struct {
			URI string `json:"uri"`
		}
		if json.Unmarshal(reg, &r) == nil && r.URI != "" {
			out[r.URI] = append(out[r.URI], where)
		}
	}
	c := f.rdb()
	defer c.Close()
	ctx := context.Background()
	keys, _ := c.Keys(ctx, "lbcert:account:*").Result()
	for _, k := range keys {
		add("redis "+k, []byte(c.HGet(ctx, k, "reg").Val()))
	}
	for _, n := range f.order {
		filepath.Walk(filepath.Join(f.nodes[n].dir, "accounts"), func(p string, fi os.FileInfo, err error) error {
			if err == nil && fi.Name() == "account.json" {
				if data, err := os.ReadFile(p); err == nil {
					add(n+" "+p, data)
				}
			}
			return nil
		})
	}
	return out
}

func nullLog() *log.Logger { return log.New(io.Discard, "", 0) }

// haproxyPool forms the fleet and gives every node its own HAProxy and
// an agent that deploys to it; the CA validates through every agent.
func (f *fleetEnv) haproxyPool() map[string]nodeLB {
	f.t.Helper()
	f.form()
	lbs := map[string]nodeLB{}
	for _, n := range f.order {
		lbs[n] = f.nodeHAProxy(n)
		f.startAgent(n, lbs[n].flags...)
	}
	f.validateVia(f.order...)
	return lbs
}

// waitInstalled waits until node n's --dir has the fleet's current
// certificate of name live (its agent installed it).
func (f *fleetEnv) waitInstalled(n, name string) {
	f.t.Helper()
	var want string
	if !poll(converge, func() bool {
		_, want = f.head(name)
		return want != "" && fileSerial(filepath.Join(f.nodes[n].dir, "live", name, "cert.pem")) == want
	}) {
		f.t.Fatalf("%s's agent did not install %s %s in %s:\n%s", n, name, want, converge, f.nodes[n].agentLog())
	}
}

// flushAll empties Redis, as FLUSHALL or a restart without data does.
func (f *fleetEnv) flushAll() {
	f.t.Helper()
	c := f.rdb()
	defer c.Close()
	if err := c.FlushAll(context.Background()).Err(); err != nil {
		f.t.Fatal(err)
	}
}

// openOnce has node n open the fleet (fleet status), which pins the
// data key on its disk as any run or its agent would.
func (f *fleetEnv) openOnce(n string) {
	f.t.Helper()
	if r := f.on(n, "fleet", "status"); r.code != 0 && r.code != 2 {
		f.t.Fatalf("%s could not open the fleet: exit %d\n%s", n, r.code, r.stderr)
	}
}

// listed says whether 'list' on node n shows name.
func (f *fleetEnv) listed(n, name string) bool {
	f.t.Helper()
	r := f.on(n, "list")
	return strings.Contains(r.stdout, name)
}
