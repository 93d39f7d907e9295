package testenv

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

func sbin(name string) (string, error) {
	for _, p := range []string{name, "/usr/sbin/" + name, "/usr/bin/" + name} {
		if path, err := exec.LookPath(p); err == nil {
			return path, nil
		}
	}
	return "", fmt.Errorf("%s not found: run 'make deps' (apt-get install %s)", name, name)
}

// Redis is a redis-server of the test's own, on a loopback port, with
// its data in its own directory and the append-only file on (so a kill
// -9 and restart keeps what was acknowledged, as a real deployment's
// does).
type Redis struct {
	Port     int
	Password string
	Dir      string
	// ReplicaOf makes it a replica of another instance.
	ReplicaOf *Redis
	// TLS, when set, serves TLS only (rediss://) with this certificate.
	TLS *RedisTLS
	// Conf is more redis.conf lines.
	Conf string
	proc *proc
	n    int // starts, for log names
}

// Addr is host:port.
func (r *Redis) Addr() string { return "127.0.0.1:" + strconv.Itoa(r.Port) }

// URL is the redis:// URL, without the password.
func (r *Redis) URL() string { return "redis://" + r.Addr() + "/0" }

// RedisTLS is a TLS server certificate for Redis: PEM files.
type RedisTLS struct{ Cert, Key, CA string }

// StartRedisTLS starts a TLS-only redis-server.
func StartRedisTLS(dir, password string, t *RedisTLS) (*Redis, error) {
	return startRedis(&Redis{Password: password, Dir: dir, TLS: t})
}

// StartRedis starts a redis-server in dir with requirepass password
// (empty for none), a replica of replicaOf when that is set.
func StartRedis(dir, password string, replicaOf *Redis) (*Redis, error) {
	return startRedis(&Redis{Password: password, Dir: dir, ReplicaOf: replicaOf})
}

// StartRedisConf starts a redis-server with extra config lines.
func StartRedisConf(dir, conf string) (*Redis, error) {
	return startRedis(&Redis{Dir: dir, Conf: conf})
}

func startRedis(r *Redis) (*Redis, error) {
	port, err := FreePort()
	if err != nil {
		return nil, err
	}
	if err := os.MkdirAll(r.Dir, 0o700); err != nil {
		return nil, err
	}
	r.Port = port
	return r, r.Start()
}

// Start starts (or restarts) the server on its port and data.
func (r *Redis) Start() error {
	bin, err := sbin("redis-server")
	if err != nil {
		return err
	}
	conf := fmt.Sprintf("port %d\nbind 127.0.0.1\ndir %s\nappendonly yes\nappendfsync always\nsave \"\"\ndaemonize no\nprotected-mode no\n", r.Port, r.Dir)
	if r.TLS != nil {
		conf = strings.Replace(conf, fmt.Sprintf("port %d\n", r.Port), fmt.Sprintf("port 0\ntls-port %d\ntls-cert-file %s\ntls-key-file %s\ntls-ca-cert-file %s\ntls-auth-clients no\n",
			r.Port, r.TLS.Cert, r.TLS.Key, r.TLS.CA), 1)
	}
	if r.Password != "" {
		conf += fmt.Sprintf("requirepass %s\nmasterauth %s\n", r.Password, r.Password)
	}
	if r.ReplicaOf != nil {
		conf += fmt.Sprintf("replicaof 127.0.0.1 %d\n", r.ReplicaOf.Port)
	}
	conf += r.Conf
	// The config is a file, not argv: the password must not show in ps.
	path := filepath.Join(r.Dir, "redis.conf")
	if err := os.WriteFile(path, []byte(conf), 0o600); err != nil {
		return err
	}
	r.n++
	p, err := start(filepath.Join(r.Dir, fmt.Sprintf("redis-%d.log", r.n)), nil, bin, path)
	if err != nil {
		return err
	}
	r.proc = p
	return waitTCP(r.Addr(), 10*time.Second, p.done, "redis-server", p.log)
}

// Kill kills the server with SIGKILL, as a crash would.
func (r *Redis) Kill() {
	if r.proc == nil {
		return
	}
	r.proc.cmd.Process.Signal(syscall.SIGKILL)
	<-r.proc.done
}

// Stop stops the server.
func (r *Redis) Stop() {
	if r != nil {
		r.proc.stop()
	}
}

// Log is the current run's log.
func (r *Redis) Log() string { return tail(r.proc.log) }

// Sentinel is a redis-sentinel watching one primary.
type Sentinel struct {
	Port   int
	Master string
	proc   *proc
}

// Addr is host:port.
func (s *Sentinel) Addr() string { return "127.0.0.1:" + strconv.Itoa(s.Port) }

// StartSentinel starts a sentinel in dir that watches primary under the
// name master, with quorum 1 and a fast failover (down after 1 s).
func StartSentinel(dir, master string, primary *Redis) (*Sentinel, error) {
	bin, err := sbin("redis-sentinel")
	if err != nil {
		return nil, err
	}
	port, err := FreePort()
	if err != nil {
		return nil, err
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	conf := fmt.Sprintf("port %d\nbind 127.0.0.1\ndir %s\nprotected-mode no\nsentinel resolve-hostnames no\n"+
		"sentinel monitor %s 127.0.0.1 %d 1\nsentinel down-after-milliseconds %s 1000\nsentinel failover-timeout %s 5000\nsentinel parallel-syncs %s 1\n",
		port, dir, master, primary.Port, master, master, master)
	if primary.Password != "" {
		conf += fmt.Sprintf("sentinel auth-pass %s %s\nrequirepass %s\n", master, primary.Password, primary.Password)
	}
	path := filepath.Join(dir, "sentinel.conf")
	if err := os.WriteFile(path, []byte(conf), 0o600); err != nil {
		return nil, err
	}
	p, err := start(filepath.Join(dir, "sentinel.log"), nil, bin, path)
	if err != nil {
		return nil, err
	}
	s := &Sentinel{Port: port, Master: master, proc: p}
	return s, waitTCP(s.Addr(), 10*time.Second, p.done, "redis-sentinel", p.log)
}

// Stop stops the sentinel.
func (s *Sentinel) Stop() {
	if s != nil {
		s.proc.stop()
	}
}

// Log is the sentinel's log.
func (s *Sentinel) Log() string { return tail(s.proc.log) }
