package e2e

import (
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/lbcert/lbcert/internal/testenv"
)

// The tests in this file run the built lbcert with two real CAs (issue
// #27 item 7): Pebble as the primary, reached through a CAFront that a
// test can make fail, and step-ca as the fallback. Their roots differ,
// and both validate HTTP-01 on the same port, where lbcert's standalone
// listener answers for either.

// failoverEnv is a Pebble primary (behind a front), a step-ca fallback on
// Pebble's validation port, and an nginx that serves every lineage.
type failoverEnv struct {
	*env
	stepca   *testenv.StepCA
	front    *testenv.CAFront // nil when lbcert talks to Pebble itself
	primary  string           // the primary's directory, as lbcert has it
	fallback string           // --fallback-ca
	roots    string           // the primary's roots, --verify-roots
	tlsAddr  string
	deploy   []string
}

// newFailoverEnv starts the two CAs; with front, lbcert reaches Pebble
// through a CAFront; step-ca gets eab keys for its EAB provisioner.
func newFailoverEnv(t *testing.T, front bool, eab int) *failoverEnv {
	t.Helper()
	port, err := testenv.FreePort()
	if err != nil {
		t.Fatal(err)
	}
	e := newEnv(t, testenv.PebbleOptions{HTTPPort: port})
	os.MkdirAll(filepath.Join(e.work, "stepca"), 0o755)
	s := startStepCA(t, testenv.StepCAOptions{Dir: filepath.Join(e.work, "stepca"), HTTPPort: port, EABKeys: eab})
	f := &failoverEnv{env: e, stepca: s, primary: e.pebble.DirectoryURL, roots: filepath.Join(e.work, "pebble-roots.pem")}
	if front {
		if f.front, err = testenv.StartCAFront(e.pebble); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(f.front.Stop)
		e.server, f.primary = f.front.DirectoryURL, f.front.DirectoryURL
	}
	f.fallback = fmt.Sprintf("stepca %s ca-bundle=%s verify-roots=%s email=pki@lbcert.test", s.DirectoryURL, s.CABundle, s.CABundle)
	f.savePebbleRoots()
	return f
}

// savePebbleRoots writes Pebble's current issuing root (new at every
// start) where --verify-roots points.
func (f *failoverEnv) savePebbleRoots() {
	f.t.Helper()
	root, err := f.pebble.Roots()
	if err != nil {
		f.t.Fatal(err)
	}
	if err := os.WriteFile(f.roots, root, 0o644); err != nil {
		f.t.Fatal(err)
	}
}

// withNginx starts an nginx whose include file lbcert writes, and makes
// every run deploy to it and check the served chain.
func (f *failoverEnv) withNginx() {
	f.t.Helper()
	f.tlsAddr = freeAddr(f.t)
	plain := freeAddr(f.t)
	prefix := filepath.Join(f.work, "nginx")
	os.MkdirAll(filepath.Join(prefix, "conf.d"), 0o755)
	body := filepath.Join(prefix, "lbcert-server.conf")
	os.WriteFile(body, []byte(fmt.Sprintf("listen %s ssl;\nreturn 200 \"ok\\n\";\n", f.tlsAddr)), 0o644)
	conf := testenv.NginxConfig(prefix, fmt.Sprintf("    server { listen %s; return 204; }\n    include %s/conf.d/*.conf;", plain, prefix))
	n, err := testenv.StartNginx(prefix, conf, plain)
	if err != nil {
		f.t.Fatal(err)
	}
	f.t.Cleanup(n.Stop)
	f.deploy = []string{"--deploy", "nginx", "--nginx-conf", n.Conf, "--nginx-bin", n.Bin, "--nginx-include", filepath.Join(prefix, "conf.d", "lbcert.conf"),
		"--nginx-server-body", body, "--verify-addr", f.tlsAddr, "--verify-roots", f.roots}
}

