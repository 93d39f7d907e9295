package e2e

import (
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/lbcert/lbcert/internal/testenv"
)

// The tests in this file run the built lbcert against a real step-ca
// (v0.30.2, testenv.StartStepCA), the second ACME server beside Pebble.
// step-ca differs from Pebble where operators of a private PKI meet it:
// 24-hour certificates, no ARI, no profiles, and a challenge it cannot
// validate left pending with an error.

// noARIRule is how list and renew -v name the rule that decides a
// certificate from a CA without ARI.
const noARIRule = "lifetime (the CA has no ARI)"

// stepIssue issues names through lbcert's standalone listener on the
// port step-ca validates on.
func (e *env) stepIssue(names ...string) result {
	e.t.Helper()
	args := []string{"issue", "--standalone", "--http-addr", fmt.Sprintf("127.0.0.1:%d", e.stepca.HTTPPort), "--agree-tos", "--email", "ops@lbcert.test"}
	for _, n := range names {
		args = append(args, "-d", n)
	}
	return e.mustRun(args...)
}

// listEntries is `lbcert list --json`, by lineage name.
func (e *env) listEntries() map[string]listed {
	e.t.Helper()
	var l struct{ Lineages []listed }
	r := e.mustRun("list", "--json")
	if err := json.Unmarshal([]byte(r.stdout), &l); err != nil {
		e.t.Fatalf("list --json: %v\n%s", err, r.stdout)
	}
	out := map[string]listed{}
	for _, x := range l.Lineages {
		out[x.Name] = x
	}
	return out
}

type listed struct {
	Name        string    `json:"name"`
	RenewAt     time.Time `json:"renew_at"`
	RenewReason string    `json:"renew_reason"`
	Serial      string    `json:"serial"`
}

// verifyStepChain checks that a lineage's certificate chains, through
// chain.pem, to step-ca's root and is valid for name.
func (e *env) verifyStepChain(lineage, name string) *x509.Certificate {
	e.t.Helper()
	leaf := e.leaf(lineage)
	roots, inters := x509.NewCertPool(), x509.NewCertPool()
	if !roots.AppendCertsFromPEM([]byte(readFile(e.t, e.stepca.CABundle))) {
		e.t.Fatal("step-ca's root is not PEM")
	}
	rest := []byte(readFile(e.t, filepath.Join(e.dir, "live", lineage, "chain.pem")))
	for {
		var b *pem.Block
		if b, rest = pem.Decode(rest); b == nil {
			break
		}
		c, err := x509.ParseCertificate(b.Bytes)
		if err != nil {
			e.t.Fatal(err)
		}
		inters.AddCert(c)
	}
	if _, err := leaf.Verify(x509.VerifyOptions{DNSName: name, Roots: roots, Intermediates: inters}); err != nil {
		e.t.Fatalf("%s does not chain to step-ca's root for %s: %v", lineage, name, err)
	}
	return leaf
}

