package deploy

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/lbcert/lbcert/internal/store"
)

func livePaths(name string) store.Paths {
	return store.New("/etc/lbcert").LivePaths(name)
}

func TestNginxSitesRender(t *testing.T) {
	got := string(NginxSites(livePaths, "/etc/nginx/body.conf", []Site{
		{Name: "b.example", Version: 3, Domains: []string{"b.example", "www.b.example"}},
		{Name: "old.example", Version: 1, Domains: []string{"www.b.example"}},
		{Name: "2001-db8--1", Version: 2, Domains: []string{"2001:db8::1"}},
		{Name: "a10.example", Version: 1, Domains: []string{"a10.example"}},
		{Name: "a9.example", Version: 1, Domains: []string{"a9.example"}},
	}))
	want := fmt.Sprintf(siteHeader, "/etc/nginx/body.conf") + `server_names_hash_max_size 1024;
server_names_hash_bucket_size 256;

# 2001-db8--1 (version 2): 2001:db8::1
server {
    server_name [2001:db8::1];
    ssl_certificate     /etc/lbcert/live/2001-db8--1/fullchain.pem;
    ssl_certificate_key /etc/lbcert/live/2001-db8--1/privkey.pem;
    include /etc/nginx/body.conf;
}

# a9.example (version 1): a9.example
server {
    server_name a9.example;
    ssl_certificate     /etc/lbcert/live/a9.example/fullchain.pem;
    ssl_certificate_key /etc/lbcert/live/a9.example/privkey.pem;
    include /etc/nginx/body.conf;
}

# a10.example (version 1): a10.example
server {
    server_name a10.example;
    ssl_certificate     /etc/lbcert/live/a10.example/fullchain.pem;
    ssl_certificate_key /etc/lbcert/live/a10.example/privkey.pem;
    include /etc/nginx/body.conf;
}

# b.example (version 3): b.example www.b.example
server {
    server_name b.example www.b.example;
    ssl_certificate     /etc/lbcert/live/b.example/fullchain.pem;
    ssl_certificate_key /etc/lbcert/live/b.example/privkey.pem;
    include /etc/nginx/body.conf;
}

# old.example (version 1): www.b.example
#   not served here: a block above serves each of its names
`
	if got != want {
		t.Fatalf("got:\n%s\nwant:\n%s", got, want)
	}
	// What the file says is what the next run reads back.
	back := parseSites([]byte(got))
	if len(back) != 5 || back["b.example"].Version != 3 || strings.Join(back["b.example"].Domains, " ") != "b.example www.b.example" ||
		strings.Join(back["old.example"].Domains, " ") != "www.b.example" || back["2001-db8--1"].Domains[0] != "2001:db8::1" {
		t.Fatalf("parsed back: %+v", back)
	}
}

func TestNginxSitesEmpty(t *testing.T) {
	got := string(NginxSites(livePaths, "/b.conf", nil))
	if strings.Contains(got, "server {") || !strings.Contains(got, "server_names_hash_max_size 1024;") {
		t.Fatalf("%s", got)
	}
	if len(parseSites([]byte(got))) != 0 {
		t.Fatal("an empty file parsed as sites")
	}
}

func TestNamesHash(t *testing.T) {
	site := func(n int, name string) []Site {
		var s []Site
		for i := range n {
			s = append(s, Site{Name: fmt.Sprint(i), Domains: []string{name}})
		}
		return s
	}
	for _, c := range []struct {
		n             int
		name          string
		size, buckets int
	}{
		{1, "a.example", 1024, 256},
		{512, "a.example", 1024, 256},
		{513, "a.example", 2048, 256},
		{100000, "a.example", 262144, 256},
		{1, strings.Repeat("a", 238), 1024, 256}, // align(8+238+2, 8) + 8 = 256
		{1, strings.Repeat("a", 239), 1024, 512},
	} {
		size, bucket := namesHash(site(c.n, c.name))
		if size != c.size || bucket != c.buckets {
			t.Errorf("%d names of %d characters: max_size %d bucket %d, want %d %d", c.n, len(c.name), size, bucket, c.size, c.buckets)
		}
	}
}