// runReport is the run report (--json) as these tests read it.
type runReport struct {
	Counts map[string]int
	Items  []struct {
		Name, Outcome, Serial, Verify, Deploy, CA, Server, Fallback, Error string
	}
	CAs []struct {
		Name, Server, Reason string
		Issued               int
		PassedOverUntil      *time.Time `json:"passed_over_until"`
	}
}

func parseReport(t *testing.T, r result) runReport {
	t.Helper()
	var rep runReport
	if err := json.Unmarshal([]byte(r.stdout), &rep); err != nil {
		t.Fatalf("--json: %v\n%s", err, r.stdout)
	}
	return rep
}

// chainsTo checks that lineage's certificate chains, through its
// chain.pem, to the root in rootsFile, for name.
func (f *failoverEnv) chainsTo(lineage, name, rootsFile string) error {
	leaf := f.leaf(lineage)
	roots, inters := x509.NewCertPool(), x509.NewCertPool()
	roots.AppendCertsFromPEM([]byte(readFile(f.t, rootsFile)))
	rest := []byte(readFile(f.t, filepath.Join(f.dir, "live", lineage, "chain.pem")))
	for {
		var b *pem.Block
		if b, rest = pem.Decode(rest); b == nil {
			break
		}
		if c, err := x509.ParseCertificate(b.Bytes); err == nil {
			inters.AddCert(c)
		}
	}
	_, err := leaf.Verify(x509.VerifyOptions{DNSName: name, Roots: roots, Intermediates: inters})
	return err
}

// TestFailoverPrimaryKilledMidBatch: Pebble is killed (SIGKILL) after the batch's
// first certificates. The batch completes through step-ca; every
// certificate chains to the root of the CA that issued it, is served by
// nginx and passed the deploy check against that root; the run, list
// and the metrics say which CA issued each and why. Once Pebble is back
// and its breaker's backoff has passed, a renewal goes back to it.
func TestFailoverPrimaryKilledMidBatch(t *testing.T) {
	t.Parallel()
	f := newFailoverEnv(t, false, 0)
	f.failoverBatch(f.pebble.Kill, func() {
		if err := f.pebble.Start(); err != nil {
			t.Fatal(err)
		}
		f.savePebbleRoots() // a new Pebble, a new root
	})
}

// TestFailoverPrimaryAnswers503: the same, with the primary answering
// every request with a 503 page through a front, as a load balancer in
// front of a CA that is down does.
func TestFailoverPrimaryAnswers503(t *testing.T) {
	t.Parallel()
	f := newFailoverEnv(t, true, 0)
	f.failoverBatch(func() { f.front.Set(testenv.Unavailable, 0) }, func() { f.front.Set(testenv.Pass, 0) })
}

