package testenv

import (
	"bytes"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"time"
)

// Pebble is a running Pebble CA and its DNS server.
type Pebble struct {
	// DirectoryURL is the ACME directory, for lbcert --server.
	DirectoryURL string
	// CABundle is the root of Pebble's own TLS certificate, for --ca-bundle.
	CABundle string
	// HTTPPort is where Pebble's VA sends HTTP-01 validation requests.
	HTTPPort int
	// MgmtURL is Pebble's management API (roots, cert status).
	MgmtURL string
	// DNSAddr is pebble-challtestsrv's DNS server, the one Pebble asks:
	// lbcert --resolver for pre-flight checks that see what the CA sees.
	DNSAddr string

	dns     *challDNS
	pebble  *proc
	startCA func() error
}

// PebbleOptions tune a Pebble instance.
type PebbleOptions struct {
	Dir      string // working directory for config and logs
	HTTPPort int    // 0 picks a free port
	// ShortLived adds the 6-day "shortlived" profile. Pebble picks a
	// random profile for orders that name none, so with it every order in
	// the test should say --profile.
	ShortLived bool
	// AlternateRoots is how many alternate chains (each to its own root)
	// Pebble offers besides the default (PEBBLE_ALTERNATE_ROOTS).
	AlternateRoots int
	// Profiles are more profiles by name, each a validity in seconds
	// (a certificate of minutes, to watch one near its expiry). As with
	// ShortLived, every order in the test should then say --profile.
	Profiles map[string]int
}

// StartPebble starts pebble-challtestsrv (every A query answers 127.0.0.1,
// no AAAA so validation never goes to ::1) and Pebble using it as DNS.
func StartPebble(o PebbleOptions) (*Pebble, error) {
	root, err := ModuleRoot()
	if err != nil {
		return nil, err
	}
	pebbleBin, err := PebbleBinary()
	if err != nil {
		return nil, err
	}
	ports := make([]int, 3)
	for i := range ports {
		if ports[i], err = FreePort(); err != nil {
			return nil, err
		}
	}
	acmePort, mgmtPort, tlsPort := ports[0], ports[1], ports[2]
	if o.HTTPPort == 0 {
		if o.HTTPPort, err = FreePort(); err != nil {
			return nil, err
		}
	}
	certs := filepath.Join(root, "testdata", "pebble")
	profiles := map[string]any{"default": map[string]any{"description": "90 days", "validityPeriod": 7776000}}
	if o.ShortLived {
		profiles["shortlived"] = map[string]any{"description": "6 days", "validityPeriod": 518400}
	}
	for name, secs := range o.Profiles {
		profiles[name] = map[string]any{"description": fmt.Sprintf("%d seconds", secs), "validityPeriod": secs}
	}
	cfg := map[string]any{
		"pebble": map[string]any{
			"listenAddress":                  fmt.Sprintf("127.0.0.1:%d", acmePort),
			"managementListenAddress":        fmt.Sprintf("127.0.0.1:%d", mgmtPort),
			"certificate":                    filepath.Join(certs, "cert.pem"),
			"privateKey":                     filepath.Join(certs, "key.pem"),
			"httpPort":                       o.HTTPPort,
			"tlsPort":                        tlsPort,
			"ocspResponderURL":               "",
			"externalAccountBindingRequired": false,
			"domainBlocklist":                []string{"blocked-domain.example"},
			// Short polling intervals: lego sleeps for an authorization's
			// Retry-After, and lbcert for a processing order's
			// (acme.processingWait; lego alone polls at once).
			"retryAfter": map[string]int{"authz": 1, "order": 1},
			"profiles":   profiles,
		},
	}
	data, _ := json.MarshalIndent(cfg, "", "  ")
	cfgPath := filepath.Join(o.Dir, "pebble-config.json")
	if err := os.WriteFile(cfgPath, data, 0o644); err != nil {
		return nil, err
	}
	dns, err := startChallDNS(o.Dir)
	if err != nil {
		return nil, err
	}
	p := &Pebble{
		DirectoryURL: fmt.Sprintf("https://127.0.0.1:%d/dir", acmePort),
		CABundle:     filepath.Join(certs, "minica.pem"),
		HTTPPort:     o.HTTPPort,
		MgmtURL:      fmt.Sprintf("https://127.0.0.1:%d", mgmtPort),
		DNSAddr:      dns.addr,
		dns:          dns,
	}
	dnsAddr := p.DNSAddr
	env := []string{
		"PEBBLE_VA_NOSLEEP=1",      // validate at once instead of after a random delay
		"PEBBLE_WFE_NONCEREJECT=0", // no random badNonce: tests must be deterministic
		"PEBBLE_AUTHZREUSE=0",      // every order validates, so tests really hit the responder
		"PEBBLE_VA_ALWAYS_VALID=0",
		fmt.Sprintf("PEBBLE_ALTERNATE_ROOTS=%d", o.AlternateRoots),
	}
	runs := 0
	p.startCA = func() error {
		runs++
		log := filepath.Join(o.Dir, "pebble.log")
		if runs > 1 {
			log = filepath.Join(o.Dir, fmt.Sprintf("pebble-%d.log", runs))
		}
		var err error
		if p.pebble, err = start(log, env, pebbleBin, "-config", cfgPath, "-dnsserver", dnsAddr); err != nil {
			return err
		}
		// Pebble serves its management interface from a goroutine of
		// its own: the ACME port can answer first (a test that asked for
		// a root right away was refused, in CI).
		for _, port := range []int{acmePort, mgmtPort} {
			if err := waitTCP(fmt.Sprintf("127.0.0.1:%d", port), 15*time.Second, p.pebble.done, "pebble", p.pebble.log); err != nil {
				return err
			}
		}
		return nil
	}
	if err := p.startCA(); err != nil {
		p.Stop()
		return nil, err
	}
	return p, nil
}

