package deploy

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/lbcert/lbcert/internal/store"
)

// commandTimeout bounds config tests and reloads, which take well under a
// second on a healthy host; a hung one must not hang cron. Tests shorten
// it, and perCertificate below.
var commandTimeout = 2 * time.Minute

// perCertificate is what each certificate the load balancer loads adds
// to the limit of its config test and reload (testLimit). Both load every
// certificate of nginx's include file or HAProxy's crt directory: about
// a millisecond each here (nginx -t over 100,000 server blocks took 75 s
// one day and more than 2 minutes the next; haproxy -c over 20,000 PEMs
// takes 16 s). A fixed 2 minutes killed the test of a node joining a
// fleet of 100,000 lineages, and the join was rolled back.
var perCertificate = 5 * time.Millisecond

// testLimit is the time limit of d's config test and reload:
// commandTimeout, plus perCertificate for each certificate the test
// loads (loadedCertificates).
func testLimit(d store.Deploy) time.Duration {
	return limitFor(loadedCertificates(d))
}

func limitFor(certificates int) time.Duration {
	return commandTimeout + time.Duration(certificates)*perCertificate
}

// loadedCertificates counts the certificates d's config test loads from
// the files lbcert writes: HAProxy's crt directory and nginx's include
// file. Counting reads a directory's names or the include file once per
// deploy, not per lineage.
func loadedCertificates(d store.Deploy) int {
	n := 0
	if d.HAProxyCerts != "" {
		if f, err := os.Open(d.HAProxyCerts); err == nil {
			names, _ := f.Readdirnames(-1)
			f.Close()
			n += len(names)
		}
	}
	if fi, err := os.Stat(d.NginxInclude); err == nil && fi.Mode().IsRegular() {
		// Only a regular file: reading a FIFO would wait for a writer.
		if data, err := os.ReadFile(d.NginxInclude); err == nil {
			n += bytes.Count(data, []byte("ssl_certificate_key"))
		}
	}
	return n
}

func (r *Runner) runNginx(ctx context.Context, g *group, changes []Change, results []Result) {
	d := g.d
	// live/<name> already points at the new version: the files nginx
	// reads are in place. The include file, when there is one, is
	// rewritten once for the whole group, then nginx is tested.
	undo := func() error { return nil }
	if d.NginxInclude != "" {
		var err error
		undo, err = r.writeSites(d, r.notYetLive(g, changes, results))
		if err != nil {
			r.rollback(g, changes, results, fmt.Errorf("write nginx include %s: %v", d.NginxInclude, err), nil)
			return
		}
	}
	if failed := nginxReload(ctx, d); failed != nil {
		err := failed
		if uerr := undo(); uerr != nil {
			err = fmt.Errorf("%v; and restoring %s failed: %v", err, d.NginxInclude, uerr)
		}
		r.rollback(g, changes, results, err, nil)
		r.dropTakenOut(d, g, changes, results)
		settle(failed)
		return
	}
	slog.Info("nginx tested and reloaded", "conf", d.NginxConf, "certificates", len(g.changes))
	for _, i := range g.changes {
		results[i].Deployed = true
	}
}

// dropTakenOut rewrites d's include file, after a rollback, when it still
// names a first certificate the rollback took out of live/: the file put
// back was written by a run killed before its config test (the same
// first deploy, retried now), and would stop nginx from loading its
// config at its next restart.
func (r *Runner) dropTakenOut(d store.Deploy, g *group, changes []Change, results []Result) {
	if d.NginxInclude == "" {
		return
	}
	data, err := os.ReadFile(d.NginxInclude)
	if err != nil {
		return
	}
	listed := parseSites(data)
	for _, i := range g.changes {
		if _, ok := listed[changes[i].Name]; ok && changes[i].Previous == 0 {
			if _, err := r.writeSites(d, r.notYetLive(g, changes, results)); err != nil {
				slog.Error("nginx include still names a certificate that is not live; the next run rewrites it", "file", d.NginxInclude, "name", changes[i].Name, "err", err)
			}
			return
		}
	}
}

