package deploy

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"unicode/utf8"

	"github.com/lbcert/lbcert/internal/store"
)

// fakeNginx is a stand-in nginx binary that logs each invocation but
// "-V" (it has no built-in PID file, so reloads go through "-s reload")
// and fails "-t" when the file named by $FAIL_TEST exists. Unit tests
// only: the end-to-end tests run the real nginx.
func fakeNginx(t *testing.T, dir string) (bin, log, failFlag string) {
	log = filepath.Join(dir, "calls.log")
	failFlag = filepath.Join(dir, "fail-test")
	bin = filepath.Join(dir, "nginx")
	script := fmt.Sprintf("#!/bin/sh\n[ \"$1\" = -V ] && exit 0\necho \"$*\" >> %s\nif [ \"$1\" = -t ] && [ -e %s ]; then echo 'emerg: broken' >&2; exit 1; fi\n", log, failFlag)
	if err := os.WriteFile(bin, []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	return bin, log, failFlag
}

func saveVersion(t *testing.T, s *store.Store, name, tag string) (int, int) {
	t.Helper()
	l := &store.Lineage{Name: name, Domains: []string{name}, Cert: store.CertInfo{Serial: tag}}
	v, prev, err := s.Save(l, store.Files{Cert: []byte(tag), Chain: []byte(tag), Fullchain: []byte(tag), Key: []byte(tag)})
	if err != nil {
		t.Fatal(err)
	}
	return v, prev
}

func TestOneTestAndReloadPerRun(t *testing.T) {
	dir := t.TempDir()
	s := store.New(filepath.Join(dir, "state"))
	bin, log, failFlag := fakeNginx(t, dir)
	conf := filepath.Join(dir, "nginx.conf")
	d := store.Deploy{Target: "nginx", NginxBin: bin, NginxConf: conf}

	const n = 500
	changes := make([]Change, n)
	for i := range changes {
		name := fmt.Sprintf("site%03d.example", i)
		saveVersion(t, s, name, "old")
		_, prev := saveVersion(t, s, name, "new")
		changes[i] = Change{Name: name, Domains: []string{name}, Previous: prev, Deploy: d}
	}
	r := &Runner{Store: s}
	for _, res := range r.Run(context.Background(), changes) {
		if res.Failed() || !res.Deployed {
			t.Fatalf("%s: %+v", res.Name, res)
		}
	}
	calls, _ := os.ReadFile(log)
	if got := string(calls); got != "-t -c "+conf+"\n-s reload -c "+conf+"\n" {
		t.Fatalf("want one test and one reload for %d certificates, got:\n%s", n, got)
	}

	// Now the test fails: every lineage goes back to "old", no reload.
	os.Remove(log)
	os.WriteFile(failFlag, nil, 0o644)
	for i := range changes {
		_, changes[i].Previous = saveVersion(t, s, changes[i].Name, "newer")
	}
	results := r.Run(context.Background(), changes)
	for i, res := range results {
		if !res.Failed() || !res.RolledBack || !strings.Contains(res.Err.Error(), "emerg: broken") {
			t.Fatalf("%s: %+v", res.Name, res)
		}
		l, err := s.Load(changes[i].Name)
		if err != nil || l.Cert.Serial != "new" {
			t.Fatalf("%s after rollback: %+v %v", changes[i].Name, l, err)
		}
	}
	calls, _ = os.ReadFile(log)
	if strings.Contains(string(calls), "reload") {
		t.Fatalf("reloaded after a failed test:\n%s", calls)
	}
}

func TestRollbackOfNewLineageRemovesIt(t *testing.T) {
	dir := t.TempDir()
	s := store.New(filepath.Join(dir, "state"))
	bin, _, failFlag := fakeNginx(t, dir)
	os.WriteFile(failFlag, nil, 0o644)
	_, prev := saveVersion(t, s, "fresh.example", "v1")
	res := (&Runner{Store: s}).Run(context.Background(), []Change{{
		Name: "fresh.example", Previous: prev, Deploy: store.Deploy{Target: "nginx", NginxBin: bin, NginxConf: "x"},
	}})
	if !res[0].RolledBack {
		t.Fatalf("%+v", res[0])
	}
	if _, err := s.Load("fresh.example"); err == nil {
		t.Fatal("a new lineage whose deploy failed is still live")
	}
}

func TestCombinedPEM(t *testing.T) {
	got := string(CombinedPEM([]byte("A\n\nB\r\n"), []byte("\nK1\nK2\n\n")))
	if got != "A\nB\nK1\nK2\n" {
		t.Fatalf("%q", got)
	}
}

func TestGroupChanges(t *testing.T) {
	n1 := store.Deploy{Target: "nginx", NginxBin: "nginx", NginxConf: "/a"}
	n2 := store.Deploy{Target: "nginx", NginxBin: "nginx", NginxConf: "/b"}
	h := store.Deploy{Target: "haproxy", HAProxyConf: "/h"}
	gs := groupChanges([]Change{{Name: "a", Deploy: n1}, {Name: "b", Deploy: h}, {Name: "c", Deploy: n1}, {Name: "d", Deploy: n2}, {Name: "e"}, {Name: "f"}})
	var got []string
	for _, g := range gs {
		got = append(got, fmt.Sprintf("%s%v", g.target, g.changes))
	}
	if strings.Join(got, " ") != "[4] [5] haproxy[1] nginx[0 2] nginx[3]" {
		t.Fatalf("groups: %v", got)
	}
}

// A failed deploy's Check is what Test gives for the same broken config,
// with the real nginx and HAProxy (installed by make deps): HAProxy's
// process IDs in its messages do not make two runs of one test differ.
// Another breakage gives another Check, a fixed config none.
func TestCheckNamesTheBrokenConfig(t *testing.T) {
	dir := t.TempDir()
	ng := filepath.Join(dir, "nginx.conf")
	hp := filepath.Join(dir, "haproxy.cfg")
	good := map[string]string{
		ng: "pid " + filepath.Join(dir, "nginx.pid") + ";\nerror_log stderr;\nevents {}\n",
		hp: "global\n  log stderr local0\ndefaults\n  mode http\n  timeout client 1s\n  timeout server 1s\n  timeout connect 1s\nfrontend f\n  bind 127.0.0.1:1\n",
	}
	for _, d := range []store.Deploy{
		{Target: "nginx", NginxBin: "nginx", NginxConf: ng},
		{Target: "haproxy", HAProxyBin: "haproxy", HAProxyConf: hp, HAProxyCerts: filepath.Join(dir, "certs")},
	} {
		conf := confOf(d)
		s := store.New(filepath.Join(dir, "state-"+d.Target))
		saveVersion(t, s, "a.example", "old")
		_, prev := saveVersion(t, s, "a.example", "new")
		os.WriteFile(conf, []byte(good[conf]+"this_is_not_a_directive;\n"), 0o644)
		r := &Runner{Store: s}
		res := r.Run(context.Background(), []Change{{Name: "a.example", Domains: []string{"a.example"}, Previous: prev, Deploy: d}})[0]
		if !res.RolledBack || res.Check == "" {
			t.Fatalf("%s: a failed config test gives no Check: %+v", d.Target, res)
		}
		for range 2 {
			if got := r.Test(context.Background(), d); got != res.Check {
				t.Fatalf("%s: Test gives %q for the same broken config, the deploy %q", d.Target, got, res.Check)
			}
		}
		os.WriteFile(conf, []byte(good[conf]+"another_unknown_word;\n"), 0o644)
		if got := r.Test(context.Background(), d); got == "" || got == res.Check {
			t.Fatalf("%s: broken otherwise, Test gives %q (the first breakage: %q)", d.Target, got, res.Check)
		}
		os.WriteFile(conf, []byte(good[conf]), 0o644)
		if got := r.Test(context.Background(), d); got != "" {
			t.Fatalf("%s: a good config's Test gives %q", d.Target, got)
		}
	}
}

// A config test that fails on a file lbcert writes (a lineage's live
// files not there yet) gives no Check: the deploys of this run may be
// what fixes it (two new lineages whose server blocks name each other's
// files), so it must never hold one back (hostile reviews: both stayed
// pending for good, also when the config reaches the state directory
// through a symbolic link or --dir is relative). A path that only looks
// like the state directory's is not lbcert's.
func TestNoCheckForAFailureOnOwnFiles(t *testing.T) {
	dir := t.TempDir()
	os.MkdirAll(filepath.Join(dir, "state"), 0o755)
	os.MkdirAll(filepath.Join(dir, "work"), 0o755)
	os.Symlink(filepath.Join(dir, "state"), filepath.Join(dir, "link"))
	for _, tc := range []struct {
		what, stateDir, named string
		own                   bool
	}{
		{"the state directory as --dir names it", filepath.Join(dir, "state"), filepath.Join(dir, "state"), true},
		{"through a symbolic link", filepath.Join(dir, "state"), filepath.Join(dir, "link"), true},
		{"--dir ../state, relative", "../state", filepath.Join(dir, "state"), true},
		{"another directory whose name ends the same", filepath.Join(dir, "state"), filepath.Join(dir, "mystate"), false},
	} {
		t.Run(tc.what, func(t *testing.T) {
			t.Chdir(filepath.Join(dir, "work"))
			s := store.New(tc.stateDir)
			live := filepath.Join(tc.named, "live", "b.example")
			conf := filepath.Join(dir, "nginx.conf")
			os.WriteFile(conf, []byte(fmt.Sprintf("pid %s/nginx.pid;\nerror_log stderr;\nevents {}\nhttp {\n server {\n  listen 127.0.0.1:1 ssl;\n  ssl_certificate %s/fullchain.pem;\n  ssl_certificate_key %s/privkey.pem;\n }\n}\n", dir, live, live)), 0o644)
			d := store.Deploy{Target: "nginx", NginxBin: "nginx", NginxConf: conf}
			if out, err := exec.Command("nginx", "-t", "-c", conf).CombinedOutput(); err == nil || !strings.Contains(string(out), live) {
				t.Fatalf("nginx -t of a config naming a missing file: %v\n%s", err, out)
			}
			got := (&Runner{Store: s}).Test(context.Background(), d)
			if tc.own && got != "" {
				t.Fatalf("Test gives %q for a failure on lbcert's own files, want none", got)
			}
			if !tc.own && got == "" {
				t.Fatal("Test gives no Check for a failure on a file that is not lbcert's")
			}
		})
	}
}

// A command's output is cut at its start to the last maxOutput bytes,
// never in the middle of a character.
func TestOutputCutKeepsCharactersWhole(t *testing.T) {
	got := trimOutput(strings.Repeat("€", 1500) + " [emerg] bad")
	if !utf8.ValidString(got) || !strings.HasSuffix(got, " [emerg] bad") || len(got) > maxOutput+3 {
		t.Fatalf("cut output: %d bytes, valid UTF-8 %v, starts %q", len(got), utf8.ValidString(got), got[:12])
	}
}