// Restart stops Pebble and starts it again on the same ports. Pebble
// keeps everything in memory, so the new one knows no account, order or
// certificate of the old one, as a CA that lost its database would; its
// roots are new too.
func (p *Pebble) Restart() error {
	p.pebble.stop()
	return p.startCA()
}

// Kill ends Pebble at once (SIGKILL), as a CA that goes down mid-order:
// connections in flight are cut, new ones refused. Its DNS server stays.
func (p *Pebble) Kill() {
	select {
	case <-p.pebble.done:
		return
	default:
	}
	p.pebble.cmd.Process.Kill()
	<-p.pebble.done
}

// Start starts a killed Pebble again on the same ports, knowing nothing
// of the old one (Restart's caveats: no accounts, new roots).
func (p *Pebble) Start() error { return p.startCA() }

// Stop stops Pebble and its DNS server.
func (p *Pebble) Stop() {
	p.pebble.stop()
	p.dns.stop()
}

// Dump makes Pebble print every goroutine's stack (SIGQUIT, which also
// ends it) and returns what it printed, marked plainly when Pebble is
// stuck on its own locks. Pebble 2.10.1 has two such bugs, both seen in
// dumps taken here:
//
//   - its order handler (wfe.Order) read-locks the order and then calls
//     orderForDisplay, which read-locks it again; when CompleteOrder asks
//     for the write lock between the two, each waits for the other
//     forever. Any client that polls an order while it is being issued
//     can hit it, more often the more orders run at once;
//   - a lock-order cycle in its memory store (an authz handler holding
//     the authz lock while it waits for the store's read lock, and
//     FindValidAuthorization holding that read lock while it waits for
//     the authz lock).
//
// A hung test then names Pebble, not lbcert, as the cause.
func (p *Pebble) Dump() string {
	dump := p.pebble.quitDump()
	if stuck := pebbleLockWaits(dump); stuck > 0 {
		return fmt.Sprintf("PEBBLE DEADLOCK: %d Pebble goroutines have waited a minute or more for one of Pebble's own locks (a lock cycle of Pebble's that testenv/pebblefix.go does not cut; not an lbcert hang)\n", stuck) + dump
	}
	return dump
}