// TestStepCAIssueListRevoke: a two-name certificate from step-ca, with
// its 24-hour default lifetime, chains to step-ca's own root. step-ca
// has no ARI: list names the lifetime rule and says why (never "ARI not
// asked yet" once lbcert knows), renew -v says why nothing is due on
// every run (issue #26 item 11) and orders nothing; cron install runs
// renew often enough for 24-hour certificates; delete --revoke puts the
// serial on step-ca's CRL.
func TestStepCAIssueListRevoke(t *testing.T) {
	t.Parallel()
	e := newStepEnv(t, testenv.StepCAOptions{})
	r := e.stepIssue("shop.example.net", "www.shop.example.net")
	if !strings.Contains(r.stdout, "shop.example.net: issued certificate for shop.example.net, www.shop.example.net") ||
		!strings.Contains(r.stdout, "Z (23 hours)\n") {
		t.Fatalf("stdout: %q", r.stdout)
	}
	c := e.verifyStepChain("shop.example.net", "www.shop.example.net")
	e.verifyStepChain("shop.example.net", "shop.example.net")
	if got := sorted(c.DNSNames); !slices.Equal(got, []string{"shop.example.net", "www.shop.example.net"}) {
		t.Fatalf("SANs = %v", got)
	}
	// step-ca's default: 24 hours, backdated one minute.
	if life := c.NotAfter.Sub(c.NotBefore); life < 24*time.Hour || life > 24*time.Hour+2*time.Minute {
		t.Fatalf("lifetime %v, want step-ca's 24-hour default", life)
	}
	serial := e.serial("shop.example.net")

	l := e.listEntries()["shop.example.net"]
	if l.RenewReason != noARIRule || l.Serial != serial {
		t.Fatalf("list --json: %+v, want rule %q", l, noARIRule)
	}
	// Short-lived (10 days or less): due between two thirds and one half
	// of the lifetime left.
	if left := c.NotAfter.Sub(l.RenewAt); left < 12*time.Hour || left > 16*time.Hour+time.Minute {
		t.Fatalf("renews at %v, %v before expiry", l.RenewAt, left)
	}
	if r := e.mustRun("list"); !strings.Contains(r.stdout, noARIRule) || strings.Contains(r.stdout, "not asked") {
		t.Fatalf("list:\n%s", r.stdout)
	}

	// Nothing is due: renew is silent on stdout, and -v says why, on
	// the run after the order and on every run after it.
	orders := e.stepca.Orders()
	for range 2 {
		r = e.mustRun("-v", "renew", "--no-random-sleep")
		if r.stdout != "" || !strings.Contains(r.stderr, "not due name=shop.example.net rule=\""+noARIRule+"\" due_at=") {
			t.Fatalf("renew -v with nothing due:\n%s%s", r.stdout, r.stderr)
		}
	}
	if n := e.stepca.Orders() - orders; n != 0 {
		t.Fatalf("a nothing-due renew sent %d orders", n)
	}

	// The schedule cron install picks gives a 24-hour certificate 3 runs
	// in the 12 hours it may have left when due: every 4 hours.
	cron := filepath.Join(e.work, "cron.d-lbcert")
	if r := e.mustRun("cron", "install", "--file", cron); !strings.Contains(r.stdout, "installed renew 6 times a day") {
		t.Fatalf("cron install: %q", r.stdout)
	}

	r = e.mustRun("delete", "--name", "shop.example.net", "--yes", "--revoke", "--cron-file", cron)
	if !strings.Contains(r.stdout, "revoked certificate "+serial) {
		t.Fatalf("delete: %q", r.stdout)
	}
	revoked, err := e.stepca.Revoked(serial)
	if err != nil || !revoked {
		t.Fatalf("serial %s on step-ca's CRL: %v %v", serial, revoked, err)
	}
	if _, err := os.Stat(filepath.Join(e.dir, "live", "shop.example.net")); !os.IsNotExist(err) {
		t.Fatalf("lineage still there after delete: %v", err)
	}
}

// TestStepCARenewByLifetime: with 90-second certificates, the lifetime
// rule (the CA has no ARI) decides: renew -v says not due and when, the
// run at that moment renews for the reason "lifetime", the new
// certificate chains to step-ca's root, and list still knows the CA has
// no ARI after the renewal.
func TestStepCARenewByLifetime(t *testing.T) {
	t.Parallel()
	const life = 90 * time.Second
	e := newStepEnv(t, testenv.StepCAOptions{CertLifetime: life})
	e.stepIssue("life.example.net")
	c1 := e.leaf("life.example.net")
	if got := c1.NotAfter.Sub(c1.NotBefore); got != life {
		t.Fatalf("lifetime %v, want %v", got, life)
	}
	l := e.listEntries()["life.example.net"]
	// Due between two thirds and one half of the lifetime left, so not
	// before 30 s after issue.
	if l.RenewReason != noARIRule || l.RenewAt.Before(c1.NotBefore.Add(life/3)) || l.RenewAt.After(c1.NotBefore.Add(life/2)) {
		t.Fatalf("list --json: %+v (issued %v)", l, c1.NotBefore)
	}
	r := e.mustRun("-v", "renew", "--no-random-sleep")
	if r.stdout != "" || !strings.Contains(r.stderr, "not due name=life.example.net rule=\""+noARIRule+"\" due_at="+l.RenewAt.UTC().Format(time.RFC3339)) {
		t.Fatalf("renew -v before the moment:\n%s%s", r.stdout, r.stderr)
	}

	// The certificate's own clock: wait for the moment list announced
	// (not a synchronisation with any process).
	time.Sleep(time.Until(l.RenewAt) + time.Second)
	orders := e.stepca.Orders()
	r = e.mustRun("-v", "renew", "--no-random-sleep")
	if !strings.Contains(r.stdout, "lbcert renew: 1 renewed, 0 not due") || !strings.Contains(r.stdout, "due: the lifetime rule") {
		t.Fatalf("renew at the moment:\n%s%s", r.stdout, r.stderr)
	}
	if n := e.stepca.Orders() - orders; n != 1 {
		t.Fatalf("%d orders for one renewal", n)
	}
	c2 := e.verifyStepChain("life.example.net", "life.example.net")
	if c2.SerialNumber.Cmp(c1.SerialNumber) == 0 || !c2.NotAfter.After(c1.NotAfter) {
		t.Fatalf("not renewed: %x until %v", c2.SerialNumber, c2.NotAfter)
	}
	if l := e.listEntries()["life.example.net"]; l.RenewReason != noARIRule {
		t.Fatalf("after the renewal list says %q, want %q", l.RenewReason, noARIRule)
	}
}

