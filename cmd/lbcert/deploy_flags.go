package main

import (
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"time"

	"github.com/spf13/pflag"

	"github.com/lbcert/lbcert/internal/config"
	"github.com/lbcert/lbcert/internal/deploy"
	"github.com/lbcert/lbcert/internal/store"
)

// The load balancers' usual config files: the flags' defaults, and what
// delete checks besides the configs the lineages deploy to.
const (
	defaultNginxConf   = "/etc/nginx/nginx.conf"
	defaultHAProxyConf = "/etc/haproxy/haproxy.cfg"
)

// deployFlags are the deploy settings of issue and batch. What is given
// is saved with the lineage; what is not is taken from the lineage's
// saved settings, so a reissue does not silently drop its deploy target.
type deployFlags struct {
	fs            *pflag.FlagSet
	target        string
	nginxConf     string
	nginxBin      string
	nginxInclude  string
	nginxBody     string
	haproxyConf   string
	haproxyBin    string
	haproxyCerts  string
	haproxySocket string
	reloadCmd     string
	hook          string
	hookTimeout   time.Duration
	verifyAddr    string
	verifyRoots   string
}

func (d *deployFlags) register(f *pflag.FlagSet) {
	d.fs = f
	f.StringVar(&d.target, "deploy", "none", "load balancer to deploy to: nginx, haproxy or none")
	f.StringVar(&d.nginxConf, "nginx-conf", defaultNginxConf, "nginx config to test (nginx -t -c FILE) and reload")
	f.StringVar(&d.nginxBin, "nginx-bin", "nginx", "nginx binary")
	f.StringVar(&d.nginxInclude, "nginx-include", "", "file lbcert writes for 'include FILE;' in nginx's http block: a server block for every lineage, all its names (needs --nginx-server-body)")
	f.StringVar(&d.nginxBody, "nginx-server-body", "", "your server body (listen lines, locations), included in every server block of --nginx-include")
	f.StringVar(&d.haproxyConf, "haproxy-conf", defaultHAProxyConf, "HAProxy config to test (haproxy -c -f FILE)")
	f.StringVar(&d.haproxyBin, "haproxy-bin", "haproxy", "HAProxy binary")
	f.StringVar(&d.haproxyCerts, "haproxy-certs", "", "directory of combined PEMs, one <name>.pem per lineage, for 'bind :443 ssl crt DIR' (default <dir>/haproxy)")
	f.StringVar(&d.haproxySocket, "haproxy-socket", "", "HAProxy runtime API socket (level admin): update certificates without a reload")
	f.StringVar(&d.reloadCmd, "reload-cmd", "", "command that reloads the load balancer, run with /bin/sh -c (nginx default: SIGHUP to the master in the config's pid file, else nginx -s reload)")
	f.StringVar(&d.hook, "deploy-hook", "", "command run with /bin/sh -c after each deployed certificate; sees LBCERT_* and RENEWED_* variables")
	f.DurationVar(&d.hookTimeout, "hook-timeout", deploy.DefaultHookTimeout, "how long a deploy hook may run before it is killed")
	f.StringVar(&d.verifyAddr, "verify-addr", "", "TLS address the load balancer serves on (host:port); checked for the new serial after reload")
	f.StringVar(&d.verifyRoots, "verify-roots", "", "PEM file of roots: the TLS check also verifies the served chain to one of them (no intermediate is ever pinned)")
}

