package fleet

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"strings"
	"sync"
	"time"

	"github.com/lbcert/lbcert/internal/deploy"
	"github.com/lbcert/lbcert/internal/store"
)

// ProbeOK is what a node reports for a probe that passed.
const ProbeOK = "ok"

// CheckProbe checks a probe URL as 'fleet rollout set --probe' takes it.
func CheckProbe(raw string) error {
	u, err := url.Parse(strings.ReplaceAll(raw, "{name}", "example.com"))
	if err != nil || u.Scheme != "https" || u.Host == "" {
		return fmt.Errorf("--probe %q: want an https:// URL, such as https://{name}/healthz ({name} is the certificate's first name)", shownURL(raw))
	}
	if u.User != nil {
		// The waves, the probe with them, are the fleet's settings in
		// Redis, where no secret is kept in clear.
		return fmt.Errorf("--probe %q: a login in the URL would be kept in Redis in clear: probe a health URL that needs none", shownURL(raw))
	}
	return nil
}

// shownURL is a probe URL as it may be shown: a password in it (sent as
// basic auth) is replaced by "xxxxx". It goes to Redis, fleet status,
// reports and mail.
func shownURL(raw string) string {
	const placeholder = "name.lbcert.invalid" // {name} is not a host url.Parse takes
	u, err := url.Parse(strings.ReplaceAll(raw, "{name}", placeholder))
	if err != nil || u.User == nil {
		return raw
	}
	if _, ok := u.User.Password(); !ok {
		return raw
	}
	return strings.ReplaceAll(u.Redacted(), placeholder, "{name}")
}

// probeURL is the probe URL for a certificate whose first name is host:
// {name} replaced by it, an IPv6 address in brackets.
func probeURL(tmpl, host string) string {
	if ip, err := netip.ParseAddr(host); err == nil && ip.Is6() {
		host = "[" + host + "]"
	}
	return strings.ReplaceAll(tmpl, "{name}", host)
}

// probe fetches the rollout's probe URL for host (the certificate's
// first name) through this node's
// own load balancer (d.VerifyAddr, whatever the URL's host resolves
// to), with the served chain verified for the URL's host against
// d.VerifyRoots (or the system's roots), and checks the status. A
// reload takes a moment to reach every worker, so it tries for up to
// about ten seconds before it calls the check failed.
func probe(ctx context.Context, cfg *RolloutConfig, name string, d store.Deploy) error {
	if d.VerifyAddr == "" {
		return errors.New("this node's agent has no --verify-addr: the probe goes through this node's own load balancer, at that address")
	}
	raw := probeURL(cfg.Probe, name)
	u, err := url.Parse(raw)
	if err != nil {
		return fmt.Errorf("probe %s: %v", shownURL(raw), err)
	}
	conf := &tls.Config{ServerName: u.Hostname(), MinVersion: tls.VersionTLS12}
	if d.VerifyRoots != "" {
		pool, err := deploy.LoadRoots(d.VerifyRoots)
		if err != nil {
			return fmt.Errorf("probe %s: --verify-roots: %v", shownURL(raw), err)
		}
		conf.RootCAs = pool
	}
	dialer := &net.Dialer{Timeout: 3 * time.Second}
	client := &http.Client{
		Timeout: 5 * time.Second,
		Transport: &http.Transport{
			TLSClientConfig:   conf,
			DisableKeepAlives: true,
			DialContext: func(ctx context.Context, network, _ string) (net.Conn, error) {
				return dialer.DialContext(ctx, network, d.VerifyAddr)
			},
		},
		CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
	}
	want := cfg.ProbeStatus
	if want == 0 {
		want = http.StatusOK
	}
	var last error
	for attempt := 0; attempt < 4; attempt++ {
		if attempt > 0 {
			select {
			case <-ctx.Done():
				return last
			case <-time.After(2 * time.Second):
			}
		}
		last = probeOnce(ctx, client, raw, want)
		var cert x509.CertificateInvalidError
		var unknown x509.UnknownAuthorityError
		var host x509.HostnameError
		if last == nil || errors.As(last, &cert) || errors.As(last, &unknown) || errors.As(last, &host) {
			return last // a chain that does not verify will not start to
		}
	}
	return last
}

