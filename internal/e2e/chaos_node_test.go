package e2e

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"math/big"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/lbcert/lbcert/internal/testenv"
)

// chaosNode is one load balancer of the chaos fleet: its --dir, its own
// nginx or HAProxy on a loopback TLS port, and its agent, which the
// schedule kills, restarts and reconfigures.
type chaosNode struct {
	name    string
	dir     string
	lb      string // "nginx" or "haproxy"
	tlsAddr string
	port    int // the agent's HTTP-01 port

	mu sync.Mutex // held while the schedule changes the agent or the load balancer

	// nginx
	ng *testenv.Nginx
	// haproxy
	hp      *testenv.HAProxy
	hdir    string
	certGen int  // which crt directory, certs-N, the config and agent use
	socket  bool // the agent updates HAProxy over its runtime API
	// nginx deploy variant: 0 plain, 1 with --verify-addr, 2 with a hook
	ngVariant int

	broken bool // the load balancer's config is broken

	// roots is Pebble's root, for --verify-roots, in a seed whose
	// staged rollouts probe (verifyFlags); "" otherwise.
	roots string

	pool []lineageSpec // what nginx maps names to lineages for

	agent     *exec.Cmd
	agentDone chan struct{}
	killed    bool      // the agent was stopped by the schedule (not exited by itself)
	exitedAt  time.Time // when it last exited by itself
	exitCode  int
	restarts  int // by the supervisor, as systemd's Restart=on-failure does
	log       *cappedLog

	member    bool      // approved and not removed
	removedAt time.Time // when 'fleet remove' of it returned
}

// cappedLog keeps the last few MB of a process's output.
type cappedLog struct {
	mu sync.Mutex
	b  bytes.Buffer
}

const logCap = 4 << 20

func (l *cappedLog) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.b.Len()+len(p) > logCap {
		rest := append([]byte("[older output dropped]\n"), l.b.Bytes()[l.b.Len()/2:]...)
		l.b.Reset()
		l.b.Write(rest)
	}
	return l.b.Write(p)
}

func (l *cappedLog) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

func tailOf(s string, n int) string {
	if len(s) > n {
		return "[...]" + s[len(s)-n:]
	}
	return s
}

// defaultCert is a self-signed certificate HAProxy serves for a name
// it holds no PEM for, so it can start and reload with an empty crt
// directory; the checks read it as "nothing served".
type defaultCert struct {
	path   string
	serial string
}

func newDefaultCert(dir string) (*defaultCert, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	serial, _ := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 62))
	tmpl := &x509.Certificate{SerialNumber: serial, Subject: pkix.Name{CommonName: "default.invalid"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour), DNSNames: []string{"default.invalid"}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return nil, err
	}
	kder, _ := x509.MarshalPKCS8PrivateKey(key)
	data := append(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: kder})...)
	d := &defaultCert{path: filepath.Join(dir, "default.pem"), serial: fmt.Sprintf("%x", serial)}
	return d, os.WriteFile(d.path, data, 0o600)
}

const brokenLine = "\nthis_is_not_a_directive;\n"

// startLB starts the node's load balancer on a fresh loopback port.
func (n *chaosNode) startLB(work string, def *defaultCert) error {
	n.tlsAddr = fmt.Sprintf("127.0.0.1:%d", mustPort())
	if n.lb == "nginx" {
		prefix := filepath.Join(work, "nginx-"+n.name)
		os.MkdirAll(prefix, 0o755)
		ng, err := testenv.StartNginx(prefix, n.nginxConf(prefix), n.tlsAddr)
		n.ng = ng
		return err
	}
	n.hdir = filepath.Join(work, "haproxy-"+n.name)
	n.certGen = 1
	os.MkdirAll(n.certsDir(), 0o755)
	if err := n.writeHAProxyConf(def); err != nil {
		return err
	}
	hp, err := testenv.StartHAProxy(n.hdir, n.haproxyConfPath(), n.tlsAddr)
	n.hp = hp
	return err
}

func mustPort() int {
	p, err := testenv.FreePort()
	if err != nil {
		panic(err)
	}
	return p
}

