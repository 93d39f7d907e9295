package e2e

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/lbcert/lbcert/internal/testenv"
)

// tryServed is the serial addr serves for name, or "" when the
// handshake fails (nothing installed for the name yet).
func tryServed(addr, name string) string {
	conn, err := tls.DialWithDialer(&net.Dialer{Timeout: 2 * time.Second}, "tcp", addr, &tls.Config{ServerName: name, InsecureSkipVerify: true})
	if err != nil {
		return ""
	}
	defer conn.Close()
	return fmt.Sprintf("%x", conn.ConnectionState().PeerCertificates[0].SerialNumber)
}

// fleetSerial is the serial of the fleet's current certificate for name.
func (f *fleetEnv) fleetSerial(name string) string {
	c := f.rdb()
	defer c.Close()
	certPEM, err := c.HGet(context.Background(), "lbcert:bundle:"+name, "cert").Bytes()
	if err != nil {
		f.t.Fatalf("%s: no bundle: %v", name, err)
	}
	b, _ := pem.Decode(certPEM)
	cert, err := x509.ParseCertificate(b.Bytes)
	if err != nil {
		f.t.Fatal(err)
	}
	return fmt.Sprintf("%x", cert.SerialNumber)
}

// nodeNginx gives node n its own nginx on a loopback TLS port, serving
// every lineage of the node's --dir by SNI, and returns the agent flags
// that deploy to it.
func (f *fleetEnv) nodeNginx(n string) (tlsAddr, conf string, agentFlags []string) {
	f.t.Helper()
	node := f.nodes[n]
	prefix := filepath.Join(f.work, "nginx-"+n)
	os.MkdirAll(prefix, 0o755)
	tlsAddr = freeAddr(f.t)
	servers := testenv.SNIServer(tlsAddr, filepath.Join(node.dir, "live"))
	ng, err := testenv.StartNginx(prefix, testenv.NginxConfig(prefix, servers), tlsAddr)
	if err != nil {
		f.t.Fatal(err)
	}
	f.t.Cleanup(ng.Stop)
	return tlsAddr, ng.Conf, []string{"--deploy", "nginx", "--nginx-conf", ng.Conf, "--nginx-bin", ng.Bin, "--reconcile", "2s"}
}