// resolve checks the deploy settings offline and returns them, filled in
// from prev for anything not given. stateDir places the default HAProxy
// directory.
func (d *deployFlags) resolve(stateDir string, prev *store.Deploy) (store.Deploy, error) {
	given := func(name string) bool { return config.Given(d.fs, name) }
	var out store.Deploy
	if prev != nil {
		out = *prev
	}
	pick := func(dst *string, name, val string) {
		if given(name) || prev == nil {
			*dst = val
		}
	}
	target := d.target
	if target == "none" {
		target = ""
	}
	pick(&out.Target, "deploy", target)
	pick(&out.ReloadCmd, "reload-cmd", d.reloadCmd)
	pick(&out.Hook, "deploy-hook", d.hook)
	pick(&out.VerifyAddr, "verify-addr", d.verifyAddr)
	pick(&out.VerifyRoots, "verify-roots", d.verifyRoots)
	if given("hook-timeout") || prev == nil {
		out.HookTimeout = int(d.hookTimeout / time.Second)
	}
	switch out.Target {
	case "":
		out.NginxConf, out.NginxBin, out.HAProxyConf, out.HAProxyBin, out.HAProxyCerts, out.HAProxySocket = "", "", "", "", "", ""
		out.NginxInclude, out.NginxServerBody = "", ""
	case "nginx":
		pick(&out.NginxConf, "nginx-conf", d.nginxConf)
		pick(&out.NginxBin, "nginx-bin", d.nginxBin)
		pick(&out.NginxInclude, "nginx-include", d.nginxInclude)
		pick(&out.NginxServerBody, "nginx-server-body", d.nginxBody)
		if out.NginxConf == "" {
			out.NginxConf = d.nginxConf
		}
		if out.NginxBin == "" {
			out.NginxBin = d.nginxBin
		}
		out.HAProxyConf, out.HAProxyBin, out.HAProxyCerts, out.HAProxySocket = "", "", "", ""
	case "haproxy":
		pick(&out.HAProxyConf, "haproxy-conf", d.haproxyConf)
		pick(&out.HAProxyBin, "haproxy-bin", d.haproxyBin)
		pick(&out.HAProxyCerts, "haproxy-certs", d.haproxyCerts)
		pick(&out.HAProxySocket, "haproxy-socket", d.haproxySocket)
		if out.HAProxyConf == "" {
			out.HAProxyConf = d.haproxyConf
		}
		if out.HAProxyBin == "" {
			out.HAProxyBin = d.haproxyBin
		}
		if out.HAProxyCerts == "" {
			out.HAProxyCerts = filepath.Join(stateDir, "haproxy")
		}
		out.NginxConf, out.NginxBin, out.NginxInclude, out.NginxServerBody = "", "", "", ""
	default:
		return out, fmt.Errorf("--deploy %q: want nginx, haproxy or none", d.target)
	}
	return out, checkDeploy(&out, stateDir)
}

// checkDeploy refuses settings that cannot work, before the CA is asked
// for a certificate that could then not be deployed.
func checkDeploy(d *store.Deploy, stateDir string) error {
	var err error
	switch d.Target {
	case "nginx":
		if d.NginxBin, err = findBin("--nginx-bin", d.NginxBin); err != nil {
			return err
		}
		if d.NginxConf, err = existingFile("--nginx-conf", d.NginxConf); err != nil {
			return err
		}
		if err := checkNginxInclude(d, stateDir); err != nil {
			return err
		}
	case "haproxy":
		if d.HAProxyBin, err = findBin("--haproxy-bin", d.HAProxyBin); err != nil {
			return err
		}
		if d.HAProxyConf, err = existingFile("--haproxy-conf", d.HAProxyConf); err != nil {
			return err
		}
		if d.HAProxyCerts, err = filepath.Abs(d.HAProxyCerts); err != nil {
			return fmt.Errorf("--haproxy-certs: %w", err)
		}
		if d.ReloadCmd == "" && d.HAProxySocket == "" {
			return fmt.Errorf("--deploy haproxy needs --reload-cmd (for example 'systemctl reload haproxy') or --haproxy-socket")
		}
		if d.HAProxySocket != "" && filepath.IsAbs(d.HAProxySocket) == false {
			if _, _, err := net.SplitHostPort(d.HAProxySocket); err != nil {
				if d.HAProxySocket, err = filepath.Abs(d.HAProxySocket); err != nil {
					return fmt.Errorf("--haproxy-socket: %w", err)
				}
			}
		}
	}
	if d.VerifyAddr != "" {
		host, port, err := net.SplitHostPort(d.VerifyAddr)
		n, perr := strconv.Atoi(port)
		if err != nil || host == "" || perr != nil || n < 1 || n > 65535 {
			return fmt.Errorf("--verify-addr %q: want host:port, like 127.0.0.1:443", d.VerifyAddr)
		}
	}
	if d.VerifyRoots != "" {
		if d.VerifyAddr == "" {
			return fmt.Errorf("--verify-roots needs --verify-addr: the address whose served chain to check")
		}
		abs, err := filepath.Abs(d.VerifyRoots)
		if err == nil {
			_, err = deploy.LoadRoots(abs)
		}
		if err != nil {
			return fmt.Errorf("--verify-roots: %w", err)
		}
		d.VerifyRoots = abs
	}
	if d.HookTimeout < 0 {
		return fmt.Errorf("--hook-timeout must be positive")
	}
	return nil
}