func (f *failoverEnv) failoverBatch(breakPrimary, restore func()) {
	t := f.t
	f.withNginx()
	const rows = 10
	var names []string
	for i := range rows {
		names = append(names, fmt.Sprintf("fo%d.example.org", i))
	}
	csv := writeCSV(t, f.work, "failover.csv", seedRows(f.env, names...))
	// The primary breaks once it has issued three certificates: orders
	// are then in flight, and the rest of the batch is still to come.
	broken := make(chan struct{})
	go func() {
		defer close(broken)
		for deadline := time.Now().Add(2 * time.Minute); time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
			if f.pebble.Issued() >= 3 {
				breakPrimary()
				return
			}
		}
	}()
	args := f.batchArgs(csv, append([]string{"--json", "--concurrency", "2", "--rate-domain", "off", "--fallback-ca", f.fallback, "--ca-backoff", "3s"}, f.deploy...)...)
	r := f.run(args...)
	<-broken
	rep := parseReport(t, r)
	if r.code != 0 || rep.Counts["issued"] != rows {
		t.Fatalf("batch: exit %d, counts %v\n%s", r.code, rep.Counts, r.stderr)
	}
	byCA := map[string]int{}
	for _, it := range rep.Items {
		byCA[it.CA]++
		root := f.roots
		if it.CA == "stepca" {
			root = f.stepca.CABundle
			if !strings.Contains(it.Fallback, "127.0.0.1") || it.Server != f.stepca.DirectoryURL {
				t.Errorf("%s: from the fallback without saying why: %+v", it.Name, it)
			}
		} else if it.Fallback != "" || it.Server != f.primary {
			t.Errorf("%s: %+v", it.Name, it)
		}
		if err := f.chainsTo(it.Name, it.Name, root); err != nil {
			t.Errorf("%s (from %s) does not chain to its CA's root: %v", it.Name, it.CA, err)
		}
		if it.Verify != "ok" || it.Deploy != "ok" {
			t.Errorf("%s: deploy %q, verify %q", it.Name, it.Deploy, it.Verify)
		}
		servedEventually(t, f.tlsAddr, it.Name, it.Serial)
	}
	if byCA["stepca"] == 0 || byCA["stepca"] == rows || f.stepca.Orders() < byCA["stepca"] {
		t.Fatalf("issued by %v; step-ca saw %d orders: want the batch split between the CAs", byCA, f.stepca.Orders())
	}
	if !strings.Contains(r.stderr, fmt.Sprintf("lbcert: warning: %d certificate(s) came from fallback stepca: ", byCA["stepca"])) {
		t.Errorf("no warning that the fallback was used:\n%s", r.stderr)
	}
	var until time.Time
	for _, c := range rep.CAs {
		if c.Server == f.primary && c.PassedOverUntil != nil {
			until = *c.PassedOverUntil
		}
	}
	if until.IsZero() {
		t.Fatalf("the primary is not passed over after failing: %+v", rep.CAs)
	}
	var moved string
	for _, it := range rep.Items {
		if it.CA == "stepca" {
			moved = it.Name
		}
	}
	l := f.listEntries()[moved]
	if list := f.mustRun("list", "--name", moved); !strings.Contains(list.stdout, "from fallback stepca: ") {
		t.Errorf("list does not say the fallback issued %s:\n%s", moved, list.stdout)
	}
	show := f.mustRun("show", moved, "--json")
	if !strings.Contains(show.stdout, `"ca": "stepca"`) || !strings.Contains(show.stdout, `"primary": "`+f.primary+`"`) {
		t.Errorf("show --json %s:\n%s", moved, show.stdout)
	}

	// The primary comes back. After the breaker's backoff one order
	// tries it, and the renewal of a certificate the fallback issued
	// goes back to it, to be served and checked against its root.
	restore()
	time.Sleep(time.Until(until) + 100*time.Millisecond) // the breaker's own clock, as list announced it
	before := f.stepca.Orders()
	r = f.run("renew", "--force", "--name", moved, "--no-random-sleep", "--json", "--fallback-ca", f.fallback)
	rep = parseReport(t, r)
	if r.code != 0 || len(rep.Items) != 1 || rep.Items[0].Outcome != "renewed" || rep.Items[0].Fallback != "" || rep.Items[0].Server != f.primary {
		t.Fatalf("renewal after the primary returned: exit %d %+v\n%s", r.code, rep.Items, r.stderr)
	}
	if f.stepca.Orders() != before {
		t.Fatal("the renewal also ordered at the fallback")
	}
	if err := f.chainsTo(moved, moved, f.roots); err != nil || rep.Items[0].Verify != "ok" {
		t.Fatalf("the renewed %s: chain %v, verify %q", moved, err, rep.Items[0].Verify)
	}
	servedEventually(t, f.tlsAddr, moved, rep.Items[0].Serial)
	if l2 := f.listEntries()[moved]; l2.Serial == l.Serial {
		t.Fatal("list shows the old certificate")
	}
	if show := f.mustRun("show", moved, "--json"); strings.Contains(show.stdout, `"fallback"`) {
		t.Fatalf("show still names a fallback:\n%s", show.stdout)
	}
}