func probeOnce(ctx context.Context, client *http.Client, raw string, want int) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, raw, nil)
	if err != nil {
		return err
	}
	req.Header.Set("User-Agent", "lbcert-rollout-probe")
	resp, err := client.Do(req)
	if err != nil {
		return fmt.Errorf("GET %s: %w", shownURL(raw), unwrapURL(err)) // %w: probe tells a chain that will not verify by its type
	}
	defer resp.Body.Close()
	io.Copy(io.Discard, io.LimitReader(resp.Body, 64<<10))
	if resp.StatusCode != want {
		return fmt.Errorf("GET %s: status %d, want %d", shownURL(raw), resp.StatusCode, want)
	}
	return nil
}

// firstName is the first name of version v of lineage name as this node
// holds it: what {name} stands for in a probe URL. A lineage is named
// after its first name, but an IPv6 address has its colons as hyphens
// there, and --name can name it anything.
func (s *Syncer) firstName(name string, v int) string {
	if l, _, err := s.Local.ReadVersion(name, v); err == nil && len(l.Domains) > 0 {
		return l.Domains[0]
	}
	return name
}

// unwrapURL drops url.Error's repetition of the method and URL.
func unwrapURL(err error) error {
	var ue *url.Error
	if errors.As(err, &ue) {
		return ue.Err
	}
	return err
}

// probes runs the staged rollout's probe for each report of a version
// whose rollout is checking it (once per report: a report Redis holds
// that already says how its probe went keeps it), and returns the names
// reported that have a rollout on its way. What Redis holds, not what
// this process remembers, so a report Redis lost is made again.
func (s *Syncer) probes(ctx context.Context, reports map[string]Served) ([]string, error) {
	cfg, err := s.N.RolloutConfig(ctx, false)
	if err != nil || !cfg.Staged() {
		return nil, err
	}
	names := make([]string, 0, len(reports))
	for name := range reports {
		names = append(names, name)
	}
	recs, err := s.N.Records(ctx, names...)
	if err != nil || len(recs) == 0 {
		return nil, err
	}
	prev, err := s.previous(ctx, recs)
	if err != nil {
		return nil, err
	}
	var checked []string
	var mu sync.Mutex
	var wg sync.WaitGroup
	sem := make(chan struct{}, 8)
	for name, r := range recs {
		checked = append(checked, name)
		rep := reports[name]
		if cfg.Probe == "" || !rep.OK || rep.Serial != r.Serial || rep.Probe != "" {
			continue
		}
		if p, ok := prev[name]; ok && p.Serial == rep.Serial && p.Probe != "" {
			rep.Probe = p.Probe
			reports[name] = rep
			continue
		}
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer func() { <-sem; wg.Done() }()
			res := ProbeOK
			if err := probe(ctx, cfg, s.firstName(name, r.Version), s.Deploy); err != nil {
				res = oneLine(err)
				slog.Warn("the staged rollout's probe failed on this node", "name", name, "version", r.Version, "err", res)
			} else {
				slog.Info("the staged rollout's probe passed on this node", "name", name, "version", r.Version)
			}
			mu.Lock()
			rep.Probe = res
			reports[name] = rep
			mu.Unlock()
		}()
	}
	wg.Wait()
	keepSince(reports, prev)
	return checked, nil
}

// previous is what Redis holds of this node's reports of recs' names.
func (s *Syncer) previous(ctx context.Context, recs map[string]*Record) (map[string]Served, error) {
	names := make([]string, 0, len(recs))
	for name := range recs {
		names = append(names, name)
	}
	raw, err := s.N.Shared.ServedOf(ctx, []string{s.N.Name}, names)
	if err != nil {
		return nil, err
	}
	out := make(map[string]Served, len(names))
	for name, v := range raw[s.N.Name] {
		var sv Served
		if json.Unmarshal([]byte(v), &sv) == nil {
			out[name] = sv
		}
	}
	return out, nil
}

// keepSince gives a report that says again what Redis holds the time
// Redis has: it says since when the node serves this, which a staged
// rollout's soak counts from; what the soak's checks found since stays
// too. A failure keeps its own time: one after a resume is news, and
// holds the rollout again.
func keepSince(reports, prev map[string]Served) {
	for name, r := range reports {
		if p, ok := prev[name]; ok && p.OK && sameReport(p, r) {
			r.At = p.At
			if r.Checked.IsZero() {
				r.Checked, r.Verify = p.Checked, p.Verify
			}
			reports[name] = r
		}
	}
}

// sameReport says whether two reports say the same of what the node
// serves, whenever and however often it was checked.
func sameReport(a, b Served) bool {
	a.At, b.At = time.Time{}, time.Time{}
	a.Checked, b.Checked = time.Time{}, time.Time{}
	a.Verify, b.Verify = "", ""
	return a == b
}

func oneLine(err error) string { return strings.Join(strings.Fields(err.Error()), " ") }
