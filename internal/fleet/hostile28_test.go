package fleet

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"math/big"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/lbcert/lbcert/internal/hint"
	"github.com/lbcert/lbcert/internal/names"
	"github.com/lbcert/lbcert/internal/store"
)

// Hostile review of staged rollouts (issue 28): what 'fleet rollout set'
// accepts that it should refuse, before anything reaches Redis.

// "NaN%" parses as a float that is neither above 100 nor at most 0, so
// both range checks pass: a wave of "NaN%" takes no node at all, and an
// expiry margin of NaN cannot even be written as JSON (the fleet's
// settings in Redis become an empty string while the command says the
// waves are set). Both must be refused like "150%".
func TestRolloutSettingsRefuseNaN(t *testing.T) {
	for _, tc := range []struct {
		what string
		o    RolloutSettings
	}{
		{"a NaN wave", RolloutSettings{Waves: []string{"NaN%", "rest"}, ProbeStatus: 200, Margin: "15%"}},
		{"a nan wave", RolloutSettings{Waves: []string{"nan%"}, ProbeStatus: 200, Margin: "15%"}},
		{"a NaN expiry margin", RolloutSettings{Waves: []string{"lb1", "rest"}, ProbeStatus: 200, Margin: "NaN%"}},
	} {
		cfg, err := tc.o.Config()
		if err == nil {
			_, jerr := json.Marshal(cfg)
			t.Errorf("%s: accepted (waves %q, margin %v; its JSON: %v)", tc.what, cfg.Waves, cfg.Margin, jerr)
		}
	}
}

// Every refusal of 'fleet rollout set' is one line with a hint (the
// project's rule for every error): most of them have none.
func TestRolloutSettingsErrorsHaveHints(t *testing.T) {
	base := func() RolloutSettings {
		return RolloutSettings{Waves: []string{"lb1", "rest"}, ProbeStatus: 200, Margin: "15%"}
	}
	cases := map[string]func(*RolloutSettings){
		"0%":               func(o *RolloutSettings) { o.Waves = []string{"0%"} },
		"150%":             func(o *RolloutSettings) { o.Waves = []string{"150%"} },
		"-1":               func(o *RolloutSettings) { o.Waves = []string{"-1"} },
		"duplicate node":   func(o *RolloutSettings) { o.Waves = []string{"lb1", "lb1,lb2"} },
		"empty wave":       func(o *RolloutSettings) { o.Waves = []string{""} },
		"rest first":       func(o *RolloutSettings) { o.Waves = []string{"rest", "lb1"} },
		"http probe":       func(o *RolloutSettings) { o.Probe = "http://{name}/healthz" },
		"negative soak":    func(o *RolloutSettings) { o.Soak = -1 },
		"probe status -1":  func(o *RolloutSettings) { o.ProbeStatus = -1 },
		"margin 95%":       func(o *RolloutSettings) { o.Margin = "95%" },
		"trailing comma":   func(o *RolloutSettings) { o.Waves = []string{"lb1,"} },
		"bad node in wave": func(o *RolloutSettings) { o.Waves = []string{"lb 1"} },
	}
	for what, bad := range cases {
		o := base()
		bad(&o)
		_, err := o.Config()
		if err == nil {
			t.Errorf("%s: accepted", what)
			continue
		}
		if strings.Contains(err.Error(), "\n") {
			t.Errorf("%s: more than one line: %q", what, err)
		}
		if hint.Of(err) == "" {
			t.Errorf("%s: %q has no hint", what, err)
		}
	}
}

// A trailing comma in a wave is a wave flag's mistake, not a missing
// --node: the error must not send the operator to a flag this command
// does not have.
func TestWaveTrailingCommaNamesTheWave(t *testing.T) {
	err := CheckWaves([]string{"lb1,"})
	if err == nil || strings.Contains(err.Error(), "--node") {
		t.Errorf("--wave 'lb1,': %v; want an error about the wave, not --node", err)
	}
}

// A probe URL may carry a password (https://user:pass@{name}/healthz:
// Go's client sends it as basic auth, and CheckProbe accepts it), but
// the password must never be shown: not in the settings fleet status
// and 'rollout set' print, not in the reason a failed probe gives (which
// goes to Redis, fleet status, every run's report and its mail).
func TestProbePasswordNeverShown(t *testing.T) {
	const secret = "pr0be-s3cret"
	raw := "https://ops:" + secret + "@{name}/healthz"
	// Refused: the probe is kept in Redis with the waves, and no secret
	// is kept there in clear; the refusal does not show it either.
	if err := CheckProbe(raw); err == nil || strings.Contains(err.Error(), secret) {
		t.Errorf("CheckProbe of a URL with a password: %v; want it refused without showing the password", err)
	}
	// A settings record that has one anyway (written by hand) shows none.
	cfg := &RolloutConfig{Waves: []string{"lb1", "rest"}, Probe: raw, ProbeStatus: 200, Margin: 0.15}
	if w := cfg.settingsWords(); strings.Contains(w, secret) {
		t.Errorf("the rollout settings as printed show the probe's password: %q", w)
	}
	srv := httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) { w.WriteHeader(500) }))
	defer srv.Close()
	client := srv.Client()
	client.Transport.(*http.Transport).DialContext = func(ctx context.Context, network, _ string) (net.Conn, error) {
		return (&net.Dialer{}).DialContext(ctx, network, srv.Listener.Addr().String())
	}
	err := probeOnce(context.Background(), client, strings.ReplaceAll(raw, "{name}", "example.com"), 200)
	if err == nil {
		t.Fatal("a probe answered 500 passed")
	}
	if strings.Contains(err.Error(), secret) {
		t.Errorf("a failed probe's reason shows its password: %q", err)
	}
}