// TestStepCABatch: a batch of rows, one of them with two names, issued
// by step-ca at --concurrency 20; each certificate chains to step-ca's
// root and list shows every lineage on the lifetime rule; a second run
// orders nothing. step-ca answers concurrent orders of one account with
// a 500 now and then (it updates the account's order index and the
// authorizations under optimistic locking): lbcert orders again, once
// per such answer, and every row is issued.
func TestStepCABatch(t *testing.T) {
	t.Parallel()
	const rows = 60
	e := newStepEnv(t, testenv.StepCAOptions{})
	lines := []string{"domains,name,challenge,http_addr"}
	addr := fmt.Sprintf("127.0.0.1:%d", e.stepca.HTTPPort)
	want := map[string]string{"multi": "www.multi.example.org"}
	lines = append(lines, `"multi.example.org www.multi.example.org",multi,standalone,`+addr)
	for i := range rows - 1 {
		name := fmt.Sprintf("site%d.example.org", i)
		want[name] = name
		lines = append(lines, name+",,standalone,"+addr)
	}
	csv := writeCSV(t, e.work, "sites.csv", strings.Join(lines, "\n")+"\n")
	// The client budget's defaults are Let's Encrypt's (50 certificates
	// per registered domain a week); a private step-ca has no such limit.
	args := []string{"batch", csv, "--agree-tos", "--email", "ops@lbcert.test", "--concurrency", "10", "--rate-domain", "off",
		"--http-port", fmt.Sprint(e.stepca.HTTPPort), "--resolver", e.stepca.DNSAddr}
	r := e.mustRun(args...)
	if !strings.Contains(r.stdout, fmt.Sprintf("%d issued", rows)) {
		t.Fatalf("batch:\n%s%s", r.stdout, r.stderr)
	}
	orders, faults := e.stepca.Orders(), e.stepca.ServerErrors()
	t.Logf("step-ca: %d orders, %d answered 5xx", orders, faults)
	// A 5xx to a new order or an authorization costs one more order; one
	// to a finalize is settled on the same order (finalized again, or
	// its certificate fetched), never by another.
	if orders < rows || orders > rows+faults {
		t.Fatalf("step-ca saw %d orders and %d 5xx answers for %d rows: want one order per row and at most one more per 5xx", orders, faults, rows)
	}
	listed := e.listEntries()
	for lineage, name := range want {
		e.verifyStepChain(lineage, name)
		if listed[lineage].RenewReason != noARIRule {
			t.Errorf("%s: list says %q", lineage, listed[lineage].RenewReason)
		}
	}
	r = e.mustRun(args...)
	if !strings.Contains(r.stdout, fmt.Sprintf("%d up to date", rows)) || e.stepca.Orders() != orders {
		t.Fatalf("second batch: %d orders\n%s", e.stepca.Orders()-orders, r.stdout)
	}
}