// waitServed waits until addr serves want for name; it returns how long
// that took, or fails after limit.
func waitServed(t *testing.T, addr, name, want string, limit time.Duration) time.Duration {
	t.Helper()
	start := time.Now()
	for time.Since(start) < limit {
		if tryServed(addr, name) == want {
			return time.Since(start)
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Fatalf("%s does not serve %s for %s after %s (serves %q)", addr, want, name, limit, tryServed(addr, name))
	return 0
}

// T1', T3 and T9: three nodes, each deploying to its own nginx.
func TestFleetEveryNodeServes(t *testing.T) {
	f := newFleet(t, "lb1", "lb2", "lb3")
	f.form()
	addrs := map[string]string{}
	confs := map[string]string{}
	for _, n := range f.order {
		addr, conf, flags := f.nodeNginx(n)
		addrs[n], confs[n] = addr, conf
		f.startAgent(n, flags...)
	}
	f.validateVia(f.order...)

	// T1': the 100-row batch from three nodes at once; every node serves
	// all 100 over TLS, each certificate matching its key.
	csv := f.writeCSV("t1.csv", 0, 100)
	for n, r := range f.batchAll(csv) {
		if r.code != 0 && r.code != 2 {
			t.Fatalf("%s: batch exit %d\n%s", n, r.code, r.stderr)
		}
	}
	names := f.fleetNames()
	if len(names) != 100 {
		t.Fatalf("%d lineages in the fleet, want 100", len(names))
	}
	sort.Strings(names)
	for _, n := range f.order {
		for _, name := range names {
			waitServed(t, addrs[n], name, f.fleetSerial(name), 60*time.Second)
		}
		checkKeys(t, f.nodes[n].dir, names)
	}
	if r := f.mustOn("lb2", "fleet", "status"); !strings.Contains(r.stdout, "lb3 ") {
		t.Errorf("fleet status:\n%s", r.stdout)
	}

	// T3: convergence over 50 new certificates ordered one by one on lb1,
	// while a 100-row batch runs on lb2: from the ordering run's return to
	// every node serving the new serial over TLS.
	bg := make(chan result, 1)
	go func() {
		bg <- f.on("lb2", "batch", f.writeCSV("bg.csv", 200, 300), "--preflight=false", "--rate-domain", "off", "--concurrency", "4")
	}()
	var lat []time.Duration
	for i := range 50 {
		name := fmt.Sprintf("conv%02d.example.com", i)
		f.mustOn("lb1", "issue", "-d", name, "--agree-tos", "--rate-domain", "off")
		serial := f.fleetSerial(name)
		returned := time.Now()
		var wg sync.WaitGroup
		var mu sync.Mutex
		worst := time.Duration(0)
		for _, n := range f.order {
			wg.Add(1)
			go func() {
				defer wg.Done()
				waitServed(t, addrs[n], name, serial, 30*time.Second)
				mu.Lock()
				worst = max(worst, time.Since(returned))
				mu.Unlock()
			}()
		}
		wg.Wait()
		lat = append(lat, worst)
	}
	bgr := <-bg
	sort.Slice(lat, func(i, j int) bool { return lat[i] < lat[j] })
	p50, p99 := lat[len(lat)/2], lat[len(lat)*99/100]
	t.Logf("T3 convergence over %d certificates: p50 %s, p99 %s, max %s (background batch: exit %d)", len(lat), p50, p99, lat[len(lat)-1], bgr.code)
	if p99 > 3*time.Second {
		t.Errorf("T3: p99 convergence %s, want under 3s", p99)
	}
	if bgr.code != 0 && bgr.code != 2 {
		t.Errorf("the background batch: exit %d\n%s", bgr.code, bgr.stderr)
	}

	// T9: a broken nginx config on lb3 during a renewal. lb3 rolls back
	// and keeps serving the old certificate, the others serve the new one,
	// fleet status shows the failure and exits non-zero; once the config
	// is fixed lb3 catches up by itself, with no order.
	name := names[0]
	old := f.fleetSerial(name)
	// First every node has finished deploying T3's last certificate:
	// nginx serves a file as soon as it is live, before the agent's
	// config test, and a config broken during that test rolls it back.
	f.waitStatusOK(30 * time.Second)
	good, _ := os.ReadFile(confs["lb3"])
	os.WriteFile(confs["lb3"], append(append([]byte{}, good...), []byte("\nthis_is_not_a_directive;\n")...), 0o644)
	f.mustOn("lb1", "renew", "--force", "--name", name, "--no-random-sleep")
	renewed := f.fleetSerial(name)
	orders := f.pebble.Orders()
	waitServed(t, addrs["lb1"], name, renewed, 10*time.Second)
	waitServed(t, addrs["lb2"], name, renewed, 10*time.Second)
	var st result
	for deadline := time.Now().Add(20 * time.Second); time.Now().Before(deadline); time.Sleep(500 * time.Millisecond) {
		if st = f.on("lb1", "fleet", "status"); st.code != 0 {
			break
		}
	}
	if st.code != 2 || !strings.Contains(st.stdout, "lb3 "+name+": deploy:") || !strings.Contains(st.stderr, "node lb3: 1 failed to deploy") {
		t.Errorf("T9: fleet status with lb3's deploy failing: exit %d\n%s%s", st.code, st.stdout, st.stderr)
	}
	if got := tryServed(addrs["lb3"], name); got != old {
		t.Errorf("T9: lb3 serves %s, want the old %s after its rollback", got, old)
	}
	os.WriteFile(confs["lb3"], good, 0o644)
	waitServed(t, addrs["lb3"], name, renewed, 20*time.Second)
	if got := f.pebble.Orders() - orders; got != 0 {
		t.Errorf("T9: catching up cost %d orders", got)
	}
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(500 * time.Millisecond) {
		if st = f.on("lb1", "fleet", "status", "--json"); st.code == 0 {
			break
		}
	}
	if st.code != 0 || !strings.Contains(st.stdout, `"version": 1`) || !strings.Contains(st.stdout, `"ok": true`) {
		t.Errorf("T9: fleet status after the fix: exit %d\n%s%s", st.code, st.stdout, st.stderr)
	}
}

// checkKeys checks that every lineage's live key in dir matches its
// certificate.
func checkKeys(t *testing.T, dir string, names []string) {
	t.Helper()
	for _, name := range names {
		live := filepath.Join(dir, "live", name)
		c, err := exec.Command("openssl", "x509", "-noout", "-pubkey", "-in", filepath.Join(live, "cert.pem")).Output()
		if err != nil {
			t.Fatalf("%s: %v", live, err)
		}
		k, err := exec.Command("openssl", "pkey", "-pubout", "-in", filepath.Join(live, "privkey.pem")).Output()
		if err != nil || !bytes.Equal(c, k) {
			t.Fatalf("%s: privkey.pem does not match cert.pem", live)
		}
	}
}
