package deploy

import (
	"bytes"
	"context"
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
// loads. Counting reads a directory's names or the include file once per
// deploy, not per lineage.
func testLimit(d store.Deploy) time.Duration {
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
	return commandTimeout + time.Duration(n)*perCertificate
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
	if err := nginxReload(ctx, d); err != nil {
		if uerr := undo(); uerr != nil {
			err = fmt.Errorf("%v; and restoring %s failed: %v", err, d.NginxInclude, uerr)
		}
		r.rollback(g, changes, results, err, nil)
		r.dropTakenOut(d, g, changes, results)
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

// nginxReload tests nginx's config once, then reloads it once.
func nginxReload(ctx context.Context, d store.Deploy) error {
	limit := testLimit(d)
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
	if pid, ok := nginxMaster(ctx, d); ok {
		if err := syscall.Kill(pid, syscall.SIGHUP); err == nil {
			return nil
		}
	}
	if out, err := run(ctx, limit, nil, "", d.NginxBin, "-s", "reload", "-c", d.NginxConf); err != nil {
		return cmdError("reload nginx", err, out)
	}
	return nil
}

// nginxMaster finds the running master of d's config, to reload it with
// SIGHUP as "nginx -s reload" does. "nginx -s reload" first loads the
// whole config, every certificate, only to learn the PID: with 10,000
// server blocks that is as long as the test. The PID file is the one the
// config's pid directive names, or nginx's built-in one; when either is
// unclear, or the PID is not an nginx master, the caller falls back to
// "nginx -s reload".
func nginxMaster(ctx context.Context, d store.Deploy) (int, bool) {
	path := pidDirective(d.NginxConf)
	if path == "" {
		out, err := run(ctx, commandTimeout, nil, "", d.NginxBin, "-V")
		if err != nil {
			return 0, false
		}
		if m := pidPathFlag.FindStringSubmatch(out); m != nil {
			path = m[1]
		}
	}
	if !filepath.IsAbs(path) {
		return 0, false // relative to a prefix lbcert does not know
	}
	data, err := os.ReadFile(path)
	if err != nil {
		return 0, false
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(data)))
	if err != nil || pid <= 1 {
		return 0, false
	}
	title, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	if err != nil || !bytes.HasPrefix(title, []byte("nginx: master process")) {
		return 0, false
	}
	return pid, true
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
