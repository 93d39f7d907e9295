package testenv

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"
)

// NginxBin finds nginx, or says how to install it.
func NginxBin() (string, error) {
	for _, p := range []string{"nginx", "/usr/sbin/nginx"} {
		if path, err := exec.LookPath(p); err == nil {
			return path, nil
		}
	}
	return "", fmt.Errorf("nginx not found: run 'make deps' (apt-get install nginx-light)")
}

// Nginx is a running nginx with its own prefix and config, on loopback.
type Nginx struct {
	Bin    string
	Prefix string // holds conf, pid, logs
	Conf   string
	proc   *proc
}

// NginxConfig wraps server blocks in a complete config that keeps every
// path (pid, logs, temp files) inside prefix, so it never touches the
// system nginx.
func NginxConfig(prefix, servers string) string {
	user := ""
	if os.Geteuid() == 0 {
		// Workers would drop to nobody and could not read test files
		// under a 0700 temporary directory.
		user = "root"
	}
	return NginxConfigAs(prefix, user, servers)
}

// NginxConfigAs is NginxConfig with nginx's workers running as user
// ("nobody nogroup", as production runs them; "" for nginx's default),
// while the master stays root and reads certificates and keys.
func NginxConfigAs(prefix, user, servers string) string {
	if user != "" {
		user = "user " + user + ";"
	}
	return fmt.Sprintf(`%s
worker_processes 1;
pid %[2]s/nginx.pid;
error_log %[2]s/error.log info;
events { worker_connections 64; }
http {
    access_log %[2]s/access.log;
    client_body_temp_path %[2]s/tmp-body;
    proxy_temp_path %[2]s/tmp-proxy;
    fastcgi_temp_path %[2]s/tmp-fastcgi;
    uwsgi_temp_path %[2]s/tmp-uwsgi;
    scgi_temp_path %[2]s/tmp-scgi;
    default_type application/octet-stream;
%[3]s
}
`, user, prefix, servers)
}

// StartNginx writes conf into prefix/nginx.conf and starts nginx in the
// foreground (daemon off), so Stop can end it reliably.
func StartNginx(prefix, conf string, waitAddr string) (*Nginx, error) {
	bin, err := NginxBin()
	if err != nil {
		return nil, err
	}
	n := &Nginx{Bin: bin, Prefix: prefix, Conf: filepath.Join(prefix, "nginx.conf")}
	if err := os.WriteFile(n.Conf, []byte(conf), 0o644); err != nil {
		return nil, err
	}
	if out, err := exec.Command(bin, "-t", "-p", prefix, "-c", n.Conf).CombinedOutput(); err != nil {
		return nil, fmt.Errorf("nginx -t: %v\n%s", err, out)
	}
	n.proc, err = start(filepath.Join(prefix, "nginx.out"), nil, bin, "-p", prefix, "-c", n.Conf, "-g", "daemon off;")
	if err != nil {
		return nil, err
	}
	if err := waitTCP(waitAddr, 10*time.Second, n.proc.done, "nginx", filepath.Join(prefix, "error.log")); err != nil {
		n.Stop()
		return nil, err
	}
	return n, nil
}

// Stop stops nginx.
func (n *Nginx) Stop() {
	if n != nil {
		n.proc.stop()
	}
}

// AccessLog returns nginx's access log so far.
func (n *Nginx) AccessLog() string {
	data, _ := os.ReadFile(filepath.Join(n.Prefix, "access.log"))
	return string(data)
}

// MasterPID returns the PID in nginx's pid file.
func (n *Nginx) MasterPID() string {
	data, _ := os.ReadFile(filepath.Join(n.Prefix, "nginx.pid"))
	return string(bytes.TrimSpace(data))
}

// Cmdline is how lbcert should run this nginx: the binary with -p, so
// "nginx -t" and "nginx -s reload" find this instance and not the system's.
func (n *Nginx) Cmdline() string {
	return strings.Join([]string{n.Bin, "-p", n.Prefix}, " ")
}

// SNIServer is an nginx server block on tlsAddr serving every lineage
// under live (a --dir's live/) by SNI, as the README's fleet snippet
// does: the certificate files are read per handshake, by name.
func SNIServer(tlsAddr, live string) string {
	return fmt.Sprintf(`
    server {
        listen %s ssl;
        server_name _;
        ssl_certificate %s/$ssl_server_name/fullchain.pem;
        ssl_certificate_key %s/$ssl_server_name/privkey.pem;
        return 200 "ok\n";
    }`, tlsAddr, live, live)
}
