// Command certmagic-bench is the benchmark's certmagic peer: one process
// that hands every name of a file to certmagic's ManageAsync, as Caddy
// does with the names of its config, and exits when certmagic has
// obtained and stored a certificate for each (or at the first failure).
// It is a module of its own so that lbcert's go.mod never depends on
// certmagic; internal/bench builds it from the Go module proxy.
//
// certmagic is used as a library user would: a file storage, an ACME
// issuer on the given directory with its HTTP-01 solver on the given
// port, every other setting at its default. -limit off turns its
// internal limiter (10 orders per 10 s per account by default) off, as
// lbcert's budget is turned off for the same comparison.
package main

import (
	"bufio"
	"context"
	"crypto/x509"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/caddyserver/certmagic"
	"go.uber.org/zap"
)

func main() {
	dir := flag.String("server", "", "ACME directory URL")
	bundle := flag.String("ca-bundle", "", "PEM roots for the ACME server's TLS certificate")
	port := flag.Int("http-port", 0, "port of the HTTP-01 solver (the CA's validation port)")
	storage := flag.String("storage", "", "certmagic's file storage directory")
	names := flag.String("names", "", "file of names, one a line")
	limit := flag.String("limit", "default", "certmagic's internal order limiter: default (10 per 10 s) or off")
	verbose := flag.Bool("v", false, "certmagic's own log on stderr")
	flag.Parse()
	if err := run(*dir, *bundle, *port, *storage, *names, *limit, *verbose); err != nil {
		fmt.Fprintln(os.Stderr, "certmagic-bench:", err)
		os.Exit(1)
	}
}

func run(dir, bundle string, port int, storage, namesFile, limit string, verbose bool) error {
	names, err := readNames(namesFile)
	if err != nil {
		return err
	}
	roots := x509.NewCertPool()
	pem, err := os.ReadFile(bundle)
	if err != nil || !roots.AppendCertsFromPEM(pem) {
		return fmt.Errorf("-ca-bundle %s: no PEM certificates (%v)", bundle, err)
	}
	switch limit {
	case "default":
	case "off": // NewRateLimiter(0, 0) is certmagic's documented "disabled"
		certmagic.RateLimitEvents, certmagic.RateLimitEventsWindow = 0, 0
	default:
		return fmt.Errorf("-limit %q: want default or off", limit)
	}
	logger := zap.NewNop()
	if verbose {
		logger, _ = zap.NewDevelopment()
	}

	var mu sync.Mutex
	left := map[string]bool{}
	for _, n := range names {
		left[n] = true
	}
	done := make(chan error, 1)
	var cfg *certmagic.Config
	cache := certmagic.NewCache(certmagic.CacheOptions{
		GetConfigForCert: func(certmagic.Certificate) (*certmagic.Config, error) { return cfg, nil },
		Logger:           logger,
	})
	defer cache.Stop()
	cfg = certmagic.New(cache, certmagic.Config{
		Storage: &certmagic.FileStorage{Path: storage},
		Logger:  logger,
		OnEvent: func(_ context.Context, event string, data map[string]any) error {
			id, _ := data["identifier"].(string)
			mu.Lock()
			defer mu.Unlock()
			switch event {
			case "cert_obtained":
				delete(left, id)
				if len(left) == 0 {
					done <- nil
				}
			case "cert_failed":
				select {
				case done <- fmt.Errorf("%s: %v", id, data["error"]):
				default:
				}
			}
			return nil
		},
	})
	cfg.Issuers = []certmagic.Issuer{certmagic.NewACMEIssuer(cfg, certmagic.ACMEIssuer{
		CA: dir, TestCA: dir, Email: "bench@lbcert.test", Agreed: true,
		DisableTLSALPNChallenge: true, ListenHost: "127.0.0.1", AltHTTPPort: port,
		TrustedRoots: roots, Logger: logger,
	})}

	start := time.Now()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	if err := cfg.ManageAsync(ctx, names); err != nil {
		return err
	}
	select {
	case err := <-done:
		if err != nil {
			return err
		}
	case <-time.After(30 * time.Minute):
		mu.Lock()
		defer mu.Unlock()
		return fmt.Errorf("after 30 minutes, %d of %d names have no certificate", len(left), len(names))
	}
	out, _ := json.Marshal(map[string]any{"names": len(names), "seconds": time.Since(start).Seconds()})
	fmt.Println(string(out))
	return nil
}

func readNames(path string) ([]string, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var out []string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if n := strings.TrimSpace(sc.Text()); n != "" {
			out = append(out, n)
		}
	}
	if len(out) == 0 && sc.Err() == nil {
		return nil, fmt.Errorf("%s: no names", path)
	}
	return out, sc.Err()
}
