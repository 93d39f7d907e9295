package testenv

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"path/filepath"
	"strings"
	"time"
)

// challDNS is pebble-challtestsrv run as a DNS server only: every A query
// answers 127.0.0.1 unless SetA said otherwise, and no AAAA query gets an
// answer, so a CA's validation never goes to ::1. Pebble and step-ca both
// resolve through it.
type challDNS struct {
	addr, mgmt string
	p          *proc
}

// startChallDNS starts pebble-challtestsrv with its log in dir.
func startChallDNS(dir string) (*challDNS, error) {
	bin, err := Tool("pebble-challtestsrv")
	if err != nil {
		return nil, err
	}
	dnsPort, err := FreePort()
	if err != nil {
		return nil, err
	}
	mgmtPort, err := FreePort()
	if err != nil {
		return nil, err
	}
	d := &challDNS{addr: fmt.Sprintf("127.0.0.1:%d", dnsPort), mgmt: fmt.Sprintf("127.0.0.1:%d", mgmtPort)}
	d.p, err = start(filepath.Join(dir, "challtestsrv.log"), nil, bin,
		"-management", d.mgmt,
		"-dnsserver", d.addr,
		"-defaultIPv4", "127.0.0.1", "-defaultIPv6", "",
		"-http01", "", "-https01", "", "-tlsalpn01", "", "-doh", "")
	if err != nil {
		return nil, err
	}
	if err := waitTCP(d.mgmt, 15*time.Second, d.p.done, "pebble-challtestsrv", d.p.log); err != nil {
		d.stop()
		return nil, err
	}
	return d, nil
}

// SetA makes host's A queries answer addrs instead of 127.0.0.1.
func (d *challDNS) SetA(host string, addrs ...string) error {
	body, _ := json.Marshal(map[string]any{"host": strings.TrimSuffix(host, ".") + ".", "addresses": addrs})
	resp, err := http.Post("http://"+d.mgmt+"/add-a", "application/json", strings.NewReader(string(body)))
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != 200 {
		msg, _ := io.ReadAll(resp.Body)
		return fmt.Errorf("challtestsrv add-a %s: %s %s", host, resp.Status, msg)
	}
	return nil
}

func (d *challDNS) stop() {
	if d != nil {
		d.p.stop()
	}
}
