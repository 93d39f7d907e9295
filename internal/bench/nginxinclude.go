package main

import (
	"bufio"
	"context"
	"crypto/tls"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"github.com/lbcert/lbcert/internal/deploy"
	"github.com/lbcert/lbcert/internal/store"
	"github.com/lbcert/lbcert/internal/testenv"
)

// benchNginxInclude measures the --nginx-include deploy at each size: n
// live lineages of two names each, a real nginx (master root, workers
// nobody) that includes the file, then deploy.Runner.Run as renew drives
// it: first for a redeploy that writes all n blocks, then for one renewed
// lineage (the file rewritten from itself, one nginx -t, one reload),
// and the time until nginx serves the renewed certificate.
func benchNginxInclude(sizes []int, work string) error {
	slog.SetDefault(slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn})))
	fmt.Printf("\nnginx include file (--nginx-include), one deploy through deploy.Runner:\n")
	fmt.Printf("| lineages | names | first write + test + reload | one renewed: rewrite + test + reload | of which nginx -t | renewed cert served after | nginx master RSS |\n|---:|---:|---:|---:|---:|---:|---:|\n")
	for _, n := range sizes {
		if err := benchInclude(n, filepath.Join(work, fmt.Sprintf("include-%d", n))); err != nil {
			return err
		}
	}
	return nil
}

func benchInclude(n int, work string) error {
	os.RemoveAll(work)
	prefix := filepath.Join(work, "nginx")
	os.MkdirAll(prefix, 0o755)
	st := store.New(filepath.Join(work, "state"))
	c, err := newCA()
	if err != nil {
		return err
	}
	save := func(i int, serial int64) (int, error) {
		name := domain(i)
		certPEM, keyPEM, cert, err := c.leaf(name, serial)
		if err != nil {
			return 0, err
		}
		l := &store.Lineage{Name: name, Domains: []string{name, "www." + name}, KeyType: "ec256",
			Cert: store.CertInfo{Serial: fmt.Sprintf("%x", cert.SerialNumber), NotBefore: cert.NotBefore, NotAfter: cert.NotAfter}}
		_, prev, err := st.Save(l, store.Files{Cert: certPEM, Chain: c.pem, Fullchain: append(append([]byte{}, certPEM...), c.pem...), Key: keyPEM})
		return prev, err
	}
	if err := parallel(n, func(i int) error { _, err := save(i, int64(10+i)); return err }); err != nil {
		return err
	}
	tlsPort, err1 := testenv.FreePort()
	plainPort, err2 := testenv.FreePort()
	if err1 != nil || err2 != nil {
		return fmt.Errorf("free ports: %v %v", err1, err2)
	}
	tlsAddr, plain := fmt.Sprintf("127.0.0.1:%d", tlsPort), fmt.Sprintf("127.0.0.1:%d", plainPort)
	body := filepath.Join(prefix, "server-body.conf")
	include := filepath.Join(prefix, "lbcert.conf")
	os.WriteFile(body, []byte(fmt.Sprintf("listen %s ssl;\nreturn 200;\n", tlsAddr)), 0o644)
	os.WriteFile(include, nil, 0o644)
	conf := testenv.NginxConfigAs(prefix, "nobody nogroup", fmt.Sprintf("    server { listen %s; return 204; }\n    include %s;", plain, include))
	ng, err := testenv.StartNginx(prefix, conf, plain)
	if err != nil {
		return err
	}
	defer ng.Stop()
	d := store.Deploy{Target: "nginx", NginxBin: ng.Bin, NginxConf: ng.Conf, NginxInclude: include, NginxServerBody: body}
	r := &deploy.Runner{Store: st}
	deployOne := func(i, previous int) (time.Duration, error) {
		start := time.Now()
		res := r.Run(context.Background(), []deploy.Change{{Name: domain(i), Previous: previous, Deploy: d}})
		took := time.Since(start)
		if res[0].Failed() {
			return took, fmt.Errorf("deploy %s: %v", domain(i), res[0].Err)
		}
		return took, nil
	}
	live, _ := st.LiveVersion(domain(0))
	first, err := deployOne(0, live)
	if err != nil {
		return err
	}
	last := "www." + domain(n-1)
	if _, err := servedAfter(tlsAddr, last, "", 5*time.Minute); err != nil {
		return err
	}
	renewed := n / 2
	prev, err := save(renewed, int64(10+n+renewed))
	if err != nil {
		return err
	}
	l, _ := st.Load(domain(renewed))
	start := time.Now()
	one, err := deployOne(renewed, prev)
	if err != nil {
		return err
	}
	// The reload returns once nginx is signalled; its master then loads
	// every certificate again before new workers serve.
	if _, err := servedAfter(tlsAddr, "www."+domain(renewed), l.Cert.Serial, 5*time.Minute); err != nil {
		return err
	}
	servedIn := time.Since(start)
	// nginx -t alone, with its CPU: on a shared host the wall clock
	// also counts other processes' turns.
	t0 := time.Now()
	cmd := exec.Command(ng.Bin, "-t", "-q", "-c", ng.Conf)
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("nginx -t: %v: %s", err, out)
	}
	test, cpu := time.Since(t0), cmd.ProcessState.UserTime()+cmd.ProcessState.SystemTime()
	fmt.Printf("| %d | %d | %.1f s | %.1f s | %.1f s (CPU %.1f s) | %.1f s | %d MB |\n",
		n, 2*n, first.Seconds(), one.Seconds(), test.Seconds(), cpu.Seconds(), servedIn.Seconds(), rssMB(ng.MasterPID()))
	return nil
}

// servedAfter polls addr until it serves serial for name (any
// certificate when serial is ""), and returns how long that took.
func servedAfter(addr, name, serial string, limit time.Duration) (time.Duration, error) {
	start := time.Now()
	for time.Since(start) < limit {
		conn, err := tls.DialWithDialer(&net.Dialer{Timeout: 2 * time.Second}, "tcp", addr, &tls.Config{ServerName: name, InsecureSkipVerify: true})
		if err == nil {
			got := fmt.Sprintf("%x", conn.ConnectionState().PeerCertificates[0].SerialNumber)
			conn.Close()
			if serial == "" || got == serial {
				return time.Since(start), nil
			}
		}
		time.Sleep(50 * time.Millisecond)
	}
	return 0, fmt.Errorf("%s: %s not served for %s within %s", addr, serial, name, limit)
}

// rssMB is a process's resident set, from /proc.
func rssMB(pid string) int {
	f, err := os.Open("/proc/" + pid + "/status")
	if err != nil {
		return 0
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), "VmRSS:"); ok {
			var kb int
			fmt.Sscan(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")), &kb)
			return kb / 1024
		}
	}
	return 0
}