// nginxConf serves every lineage under live/ by SNI, as the README's
// fleet snippet does, with a map from each lineage's other names to its
// directory (live/<name> is named after the first name only).
func (n *chaosNode) nginxConf(prefix string) string {
	var m strings.Builder
	m.WriteString("    map $ssl_server_name $lbcert_lineage {\n        hostnames;\n        default $ssl_server_name;\n")
	for _, s := range n.pool {
		for _, d := range s.Domains[1:] {
			fmt.Fprintf(&m, "        %s %s;\n", d, s.Name)
		}
	}
	m.WriteString("    }")
	server := strings.ReplaceAll(testenv.SNIServer(n.tlsAddr, filepath.Join(n.dir, "live")), "$ssl_server_name", "$lbcert_lineage")
	return testenv.NginxConfig(prefix, m.String()+server)
}

func (n *chaosNode) certsDir() string {
	return filepath.Join(n.hdir, fmt.Sprintf("certs-%d", n.certGen))
}

func (n *chaosNode) haproxyConfPath() string { return filepath.Join(n.hdir, "haproxy.cfg") }

// writeHAProxyConf writes the deploy test's HAProxy config with the
// default certificate first on the bind line (the one served for a name
// without a PEM), then the crt directory.
func (n *chaosNode) writeHAProxyConf(def *defaultCert) error {
	conf := haproxyConfig(filepath.Join(n.hdir, "admin.sock"), n.tlsAddr, def.path+" crt "+n.certsDir())
	if n.broken {
		conf += brokenLine
	}
	return os.WriteFile(n.haproxyConfPath(), []byte(conf), 0o644)
}

// setBroken breaks or fixes the load balancer's config on disk; the
// running server keeps what it loaded.
func (n *chaosNode) setBroken(broken bool, def *defaultCert) error {
	n.broken = broken
	if n.lb == "haproxy" {
		return n.writeHAProxyConf(def)
	}
	conf := n.nginxConf(n.ng.Prefix)
	if broken {
		conf += brokenLine
	}
	return os.WriteFile(n.ng.Conf, []byte(conf), 0o644)
}

// reloadHAProxy makes the master re-read its config (SIGUSR2), as the
// agent's --reload-cmd does.
func (n *chaosNode) reloadHAProxy() error {
	return syscall.Kill(n.hp.MasterPID(), syscall.SIGUSR2)
}

// deployFlags are the agent's --deploy settings for its current variant.
func (n *chaosNode) deployFlags() []string {
	if n.lb == "nginx" {
		f := []string{"--deploy", "nginx", "--nginx-conf", n.ng.Conf, "--nginx-bin", n.ng.Bin}
		switch n.ngVariant {
		case 1:
			f = append(f, "--verify-addr", n.tlsAddr)
		case 2:
			f = append(f, "--deploy-hook", "true")
		}
		return append(f, n.verifyFlags()...)
	}
	f := []string{"--deploy", "haproxy", "--haproxy-conf", n.haproxyConfPath(), "--haproxy-bin", n.hp.Bin,
		"--haproxy-certs", n.certsDir(), "--reload-cmd", fmt.Sprintf("kill -USR2 $(cat %s)", n.hp.PIDFile)}
	if n.socket {
		f = append(f, "--haproxy-socket", filepath.Join(n.hdir, "admin.sock"))
	}
	return append(f, n.verifyFlags()...)
}

// variant names the current deploy settings, for the log.
func (n *chaosNode) variant() string {
	if n.lb == "nginx" {
		return [...]string{"nginx", "nginx+verify-addr", "nginx+hook"}[n.ngVariant]
	}
	s := fmt.Sprintf("haproxy certs-%d", n.certGen)
	if n.socket {
		s += "+runtime-api"
	}
	return s
}

