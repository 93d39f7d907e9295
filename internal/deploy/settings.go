package deploy

import (
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/lbcert/lbcert/internal/store"
)

// The load balancers' usual config files: the flags' defaults, and what
// delete checks besides the configs the lineages deploy to.
const (
	DefaultNginxConf   = "/etc/nginx/nginx.conf"
	DefaultHAProxyConf = "/etc/haproxy/haproxy.cfg"
)

// Flags are the deploy settings as a command was given them (issue,
// batch, the fleet agent): --deploy, --nginx-*, --haproxy-*,
// --reload-cmd, --deploy-hook, --hook-timeout and --verify-*.
type Flags struct {
	Target        string
	NginxConf     string
	NginxBin      string
	NginxInclude  string
	NginxBody     string
	HAProxyConf   string
	HAProxyBin    string
	HAProxyCerts  string
	HAProxySocket string
	ReloadCmd     string
	Hook          string
	HookTimeout   time.Duration
	VerifyAddr    string
	VerifyRoots   string
}

// Resolve checks the settings offline and returns them, filled in from
// prev for anything given says was not given (on the command line, in
// the environment or the config file), so that a reissue does not
// silently drop its deploy target. stateDir places the default HAProxy
// directory.
func (d Flags) Resolve(given func(flag string) bool, stateDir string, prev *store.Deploy) (store.Deploy, error) {
	var out store.Deploy
	if prev != nil {
		out = *prev
	}
	pick := func(dst *string, name, val string) {
		if given(name) || prev == nil {
			*dst = val
		}
	}
	target := d.Target
	if target == "none" {
		target = ""
	}
	pick(&out.Target, "deploy", target)
	pick(&out.ReloadCmd, "reload-cmd", d.ReloadCmd)
	pick(&out.Hook, "deploy-hook", d.Hook)
	pick(&out.VerifyAddr, "verify-addr", d.VerifyAddr)
	pick(&out.VerifyRoots, "verify-roots", d.VerifyRoots)
	if given("hook-timeout") || prev == nil {
		out.HookTimeout = int(d.HookTimeout / time.Second)
	}
	switch out.Target {
	case "":
		out.NginxConf, out.NginxBin, out.HAProxyConf, out.HAProxyBin, out.HAProxyCerts, out.HAProxySocket = "", "", "", "", "", ""
		out.NginxInclude, out.NginxServerBody = "", ""
	case "nginx":
		pick(&out.NginxConf, "nginx-conf", d.NginxConf)
		pick(&out.NginxBin, "nginx-bin", d.NginxBin)
		pick(&out.NginxInclude, "nginx-include", d.NginxInclude)
		pick(&out.NginxServerBody, "nginx-server-body", d.NginxBody)
		if out.NginxConf == "" {
			out.NginxConf = d.NginxConf
		}
		if out.NginxBin == "" {
			out.NginxBin = d.NginxBin
		}
		out.HAProxyConf, out.HAProxyBin, out.HAProxyCerts, out.HAProxySocket = "", "", "", ""
	case "haproxy":
		pick(&out.HAProxyConf, "haproxy-conf", d.HAProxyConf)
		pick(&out.HAProxyBin, "haproxy-bin", d.HAProxyBin)
		pick(&out.HAProxyCerts, "haproxy-certs", d.HAProxyCerts)
		pick(&out.HAProxySocket, "haproxy-socket", d.HAProxySocket)
		if out.HAProxyConf == "" {
			out.HAProxyConf = d.HAProxyConf
		}
		if out.HAProxyBin == "" {
			out.HAProxyBin = d.HAProxyBin
		}
		if out.HAProxyCerts == "" {
			out.HAProxyCerts = filepath.Join(stateDir, "haproxy")
		}
		out.NginxConf, out.NginxBin, out.NginxInclude, out.NginxServerBody = "", "", "", ""
	default:
		return out, fmt.Errorf("--deploy %q: want nginx, haproxy or none", d.Target)
	}
	return out, Check(&out, stateDir)
}

// runtimeAPISeparators are the characters HAProxy's runtime API reads
// as the end of a word or of a command (or an escape), in a path.
const runtimeAPISeparators = " \t\r\n;\\"