// TestStepCAValidationFailures: step-ca keeps a challenge it cannot
// fetch pending with an error. lbcert reads that error at its first
// poll of the authorization and fails the order with the CA's own words
// and a hint, instead of polling for about 95 s and saying
// "status=pending" (issue #26 item 13). A wrong answer, which step-ca
// files as rejectedIdentifier, gets the route hint, not "policy or
// blocklist". Both start the failure backoff, as a validation that
// failed at Let's Encrypt does.
func TestStepCAValidationFailures(t *testing.T) {
	t.Parallel()
	e := newStepEnv(t, testenv.StepCAOptions{})

	// Unreachable: the name resolves to this host, but nothing listens
	// on the port step-ca validates on (lbcert's listener is elsewhere).
	elsewhere := freeAddr(t)
	authzs := e.stepca.Requests("authz/")
	r := e.run("issue", "-d", "gone.example.net", "--standalone", "--http-addr", elsewhere, "--preflight=false", "--agree-tos", "--email", "ops@lbcert.test")
	if r.code != 1 ||
		!strings.Contains(r.stderr, "lbcert: error: obtain gone.example.net: http-01 for gone.example.net: connection: The server could not connect to validation target\n") ||
		!strings.Contains(r.stderr, "lbcert: hint: does port 80 for gone.example.net reach lbcert's listener on "+elsewhere) ||
		strings.Contains(r.stderr, "status=pending") {
		t.Fatalf("unreachable name: exit %d\n%s", r.code, r.stderr)
	}
	// lego reads the authorization for its challenges, lbcert polls it
	// once, and lego deactivates it after the failure: three requests,
	// not a poll every few seconds.
	if n := e.stepca.Requests("authz/") - authzs; n > 3 {
		t.Fatalf("the stalled authorization was requested %d times", n)
	}
	st := readFile(t, filepath.Join(e.dir, "renewal", "gone.example.net.json"))
	if !strings.Contains(st, `"failures": 1`) {
		t.Fatalf("no backoff after a failed validation:\n%s", st)
	}

	// A wrong answer: nginx on step-ca's validation port answers every
	// token with the same text.
	prefix := filepath.Join(e.work, "nginx")
	os.MkdirAll(prefix, 0o755)
	webroot := filepath.Join(e.work, "acme")
	os.MkdirAll(webroot, 0o755)
	httpAddr := fmt.Sprintf("127.0.0.1:%d", e.stepca.HTTPPort)
	n, err := testenv.StartNginx(prefix, testenv.NginxConfig(prefix, fmt.Sprintf(`
    server {
        listen %s;
        location /.well-known/acme-challenge/ { return 200 "not the token\n"; }
    }`, httpAddr)), httpAddr)
	if err != nil {
		t.Fatal(err)
	}
	defer n.Stop()
	r = e.run("issue", "-d", "wrong.example.net", "--webroot", webroot, "--preflight=false", "--email", "ops@lbcert.test")
	if r.code != 1 || !strings.Contains(r.stderr, "lbcert: error: obtain wrong.example.net: rejectedIdentifier: ") ||
		!strings.Contains(r.stderr, "lbcert: hint: does the web server serve "+webroot+"/.well-known/acme-challenge/") ||
		strings.Contains(r.stderr, "policy or blocklist") {
		t.Fatalf("wrong answer: exit %d\n%s", r.code, r.stderr)
	}
	if !strings.Contains(n.AccessLog(), "/.well-known/acme-challenge/") {
		t.Fatalf("step-ca did not fetch the token from nginx:\n%s", n.AccessLog())
	}
}