// TestFailoverRateLimitedPastMaxWait: the primary answers new orders
// with rateLimited and a Retry-After of an hour, past --max-wait: the
// fallback issues, and the next order does not ask the primary again
// before its Retry-After (the budget holds it), but goes to the fallback.
func TestFailoverRateLimitedPastMaxWait(t *testing.T) {
	t.Parallel()
	f := newFailoverEnv(t, true, 0)
	f.front.Set(testenv.RefuseOrders, time.Hour)
	http := fmt.Sprintf("127.0.0.1:%d", f.pebble.HTTPPort)
	issue := func(name string) runReport {
		r := f.run("issue", "-d", name, "--standalone", "--http-addr", http, "--agree-tos", "--max-wait", "5s", "--json", "--fallback-ca", f.fallback)
		rep := parseReport(t, r)
		if r.code != 0 || rep.Items[0].CA != "stepca" {
			t.Fatalf("issue %s: exit %d %+v\n%s", name, r.code, rep.Items, r.stderr)
		}
		return rep
	}
	rep := issue("rl1.example.org")
	if !strings.Contains(rep.Items[0].Fallback, "answered rateLimited") || !strings.Contains(rep.Items[0].Fallback, "past --max-wait 5s") {
		t.Fatalf("fallback reason %q", rep.Items[0].Fallback)
	}
	if n := f.front.Orders(); n != 1 {
		t.Fatalf("the primary got %d new orders, want 1", n)
	}
	if err := f.chainsTo("rl1.example.org", "rl1.example.org", f.stepca.CABundle); err != nil {
		t.Fatal(err)
	}
	rep = issue("rl2.example.org")
	if n := f.front.Orders(); n != 1 {
		t.Fatalf("a second order went to the primary inside its Retry-After (%d new orders)", n)
	}
	if !strings.Contains(rep.Items[0].Fallback, f.primary[len("https://"):len(f.primary)-len("/dir")]+" not ordered: ") {
		t.Fatalf("fallback reason %q", rep.Items[0].Fallback)
	}
}

// TestNoFailoverForAFailedValidation: a name the primary cannot validate
// fails there, once, and never reaches the fallback, whose limits it
// would spend as well.
func TestNoFailoverForAFailedValidation(t *testing.T) {
	t.Parallel()
	f := newFailoverEnv(t, true, 0)
	// Pebble resolves the name to an address nothing listens on.
	if err := f.pebble.SetA("bad.example.org", "127.0.0.2"); err != nil {
		t.Fatal(err)
	}
	http := fmt.Sprintf("127.0.0.1:%d", f.pebble.HTTPPort)
	r := f.run("issue", "-d", "bad.example.org", "--standalone", "--http-addr", http, "--agree-tos", "--fallback-ca", f.fallback)
	if r.code != 1 || !strings.Contains(r.stderr, "lbcert: error: obtain bad.example.org: ") || strings.Contains(r.stdout+r.stderr, "stepca") {
		t.Fatalf("exit %d\n%s%s", r.code, r.stdout, r.stderr)
	}
	if n := f.stepca.Orders(); n != 0 {
		t.Fatalf("the fallback got %d orders for a name that failed validation", n)
	}
	if n := f.front.Orders(); n != 1 {
		t.Fatalf("the primary got %d orders, want 1", n)
	}
	if n := strings.Count(f.pebble.FullLog(), "set INVALID by completed challenge"); n != 1 {
		t.Fatalf("%d failed validations at the primary, want 1", n)
	}
	st := readFile(t, filepath.Join(f.dir, "renewal", "bad.example.org.json"))
	if !strings.Contains(st, `"failures": 1`) {
		t.Fatalf("no failure backoff for the name:\n%s", st)
	}
}