// Check refuses settings that cannot work, before the CA is asked for a
// certificate that could then not be deployed, and makes every path
// absolute.
func Check(d *store.Deploy, stateDir string) error {
	var err error
	switch d.Target {
	case "nginx":
		if d.NginxBin, err = FindBin("--nginx-bin", d.NginxBin); err != nil {
			return err
		}
		if d.NginxConf, err = existingFile("--nginx-conf", d.NginxConf); err != nil {
			return err
		}
		if err := checkNginxInclude(d, stateDir); err != nil {
			return err
		}
	case "haproxy":
		if d.HAProxyBin, err = FindBin("--haproxy-bin", d.HAProxyBin); err != nil {
			return err
		}
		if d.HAProxyConf, err = existingFile("--haproxy-conf", d.HAProxyConf); err != nil {
			return err
		}
		if d.HAProxyCerts, err = filepath.Abs(d.HAProxyCerts); err != nil {
			return fmt.Errorf("--haproxy-certs: %w", err)
		}
		if d.HAProxySocket != "" && strings.ContainsAny(d.HAProxyCerts, runtimeAPISeparators) {
			return fmt.Errorf("--haproxy-certs %q: HAProxy's runtime API splits a command at spaces, ';' and '\\', so it cannot name a certificate there; use a directory without them, or --reload-cmd instead of --haproxy-socket", d.HAProxyCerts)
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
			_, err = LoadRoots(abs)
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
	if d.NginxInclude == d.NginxServerBody || d.NginxInclude == d.NginxConf || sameExisting(d.NginxInclude, d.NginxServerBody) || sameExisting(d.NginxInclude, d.NginxConf) {
		return fmt.Errorf("--nginx-include %s: lbcert rewrites this file; give it a file of its own", d.NginxInclude)
	}
	if fi, err := os.Stat(d.NginxInclude); err == nil && fi.IsDir() {
		return fmt.Errorf("--nginx-include %s: is a directory; name the file lbcert writes, like /etc/nginx/conf.d/lbcert.conf", d.NginxInclude)
	} else if err == nil && !fi.Mode().IsRegular() {
		return fmt.Errorf("--nginx-include %s: not a regular file (a pipe, socket or device); name the file lbcert writes, like /etc/nginx/conf.d/lbcert.conf", d.NginxInclude)
	}
	if fi, err := os.Stat(filepath.Dir(d.NginxInclude)); err != nil || !fi.IsDir() {
		return fmt.Errorf("--nginx-include %s: no directory %s", d.NginxInclude, filepath.Dir(d.NginxInclude))
	}
	abs, err := filepath.Abs(stateDir)
	if err != nil {
		return fmt.Errorf("--dir: %w", err)
	}
	for _, p := range [][2]string{{"--nginx-include", d.NginxInclude}, {"--nginx-server-body", d.NginxServerBody}, {"--dir", abs}} {
		if err := NginxPathOK(p[1]); err != nil {
			return fmt.Errorf("%s %w", p[0], err)
		}
	}
	return nil
}

// sameExisting reports whether a and b both exist and are one file
// (through a symbolic or hard link).
func sameExisting(a, b string) bool {
	fa, err1 := os.Stat(a)
	fb, err2 := os.Stat(b)
	return err1 == nil && err2 == nil && os.SameFile(fa, fb)
}

// FindBin finds a load balancer binary by name or path (and in /usr/sbin,
// which a root crontab's PATH may lack).
func FindBin(flag, bin string) (string, error) {
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
		return "", fmt.Errorf("%s %s: %w", flag, path, unwrapPathErr(err))
	}
	if fi.IsDir() {
		return "", fmt.Errorf("%s %s: is a directory", flag, path)
	}
	if !fi.Mode().IsRegular() {
		// The load balancer and lbcert read it at every test and reload:
		// a pipe would be empty the second time, or block lbcert.
		return "", fmt.Errorf("%s %s: not a regular file (a pipe, socket or device); name the file itself", flag, path)
	}
	return abs, nil
}

func unwrapPathErr(err error) error {
	if pe, ok := err.(*os.PathError); ok {
		return pe.Err
	}
	return err
}