// notYetLive names the lineages of other groups of this run that are new
// and not deployed yet: their deploy may still fail and take them out of
// live/, and an include file naming their paths would then break the
// next reload. They join the file with the next deploy.
func (r *Runner) notYetLive(g *group, changes []Change, results []Result) func(string) bool {
	mine := map[int]bool{}
	for _, i := range g.changes {
		mine[i] = true
	}
	skip := map[string]bool{}
	for i, c := range changes {
		if !mine[i] && c.Previous == 0 && !results[i].Deployed {
			skip[c.Name] = true
		}
	}
	return func(name string) bool { return skip[name] }
}

// nginxReload tests nginx's config once, then reloads it once. With
// an include file of besideFrom server blocks or more, and a master it
// can signal itself, it tests and reloads side by side (testBeside).
func nginxReload(ctx context.Context, d store.Deploy) error {
	certificates := loadedCertificates(d)
	limit := limitFor(certificates)
	// The master is looked up once, before the test: a pid file naming
	// another process is refused before a test that may take minutes. A
	// master gone by the end of the test refuses the signal, and nginx
	// then finds its new one itself ("nginx -s reload").
	pid, ok := 0, false
	if d.ReloadCmd == "" {
		var err error
		if pid, ok, err = nginxMaster(ctx, d); err != nil {
			return err
		}
		if ok && certificates >= besideFrom {
			return testBeside(ctx, d, pid, limit)
		}
	}
	out, err := run(ctx, limit, nil, "", d.NginxBin, "-t", "-c", d.NginxConf)
	if err != nil {
		return &testFailed{nginxTestError(d, cmdError(fmt.Sprintf("nginx -t -c %s failed", d.NginxConf), err, out)), out}
	}
	if d.ReloadCmd != "" {
		if out, err := run(ctx, limit, nil, d.ReloadCmd); err != nil {
			return cmdError(fmt.Sprintf("reload command %q failed", d.ReloadCmd), err, out)
		}
		return nil
	}
	if ok {
		if err := syscall.Kill(pid, syscall.SIGHUP); err == nil {
			return nil
		}
	}
	if out, err := run(ctx, limit, nil, "", d.NginxBin, "-s", "reload", "-c", d.NginxConf); err != nil {
		return cmdError("reload nginx", err, out)
	}
	return nil
}

// besideFrom is the include file size, in server blocks, from which the
// config test and the reload run side by side. nginx loads every block's
// certificate and key, once for "nginx -t" and once more in the master
// at reload: about a millisecond a block with OpenSSL 3, so 100,000
// blocks took two minutes each on a 2-core machine, and a node joining
// a fleet of that size served four minutes after its last install
// (internal/bench/README.md). Below this size both together take under
// about ten seconds, and the test runs first. Tests lower it.
var besideFrom = 10_000