// checkNginxInclude checks the include file's settings: both or
// neither, the body a file, the include's directory there, and every path
// the file will name one nginx reads as written.
func checkNginxInclude(d *store.Deploy, stateDir string) error {
	if d.NginxInclude == "" && d.NginxServerBody == "" {
		return nil
	}
	if d.NginxInclude == "" || d.NginxServerBody == "" {
		return fmt.Errorf("--nginx-include and --nginx-server-body go together: the file lbcert writes, and your server body it includes in every block")
	}
	var err error
	if d.NginxServerBody, err = existingFile("--nginx-server-body", d.NginxServerBody); err != nil {
		return err
	}
	if d.NginxInclude, err = filepath.Abs(d.NginxInclude); err != nil {
		return fmt.Errorf("--nginx-include: %w", err)
	}
	if d.NginxInclude == d.NginxServerBody || d.NginxInclude == d.NginxConf {
		return fmt.Errorf("--nginx-include %s: lbcert rewrites this file; give it a file of its own", d.NginxInclude)
	}
	if fi, err := os.Stat(d.NginxInclude); err == nil && fi.IsDir() {
		return fmt.Errorf("--nginx-include %s: is a directory; name the file lbcert writes, like /etc/nginx/conf.d/lbcert.conf", d.NginxInclude)
	}
	if fi, err := os.Stat(filepath.Dir(d.NginxInclude)); err != nil || !fi.IsDir() {
		return fmt.Errorf("--nginx-include %s: no directory %s", d.NginxInclude, filepath.Dir(d.NginxInclude))
	}
	abs, err := filepath.Abs(stateDir)
	if err != nil {
		return fmt.Errorf("--dir: %w", err)
	}
	for _, p := range [][2]string{{"--nginx-include", d.NginxInclude}, {"--nginx-server-body", d.NginxServerBody}, {"--dir", abs}} {
		if err := deploy.NginxPathOK(p[1]); err != nil {
			return fmt.Errorf("%s %w", p[0], err)
		}
	}
	return nil
}

func findBin(flag, bin string) (string, error) {
	if p, err := exec.LookPath(bin); err == nil {
		return filepath.Abs(p)
	}
	if !filepath.IsAbs(bin) {
		if p, err := exec.LookPath(filepath.Join("/usr/sbin", bin)); err == nil {
			return p, nil
		}
	}
	return "", fmt.Errorf("%s %s: not found or not executable", flag, bin)
}

func existingFile(flag, path string) (string, error) {
	abs, err := filepath.Abs(path)
	if err != nil {
		return "", fmt.Errorf("%s %s: %w", flag, path, err)
	}
	fi, err := os.Stat(abs)
	if err != nil {
		return "", fmt.Errorf("%s %s: %w", flag, path, unwrapPath(err))
	}
	if fi.IsDir() {
		return "", fmt.Errorf("%s %s: is a directory", flag, path)
	}
	return abs, nil
}
