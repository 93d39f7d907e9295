package deploy

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"path/filepath"
	"regexp"
	"strings"

	"github.com/lbcert/lbcert/internal/store"
)

// testFailed is a load balancer config test (nginx -t, haproxy -c) that
// failed. What it printed tells one broken config from another: a
// deploy owed because the config was broken is not tried again, new
// files swapped in and out, while the config test of the files as they
// are still fails the same way (Runner.Test).
type testFailed struct {
	error
	output string
}

func (e *testFailed) Unwrap() error { return e.error }

// runParts are what differs from one run of the same config test to
// the next: the time and "pid#tid:" nginx prints when its error log is
// stderr, and the "(pid)" in HAProxy's messages.
var runParts = regexp.MustCompile(`\d{4}/\d\d/\d\d \d\d:\d\d:\d\d|\d+#\d+:|\(\d+\)`)

// fingerprint names a failed config test by its output, without what
// changes from one run to the next.
func fingerprint(output string) string {
	s := runParts.ReplaceAllString(output, "")
	sum := sha256.Sum256([]byte(strings.Join(strings.Fields(s), " ")))
	return hex.EncodeToString(sum[:8])
}

// Test runs d's config test on the load balancer's files as they are,
// changing nothing, and returns the failed test's fingerprint (as a
// Result's Check), or "" when it passes or d has no config test.
func (r *Runner) Test(ctx context.Context, d store.Deploy) string {
	var out string
	var err error
	switch d.Target {
	case "nginx":
		out, err = run(ctx, testLimit(d), nil, "", d.NginxBin, "-t", "-c", d.NginxConf)
	case "haproxy":
		out, err = run(ctx, testLimit(d), nil, "", d.HAProxyBin, "-c", "-f", d.HAProxyConf)
	default:
		return ""
	}
	if err == nil || r.namesOwnFiles(out, d) {
		return ""
	}
	return fingerprint(out)
}

// namesOwnFiles reports whether a failed config test names a file
// lbcert writes: a lineage's live or archived files, HAProxy's
// certificate directory, the nginx include file. Such a failure may be
// this run's to fix (two new lineages whose server blocks each need the
// other's files: neither passes the test alone, both pass together), so
// it never holds a deploy back. The paths the test printed are compared
// with symbolic links followed and made absolute, as the config may
// reach the state directory by a link or --dir may be relative.
func (r *Runner) namesOwnFiles(out string, d store.Deploy) bool {
	dirs := []string{resolve(filepath.Dir(filepath.Dir(r.Store.LivePaths("x").Dir)))}
	if d.HAProxyCerts != "" {
		dirs = append(dirs, resolve(d.HAProxyCerts))
	}
	include := ""
	if d.NginxInclude != "" {
		include = resolve(d.NginxInclude)
	}
	for _, p := range absPaths.FindAllString(out, -1) {
		p = resolve(p)
		if include != "" && p == include {
			return true
		}
		for _, dir := range dirs {
			if rel, err := filepath.Rel(dir, p); err == nil && rel != ".." && !strings.HasPrefix(rel, ".."+string(filepath.Separator)) {
				return true
			}
		}
	}
	return false
}

// absPaths are the absolute paths in a config test's output: nginx and
// HAProxy print every file they name in full, quoted or in parentheses.
var absPaths = regexp.MustCompile(`/[^\s"'():;,\[\]]+`)

// resolve is p made absolute, with the symbolic links of as much of it
// as exists followed (a missing file's directory is resolved and its
// name joined back).
func resolve(p string) string {
	p, err := filepath.Abs(p)
	if err != nil {
		return p
	}
	rest := ""
	for q := p; ; q = filepath.Dir(q) {
		if real, err := filepath.EvalSymlinks(q); err == nil {
			return filepath.Join(real, rest)
		}
		if q == filepath.Dir(q) {
			return p
		}
		rest = filepath.Join(filepath.Base(q), rest)
	}
}