// TestFailoverPrimaryHangs: the primary accepts every request and never
// answers it. With a fallback to go to, the request gives up after 30 s,
// as connecting and the handshake do, and the fallback issues.
func TestFailoverPrimaryHangs(t *testing.T) {
	t.Parallel()
	f := newFailoverEnv(t, true, 0)
	http := fmt.Sprintf("127.0.0.1:%d", f.pebble.HTTPPort)
	f.mustRun("issue", "-d", "warm.example.org", "--standalone", "--http-addr", http, "--agree-tos") // the account, registered
	// A fallback with no account yet needs its terms accepted: without
	// --agree-tos and a terminal, that is refused before any order.
	orders := f.front.Orders()
	r := f.run("issue", "-d", "hang.example.org", "--standalone", "--http-addr", http, "--fallback-ca", f.fallback)
	if r.code != 1 || !strings.Contains(r.stderr, "lbcert: error: --fallback-ca stepca: no account at "+f.stepca.DirectoryURL+" yet, and no terminal to ask about its terms of service: pass --agree-tos to accept them\n") ||
		f.front.Orders() != orders || f.stepca.Requests("new-account") != 0 {
		t.Fatalf("a fallback whose terms nobody accepted: exit %d\n%s", r.code, r.stderr)
	}
	f.front.Set(testenv.Hang, 0)
	r = f.run("issue", "-d", "hang.example.org", "--standalone", "--http-addr", http, "--agree-tos", "--json", "--fallback-ca", f.fallback)
	rep := parseReport(t, r)
	if r.code != 0 || rep.Items[0].CA != "stepca" || !strings.Contains(rep.Items[0].Fallback, "did not answer") {
		t.Fatalf("exit %d %+v\n%s", r.code, rep.Items, r.stderr)
	}
	if err := f.chainsTo("hang.example.org", "hang.example.org", f.stepca.CABundle); err != nil {
		t.Fatal(err)
	}
}

// TestFallbackEAB: a fallback that requires external account binding
// registers with its own key ID and HMAC key, from the environment
// (LBCERT_EAB_HMAC_KEY_<NAME>) or a file, never argv; the key is in no
// output and no file lbcert writes.
func TestFallbackEAB(t *testing.T) {
	t.Parallel()
	f := newFailoverEnv(t, true, 2)
	f.front.Set(testenv.Unavailable, 0)
	http := fmt.Sprintf("127.0.0.1:%d", f.pebble.HTTPPort)
	k1, k2 := f.stepca.EAB[0], f.stepca.EAB[1]
	spec := func(kid, extra string) string {
		return fmt.Sprintf("stepca-eab %s ca-bundle=%s eab-kid=%s %s", f.stepca.EABDirectoryURL, f.stepca.CABundle, kid, extra)
	}
	r := f.runEnv([]string{"LBCERT_EAB_HMAC_KEY_STEPCA_EAB=" + k1.HMAC}, "issue", "-d", "eab1.example.org", "--standalone", "--http-addr", http,
		"--agree-tos", "--email", "a@lbcert.test", "--fallback-ca", spec(k1.KID, ""))
	if r.code != 0 || !strings.Contains(r.stdout, "issuer    stepca-eab (fallback: ") || strings.Contains(r.stdout+r.stderr, k1.HMAC) {
		t.Fatalf("HMAC key from the environment: exit %d\n%s%s", r.code, r.stdout, r.stderr)
	}
	keyFile := filepath.Join(f.work, "eab.hmac")
	os.WriteFile(keyFile, []byte(k2.HMAC+"\n"), 0o600)
	r = f.run("issue", "-d", "eab2.example.org", "--standalone", "--http-addr", http, "--agree-tos", "--email", "b@lbcert.test",
		"--fallback-ca", spec(k2.KID, "eab-hmac-key-file="+keyFile))
	if r.code != 0 || strings.Contains(r.stdout+r.stderr, k2.HMAC) {
		t.Fatalf("HMAC key from a file: exit %d\n%s", r.code, r.stderr)
	}
	if err := f.chainsTo("eab2.example.org", "eab2.example.org", f.stepca.CABundle); err != nil {
		t.Fatal(err)
	}
	noSecretOnDisk(t, f.dir, k1.HMAC, k2.HMAC)
}
