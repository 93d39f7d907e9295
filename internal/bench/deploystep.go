package main

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/lbcert/lbcert/internal/deploy"
	"github.com/lbcert/lbcert/internal/store"
	"github.com/lbcert/lbcert/internal/testenv"
)

// benchDeploy measures the deploy step for n renewed lineages against a
// real nginx on loopback: one config test, one reload, n TLS verifies
// (SNI per name), through deploy.Runner as renew drives it.
func benchDeploy(n int, work string) error {
	slog.SetDefault(slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn})))
	work = filepath.Join(work, "deploy")
	os.RemoveAll(work)
	prefix := filepath.Join(work, "nginx")
	os.MkdirAll(prefix, 0o755)
	st := store.New(filepath.Join(work, "state"))
	c, err := newCA()
	if err != nil {
		return err
	}
	port, err := testenv.FreePort()
	if err != nil {
		return err
	}
	addr := fmt.Sprintf("127.0.0.1:%d", port)
	save := func(i int, serial int64) (int, int, error) {
		name := domain(i)
		certPEM, keyPEM, cert, err := c.leaf(name, serial)
		if err != nil {
			return 0, 0, err
		}
		l := &store.Lineage{Name: name, Domains: []string{name}, KeyType: "ec256",
			Cert: store.CertInfo{Serial: fmt.Sprintf("%x", cert.SerialNumber), NotBefore: cert.NotBefore, NotAfter: cert.NotAfter}}
		return st.Save(l, store.Files{Cert: certPEM, Chain: c.pem, Fullchain: append(append([]byte{}, certPEM...), c.pem...), Key: keyPEM})
	}
	var servers strings.Builder
	for i := range n {
		if _, _, err := save(i, int64(10+i)); err != nil {
			return err
		}
		live := st.LivePaths(domain(i))
		fmt.Fprintf(&servers, "    server { listen %s ssl; server_name %s; ssl_certificate %s; ssl_certificate_key %s; return 200; }\n",
			addr, domain(i), live.Fullchain, live.Key)
	}
	conf := testenv.NginxConfig(prefix, servers.String())
	ng, err := testenv.StartNginx(prefix, conf, addr)
	if err != nil {
		return err
	}
	defer ng.Stop()
	// Renew all n: new versions live on disk, then one deploy.
	changes := make([]deploy.Change, n)
	for i := range n {
		_, prev, err := save(i, int64(100000+i))
		if err != nil {
			return err
		}
		l, _ := st.Load(domain(i))
		changes[i] = deploy.Change{Name: domain(i), Domains: l.Domains, Serial: l.Cert.Serial, Previous: prev,
			Deploy: store.Deploy{Target: "nginx", NginxBin: ng.Bin, NginxConf: ng.Conf, VerifyAddr: addr}}
	}
	start := time.Now()
	results := (&deploy.Runner{Store: st, Opts: deploy.Options{VerifyTimeout: 30 * time.Second}}).Run(context.Background(), changes)
	took := time.Since(start)
	ok := 0
	for _, r := range results {
		if !r.Failed() && r.Verify == "ok" {
			ok++
		}
	}
	fmt.Printf("\nDeploy step for %d renewed lineages against nginx on loopback (one nginx -t, one reload, %d TLS verifies): %.1f s, %d verified (target under 30 s: %s)\n",
		n, n, took.Seconds(), ok, map[bool]string{true: "met", false: "NOT met"}[took < 30*time.Second && ok == n])
	if ok != n {
		for _, r := range results {
			if r.Failed() {
				return fmt.Errorf("deploy %s: %v", r.Name, r.Err)
			}
		}
	}
	return nil
}