// lockWait matches a goroutine parked on a mutex for minutes.
var lockWait = regexp.MustCompile(`(?m)^goroutine \d+ .*\[sync\.(RW)?Mutex\.R?Lock, \d+ minutes\]:\n((?:.+\n)+)`)

// pebbleLockWaits counts goroutines stuck on a lock inside Pebble.
func pebbleLockWaits(dump string) int {
	n := 0
	for _, m := range lockWait.FindAllStringSubmatch(dump, -1) {
		if strings.Contains(m[2], "letsencrypt/pebble") {
			n++
		}
	}
	return n
}

// PID is Pebble's process ID, for the benchmarks' CPU accounting.
func (p *Pebble) PID() int { return p.pebble.cmd.Process.Pid }

// Log returns Pebble's log so far, for failure messages and for counting
// what the CA saw.
func (p *Pebble) Log() string { return tail(p.pebble.log) }

// FullLog returns all of Pebble's log.
func (p *Pebble) FullLog() string { return p.pebble.fullLog() }

// mgmtGet fetches a management API path.
func (p *Pebble) mgmtGet(path string) ([]byte, error) { return p.mgmt(http.MethodGet, path, nil) }

// mgmt sends one request to Pebble's management interface.
func (p *Pebble) mgmt(method, path string, body []byte) ([]byte, error) {
	pool := x509.NewCertPool()
	pem, err := os.ReadFile(p.CABundle)
	if err != nil {
		return nil, err
	}
	pool.AppendCertsFromPEM(pem)
	c := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}}}
	req, err := http.NewRequest(method, p.MgmtURL+path, bytes.NewReader(body))
	if err != nil {
		return nil, err
	}
	resp, err := c.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	out, err := io.ReadAll(resp.Body)
	if resp.StatusCode != 200 {
		return nil, fmt.Errorf("%s %s: %s: %s", method, path, resp.Status, strings.TrimSpace(string(out)))
	}
	return out, err
}

// SetRenewalInfo makes Pebble's ARI answer for the certificate in
// certPEM the window [start, end], as a CA does in a mass revocation
// when it moves the window into the past.
func (p *Pebble) SetRenewalInfo(certPEM []byte, start, end time.Time) error {
	ari, _ := json.Marshal(map[string]any{"suggestedWindow": map[string]string{
		"start": start.UTC().Format(time.RFC3339), "end": end.UTC().Format(time.RFC3339)}})
	body, _ := json.Marshal(map[string]string{"Certificate": string(certPEM), "ARIResponse": string(ari)})
	_, err := p.mgmt(http.MethodPost, "/set-renewal-info/", body)
	return err
}

// Roots returns Pebble's issuing root (PEM), which changes every start.
func (p *Pebble) Roots() ([]byte, error) { return p.mgmtGet("/roots/0") }

// Root returns the PEM of root i: 0 is the default chain's, 1 and up
// the alternates'.
func (p *Pebble) Root(i int) ([]byte, error) { return p.mgmtGet(fmt.Sprintf("/roots/%d", i)) }

// CertStatus returns Pebble's view of a certificate by serial (hex):
// "Valid" or "Revoked".
func (p *Pebble) CertStatus(serial string) (string, error) {
	body, err := p.mgmtGet("/cert-status-by-serial/" + serial)
	if err != nil {
		return "", err
	}
	var st struct{ Status string }
	if err := json.Unmarshal(body, &st); err != nil {
		return "", err
	}
	return st.Status, nil
}

// SetA makes the DNS server answer host's A queries with addrs instead of
// 127.0.0.1, for tests of names that do not point at this machine.
func (p *Pebble) SetA(host string, addrs ...string) error { return p.dns.SetA(host, addrs...) }

// Orders counts the new orders Pebble has received so far.
func (p *Pebble) Orders() int {
	return strings.Count(p.FullLog(), "POST /order-plz -> calling handler()")
}

// Issued counts the certificates Pebble has issued so far. An order the
// CA refused (say for an ARI "replaces" it had already seen) counts in
// Orders but not here.
func (p *Pebble) Issued() int {
	return strings.Count(p.FullLog(), "Issued certificate serial")
}