// countingStore counts the lineages read in full.
type countingStore struct {
	*store.Store
	mu    sync.Mutex // the include file's lineages are read several at once
	loads map[string]int
}

func (c *countingStore) Load(name string) (*store.Lineage, error) {
	c.mu.Lock()
	c.loads[name]++
	c.mu.Unlock()
	return c.Store.Load(name)
}

// includeSetup is a state directory, a stand-in nginx and deploy
// settings with an include file and a server body.
func includeSetup(t *testing.T) (s *store.Store, d store.Deploy, log, failFlag string) {
	dir := t.TempDir()
	s = store.New(filepath.Join(dir, "state"))
	bin, log, failFlag := fakeNginx(t, dir)
	body := filepath.Join(dir, "body.conf")
	os.WriteFile(body, []byte("listen 443 ssl;\n"), 0o644)
	d = store.Deploy{Target: "nginx", NginxBin: bin, NginxConf: filepath.Join(dir, "nginx.conf"),
		NginxInclude: filepath.Join(dir, "sites.conf"), NginxServerBody: body}
	return s, d, log, failFlag
}

// TestIncludeEveryLineageOneWrite: one run writes a block for every live
// lineage, the ones whose deploy is not nginx included, reading only the
// lineages the run changed; a failed test puts the file back byte for
// byte, or removes it when there was none.
func TestIncludeEveryLineageOneWrite(t *testing.T) {
	st, d, log, failFlag := includeSetup(t)
	cs := &countingStore{Store: st, loads: map[string]int{}}
	r := &Runner{Store: cs}

	// A first deploy fails: the file did not exist, so it is gone again.
	os.WriteFile(failFlag, nil, 0o644)
	saveVersion(t, cs.Store, "plain.example", "p1") // live, deploys nowhere
	_, prev := saveVersion(t, cs.Store, "shop.example", "s1")
	res := r.Run(context.Background(), []Change{{Name: "shop.example", Domains: []string{"shop.example"}, Previous: prev, Deploy: d}})
	if !res[0].RolledBack {
		t.Fatalf("%+v", res[0])
	}
	if _, err := os.Stat(d.NginxInclude); !os.IsNotExist(err) {
		t.Fatalf("the include file a failed first deploy wrote is still there: %v", err)
	}
	os.Remove(failFlag)
	_, prev = saveVersion(t, cs.Store, "shop.example", "s1")
	res = r.Run(context.Background(), []Change{{Name: "shop.example", Domains: []string{"shop.example"}, Previous: prev, Deploy: d}})
	if res[0].Failed() {
		t.Fatal(res[0].Err)
	}
	first, _ := os.ReadFile(d.NginxInclude)
	sites := parseSites(first)
	// shop's first version was rolled back; the second is live.
	if len(sites) != 2 || sites["plain.example"].Version != 1 || sites["shop.example"].Version != 2 {
		t.Fatalf("include file:\n%s", first)
	}

	// Renew shop: only shop is read; plain's block is reused.
	clear(cs.loads)
	os.Remove(log)
	_, prev = saveVersion(t, cs.Store, "shop.example", "s2")
	res = r.Run(context.Background(), []Change{{Name: "shop.example", Domains: []string{"shop.example"}, Previous: prev, Deploy: d}})
	if res[0].Failed() {
		t.Fatal(res[0].Err)
	}
	if cs.loads["plain.example"] != 0 || cs.loads["shop.example"] != 1 {
		t.Fatalf("lineages read: %v", cs.loads)
	}
	second, _ := os.ReadFile(d.NginxInclude)
	if parseSites(second)["shop.example"].Version != 3 {
		t.Fatalf("include file after renew:\n%s", second)
	}
	calls, _ := os.ReadFile(log)
	if string(calls) != "-t -c "+d.NginxConf+"\n-s reload -c "+d.NginxConf+"\n" {
		t.Fatalf("want one test and one reload, got:\n%s", calls)
	}

	// A failed test: the file is as it was, byte for byte.
	os.WriteFile(failFlag, nil, 0o644)
	_, prev = saveVersion(t, cs.Store, "shop.example", "s3")
	res = r.Run(context.Background(), []Change{{Name: "shop.example", Domains: []string{"shop.example"}, Previous: prev, Deploy: d}})
	if !res[0].RolledBack {
		t.Fatalf("%+v", res[0])
	}
	if now, _ := os.ReadFile(d.NginxInclude); string(now) != string(second) {
		t.Fatalf("include file not restored:\n%s", now)
	}
}