// testBeside signals nginx's master to reload while "nginx -t" tests
// the same files, and returns the test's verdict once it ends. This is
// safe because an nginx reload is all or nothing: a master whose new
// config fails to load (the very failures "nginx -t" reports) logs it
// and goes on serving its old config with its old workers. So the test
// still decides. When it fails, the master is left to finish loading
// the same files, and to fail on them as the test did, before the
// caller puts its files back (masterSettled): put back while the
// master was still reading, they would give it a mix of old and new
// files that loads, and it would serve certificates of a deploy the
// test refused. Then the caller rolls back and reloads again (settle),
// so that the master holds the files as they are now, even if its
// reload got further than the test (a test killed at its time limit).
// When it passes, it returns once the master is done loading too, so
// that "deployed" means the new certificates are served. The cost is
// memory: nginx holds the config three times for a while (the test, and
// the master's old and new one) rather than twice.
func testBeside(ctx context.Context, d store.Deploy, pid int, limit time.Duration) error {
	type verdict struct {
		out string
		err error
	}
	start := time.Now()
	cpu, _ := procState(pid)
	done := make(chan verdict, 1)
	go func() {
		out, err := run(ctx, limit, nil, "", d.NginxBin, "-t", "-c", d.NginxConf)
		done <- verdict{out, err}
	}()
	hup := syscall.Kill(pid, syscall.SIGHUP)
	v := <-done
	if v.err != nil {
		// Even when interrupted: the files must not be put back under a
		// master still reading them.
		if hup == nil && !masterSettled(context.WithoutCancel(ctx), pid, cpu, start.Add(limit)) {
			slog.Warn("nginx's master was still loading its config at the time limit; putting the files back anyway", "master", pid)
		}
		err := nginxTestError(d, cmdError(fmt.Sprintf("nginx -t -c %s failed", d.NginxConf), v.err, v.out))
		return &signalledBeside{&testFailed{err, v.out}, pid}
	}
	if hup != nil {
		// As when the test comes first: nginx finds its master itself.
		if out, err := run(ctx, limit, nil, "", d.NginxBin, "-s", "reload", "-c", d.NginxConf); err != nil {
			return cmdError("reload nginx", err, out)
		}
		return nil
	}
	// Deployed means served: the master is still loading the config it
	// was signalled to (as long as the test took, or longer), and until
	// it is done its old workers serve the old certificates.
	if !masterSettled(ctx, pid, cpu, start.Add(limit)) {
		slog.Warn("nginx's master was not seen to finish loading its config (still loading at the time limit or the interrupt, or gone); its new certificates may not be served yet", "master", pid)
	}
	slog.Info("nginx tested while it reloaded", "conf", d.NginxConf, "master", pid)
	return nil
}

// masterSettled waits until nginx's master, signalled to reload when
// its CPU time was cpuBefore, is done loading its config: it has used
// CPU since (or two seconds went by: a small config loads within one
// tick of the CPU clock) and has then been asleep, using none, for
// three looks 50 ms apart. A master loading a config is running; one
// that has loaded it, or failed to, sleeps until its next signal. It
// reports false at the deadline, when ctx ends, or when the master
// cannot be read.
func masterSettled(ctx context.Context, pid int, cpuBefore time.Duration, deadline time.Time) bool {
	start, quiet := time.Now(), 0
	last := time.Duration(-1)
	for time.Now().Before(deadline) && ctx.Err() == nil {
		cpu, state := procState(pid)
		switch {
		case state == 0:
			return false
		case state == 'S' && cpu == last && (cpu > cpuBefore || time.Since(start) > 2*time.Second):
			quiet++
		default:
			quiet = 0
		}
		if quiet >= 3 {
			return true
		}
		last = cpu
		time.Sleep(50 * time.Millisecond)
	}
	return false
}

// procState is a process's CPU time (user and system) and its state
// letter, from /proc/PID/stat; state 0 when it cannot be read.
func procState(pid int) (time.Duration, byte) {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	i := bytes.LastIndexByte(data, ')')
	if err != nil || i < 0 || i+2 >= len(data) {
		return 0, 0
	}
	// After the command name: state, then 10 fields, then utime, stime.
	f := strings.Fields(string(data[i+2:]))
	if len(f) < 13 {
		return 0, 0
	}
	utime, err1 := strconv.ParseInt(f[11], 10, 64)
	stime, err2 := strconv.ParseInt(f[12], 10, 64)
	if err1 != nil || err2 != nil {
		return 0, 0
	}
	const hz = 100 // USER_HZ on Linux
	return time.Duration(utime+stime) * time.Second / hz, f[0][0]
}

// signalledBeside is a failed config test whose reload was signalled
// beside it (testBeside): once the files are back, nginx is reloaded
// again (settle).
type signalledBeside struct {
	*testFailed
	pid int
}