// TestStepCAProfileRefused: step-ca offers no profiles, so --profile is
// refused before any order, in one line naming the CA; it is the
// setting's fault, not the name's, so the run without --profile right
// after issues at once instead of waiting out a backoff.
func TestStepCAProfileRefused(t *testing.T) {
	t.Parallel()
	e := newStepEnv(t, testenv.StepCAOptions{})
	addr := fmt.Sprintf("127.0.0.1:%d", e.stepca.HTTPPort)
	r := e.run("issue", "-d", "p.example.net", "--standalone", "--http-addr", addr, "--agree-tos", "--profile", "shortlived")
	if r.code != 1 || !strings.Contains(r.stderr, `lbcert: error: --profile "shortlived": `+e.stepca.DirectoryURL+" offers no profiles; leave --profile unset") {
		t.Fatalf("exit %d\n%s", r.code, r.stderr)
	}
	if n := e.stepca.Orders(); n != 0 {
		t.Fatalf("step-ca got %d orders for a profile it does not offer", n)
	}
	if _, err := os.Stat(filepath.Join(e.dir, "live", "p.example.net")); !os.IsNotExist(err) {
		t.Fatalf("a refused profile left a lineage: %v", err)
	}
	r = e.mustRun("issue", "-d", "p.example.net", "--standalone", "--http-addr", addr)
	if !strings.Contains(r.stdout, "p.example.net: issued certificate") {
		t.Fatalf("issue without --profile after the refusal:\n%s%s", r.stdout, r.stderr)
	}
}

// TestStepCAEAB: step-ca's acme-eab provisioner registers no account
// without external account binding; with the key ID and HMAC key from
// the environment, or the HMAC key from a file, lbcert registers and
// issues; a key already bound is refused with a hint that names it. The
// HMAC key never appears in lbcert's output or state.
func TestStepCAEAB(t *testing.T) {
	t.Parallel()
	e := newStepEnv(t, testenv.StepCAOptions{EABKeys: 2})
	e.server = e.stepca.EABDirectoryURL
	addr := fmt.Sprintf("127.0.0.1:%d", e.stepca.HTTPPort)
	issue := func(env []string, name, email string, extra ...string) result {
		args := append([]string{"issue", "-d", name, "--standalone", "--http-addr", addr, "--agree-tos", "--email", email}, extra...)
		return e.runEnv(env, args...)
	}

	r := issue(nil, "noeab.example.net", "ops@lbcert.test")
	if r.code != 1 || !strings.Contains(r.stderr, "this CA requires external account binding") {
		t.Fatalf("without EAB: exit %d\n%s", r.code, r.stderr)
	}
	if n := e.stepca.Requests("new-account"); n != 0 {
		t.Fatalf("without EAB lbcert sent %d account requests", n)
	}

	k1, k2 := e.stepca.EAB[0], e.stepca.EAB[1]
	r = issue([]string{"LBCERT_EAB_KID=" + k1.KID, "LBCERT_EAB_HMAC_KEY=" + k1.HMAC}, "eab1.example.net", "ops@lbcert.test")
	if r.code != 0 || !strings.Contains(r.stdout, "eab1.example.net: issued certificate") {
		t.Fatalf("EAB from the environment: exit %d\n%s%s", r.code, r.stdout, r.stderr)
	}
	keyFile := filepath.Join(e.work, "eab.key")
	if err := os.WriteFile(keyFile, []byte(k2.HMAC+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	r = issue([]string{"LBCERT_EAB_KID=" + k2.KID}, "eab2.example.net", "ops2@lbcert.test", "--eab-hmac-key-file", keyFile)
	if r.code != 0 || !strings.Contains(r.stdout, "eab2.example.net: issued certificate") {
		t.Fatalf("EAB HMAC key from a file: exit %d\n%s%s", r.code, r.stdout, r.stderr)
	}
	e.verifyStepChain("eab2.example.net", "eab2.example.net")

	// A key binds one account: step-ca answers its reuse with a 500
	// "internal error"; lbcert says which key to check.
	r = issue([]string{"LBCERT_EAB_KID=" + k1.KID, "LBCERT_EAB_HMAC_KEY=" + k1.HMAC}, "eab3.example.net", "ops3@lbcert.test")
	if r.code != 1 || !strings.Contains(r.stderr, "lbcert: error: register account ops3@lbcert.test: serverInternal: ") ||
		!strings.Contains(r.stderr, "lbcert: hint: the CA refused the account with EAB key ID "+k1.KID) ||
		strings.Contains(r.stdout+r.stderr, k1.HMAC) {
		t.Fatalf("a bound key used again: exit %d\n%s%s", r.code, r.stdout, r.stderr)
	}

	// The HMAC keys are nowhere lbcert writes.
	noSecretOnDisk(t, e.dir, k1.HMAC, k2.HMAC)
}