// startAgent starts the agent with the node's current settings; the
// caller holds n.mu.
func (n *chaosNode) startAgent(url string) error {
	args := append([]string{"-v", "--dir", n.dir, "--redis", url, "agent", "--http-addr", fmt.Sprintf("127.0.0.1:%d", n.port), "--reconcile", "2s"}, n.deployFlags()...)
	cmd := exec.Command(lbcertBin, args...)
	cmd.Env = append(os.Environ(), "LBCERT_CONFIG=", "LBCERT_REDIS_PASSWORD="+fleetPassword)
	fmt.Fprintf(n.log, "=== %s agent started: %s\n", time.Now().Format("15:04:05.000"), n.variant())
	cmd.Stdout, cmd.Stderr = n.log, n.log
	if err := cmd.Start(); err != nil {
		return err
	}
	done := make(chan struct{})
	go func() {
		cmd.Wait()
		// Read only once done is closed, which orders these writes
		// before the read.
		n.exitedAt, n.exitCode = time.Now(), cmd.ProcessState.ExitCode()
		close(done)
	}()
	n.agent, n.agentDone, n.killed = cmd, done, false
	return nil
}

func (n *chaosNode) agentRunning() bool {
	if n.agent == nil {
		return false
	}
	select {
	case <-n.agentDone:
		return false
	default:
		return true
	}
}

// killAgent is kill -9 of the agent.
func (n *chaosNode) killAgent() {
	if !n.agentRunning() {
		return
	}
	n.killed = true
	n.agent.Process.Kill()
	<-n.agentDone
	fmt.Fprintf(n.log, "=== %s agent killed (SIGKILL)\n", time.Now().Format("15:04:05.000"))
}

// stopAgent stops the agent as systemd does: SIGTERM, then SIGKILL.
func (n *chaosNode) stopAgent() {
	if !n.agentRunning() {
		return
	}
	n.killed = true
	n.agent.Process.Signal(syscall.SIGTERM)
	select {
	case <-n.agentDone:
	case <-time.After(10 * time.Second):
		n.agent.Process.Kill()
		<-n.agentDone
	}
	fmt.Fprintf(n.log, "=== %s agent stopped (SIGTERM)\n", time.Now().Format("15:04:05.000"))
}

func (n *chaosNode) stopAll() {
	n.mu.Lock()
	defer n.mu.Unlock()
	n.stopAgent()
	n.ng.Stop()
	n.hp.Stop()
}

// served is the serial n's load balancer serves for name over TLS, or
// "" for none (no handshake, or HAProxy's default certificate).
func (n *chaosNode) served(name string, def *defaultCert) string {
	s := tryServed(n.tlsAddr, name)
	if s == def.serial {
		return ""
	}
	return s
}

// lbLog is the load balancer's own log, for a failure's dump.
func (n *chaosNode) lbLog() string {
	if n.hp != nil {
		return n.hp.Log()
	}
	data, _ := os.ReadFile(filepath.Join(n.ng.Prefix, "error.log"))
	return tailOf(string(data), 4000)
}

// validationFront is the HAProxy in front of the agents on the port
// Pebble validates HTTP-01 on, with "balance random" and health checks
// as a real pool's front has; the schedule takes a removed node out and
// puts a joined one in with a graceful reload.
type validationFront struct {
	mu   sync.Mutex
	dir  string
	port int
	hp   *testenv.HAProxy
}

func (v *validationFront) set(nodes []*chaosNode) error {
	v.mu.Lock()
	defer v.mu.Unlock()
	var servers strings.Builder
	for _, n := range nodes {
		fmt.Fprintf(&servers, "    server %s 127.0.0.1:%d check inter 500 fall 2 rise 1\n", n.name, n.port)
	}
	conf := agentsFrontConf(fmt.Sprintf("127.0.0.1:%d", v.port), servers.String())
	path := filepath.Join(v.dir, "haproxy.cfg")
	os.MkdirAll(v.dir, 0o755)
	if err := os.WriteFile(path, []byte(conf), 0o644); err != nil {
		return err
	}
	if v.hp != nil {
		return syscall.Kill(v.hp.MasterPID(), syscall.SIGUSR2)
	}
	hp, err := testenv.StartHAProxy(v.dir, path, fmt.Sprintf("127.0.0.1:%d", v.port))
	v.hp = hp
	return err
}

func (v *validationFront) stop() {
	v.mu.Lock()
	defer v.mu.Unlock()
	v.hp.Stop()
}