// README: "nodes no wave names (a node that joins later, say) are in the
// last wave", and a node that joins mid-rollout gets its wave's version.
// With a count wave ("1", then rest) a node that joins mid-rollout and
// sorts first (lb0) is taken by the count instead: it becomes the canary,
// and the canary that already passed its checks (lb1) moves to the last
// wave and goes back to the previous version.
func TestJoinMidRolloutDoesNotReshuffleWaves(t *testing.T) {
	cfg := &RolloutConfig{Waves: []string{"1", "rest"}}
	// The rollout resolves the waves when it starts, over lb1 to lb3, and
	// keeps them in its record; lb0 joins after.
	before := cfg.Resolve([]string{"lb1", "lb2", "lb3"})
	after := placeWaves(before, []string{"lb1", "lb2", "lb3", "lb0"})
	if w := waveOf(after, "lb0"); w != len(after)-1 {
		t.Errorf("lb0, joining later, is in wave %d of %d (%v), want the last", w+1, len(after), after)
	}
	now := time.Now()
	prev := store.CertInfo{NotBefore: now.Add(-24 * time.Hour), NotAfter: now.Add(89 * 24 * time.Hour)}
	r := &Record{Name: "a.example", Version: 5, Serial: "new", Previous: 4, PrevSerial: "old", Wave: 0, State: Rolling}
	for _, waves := range [][][]string{before, after} {
		got := decideTarget(targetIn{rec: r, waves: waves, node: "lb1", live: 5, liveSerial: "new", prev: prev, margin: DefaultMargin, now: now})
		if got.Version != 5 {
			t.Errorf("waves %v: the canary lb1, serving version 5 at wave 1, is sent back to version %d (%s)", waves, got.Version, got.Held)
		}
	}
}

// An IPv6 certificate's lineage is named with its colons as hyphens
// ("::1" -> "--1", names.LineageFor), so "https://{name}/healthz" asks
// for host "--1", which no certificate names: the probe of every IPv6
// certificate fails its hostname check, and a fleet with a probe holds
// every one of their renewals at the canary.
func TestProbeOfAnIPv6Certificate(t *testing.T) {
	srv := httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {}))
	defer srv.Close()
	roots := filepath.Join(t.TempDir(), "roots.pem")
	if err := os.WriteFile(roots, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: srv.Certificate().Raw}), 0o644); err != nil {
		t.Fatal(err)
	}
	if !slices.ContainsFunc(srv.Certificate().IPAddresses, func(ip net.IP) bool { return ip.Equal(net.IPv6loopback) }) {
		t.Fatal("the test server's certificate does not name ::1: this test shows nothing")
	}
	cfg := &RolloutConfig{Probe: "https://{name}/healthz", ProbeStatus: 200}
	d := store.Deploy{VerifyAddr: srv.Listener.Addr().String(), VerifyRoots: roots}
	// {name} is the certificate's first name, "::1", not its lineage's.
	if err := probe(context.Background(), cfg, "::1", d); err != nil {
		t.Errorf("the probe of the certificate for ::1 (lineage %q) through a load balancer serving it: %v", names.LineageFor("::1"), err)
	}
}

// probe gives up at once on a chain that does not verify ("will not
// start to"), rather than trying four times over six seconds: the
// verification error must survive probeOnce's wrapping.
func TestProbeGivesUpAtOnceOnABadChain(t *testing.T) {
	srv := httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {}))
	defer srv.Close()
	roots := filepath.Join(t.TempDir(), "roots.pem")
	// Roots that do not sign what srv serves: a throwaway self-signed one.
	if err := os.WriteFile(roots, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: selfSigned(t)}), 0o644); err != nil {
		t.Fatal(err)
	}
	cfg := &RolloutConfig{Probe: "https://{name}/healthz", ProbeStatus: 200}
	d := store.Deploy{VerifyAddr: srv.Listener.Addr().String(), VerifyRoots: roots}
	start := time.Now()
	err := probe(context.Background(), cfg, "example.com", d)
	if err == nil {
		t.Fatal("a chain signed by no given root passed the probe")
	}
	if took := time.Since(start); took > 2*time.Second {
		t.Errorf("the probe took %s to give up on a chain that does not verify (%v)", took.Round(time.Second), err)
	}
}

func selfSigned(t *testing.T) []byte {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "not the root"}, NotBefore: time.Now().Add(-time.Hour),
		NotAfter: time.Now().Add(time.Hour), IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	return der
}