// TestIncludeWriteFailureRollsBack: a file that cannot be written rolls
// the run back and names the file.
func TestIncludeWriteFailureRollsBack(t *testing.T) {
	s, d, log, _ := includeSetup(t)
	defer func(w func(string, []byte, os.FileMode) error) { writeInclude = w }(writeInclude)
	writeInclude = func(string, []byte, os.FileMode) error { return errors.New("no space left on device") }
	saveVersion(t, s, "shop.example", "s1")
	_, prev := saveVersion(t, s, "shop.example", "s2")
	res := (&Runner{Store: s}).Run(context.Background(), []Change{{Name: "shop.example", Previous: prev, Deploy: d}})
	if !res[0].RolledBack || !strings.Contains(res[0].Err.Error(), "write nginx include "+d.NginxInclude+": no space left") {
		t.Fatalf("%+v", res[0])
	}
	if v, _ := s.LiveVersion("shop.example"); v != 1 {
		t.Fatalf("live version %d after rollback", v)
	}
	if _, err := os.Stat(log); err == nil {
		t.Fatal("nginx was run although the include file could not be written")
	}
}

// TestIncludeSkipsOtherGroupsNewLineages: a lineage new in this run
// whose own deploy (another nginx) has not succeeded yet is not named by
// this group's file: its rollback would leave the file pointing at
// nothing.
func TestIncludeSkipsOtherGroupsNewLineages(t *testing.T) {
	s, d, _, _ := includeSetup(t)
	other := d
	other.NginxConf = "/etc/nginx/other.conf"
	_, p1 := saveVersion(t, s, "a.example", "a1")
	_, p2 := saveVersion(t, s, "z.example", "z1")
	changes := []Change{{Name: "a.example", Previous: p1, Deploy: d}, {Name: "z.example", Previous: p2, Deploy: other}}
	g := groupChanges(changes)
	skip := (&Runner{Store: s}).notYetLive(g[0], changes, make([]Result, 2))
	if skip("a.example") || !skip("z.example") {
		t.Fatal("wrong lineages skipped")
	}
}

func TestUnlist(t *testing.T) {
	s, d, _, failFlag := includeSetup(t)
	r := &Runner{Store: s}
	saveVersion(t, s, "a.example", "a1")
	saveVersion(t, s, "b.example", "b1")
	if _, err := r.writeSites(d, func(string) bool { return false }); err != nil {
		t.Fatal(err)
	}
	before, _ := os.ReadFile(d.NginxInclude)

	os.WriteFile(failFlag, nil, 0o644)
	if err := r.Unlist(context.Background(), "a.example", d, false); err == nil || !strings.Contains(err.Error(), "emerg: broken") {
		t.Fatalf("Unlist with a failing test: %v", err)
	}
	if now, _ := os.ReadFile(d.NginxInclude); string(now) != string(before) {
		t.Fatalf("not restored:\n%s", now)
	}
	if err := r.Unlist(context.Background(), "a.example", d, true); err == nil {
		t.Fatal("a failed test was not reported")
	}
	if now, _ := os.ReadFile(d.NginxInclude); parseSites(now)["a.example"].Name != "" {
		t.Fatalf("keep: the block is still there:\n%s", now)
	}
	os.Remove(failFlag)
	if err := r.Unlist(context.Background(), "b.example", d, false); err != nil {
		t.Fatal(err)
	}
	now, _ := os.ReadFile(d.NginxInclude)
	if sites := parseSites(now); len(sites) != 1 || sites["a.example"].Name == "" {
		t.Fatalf("after unlisting b (a is still live):\n%s", now)
	}
}