func (e *signalledBeside) Unwrap() error { return e.testFailed }

// settle reloads nginx again after err's files were put back, when err
// is a failed test whose reload was signalled beside it. The master
// handles a signal that arrives while it loads a config once that load
// ends, so this reload comes after the first, whatever the first did.
func settle(err error) {
	var sb *signalledBeside
	if !errors.As(err, &sb) {
		return
	}
	if kerr := syscall.Kill(sb.pid, syscall.SIGHUP); kerr != nil {
		slog.Warn("could not reload nginx with its files put back", "master", sb.pid, "err", kerr)
		return
	}
	slog.Info("nginx reloaded again, with its files put back", "master", sb.pid)
}

// nginxMaster finds the running master of d's config, to reload it with
// SIGHUP as "nginx -s reload" does. "nginx -s reload" first loads the
// whole config, every certificate, only to learn the PID: with 10,000
// server blocks that is as long as the test. The PID file is the one the
// config's pid directive names, or nginx's built-in one; when either is
// unclear, or the PID is not an nginx master, the caller falls back to
// "nginx -s reload".
func nginxMaster(ctx context.Context, d store.Deploy) (int, bool, error) {
	path := pidDirective(d.NginxConf)
	if path == "" {
		out, err := run(ctx, commandTimeout, nil, "", d.NginxBin, "-V")
		if err != nil {
			return 0, false, nil
		}
		if m := pidPathFlag.FindStringSubmatch(out); m != nil {
			path = m[1]
		}
	}
	if !filepath.IsAbs(path) {
		return 0, false, nil // relative to a prefix lbcert does not know
	}
	data, err := os.ReadFile(path)
	if err != nil {
		return 0, false, nil
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(data)))
	if err != nil || pid <= 1 {
		return 0, false, nil
	}
	title, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	if err != nil {
		return 0, false, nil // gone: "nginx -s reload" says so in its words
	}
	if bytes.HasPrefix(title, []byte("nginx: master process")) || sameProgram(pid, d.NginxBin) {
		return pid, true, nil
	}
	// "nginx -s reload" would signal this process too: it reads the same
	// file.
	name, _, _ := strings.Cut(string(title), "\x00")
	if name == "" {
		name = "exiting, or a kernel thread"
	}
	return 0, false, fmt.Errorf("nginx's pid file %s names process %d (%s), which is not nginx's master: nothing reloaded; check the config's pid directive, or whether nginx is running", path, pid, name)
}

// sameProgram reports whether process pid runs the program bin names (an
// nginx build whose master does not call itself "nginx: master process").
func sameProgram(pid int, bin string) bool {
	exe, err1 := os.Stat(fmt.Sprintf("/proc/%d/exe", pid))
	want, err2 := os.Stat(bin)
	return err1 == nil && err2 == nil && os.SameFile(exe, want)
}

var (
	pidLine     = regexp.MustCompile(`^\s*pid\s+([^\s;#]+)\s*;`)
	pidPathFlag = regexp.MustCompile(`--pid-path=(\S+)`)
)

// pidDirective is the path of the main config's pid directive, or "".
func pidDirective(conf string) string {
	data, err := os.ReadFile(conf)
	if err != nil {
		return ""
	}
	for _, line := range strings.Split(string(data), "\n") {
		if m := pidLine.FindStringSubmatch(line); m != nil {
			return strings.Trim(m[1], `"'`)
		}
	}
	return ""
}

// nginxTestError says what to do when the include file's own hash
// settings meet the operator's.
func nginxTestError(d store.Deploy, err error) error {
	if d.NginxInclude != "" && strings.Contains(err.Error(), "server_names_hash") && strings.Contains(err.Error(), "duplicate") {
		return fmt.Errorf("%v (the include file %s sets server_names_hash_max_size and _bucket_size for its names: remove yours)", err, d.NginxInclude)
	}
	return err
}