func TestNginxPathOK(t *testing.T) {
	for _, p := range []string{"/etc/lbcert", "/var/lib/lbcert-2/x_y.conf", "/srv/a+b@c:d,e=f"} {
		if err := NginxPathOK(p); err != nil {
			t.Errorf("%s: %v", p, err)
		}
	}
	for _, p := range []string{"/etc/my certs", "/etc/$host", "/a;b", "/a{b", `/a"b`, "/a\tb", "/a#b"} {
		if err := NginxPathOK(p); err == nil {
			t.Errorf("%q accepted", p)
		}
	}
}

// memStore holds n live lineages of two names in memory: the rewrite's
// own cost, without reading lineages from disk.
type memStore struct {
	*store.Store
	names   []string
	version map[string]int
}

func (m *memStore) Names() ([]string, error)             { return m.names, nil }
func (m *memStore) LiveVersion(name string) (int, error) { return m.version[name], nil }
func (m *memStore) Load(name string) (*store.Lineage, error) {
	return &store.Lineage{Name: name, Version: m.version[name], Domains: []string{name, "www." + name}}, nil
}

// BenchmarkIncludeRewrite is one deploy's rewrite of the include file
// with n live lineages, one of them renewed: read the file, list the
// lineages, render, and write it atomically (fsync included).
func BenchmarkIncludeRewrite(b *testing.B) {
	defer slog.SetDefault(slog.Default())
	slog.SetDefault(slog.New(slog.DiscardHandler))
	for _, n := range []int{1000, 10000, 100000} {
		b.Run(fmt.Sprintf("lineages=%d", n), func(b *testing.B) {
			dir := b.TempDir()
			m := &memStore{Store: store.New("/var/lib/lbcert"), version: map[string]int{}}
			for i := range n {
				name := fmt.Sprintf("site%06d.example.com", i)
				m.names = append(m.names, name)
				m.version[name] = 1
			}
			d := store.Deploy{NginxInclude: filepath.Join(dir, "sites.conf"), NginxServerBody: "/etc/nginx/body.conf"}
			r := &Runner{Store: m}
			none := func(string) bool { return false }
			if _, err := r.writeSites(d, none); err != nil {
				b.Fatal(err)
			}
			for b.Loop() {
				m.version[m.names[n/2]]++
				if _, err := r.writeSites(d, none); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// TestHashDirectiveHint: nginx refusing the include file's hash settings
// because the operator's config sets them too gets the way out.
func TestHashDirectiveHint(t *testing.T) {
	d := store.Deploy{NginxInclude: "/etc/nginx/conf.d/lbcert.conf"}
	err := nginxTestError(d, errors.New(`nginx -t -c /etc/nginx/nginx.conf failed: exit status 1: [emerg] "server_names_hash_bucket_size" directive is duplicate in /etc/nginx/conf.d/lbcert.conf:8`))
	if !strings.Contains(err.Error(), "sets server_names_hash_max_size and _bucket_size for its names: remove yours") {
		t.Fatal(err)
	}
	other := errors.New(`nginx -t failed: [emerg] unknown directive "x"`)
	if nginxTestError(d, other) != other || nginxTestError(store.Deploy{}, err) != err {
		t.Fatal("a hint on an unrelated failure")
	}
}

// TestReloadSignalsTheMaster: the reload is a SIGHUP to the master whose
// PID the config's pid file holds, without "nginx -s reload" loading the
// whole config again; a PID that is not an nginx master's falls back to
// "nginx -s reload".
func TestReloadSignalsTheMaster(t *testing.T) {
	dir := t.TempDir()
	bin, log, _ := fakeNginx(t, dir)
	// A test run under nohup ignores SIGHUP, and the stand-in master
	// would inherit that: with a handler of this process's own, the
	// child starts with the default action (handlers do not survive
	// exec).
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	defer signal.Stop(hup)
	master := exec.Command("/bin/sleep", "60")
	master.Args[0] = "nginx: master process " + bin
	if err := master.Start(); err != nil {
		t.Fatal(err)
	}
	defer master.Process.Kill()
	for i := 0; i < 500; i++ { // until the stand-in has its title
		if title, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", master.Process.Pid)); strings.HasPrefix(string(title), "nginx: master") {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	pidFile, conf := filepath.Join(dir, "run", "nginx.pid"), filepath.Join(dir, "nginx.conf")
	os.MkdirAll(filepath.Dir(pidFile), 0o755)
	os.WriteFile(conf, []byte("# pid /elsewhere.pid;\nuser nobody;\n  pid   "+pidFile+" ;\nevents {}\n"), 0o644)
	os.WriteFile(pidFile, []byte(fmt.Sprintf("%d\n", master.Process.Pid)), 0o644)
	d := store.Deploy{NginxBin: bin, NginxConf: conf}
	if err := nginxReload(context.Background(), d); err != nil {
		t.Fatal(err)
	}
	err := master.Wait()
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.Sys().(syscall.WaitStatus).Signal() != syscall.SIGHUP {
		t.Fatalf("the master got no SIGHUP: %v", err)
	}
	if calls, _ := os.ReadFile(log); string(calls) != "-t -c "+conf+"\n" {
		t.Fatalf("nginx was run for more than the test:\n%s", calls)
	}

	// A pid file naming another process: "nginx -s reload" would signal
	// it too (it reads the same file), so nothing is signalled and the
	// error says why.
	os.WriteFile(pidFile, []byte(fmt.Sprintf("%d\n", os.Getpid())), 0o644)
	err = nginxReload(context.Background(), d)
	if err == nil || !strings.Contains(err.Error(), fmt.Sprintf("names process %d", os.Getpid())) || !strings.Contains(err.Error(), "which is not nginx's master: nothing reloaded") {
		t.Fatalf("a pid file naming another process: %v", err)
	}
	if calls, _ := os.ReadFile(log); strings.Contains(string(calls), "-s reload") {
		t.Fatalf("nginx -s reload was run, signalling the process the pid file names:\n%s", calls)
	}

	// A pid file naming no process: left to "nginx -s reload", which
	// reports it in its own words.
	dead := exec.Command("/bin/true")
	dead.Run()
	os.WriteFile(pidFile, []byte(fmt.Sprintf("%d\n", dead.Process.Pid)), 0o644)
	if err := nginxReload(context.Background(), d); err != nil {
		t.Fatal(err)
	}
	if calls, _ := os.ReadFile(log); !strings.HasSuffix(string(calls), "-s reload -c "+conf+"\n") {
		t.Fatalf("a stale pid file was not left to nginx -s reload:\n%s", calls)
	}
}

// TestIncludeDropsAFirstCertificateTakenOut: a run killed during a first
// certificate's config test left the include file naming it; the next
// run's deploy fails too and takes the certificate out of live/, and
// the file put back must not name it (nginx would not load its config at
// its next restart).
func TestIncludeDropsAFirstCertificateTakenOut(t *testing.T) {
	s, d, _, failFlag := includeSetup(t)
	r := &Runner{Store: s}
	saveVersion(t, s, "old.example", "o1")
	_, prev := saveVersion(t, s, "new.example", "n1")
	// What the killed run left: new.example live and in the file.
	if _, err := r.writeSites(d, func(string) bool { return false }); err != nil {
		t.Fatal(err)
	}
	if before, _ := os.ReadFile(d.NginxInclude); parseSites(before)["new.example"].Name == "" {
		t.Fatalf("set-up: the file does not name new.example:\n%s", before)
	}
	os.WriteFile(failFlag, nil, 0o644)
	res := r.Run(context.Background(), []Change{{Name: "new.example", Domains: []string{"new.example"}, Previous: prev, Deploy: d}})
	if !res[0].RolledBack {
		t.Fatalf("%+v", res[0])
	}
	if _, err := s.LiveVersion("new.example"); err == nil {
		t.Fatal("the first certificate is still live after its rollback")
	}
	now, _ := os.ReadFile(d.NginxInclude)
	if sites := parseSites(now); sites["new.example"].Name != "" || sites["old.example"].Name == "" {
		t.Fatalf("the include file after the rollback:\n%s", now)
	}
}

// hupCounter is a stand-in nginx master: a shell whose process title is
// an nginx master's, appending a line to its file at each SIGHUP.
func hupCounter(t *testing.T, dir string) (pid int, hups string) {
	t.Helper()
	// As in TestReloadSignalsTheMaster: a handler of this process's own
	// lets the child start with SIGHUP's default action, which its trap
	// then replaces.
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	t.Cleanup(func() { signal.Stop(hup) })
	hups = filepath.Join(dir, "hups")
	ready := filepath.Join(dir, "master-ready")
	script := fmt.Sprintf("trap 'echo hup >> %s' HUP; touch %s; while :; do sleep 0.02; done", hups, ready)
	master := exec.Command("/bin/bash", "-c", `exec -a "nginx: master process (stand-in)" /bin/bash -c "$0"`, script)
	if err := master.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { master.Process.Kill(); master.Wait() })
	for i := 0; ; i++ {
		if _, err := os.Stat(ready); err == nil {
			return master.Process.Pid, hups
		}
		if i > 500 {
			t.Fatal("the stand-in master did not start")
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func countLines(path string) int {
	data, _ := os.ReadFile(path)
	return strings.Count(string(data), "\n")
}

// TestLargeIncludeTestsWhileReloading: with an include of besideFrom
// blocks or more, the master is signalled to reload while "nginx -t"
// runs (the stand-in test passes only once the master has had its
// SIGHUP), and the deploy is decided by the test. A failed test rolls
// back, puts the file back, and reloads once more so that the master
// holds the files as they are.
func TestLargeIncludeTestsWhileReloading(t *testing.T) {
	defer func(n int) { besideFrom = n }(besideFrom)
	besideFrom = 2
	st, d, log, failFlag := includeSetup(t)
	dir := filepath.Dir(d.NginxConf)
	pid, hups := hupCounter(t, dir)
	pidFile := filepath.Join(dir, "nginx.pid")
	os.WriteFile(pidFile, []byte(fmt.Sprintf("%d\n", pid)), 0o644)
	os.WriteFile(d.NginxConf, []byte("pid "+pidFile+";\nevents {}\n"), 0o644)
	// The stand-in "nginx -t" waits up to 5 s for the master to have had
	// the SIGHUPs the file want names, and fails without them: only a
	// test run beside the reload passes.
	want := filepath.Join(dir, "want")
	script := fmt.Sprintf("#!/bin/sh\n[ \"$1\" = -V ] && exit 0\necho \"$*\" >> %s\nhups() { cat %s 2>/dev/null | wc -l; }\n"+
		"if [ \"$1\" = -t ]; then\n  n=0; want=$(cat %s)\n"+
		"  while [ $(hups) -lt $want ] && [ $n -lt 250 ]; do sleep 0.02; n=$((n+1)); done\n"+
		"  [ $(hups) -ge $want ] || { echo 'test: the master was not reloaded beside me' >&2; exit 3; }\n"+
		"  [ -e %s ] && { echo 'emerg: broken' >&2; exit 1; }\nfi\nexit 0\n", log, hups, want, failFlag)
	expect := func(n int) { os.WriteFile(want, []byte(fmt.Sprint(n)), 0o644) }
	expect(1)
	os.WriteFile(d.NginxBin, []byte(script), 0o755)

	r := &Runner{Store: st}
	var changes []Change
	for _, name := range []string{"a.example", "b.example"} {
		_, prev := saveVersion(t, st, name, "v1")
		changes = append(changes, Change{Name: name, Domains: []string{name}, Previous: prev, Deploy: d})
	}
	for _, res := range r.Run(context.Background(), changes) {
		if res.Failed() || !res.Deployed {
			t.Fatalf("%s: %+v", res.Name, res)
		}
	}
	if got := countLines(hups); got != 1 {
		t.Fatalf("want one reload, the master had %d SIGHUPs", got)
	}
	if calls, _ := os.ReadFile(log); string(calls) != "-t -c "+d.NginxConf+"\n" {
		t.Fatalf("want one test and the reload by signal, nginx was run:\n%s", calls)
	}
	before, _ := os.ReadFile(d.NginxInclude)

	// The test fails: the master was signalled beside it, so it is
	// signalled again once the file is back.
	os.WriteFile(failFlag, nil, 0o644)
	expect(2)
	for i := range changes {
		_, changes[i].Previous = saveVersion(t, st, changes[i].Name, "v2")
	}
	_, prev := saveVersion(t, st, "c.example", "v1")
	changes = append(changes, Change{Name: "c.example", Domains: []string{"c.example"}, Previous: prev, Deploy: d})
	for _, res := range r.Run(context.Background(), changes) {
		if !res.RolledBack || !strings.Contains(res.Err.Error(), "emerg: broken") {
			t.Fatalf("%s: %+v", res.Name, res)
		}
	}
	if now, _ := os.ReadFile(d.NginxInclude); string(now) != string(before) {
		t.Fatalf("include file not put back:\n%s", now)
	}
	for i := 0; countLines(hups) < 3 && i < 250; i++ {
		time.Sleep(20 * time.Millisecond)
	}
	if got := countLines(hups); got != 3 {
		t.Fatalf("want the reload beside the failed test and one more after the rollback (3 in all), the master had %d", got)
	}

	// Below besideFrom the test comes first: the stand-in test, waiting
	// for a SIGHUP that is not coming, fails.
	besideFrom = 100
	os.Remove(failFlag)
	os.Remove(hups)
	expect(1)
	for i := range changes[:2] {
		_, changes[i].Previous = saveVersion(t, st, changes[i].Name, "v3")
	}
	for _, res := range r.Run(context.Background(), changes[:2]) {
		if !res.RolledBack || !strings.Contains(res.Err.Error(), "not reloaded beside me") {
			t.Fatalf("%s: %+v", res.Name, res)
		}
	}
	if got := countLines(hups); got != 0 {
		t.Fatalf("a small include's failed test reloaded the master %d times", got)
	}
}

// TestBesideTestWaitsForTheMaster: a master signalled beside a test
// that ends at once is still loading its config (here: a stand-in
// master that works for a while, then reads the include file). After a
// passing test, deployed is reported only once it is done, when its new
// workers serve the new certificates. After a failing one, the files are
// put back only once it is done, so it loads the files the test refused,
// fails on them as the test did, and never a mix of old and new; then
// it is signalled again and reads the file put back.
func TestBesideTestWaitsForTheMaster(t *testing.T) {
	defer func(n int) { besideFrom = n }(besideFrom)
	besideFrom = 1
	st, d, _, failFlag := includeSetup(t)
	dir := filepath.Dir(d.NginxConf)
	slowMaster(t, d, 400_000)
	old := []byte("# an include file from before\n")
	os.WriteFile(d.NginxInclude, old, 0o644)

	r := &Runner{Store: st}
	// A passing test: deployed is reported only once the master is done
	// loading, so that the new certificate is served by then.
	_, prev := saveVersion(t, st, "z.example", "v1")
	res := r.Run(context.Background(), []Change{{Name: "z.example", Domains: []string{"z.example"}, Previous: prev, Deploy: d}})
	if res[0].Failed() || !res[0].Deployed {
		t.Fatalf("%+v", res[0])
	}
	if loaded, err := os.ReadFile(filepath.Join(dir, "seen.1")); err != nil || !strings.Contains(string(loaded), "z.example") {
		t.Fatalf("deployed was reported before the master was done loading the tested files (%v):\n%s", err, loaded)
	}
	old, _ = os.ReadFile(d.NginxInclude)

	os.WriteFile(failFlag, nil, 0o644)
	_, prev = saveVersion(t, st, "a.example", "v1")
	res = r.Run(context.Background(), []Change{{Name: "a.example", Domains: []string{"a.example"}, Previous: prev, Deploy: d}})
	if !res[0].RolledBack {
		t.Fatalf("%+v", res[0])
	}
	if now, _ := os.ReadFile(d.NginxInclude); string(now) != string(old) {
		t.Fatalf("include not put back:\n%s", now)
	}
	first, err := os.ReadFile(filepath.Join(dir, "seen.2"))
	if err != nil {
		t.Fatalf("the files were put back before the master was done loading: %v", err)
	}
	if !strings.Contains(string(first), "a.example") {
		t.Fatalf("the master's first load read the file put back, not the one tested:\n%s", first)
	}
	var second []byte
	for i := 0; i < 500 && string(second) != string(old); i++ { // cat may be half way
		second, _ = os.ReadFile(filepath.Join(dir, "seen.3"))
		time.Sleep(20 * time.Millisecond)
	}
	if string(second) != string(old) {
		t.Fatalf("the master's second load (after the files were put back) read:\n%s", second)
	}
}

// slowMaster starts a stand-in nginx master for d and names it in d's
// pid file: at each SIGHUP it works for a while, running as a master
// loading certificates does (iterations of a shell loop: 400,000 are
// about half a second), then copies the include file as it reads it to
// seen.N beside d's config.
func slowMaster(t *testing.T, d store.Deploy, iterations int) {
	t.Helper()
	dir := filepath.Dir(d.NginxConf)
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	t.Cleanup(func() { signal.Stop(hup) })
	ready := filepath.Join(dir, "master-ready")
	script := fmt.Sprintf("n=0; load() { i=0; while [ $i -lt %d ]; do i=$((i+1)); done; n=$((n+1)); cat %s > %s/seen.$n; }; trap load HUP; touch %s; while :; do sleep 0.02; done",
		iterations, d.NginxInclude, dir, ready)
	master := exec.Command("/bin/bash", "-c", `exec -a "nginx: master process (slow stand-in)" /bin/bash -c "$0"`, script)
	if err := master.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { master.Process.Kill(); master.Wait() })
	for i := 0; i < 500; i++ {
		if _, err := os.Stat(ready); err == nil {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	pidFile := filepath.Join(dir, "nginx.pid")
	os.WriteFile(pidFile, []byte(fmt.Sprintf("%d\n", master.Process.Pid)), 0o644)
	os.WriteFile(d.NginxConf, []byte("pid "+pidFile+";\nevents {}\n"), 0o644)
}

// TestBesideWaitEndsAtTheInterrupt: after a passing test beside the
// reload, the wait for a master still loading ends when the run is
// interrupted, not at the test's time limit.
func TestBesideWaitEndsAtTheInterrupt(t *testing.T) {
	defer func(n int) { besideFrom = n }(besideFrom)
	besideFrom = 1
	st, d, _, _ := includeSetup(t)
	slowMaster(t, d, 40_000_000) // about a minute
	ctx, cancel := context.WithCancel(context.Background())
	time.AfterFunc(time.Second, cancel)
	_, prev := saveVersion(t, st, "z.example", "v1")
	res := (&Runner{Store: st}).Run(ctx, []Change{{Name: "z.example", Domains: []string{"z.example"}, Previous: prev, Deploy: d}})
	if res[0].Failed() || !res[0].Deployed {
		t.Fatalf("%+v", res[0])
	}
	if _, err := os.Stat(filepath.Join(filepath.Dir(d.NginxConf), "seen.1")); err == nil {
		t.Fatal("the stand-in master finished loading: the test proves nothing")
	}
}
