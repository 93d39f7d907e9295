package deploy

import (
	"bufio"
	"cmp"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"io"
	"log/slog"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/lbcert/lbcert/internal/store"
)

// fakeRuntimeAPI answers HAProxy's runtime API on a unix socket, one
// command per connection, recording every command it got. It keeps one
// certificate transaction at a time as HAProxy 2.6 does: a set for
// another certificate while one is open is added to the open one
// ("Transaction updated for certificate <open>"), and a commit or abort
// must name the open one. It fails the "set ssl cert" after the first
// failAfter ones, and the commit after the first failCommitAfter ones
// (when set); as HAProxy does, it then fails every set, or commit, of
// that certificate again. Unit test only: the end-to-end tests use a
// real HAProxy.
type fakeRuntimeAPI struct {
	mu              sync.Mutex
	cmds            []string
	certs           []string
	sets            int
	failAfter       int
	commits         int
	failCommitAfter int
	open            string // the certificate whose transaction is open
	// otherAt: just before the otherAt-th set, another client opens a
	// transaction on other.
	otherAt int
	other   string
	// lockEvery: every lockEvery-th command is answered "currently
	// locked", as while another client's command holds the lock.
	lockEvery int
	n         int
	// intrudeAt: right after the intrudeAt-th transaction opens, another
	// client's set for another certificate goes into it, with intruder.
	intrudeAt int
	intruder  string
	opened    int
	pending   string            // the open transaction's PEM
	committed map[string]string // path -> PEM in memory
	// dies: the failing "set ssl cert" is HAProxy's last answer; its
	// socket goes away with it.
	dies bool
	// listed are the certificates the directory's crt-list serves.
	listed map[string]bool
	// loseCommitAt: the loseCommitAt-th commit is made, and its answer
	// lost (an empty answer, as from a connection cut after the commit).
	loseCommitAt int
	// cutSetAt: the cutSetAt-th set opens its transaction, and its
	// answer is lost (the connection cut), so its commit is never sent.
	cutSetAt int
	// cutListAt: the cutListAt-th "show ssl cert" listing gets no
	// answer, the connection cut.
	cutListAt int
	// otherList: no crt-list loads the directory (its certificates are
	// named one by one on bind lines); only this one exists.
	otherList string
	// conns counts the connections, sessions the interactive ones.
	conns, sessions int
	// cutShowAt: the cutShowAt-th "show ssl cert <path>" gets no answer,
	// the connection cut (as HAProxy restarted after a commit).
	cutShowAt, shows int
	// refusedSet and refusedCommit are the certificates whose set, or
	// commit, failed: they fail again.
	refusedSet, refusedCommit string
	// ahead counts the commands read while the client had already sent
	// more (pipelined), behind them on the connection; commitQueued
	// those with a commit among what was behind them.
	ahead, commitQueued int
	// restartAtShow: at the restartAtShow-th "show ssl cert <path>"
	// HAProxy restarts (restart); restarts counts them, and is in the
	// process id "show info" gives. restartAtList: the same at the
	// restartAtList-th "show ssl cert" listing.
	restartAtShow, restartAtList, lists, restarts int
	// reloadAtSet: just before the reloadAtSet-th set, HAProxy reloads:
	// what it holds is loaded from the files again (restart), without
	// cutting the session, which stays on the old process: "show info"
	// gives the old process id to a session opened before the reload.
	reloadAtSet, sessionsAtReload int
	dir                           string // the certificate directory, which serve loads
}

// restart is HAProxy restarted: its process id changes, no transaction
// is open, and it holds what the directory's PEM files hold, every one
// in the crt-list.
func (f *fakeRuntimeAPI) restart() {
	f.restarts++
	f.open, f.certs, f.committed, f.listed = "", nil, map[string]string{}, map[string]bool{}
	files, _ := filepath.Glob(filepath.Join(f.dir, "*.pem"))
	for _, p := range files {
		b, _ := os.ReadFile(p)
		f.certs, f.committed[p], f.listed[p] = append(f.certs, p), string(b), true
	}
}

func (f *fakeRuntimeAPI) answer(cmd string) string {
	f.n++
	if f.lockEvery > 0 && f.n%f.lockEvery == 0 {
		return "Can't do it! Operations on certificates are currently locked!\n"
	}
	first := strings.SplitN(cmd, "\n", 2)[0]
	arg := func(prefix string) string {
		return strings.TrimSpace(strings.TrimSuffix(strings.TrimPrefix(first, prefix), "<<"))
	}
	switch {
	case cmd == "show info\n":
		return fmt.Sprintf("Name: HAProxy\nVersion: 2.6.12\nPid: %d\n", 4000+f.restarts)
	case cmd == "show ssl cert\n" && f.restartAtList > 0 && f.lists+1 == f.restartAtList:
		f.lists++
		f.restart() // the connection cut with it
		return ""
	case cmd == "show ssl cert\n" && f.cutListAt > 0 && f.lists+1 == f.cutListAt:
		f.lists++
		return ""
	case strings.HasPrefix(cmd, "show ssl cert /") && f.restartAtShow > 0 && f.shows+1 == f.restartAtShow:
		f.shows++
		f.restart() // the connection cut with it
		return ""
	case strings.HasPrefix(cmd, "show ssl cert /") && f.cutShowAt > 0 && f.shows+1 == f.cutShowAt:
		f.shows++
		return ""
	case strings.HasPrefix(cmd, "show ssl cert /"):
		f.shows++
		if c, _ := pem.Decode([]byte(f.committed[arg("show ssl cert")])); c != nil {
			if x, err := x509.ParseCertificate(c.Bytes); err == nil {
				return fmt.Sprintf("Filename: %s\nSerial: %X\n", arg("show ssl cert"), x.SerialNumber.Bytes())
			}
		}
		return "Filename: " + arg("show ssl cert") + "\n"
	case strings.HasPrefix(cmd, "show ssl cert"):
		f.lists++
		out := "# filename\n" + strings.Join(f.certs, "\n") + "\n"
		if f.open != "" {
			out += "# transaction\n*" + f.open + "\n"
		}
		return out
	case strings.HasPrefix(cmd, "show ssl crt-list /"):
		out := "# " + arg("show ssl crt-list") + "\n"
		for p := range f.listed {
			out += p + "\n"
		}
		return out
	case strings.HasPrefix(cmd, "show ssl crt-list"):
		return "" // set by serve
	case strings.HasPrefix(cmd, "add ssl crt-list"):
		if f.listed == nil {
			f.listed = map[string]bool{}
		}
		f.listed[strings.Fields(first)[4]] = true
		return "Inserting certificate\nSuccess!\n"
	case strings.HasPrefix(cmd, "del ssl crt-list"):
		delete(f.listed, strings.Fields(first)[4])
		return "Entry '" + strings.Fields(first)[4] + "' deleted in crtlist '" + strings.Fields(first)[3] + "'!\n"
	case strings.HasPrefix(cmd, "del ssl cert"):
		f.certs = slices.DeleteFunc(f.certs, func(c string) bool { return c == arg("del ssl cert") })
		return "Certificate '" + arg("del ssl cert") + "' deleted!\n"
	case strings.HasPrefix(cmd, "set ssl cert"):
		f.sets++
		if f.sets == f.reloadAtSet {
			f.sessionsAtReload = f.sessions
			f.restart()
		}
		if f.sets == f.otherAt {
			f.open = f.other
		}
		if f.sets == f.failAfter+1 || f.refusedSet == arg("set ssl cert") {
			f.refusedSet = arg("set ssl cert")
			return "Can't update the certificate: out of memory\n"
		}
		if f.open != "" {
			return "Transaction updated for certificate " + f.open + "!\n"
		}
		f.open = arg("set ssl cert")
		f.pending = strings.SplitN(cmd, "\n", 2)[1]
		if f.opened++; f.opened == f.intrudeAt {
			f.pending = f.intruder
		}
		if f.sets == f.cutSetAt {
			return ""
		}
		return "Transaction created for certificate " + f.open + "!\n"
	case strings.HasPrefix(cmd, "new ssl cert"):
		f.certs = append(f.certs, arg("new ssl cert"))
		return "New empty certificate store '" + arg("new ssl cert") + "'!\n"
	case strings.HasPrefix(cmd, "commit ssl cert"):
		p := arg("commit ssl cert")
		if f.open != p {
			return "The ongoing transaction is about '" + f.open + "' but you are trying to set '" + p + "'\nCan't commit " + p + "!\n"
		}
		f.commits++
		if f.failCommitAfter > 0 && f.commits == f.failCommitAfter+1 || f.refusedCommit == p {
			f.refusedCommit = p
			return "Committing " + p + "\nCan't commit: out of memory\n"
		}
		f.open = ""
		if f.committed == nil {
			f.committed = map[string]string{}
		}
		f.committed[p] = f.pending
		if f.commits == f.loseCommitAt {
			return ""
		}
		return "Committing " + p + "\nSuccess!\n"
	case strings.HasPrefix(cmd, "abort ssl cert"):
		p := arg("abort ssl cert")
		if f.open == "" {
			return "No ongoing transaction!\n"
		}
		if f.open != p {
			return "The ongoing transaction is about '" + f.open + "' but you are trying to abort a transaction for '" + p + "'\n"
		}
		f.open = ""
		return "Transaction aborted for certificate '" + p + "'!\n"
	}
	return "Success!\n"
}

func (f *fakeRuntimeAPI) serve(t *testing.T, ln net.Listener, crtList string) {
	f.mu.Lock()
	f.dir = crtList
	f.mu.Unlock()
	for {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		r := bufio.NewReader(c)
		first, _ := r.ReadString('\n')
		f.mu.Lock()
		f.conns++
		if first == "prompt\n" {
			f.sessions++
		}
		f.mu.Unlock()
		if first == "prompt\n" {
			// Interactive: a command per line (a payload up to an empty
			// line), each answer followed by an empty line and "> ".
			c.Write([]byte("\n> "))
			if !f.session(ln, c, r, crtList) {
				return
			}
			continue
		}
		rest, _ := io.ReadAll(r)
		out, died := f.one(first+string(rest), crtList)
		c.Write([]byte(out))
		c.Close()
		if died {
			ln.Close()
			return
		}
	}
}

// one answers cmd; died: HAProxy's socket goes away after it.
func (f *fakeRuntimeAPI) one(cmd, crtList string) (out string, died bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.cmds = append(f.cmds, cmd)
	out = f.answer(cmd)
	if cmd == "show ssl crt-list\n" {
		out = cmp.Or(f.otherList, crtList) + "\n"
	}
	return out, f.dies && f.sets == f.failAfter+1
}

// session serves one interactive session until the client closes it;
// false when the socket went away with it. An empty answer (a commit
// whose answer is lost) cuts the connection.
func (f *fakeRuntimeAPI) session(ln net.Listener, c net.Conn, r *bufio.Reader, crtList string) bool {
	defer c.Close()
	f.mu.Lock()
	session := f.sessions
	f.mu.Unlock()
	for {
		cmd, err := r.ReadString('\n')
		if err != nil || cmd == "quit\n" {
			return true
		}
		if strings.HasSuffix(cmd, "<<\n") {
			for {
				line, err := r.ReadString('\n')
				cmd += line
				if err != nil || line == "\n" {
					break
				}
			}
		}
		if r.Buffered() > 0 {
			behind, _ := r.Peek(r.Buffered())
			f.mu.Lock()
			f.ahead++
			if strings.Contains(string(behind), "commit ssl cert") {
				f.commitQueued++
			}
			f.mu.Unlock()
		}
		out, died := f.one(cmd, crtList)
		f.mu.Lock()
		if cmd == "show info\n" && f.sessionsAtReload > 0 && session <= f.sessionsAtReload {
			out = fmt.Sprintf("Name: HAProxy\nPid: %d\n", 4000+f.restarts-1) // the old process
		}
		f.mu.Unlock()
		if out == "" {
			return true
		}
		c.Write([]byte(out + "\n> "))
		if died {
			ln.Close()
			return false
		}
	}
}

// haproxyFixture is a store, a certificate directory and a stand-in
// "haproxy -c" that passes, with each name saved twice (OLD- then NEW-,
// live) and its PEM on disk holding "OLD PEM <name>". It returns the
// changes that deploy the new versions with d's settings filled in.
func haproxyFixture(t *testing.T, d store.Deploy, names ...string) (*store.Store, string, []Change) {
	t.Helper()
	dir := t.TempDir()
	s := store.New(filepath.Join(dir, "state"))
	certs := filepath.Join(dir, "certs")
	os.MkdirAll(certs, 0o700)
	haproxy := filepath.Join(dir, "haproxy")
	os.WriteFile(haproxy, []byte("#!/bin/sh\nexit 0\n"), 0o755)
	d.Target, d.HAProxyBin, d.HAProxyConf, d.HAProxyCerts = "haproxy", haproxy, haproxy, certs
	var changes []Change
	for _, name := range names {
		saveVersion(t, s, name, "OLD-"+name)
		os.WriteFile(PEMPath(certs, name), []byte("OLD PEM "+name), 0o600)
		_, prev := saveVersion(t, s, name, "NEW-"+name)
		changes = append(changes, Change{Name: name, Domains: []string{name}, Serial: "NEW-" + name, Previous: prev, Deploy: d})
	}
	return s, certs, changes
}

// hotFixture is haproxyFixture with api answering the runtime API on a
// socket the changes name; loaded: HAProxy holds every name already.
func hotFixture(t *testing.T, api *fakeRuntimeAPI, loaded bool, names ...string) (*store.Store, string, []Change) {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "admin.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	s, certs, changes := haproxyFixture(t, store.Deploy{HAProxySocket: sock}, names...)
	for _, c := range changes {
		if loaded {
			api.certs = append(api.certs, PEMPath(certs, c.Name))
			if api.listed == nil {
				api.listed = map[string]bool{}
			}
			api.listed[PEMPath(certs, c.Name)] = true
		}
	}
	go api.serve(t, ln, certs)
	return s, certs, changes
}

// A runtime-API update that fails midway sets the certificates it had
// already committed back to their previous PEM, in HAProxy's memory, and
// the files and live/ are rolled back too.
func TestHotUpdateIsAllOrNothing(t *testing.T) {
	api := &fakeRuntimeAPI{failAfter: 1}
	s, certs, changes := hotFixture(t, api, true, "a.test", "b.test")
	results := (&Runner{Store: s}).Run(context.Background(), changes)
	for _, r := range results {
		if !r.RolledBack || r.Err == nil || !strings.Contains(r.Err.Error(), "set back in HAProxy's memory") {
			t.Fatalf("%s: rolled back %v, err %v", r.Name, r.RolledBack, r.Err)
		}
	}
	api.mu.Lock()
	defer api.mu.Unlock()
	// a.test was committed, b.test failed: a.test must be set back to
	// its old PEM and committed again.
	var undo []string
	for _, c := range api.cmds {
		if strings.Contains(c, "OLD PEM a.test") || (len(undo) > 0 && strings.HasPrefix(c, "commit ssl cert")) {
			undo = append(undo, strings.SplitN(c, "\n", 2)[0])
		}
	}
	if len(undo) != 2 || !strings.HasPrefix(undo[0], "set ssl cert "+PEMPath(certs, "a.test")) || !strings.HasPrefix(undo[1], "commit ssl cert "+PEMPath(certs, "a.test")) {
		t.Fatalf("a.test not set back in memory; commands after the failure: %q\nall: %q", undo, api.cmds)
	}
	for _, name := range []string{"a.test", "b.test"} {
		if got, _ := os.ReadFile(PEMPath(certs, name)); string(got) != "OLD PEM "+name {
			t.Errorf("%s PEM on disk: %q", name, got)
		}
		if l, _ := s.Load(name); l.Cert.Serial != "OLD-"+name {
			t.Errorf("%s live: %s", name, l.Cert.Serial)
		}
	}
}

// HAProxy gone in the middle of a runtime-API update of 60 new
// certificates: the undo stops at its first failure, and the error, which
// is saved in the record of every lineage of the deploy, names that one
// failure and a count, not one failure per certificate (at 20,000
// lineages it had grown to 790 KB, written into each of their records).
func TestHotUpdateUndoStopsWhenHAProxyIsGone(t *testing.T) {
	var names []string
	for i := range 60 {
		names = append(names, fmt.Sprintf("n%02d.test", i))
	}
	defer func(d time.Duration) { restartWait = d }(restartWait)
	restartWait = 300 * time.Millisecond
	api := &fakeRuntimeAPI{failAfter: 50, dies: true}
	s, certs, changes := hotFixture(t, api, false, names...) // none loaded: all 60 are new
	results := (&Runner{Store: s}).Run(context.Background(), changes)
	for _, r := range results {
		if r.Err == nil || !r.RolledBack {
			t.Fatalf("%s: rolled back %v, err %v", r.Name, r.RolledBack, r.Err)
		}
		msg := r.Err.Error()
		// HAProxy took 50 before it died; the update knows of those whose
		// answers it read. The message names three paths of the test's
		// temporary directory, and says the API did not answer again
		// (HAProxy may have restarted meanwhile).
		if len(msg) > 900 || strings.Count(msg, "del ssl") > 1 || !regexp.MustCompile(`at 1 of the (4[3-9]|50) certificates already committed`).MatchString(msg) || !strings.Contains(msg, "reload or restart HAProxy") || !strings.Contains(msg, "did not answer again within 300ms") {
			t.Fatalf("%s: error of %d bytes: %.800s", r.Name, len(msg), msg)
		}
	}
	for _, name := range names {
		if got, _ := os.ReadFile(PEMPath(certs, name)); string(got) != "OLD PEM "+name {
			t.Errorf("%s PEM on disk: %q", name, got)
		}
	}
}

// A certificate transaction left open in HAProxy (a run killed between
// its set and its commit) is aborted before the update when it is in
// lbcert's directory, and the update then goes through; one elsewhere is
// the operator's, and the update stops, naming it, before any set. A set
// is never taken as done on an answer naming another certificate.
func TestHotUpdateAbortsATransactionLeftOpen(t *testing.T) {
	for _, tc := range []struct {
		name   string
		open   func(certs string) string
		failed bool
	}{
		{"in lbcert's directory", func(certs string) string { return PEMPath(certs, "b.test") }, false},
		{"elsewhere", func(string) string { return "/etc/haproxy/other/x.pem" }, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			api := &fakeRuntimeAPI{failAfter: -2}
			s, certs, changes := hotFixture(t, api, true, "a.test", "b.test")
			api.mu.Lock()
			api.open = tc.open(certs)
			api.mu.Unlock()
			results := (&Runner{Store: s}).Run(context.Background(), changes)
			api.mu.Lock()
			defer api.mu.Unlock()
			sets := 0
			for _, c := range api.cmds {
				if strings.HasPrefix(c, "set ssl cert") {
					sets++
				}
			}
			for _, r := range results {
				switch {
				case tc.failed && (r.Err == nil || !strings.Contains(r.Err.Error(), "transaction open on /etc/haproxy/other/x.pem") || sets != 0):
					t.Fatalf("%s: err %v after %d sets", r.Name, r.Err, sets)
				case !tc.failed && (r.Err != nil || !r.Deployed || api.open != "" || sets != 2):
					t.Fatalf("%s: deployed %v, err %v, open transaction %q, %d sets; commands %q", r.Name, r.Deployed, r.Err, api.open, sets, api.cmds)
				}
			}
		})
	}
}

// A commit HAProxy refuses leaves no transaction open: it is aborted, so
// the next update is not refused behind it.
func TestHotUpdateAbortsAfterAFailedCommit(t *testing.T) {
	api := &fakeRuntimeAPI{failAfter: -2, failCommitAfter: 1}
	s, _, changes := hotFixture(t, api, true, "a.test", "b.test")
	results := (&Runner{Store: s}).Run(context.Background(), changes)
	api.mu.Lock()
	defer api.mu.Unlock()
	if results[0].Err == nil || api.open != "" {
		t.Fatalf("err %v; transaction left open on %q; commands %q", results[0].Err, api.open, api.cmds)
	}
}

// Another client opens a transaction in the middle of an update: HAProxy
// adds lbcert's next set to it. lbcert aborts that transaction (it holds
// a lineage's key, and the other client's commit would serve it for its
// certificate), sends nothing more into it, and leaves none open.
func TestHotUpdateAbortsAnotherClientsTransactionItWasAddedTo(t *testing.T) {
	api := &fakeRuntimeAPI{failAfter: -2, otherAt: 2, other: "/etc/haproxy/other/x.pem"}
	s, _, changes := hotFixture(t, api, true, "a.test", "b.test")
	results := (&Runner{Store: s}).Run(context.Background(), changes)
	api.mu.Lock()
	defer api.mu.Unlock()
	aborted, into := false, 0
	for _, c := range api.cmds {
		aborted = aborted || strings.HasPrefix(c, "abort ssl cert /etc/haproxy/other/x.pem")
		if strings.HasPrefix(c, "commit ssl cert /etc/haproxy/other/") {
			into++
		}
	}
	if results[1].Err == nil || !strings.Contains(results[1].Err.Error(), "another client had open on /etc/haproxy/other/x.pem; lbcert aborted") || !aborted || into != 0 || api.open != "" {
		t.Fatalf("err %v; aborted %v; commits of the other's %d; open %q; commands %q", results[1].Err, aborted, into, api.open, api.cmds)
	}
}

// Another client's set goes into lbcert's transaction between lbcert's
// set and its commit (HAProxy 2.6 adds it there): the commit succeeds,
// but HAProxy serves the other client's certificate under lbcert's name.
// lbcert checks the serial HAProxy serves after each commit, and the
// deploy fails, saying so, instead of reporting success.
func TestHotUpdateChecksWhatItCommitted(t *testing.T) {
	s, certs, d, ln := realCertFixture(t)
	api := &fakeRuntimeAPI{failAfter: -2, intrudeAt: 1, intruder: string(selfSigned(t, "other.test"))}
	olds, changes := loadedTwice(t, s, certs, d, api, "a.test", "b.test")
	go api.serve(t, ln, certs)
	results := (&Runner{Store: s}).Run(context.Background(), changes)
	// b.test's set went out with a.test's check, its commit only after
	// that check was read: it is not committed.
	if results[0].Err == nil || !strings.Contains(results[0].Err.Error(), "another runtime-API client's set went into lbcert's transaction") || !strings.Contains(results[0].Err.Error(), "the 1 certificates already committed were set back") {
		t.Fatalf("a.test: deployed %v, err %v", results[0].Deployed, results[0].Err)
	}
	// The certificate committed with the other client's PEM is set back
	// to its previous one, like every other committed one.
	api.mu.Lock()
	back := pemSerial([]byte(api.committed[PEMPath(certs, "a.test")]))
	api.mu.Unlock()
	if back != pemSerial(olds["a.test"]) {
		t.Fatalf("a.test in memory after the undo: serial %q, want the previous %q", back, pemSerial(olds["a.test"]))
	}
	// Without the other client, the same check passes: what HAProxy
	// serves is what lbcert committed.
	api.mu.Lock()
	api.intrudeAt = 0
	api.mu.Unlock()
	for _, r := range (&Runner{Store: s}).Run(context.Background(), changes) {
		if r.Err != nil || !r.Deployed {
			t.Fatalf("%s without the other client: deployed %v, err %v", r.Name, r.Deployed, r.Err)
		}
	}
}

// realCertFixture is a store, a certificate directory, a stand-in
// "haproxy -c" that passes, and a socket for a fake runtime API to
// serve, for tests whose certificates are real (their serials checked).
func realCertFixture(t *testing.T) (*store.Store, string, store.Deploy, net.Listener) {
	t.Helper()
	dir := t.TempDir()
	s := store.New(filepath.Join(dir, "state"))
	certs := filepath.Join(dir, "certs")
	os.MkdirAll(certs, 0o700)
	haproxy := filepath.Join(dir, "haproxy")
	os.WriteFile(haproxy, []byte("#!/bin/sh\nexit 0\n"), 0o755)
	sock := filepath.Join(dir, "admin.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	return s, certs, store.Deploy{Target: "haproxy", HAProxyBin: haproxy, HAProxyConf: haproxy, HAProxyCerts: certs, HAProxySocket: sock}, ln
}

// selfSigned is a PEM certificate for name with a random serial.
func selfSigned(t *testing.T, name string) []byte {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	serial, _ := rand.Int(rand.Reader, big.NewInt(1<<62))
	tmpl := &x509.Certificate{SerialNumber: serial, DNSNames: []string{name}, NotBefore: time.Now(), NotAfter: time.Now().Add(time.Hour)}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
}

// Another client's transaction gets in the way of the undo itself: the
// undo aborts it and tries the same certificate again, instead of
// stopping with memory and disk out of step.
func TestHotUpdateUndoRetriesAfterACollision(t *testing.T) {
	api := &fakeRuntimeAPI{failAfter: 1, otherAt: 3, other: "/etc/haproxy/other/x.pem"}
	s, _, changes := hotFixture(t, api, true, "a.test", "b.test")
	results := (&Runner{Store: s}).Run(context.Background(), changes)
	api.mu.Lock()
	defer api.mu.Unlock()
	if results[0].Err == nil || !strings.Contains(results[0].Err.Error(), "the 1 certificates already committed were set back") || api.open != "" {
		t.Fatalf("err %v; open %q; commands %q", results[0].Err, api.open, api.cmds)
	}
}

// "Operations on certificates are currently locked" (another client's
// command, even a show, holds HAProxy's lock) is waited out, not taken
// as a failure that rolls the whole update back.
func TestHotUpdateWaitsOutTheLock(t *testing.T) {
	api := &fakeRuntimeAPI{failAfter: -2, lockEvery: 3}
	s, _, changes := hotFixture(t, api, false, "a.test", "b.test", "c.test")
	for _, r := range (&Runner{Store: s}).Run(context.Background(), changes) {
		if r.Err != nil || !r.Deployed {
			t.Fatalf("%s: deployed %v, err %v", r.Name, r.Deployed, r.Err)
		}
	}
}

// The config test's time limit grows with the certificates the load
// balancer loads: a test that needs longer than the base limit passes
// when there are certificates to account for it (a node joining a fleet
// of 100,000 lineages had its nginx test killed at a fixed 2 minutes).
func TestConfigTestLimitGrowsWithCertificates(t *testing.T) {
	base, per := commandTimeout, perCertificate
	t.Cleanup(func() { commandTimeout, perCertificate = base, per })
	commandTimeout, perCertificate = 100*time.Millisecond, time.Second
	s, certs, changes := haproxyFixture(t, store.Deploy{ReloadCmd: "true"}, "a.test", "b.test", "c.test")
	slow := filepath.Join(t.TempDir(), "haproxy")
	os.WriteFile(slow, []byte("#!/bin/sh\nsleep 0.5\nexit 0\n"), 0o755)
	for i := range changes {
		changes[i].Deploy.HAProxyBin = slow
	}
	if got := testLimit(changes[0].Deploy); got != 100*time.Millisecond+3*time.Second {
		t.Fatalf("limit with 3 PEMs in %s: %s", certs, got)
	}
	for _, r := range (&Runner{Store: s}).Run(context.Background(), changes) {
		if r.Err != nil || !r.Deployed {
			t.Fatalf("%s: deployed %v, err %v", r.Name, r.Deployed, r.Err)
		}
	}
	// Without certificates to count, the base limit applies and the slow
	// test is killed: the limit is what the deploy used.
	empty := changes[0].Deploy
	empty.HAProxyCerts = t.TempDir()
	if (&Runner{Store: s}).Test(context.Background(), empty) == "" {
		t.Fatal("a config test slower than the base limit passed with no certificates to count")
	}
	include := filepath.Join(t.TempDir(), "sites.conf")
	os.WriteFile(include, NginxSites(s.LivePaths, "/etc/nginx/site-body.conf", []Site{{Name: "a.test", Domains: []string{"a.test"}}, {Name: "b.test", Domains: []string{"b.test"}}}), 0o600)
	if got := testLimit(store.Deploy{NginxInclude: include}); got != 100*time.Millisecond+2*time.Second {
		t.Fatalf("limit with 2 server blocks: %s", got)
	}
	// An include path that is a FIFO counts nothing, and reading it does
	// not wait for a writer.
	fifo := filepath.Join(t.TempDir(), "fifo.conf")
	if err := syscall.Mkfifo(fifo, 0o600); err != nil {
		t.Fatal(err)
	}
	if got := testLimit(store.Deploy{NginxInclude: fifo}); got != 100*time.Millisecond {
		t.Fatalf("limit with a FIFO for the include: %s", got)
	}
}

// ENOSPC while writing the PEMs: the one written before the disk filled
// is put back, and no spurious "rollback: restore ... failed" is reported
// for the PEMs that were never replaced. The fake writes the first PEM
// of the batch for real and then finds the disk full, for the batch as
// for the restore.
func TestHAProxyWriteFailureRollsBackOnlyWhatWasWritten(t *testing.T) {
	s, certs, changes := haproxyFixture(t, store.Deploy{ReloadCmd: "true"}, "a.test", "b.test", "c.test")
	full := func(path string) error { return &os.PathError{Op: "write", Path: path, Err: syscall.ENOSPC} }
	replaced := ""
	writePEMs = func(files []store.FileWrite, renamed func(int)) error {
		if err := store.WriteFiles(files[:1], renamed); err != nil {
			return err
		}
		replaced = strings.TrimSuffix(filepath.Base(files[0].Path), ".pem")
		return full(files[1].Path)
	}
	writePEM = func(path string, data []byte, perm os.FileMode) error { return full(path) }
	defer func() { writePEM, writePEMs = store.WriteFile, store.WriteFiles }()
	var logs strings.Builder
	old := slog.Default()
	slog.SetDefault(slog.New(slog.NewTextHandler(&logs, nil)))
	defer slog.SetDefault(old)

	results := (&Runner{Store: s}).Run(context.Background(), changes)
	for _, r := range results {
		if !r.RolledBack || !strings.Contains(r.Err.Error(), "no space left on device") {
			t.Fatalf("%s: %+v", r.Name, r)
		}
	}
	if replaced == "" {
		t.Fatal("no PEM was written before the disk filled")
	}
	// Only the replaced PEM's restore (which the full disk refuses too)
	// may be reported; the others failed atomically or never started:
	// intact, with nothing to report.
	for _, name := range []string{"a.test", "b.test", "c.test"} {
		reported := strings.Contains(logs.String(), "rollback: restore load balancer file\" name="+name)
		if name == replaced {
			if !reported {
				t.Errorf("%s's failed restore was not reported:\n%s", name, logs.String())
			}
			continue
		}
		if reported {
			t.Errorf("spurious rollback error for %s:\n%s", name, logs.String())
		}
		if got, _ := os.ReadFile(PEMPath(certs, name)); string(got) != "OLD PEM "+name {
			t.Errorf("%s PEM: %q", name, got)
		}
	}
}

// The runtime API's payload ends at the first blank line: a PEM with
// blank lines and carriage returns (written by someone else) goes
// whole, without them.
func TestPayloadDropsBlankLinesAndCarriageReturns(t *testing.T) {
	in := "-----BEGIN CERTIFICATE-----\r\nAAAA\r\n\r\n-----END CERTIFICATE-----\n  \n\n-----BEGIN PRIVATE KEY-----\nBBBB\n-----END PRIVATE KEY-----"
	want := "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n-----BEGIN PRIVATE KEY-----\nBBBB\n-----END PRIVATE KEY-----\n"
	if got := payload([]byte(in)); got != want {
		t.Errorf("payload(%q) = %q, want %q", in, got, want)
	}
}

// Over the runtime API the config test runs only before a reload: an
// update HAProxy takes needs none (it parsed each PEM itself), and one
// it refuses is followed by "haproxy -c" and, only if that passes, the
// reload command. A failing test rolls back with nothing reloaded.
func TestHAProxyConfigTestOnlyBeforeAReload(t *testing.T) {
	for _, tc := range []struct {
		name        string
		failAfter   int  // the fake refuses the set after this many
		testPasses  bool // the stand-in "haproxy -c"
		wantTests   int
		wantReload  bool
		wantSuccess bool
	}{
		{"update taken", -2, true, 0, false, true},
		{"update refused, test passes", 0, true, 1, true, true},
		{"update refused, test fails", 0, false, 1, false, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			api := &fakeRuntimeAPI{failAfter: tc.failAfter}
			s, certs, changes := hotFixture(t, api, true, "a.test", "b.test")
			dir := t.TempDir()
			calls, reloaded := filepath.Join(dir, "calls"), filepath.Join(dir, "reloaded")
			exit := 0
			if !tc.testPasses {
				exit = 1
			}
			haproxy := filepath.Join(dir, "haproxy")
			os.WriteFile(haproxy, []byte(fmt.Sprintf("#!/bin/sh\necho \"$@\" >> %s\necho '[ALERT] config broken'\nexit %d\n", calls, exit)), 0o755)
			for i := range changes {
				changes[i].Deploy.HAProxyBin = haproxy
				changes[i].Deploy.ReloadCmd = "touch " + reloaded
			}
			results := (&Runner{Store: s}).Run(context.Background(), changes)
			data, _ := os.ReadFile(calls)
			if got := strings.Count(string(data), "-c -f"); got != tc.wantTests {
				t.Fatalf("haproxy -c ran %d times, want %d (calls %q)", got, tc.wantTests, data)
			}
			if _, err := os.Stat(reloaded); (err == nil) != tc.wantReload {
				t.Fatalf("reloaded %v, want %v", err == nil, tc.wantReload)
			}
			for _, r := range results {
				if r.Deployed != tc.wantSuccess || (r.Err == nil) != tc.wantSuccess {
					t.Fatalf("%s: deployed %v, err %v", r.Name, r.Deployed, r.Err)
				}
				if !tc.wantSuccess {
					if !r.RolledBack || r.Check == "" || !strings.Contains(r.Err.Error(), "haproxy -c -f") {
						t.Fatalf("%s: rolled back %v, check %q, err %v", r.Name, r.RolledBack, r.Check, r.Err)
					}
					if got, _ := os.ReadFile(PEMPath(certs, r.Name)); string(got) != "OLD PEM "+r.Name {
						t.Fatalf("%s PEM on disk after the rollback: %q", r.Name, got)
					}
				}
			}
		})
	}
}

// A certificate store HAProxy holds that no crt-list serves (a run
// killed after its "new ssl cert" left it) is added to the directory's
// crt-list by the next update, not only set: set alone reported it
// deployed while HAProxy served nothing for the name. And a new
// certificate HAProxy refuses leaves no empty store behind.
func TestHotUpdateListsAStoreNoCrtListServes(t *testing.T) {
	api := &fakeRuntimeAPI{failAfter: -2}
	s, certs, changes := hotFixture(t, api, false, "a.test")
	api.mu.Lock()
	api.certs = []string{PEMPath(certs, "a.test")} // held, listed nowhere
	api.mu.Unlock()
	for _, r := range (&Runner{Store: s}).Run(context.Background(), changes) {
		if r.Err != nil || !r.Deployed {
			t.Fatalf("%s: deployed %v, err %v", r.Name, r.Deployed, r.Err)
		}
	}
	api.mu.Lock()
	if !api.listed[PEMPath(certs, "a.test")] || slices.ContainsFunc(api.cmds, func(c string) bool { return strings.HasPrefix(c, "new ssl cert") }) {
		t.Fatalf("a store held and unlisted: listed %v; commands %q", api.listed, api.cmds)
	}
	api.mu.Unlock()

	refusing := &fakeRuntimeAPI{failAfter: 0}
	s, certs, changes = hotFixture(t, refusing, false, "b.test")
	for _, r := range (&Runner{Store: s}).Run(context.Background(), changes) {
		if r.Err == nil || !r.RolledBack {
			t.Fatalf("%s: rolled back %v, err %v", r.Name, r.RolledBack, r.Err)
		}
	}
	refusing.mu.Lock()
	defer refusing.mu.Unlock()
	if slices.Contains(refusing.certs, PEMPath(certs, "b.test")) || refusing.listed[PEMPath(certs, "b.test")] {
		t.Fatalf("a refused new certificate left a store: certificates %v, listed %v; commands %q", refusing.certs, refusing.listed, refusing.cmds)
	}
}

// Certificates named one by one on bind lines ("crt DIR/a.pem"), with no
// crt-list for the directory: one HAProxy holds is updated in place, and
// nothing is added to a crt-list.
func TestHotUpdateOfCertificatesNamedOnBindLines(t *testing.T) {
	api := &fakeRuntimeAPI{failAfter: -2, otherList: "/etc/haproxy/other.crtlist"}
	s, _, changes := hotFixture(t, api, true, "a.test")
	for _, r := range (&Runner{Store: s}).Run(context.Background(), changes) {
		if r.Err != nil || !r.Deployed {
			t.Fatalf("%s: deployed %v, err %v", r.Name, r.Deployed, r.Err)
		}
	}
	api.mu.Lock()
	defer api.mu.Unlock()
	if slices.ContainsFunc(api.cmds, func(c string) bool { return strings.HasPrefix(c, "add ssl crt-list") }) {
		t.Fatalf("added to a crt-list: %q", api.cmds)
	}
}

// A commit HAProxy made whose answer was lost counts as committed: the
// update then fails and sets it back, instead of reporting a rollback
// while HAProxy serves the new certificate and the files the old one;
// one command at a time and pipelined alike.
func TestHotUpdateSetsBackACommitWhoseAnswerWasLost(t *testing.T) {
	bothWays(t, func(t *testing.T, piped bool) {
		s, certs, d, ln := realCertFixture(t)
		api := &fakeRuntimeAPI{failAfter: -2, loseCommitAt: 1, listed: map[string]bool{}}
		old := selfSigned(t, "a.test")
		s.Save(&store.Lineage{Name: "a.test", Domains: []string{"a.test"}}, store.Files{Cert: old, Chain: old, Fullchain: old, Key: old})
		os.WriteFile(PEMPath(certs, "a.test"), old, 0o600)
		api.certs = append(api.certs, PEMPath(certs, "a.test"))
		api.listed[PEMPath(certs, "a.test")] = true
		cur := selfSigned(t, "a.test")
		_, prev, err := s.Save(&store.Lineage{Name: "a.test", Domains: []string{"a.test"}}, store.Files{Cert: cur, Chain: cur, Fullchain: cur, Key: cur})
		if err != nil {
			t.Fatal(err)
		}
		go api.serve(t, ln, certs)
		r := (&Runner{Store: s}).Run(context.Background(), []Change{{Name: "a.test", Domains: []string{"a.test"}, Previous: prev, Deploy: d}})[0]
		if r.Err == nil || !r.RolledBack || !strings.Contains(r.Err.Error(), "the 1 certificates already committed were set back") {
			t.Fatalf("rolled back %v, err %v", r.RolledBack, r.Err)
		}
		api.mu.Lock()
		defer api.mu.Unlock()
		if got := pemSerial([]byte(api.committed[PEMPath(certs, "a.test")])); got != pemSerial(old) || api.open != "" {
			t.Fatalf("a.test in memory: serial %q, want the previous %q (the files'); open transaction %q", got, pemSerial(old), api.open)
		}
	})
}

// A pipelined set whose answer was lost with the connection (its commit
// waits for that answer, so it was never sent) is not taken for a
// commit whose answer was lost: its transaction is aborted, and it and
// the certificates after it are updated one command at a time over a
// new connection. The update then succeeds; it used to fail, naming a
// commit that was never sent.
func TestHotUpdateSetWhoseAnswerWasLostIsNotACommit(t *testing.T) {
	names := []string{"a.test", "b.test", "c.test", "d.test"}
	api := &fakeRuntimeAPI{failAfter: 1 << 20, cutSetAt: 2}
	s, certs, changes := hotFixture(t, api, false, names...) // all new
	var logs strings.Builder
	old := slog.Default()
	slog.SetDefault(slog.New(slog.NewTextHandler(&logs, nil)))
	defer slog.SetDefault(old)
	allDeployed(t, s, changes)
	// The transaction aborted is this update's own: no warning that one
	// was "left open", as if by another client (a review's finding).
	if out := logs.String(); strings.Contains(out, "left open") || !strings.Contains(out, "this update's set") {
		t.Errorf("log:\n%s", out)
	}
	api.mu.Lock()
	defer api.mu.Unlock()
	for _, n := range names {
		p := PEMPath(certs, n)
		if !strings.Contains(api.committed[p], "NEW-"+n) || !api.listed[p] {
			t.Errorf("%s: committed %q, listed %v", n, api.committed[p], api.listed[p])
		}
	}
	if api.open != "" || api.sessions < 2 {
		t.Errorf("open transaction %q, %d sessions; want none open, and a second session after the cut", api.open, api.sessions)
	}
}

// An update keeps its commands on one interactive session: one
// connection for all of them, as many commands as a connection each
// made; a session left idle is replaced before it is used, and one that
// breaks is replaced for the next command.
func TestHotUpdateKeepsOneSession(t *testing.T) {
	var names []string
	for i := range 40 {
		names = append(names, fmt.Sprintf("s%02d.test", i))
	}
	api := &fakeRuntimeAPI{failAfter: 1 << 20}
	s, certs, changes := hotFixture(t, api, false, names...) // all new
	for _, r := range (&Runner{Store: s}).Run(context.Background(), changes) {
		if r.Err != nil {
			t.Fatalf("%s: %v", r.Name, r.Err)
		}
	}
	api.mu.Lock()
	conns, sessions, cmds := api.conns, api.sessions, len(api.cmds)
	api.mu.Unlock()
	if conns != 1 || sessions != 1 {
		t.Errorf("%d connections, %d of them sessions, for one update; want one session", conns, sessions)
	}
	// show info, show ssl cert and show ssl crt-list, then new, set,
	// commit, show and add a name; sent ahead of their answers.
	if want := 3 + 5*len(names); cmds != want || api.ahead == 0 {
		t.Errorf("%d commands, want %d; %d read with more already sent behind them", cmds, want, api.ahead)
	}
	// A commit is never queued behind another command (HAProxy 2.6
	// crashes later when the client goes away with one queued).
	if api.commitQueued != 0 {
		t.Errorf("%d commands were read with a commit queued behind them", api.commitQueued)
	}
	for _, n := range names {
		p := PEMPath(certs, n)
		if !strings.Contains(api.committed[p], "NEW-"+n) || !api.listed[p] {
			t.Fatalf("%s: committed %q, listed %v", n, api.committed[p], api.listed[p])
		}
	}

	// Idle longer than sessionIdle: a new session, not the old one.
	defer func(d time.Duration) { sessionIdle = d }(sessionIdle)
	sessionIdle = 20 * time.Millisecond
	a := &runtimeAPI{addr: changes[0].Deploy.HAProxySocket, keep: true}
	defer a.close()
	ctx := context.Background()
	if _, err := a.do(ctx, "show ssl crt-list"); err != nil {
		t.Fatal(err)
	}
	time.Sleep(50 * time.Millisecond)
	first := a.sess
	if out, err := a.do(ctx, "show ssl crt-list"); err != nil || out != certs {
		t.Fatalf("after idling: %q, %v", out, err)
	}
	if a.sess == first {
		t.Error("a session idle past sessionIdle was used again")
	}
	// HAProxy's end closed (as at its stats timeout, or a restart): the
	// command fails, and the next one gets a session of its own.
	io.WriteString(a.sess.conn, "quit\n")
	if out, err := a.do(ctx, "show ssl crt-list"); err == nil {
		t.Fatalf("a command on a session HAProxy closed answered %q", out)
	}
	if a.sess != nil {
		t.Error("a failed session is kept")
	}
	if out, err := a.do(ctx, "show ssl crt-list"); err != nil || out != certs {
		t.Fatalf("after the session closed: %q, %v", out, err)
	}
	api.mu.Lock()
	defer api.mu.Unlock()
	if api.sessions != 4 {
		t.Errorf("%d sessions, want 4 (the update's, then three)", api.sessions)
	}
}

// The connection cut on the check after a commit HAProxy answered: the
// certificate is committed. One at a time, the undo sets it back with
// the others; pipelined, the update asks HAProxy again, finds it
// committed, and goes on.
func TestHotUpdateSetsBackACommitWhoseCheckWasCut(t *testing.T) {
	bothWays(t, func(t *testing.T, piped bool) {
		s, certs, d, ln := realCertFixture(t)
		api := &fakeRuntimeAPI{failAfter: -2, cutShowAt: 2, listed: map[string]bool{}}
		olds, changes := loadedTwice(t, s, certs, d, api, "a.test", "b.test")
		for _, c := range changes {
			api.listed[PEMPath(certs, c.Name)] = true
		}
		go api.serve(t, ln, certs)
		for _, r := range (&Runner{Store: s}).Run(context.Background(), changes) {
			if piped && (r.Err != nil || !r.Deployed) {
				t.Fatalf("%s: deployed %v, err %v", r.Name, r.Deployed, r.Err)
			}
			if !piped && (r.Err == nil || !r.RolledBack || !strings.Contains(r.Err.Error(), "the 2 certificates already committed were set back")) {
				t.Fatalf("%s: rolled back %v, err %v", r.Name, r.RolledBack, r.Err)
			}
		}
		api.mu.Lock()
		defer api.mu.Unlock()
		for name, old := range olds {
			want := pemSerial(old)
			if piped {
				disk, _ := os.ReadFile(PEMPath(certs, name))
				if want = pemSerial(disk); want == pemSerial(old) {
					t.Errorf("%s: the old PEM on disk after a deploy", name)
				}
			}
			if got := pemSerial([]byte(api.committed[PEMPath(certs, name)])); got != want {
				t.Errorf("%s in memory: serial %q, want %q (the files')", name, got, want)
			}
		}
	})
}

// A socket that takes the connection and never answers "prompt" (not
// HAProxy's) fails the update after promptWait, saying so.
func TestHotUpdateSocketThatNeverPrompts(t *testing.T) {
	defer func(d time.Duration) { promptWait = d }(promptWait)
	promptWait = 100 * time.Millisecond
	sock := filepath.Join(t.TempDir(), "silent.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			// Silent, and closed after 3 s: an update that waited longer
			// than promptWait (a command's 30 s) ends on this close, and
			// its error says EOF, not timeout.
			time.AfterFunc(3*time.Second, func() { c.Close() })
		}
	}()
	s, certs, changes := haproxyFixture(t, store.Deploy{HAProxySocket: sock}, "a.test")
	r := (&Runner{Store: s}).Run(context.Background(), changes)[0]
	if r.Err == nil || !r.RolledBack || !strings.Contains(r.Err.Error(), "start an interactive session") || !strings.Contains(r.Err.Error(), "timeout") {
		t.Fatalf("rolled back %v, err %v", r.RolledBack, r.Err)
	}
	if got, _ := os.ReadFile(PEMPath(certs, "a.test")); string(got) != "OLD PEM a.test" {
		t.Errorf("PEM on disk %q, want the old one back", got)
	}
}

// loadedTwice saves each name with a real self-signed certificate, its
// PEM on disk and in the fake HAProxy's memory, then saves a new one
// live: the changes deploy the new ones; olds are the PEMs replaced.
func loadedTwice(t *testing.T, s *store.Store, certs string, d store.Deploy, api *fakeRuntimeAPI, names ...string) (map[string][]byte, []Change) {
	t.Helper()
	olds := map[string][]byte{}
	var changes []Change
	for _, name := range names {
		old := selfSigned(t, name)
		olds[name] = old
		s.Save(&store.Lineage{Name: name, Domains: []string{name}}, store.Files{Cert: old, Chain: old, Fullchain: old, Key: old})
		os.WriteFile(PEMPath(certs, name), old, 0o600)
		api.certs = append(api.certs, PEMPath(certs, name))
		cur := selfSigned(t, name)
		_, prev, err := s.Save(&store.Lineage{Name: name, Domains: []string{name}}, store.Files{Cert: cur, Chain: cur, Fullchain: cur, Key: cur})
		if err != nil {
			t.Fatal(err)
		}
		changes = append(changes, Change{Name: name, Domains: []string{name}, Previous: prev, Deploy: d})
	}
	return olds, changes
}

// A batch of PEMs that fails before its renames (no room for every
// temporary file at once) is written again one PEM at a time: the
// deploy takes what it took before the batch.
func TestHAProxyPEMsOneByOneWhenTheBatchFails(t *testing.T) {
	s, certs, changes := haproxyFixture(t, store.Deploy{ReloadCmd: "true"}, "a.test", "b.test", "c.test")
	writePEMs = func(files []store.FileWrite, renamed func(int)) error {
		return &os.PathError{Op: "write", Path: files[2].Path + ".tmp-1", Err: syscall.ENOSPC}
	}
	defer func() { writePEMs = store.WriteFiles }()
	for _, r := range (&Runner{Store: s}).Run(context.Background(), changes) {
		if r.Err != nil || !r.Deployed {
			t.Fatalf("%s: deployed %v, err %v", r.Name, r.Deployed, r.Err)
		}
		if got, _ := os.ReadFile(PEMPath(certs, r.Name)); !strings.Contains(string(got), "NEW-"+r.Name) {
			t.Errorf("%s PEM: %q", r.Name, got)
		}
	}
}

// A new certificate HAProxy refuses in the middle of a pipelined update
// of 30 new ones: the update is all or nothing. Those committed before
// it, and those sent after it and committed before the refusal was read,
// are taken out again; no empty store, crt-list entry or open
// transaction is left.
func TestPipelinedUpdateRefusedMidwayLeavesNothing(t *testing.T) {
	var names []string
	for i := range 30 {
		names = append(names, fmt.Sprintf("p%02d.test", i))
	}
	api := &fakeRuntimeAPI{failAfter: 12}
	s, certs, changes := hotFixture(t, api, false, names...)
	for _, r := range (&Runner{Store: s}).Run(context.Background(), changes) {
		if r.Err == nil || !r.RolledBack || !strings.Contains(r.Err.Error(), "already committed were set back") {
			t.Fatalf("%s: rolled back %v, err %v", r.Name, r.RolledBack, r.Err)
		}
	}
	api.mu.Lock()
	defer api.mu.Unlock()
	if len(api.certs) != 0 || len(api.listed) != 0 || api.open != "" || api.ahead == 0 {
		t.Fatalf("left in HAProxy: stores %q, listed %v, open %q (%d commands sent ahead)", api.certs, api.listed, api.open, api.ahead)
	}
	// The refused one was tried again alone, after the pipeline.
	tries := 0
	for _, c := range api.cmds {
		if strings.HasPrefix(c, "set ssl cert "+PEMPath(certs, "p12.test")) {
			tries++
		}
	}
	if tries != 2 {
		t.Fatalf("p12.test set %d times, want 2 (pipelined, then alone)", tries)
	}
}

// The same certificate again with another PEM (its key changed) whose
// commit HAProxy refuses: HAProxy still serves the serial the new PEM
// has, the old PEM's, and that is no sign the commit was made. The
// update fails and rolls back, pipelined or not (found by the
// end-to-end TestDeployHAProxy, with a real HAProxy refusing a key that
// does not match).
func TestRefusedCommitOfTheSameSerialFails(t *testing.T) {
	bothWays(t, func(t *testing.T, piped bool) {
		s, certs, d, ln := realCertFixture(t)
		cert := selfSigned(t, "a.test")
		path := PEMPath(certs, "a.test")
		s.Save(&store.Lineage{Name: "a.test", Domains: []string{"a.test"}}, store.Files{Cert: cert, Chain: cert, Fullchain: cert, Key: []byte("KEY ONE\n")})
		old := CombinedPEM(cert, []byte("KEY ONE\n"))
		os.WriteFile(path, old, 0o600)
		api := &fakeRuntimeAPI{failAfter: -2, listed: map[string]bool{path: true}, certs: []string{path}, committed: map[string]string{path: string(old)}, refusedCommit: path}
		_, prev, err := s.Save(&store.Lineage{Name: "a.test", Domains: []string{"a.test"}}, store.Files{Cert: cert, Chain: cert, Fullchain: cert, Key: []byte("KEY TWO\n")})
		if err != nil {
			t.Fatal(err)
		}
		go api.serve(t, ln, certs)
		r := (&Runner{Store: s}).Run(context.Background(), []Change{{Name: "a.test", Domains: []string{"a.test"}, Previous: prev, Deploy: d}})[0]
		if r.Err == nil || !r.RolledBack {
			t.Fatalf("deployed %v, rolled back %v, err %v", r.Deployed, r.RolledBack, r.Err)
		}
		api.mu.Lock()
		defer api.mu.Unlock()
		if got, _ := os.ReadFile(path); string(got) != string(old) || api.committed[path] != string(old) || api.open != "" {
			t.Fatalf("after the rollback: PEM on disk %q, in memory %q, open transaction %q", got, api.committed[path], api.open)
		}
	})
}

// bothWays runs f with the runtime API's commands pipelined, and one at
// a time.
func bothWays(t *testing.T, f func(t *testing.T, piped bool)) {
	for _, piped := range []bool{false, true} {
		t.Run(fmt.Sprintf("pipelined %v", piped), func(t *testing.T) {
			defer func(p bool) { pipelining = p }(pipelining)
			pipelining = piped
			f(t, piped)
		})
	}
}

// Another client opens a transaction outside lbcert's directory in the
// middle of a pipelined update (a hostile review's finding): lbcert's
// set goes into it. Its commit is not sent (a commit waits for every
// answer before it), nothing more is sent, and the other transaction is
// aborted (it holds lbcert's key): one set went into it, as one at a
// time, not the window's worth sent ahead before the answer was read.
func TestPipelinedSetIntoAnotherClientsTransactionIsTheOnlyOne(t *testing.T) {
	var names []string
	for i := range 40 {
		names = append(names, fmt.Sprintf("w%02d.test", i))
	}
	other := "/etc/haproxy/other/x.pem"
	api := &fakeRuntimeAPI{failAfter: -2, otherAt: 4, other: other}
	s, _, changes := hotFixture(t, api, true, names...)
	for _, r := range (&Runner{Store: s}).Run(context.Background(), changes) {
		if r.Err == nil || !r.RolledBack || !strings.Contains(r.Err.Error(), "another client had open on "+other+"; lbcert aborted") {
			t.Fatalf("%s: rolled back %v, err %v", r.Name, r.RolledBack, r.Err)
		}
	}
	api.mu.Lock()
	defer api.mu.Unlock()
	sets, into, aborted := 0, 0, false
	for _, c := range api.cmds {
		switch {
		case strings.HasPrefix(c, "abort ssl cert "+other):
			aborted = true
		case strings.HasPrefix(c, "commit ssl cert "+other):
			t.Fatalf("lbcert committed the other client's transaction: %q", c)
		case strings.HasPrefix(c, "set ssl cert") && !aborted:
			if sets++; sets >= api.otherAt {
				into++
			}
		}
	}
	if !aborted || api.open != "" || into != 1 {
		t.Fatalf("aborted %v, open %q: %d of lbcert's sets went into the other's transaction, want 1", aborted, api.open, into)
	}
	// The three committed before it were set back: each commit after
	// the abort is an undo's.
	undos := 0
	for _, c := range api.cmds[slices.IndexFunc(api.cmds, func(c string) bool { return strings.HasPrefix(c, "abort ssl cert "+other) }):] {
		if strings.HasPrefix(c, "commit ssl cert") {
			undos++
		}
	}
	if undos != api.otherAt-1 {
		t.Fatalf("%d commits after the abort, want the %d undos", undos, api.otherAt-1)
	}
}

// HAProxy restarts in the middle of an update (a hostile review's
// finding: kill -9 and a new process): the new process loads every PEM
// written for the update from disk, the ones lbcert had not sent yet
// too. The update goes on over a new connection and then fails (the
// sixth commit's answer lost), and the files are rolled back; lbcert sees
// another process id and sets every certificate of the update back in
// memory, not only those it had committed, so that HAProxy serves what
// the files hold.
func TestHotUpdateAcrossARestartSetsEveryCertificateBack(t *testing.T) {
	s, certs, d, ln := realCertFixture(t)
	names := numbered("r%02d.test", 24)
	api := &fakeRuntimeAPI{failAfter: -2, restartAtShow: 3, loseCommitAt: 6}
	olds, changes := loadedTwice(t, s, certs, d, api, names...)
	go api.serve(t, ln, certs)
	allRolledBack(t, s, changes, "HAProxy restarted or reloaded during the update (process 4000, now 4001) and loaded all 24 new PEMs from disk; the 24 certificates it loaded from disk were set back")
	servesPrevious(t, api, certs, olds, names)
}

// HAProxy restarts between a commit's answer and its check, the update
// otherwise whole: the new process loaded every new PEM from disk, the
// check of the committed certificate holds there, the certificates not
// yet committed are updated one command at a time over a new
// connection, and the update succeeds: HAProxy and the files both hold
// the new certificates.
func TestHotUpdateGoesOnAfterARestartBetweenChecks(t *testing.T) {
	s, certs, d, ln := realCertFixture(t)
	names := numbered("g%02d.test", 12)
	api := &fakeRuntimeAPI{failAfter: -2, restartAtShow: 3}
	olds, changes := loadedTwice(t, s, certs, d, api, names...)
	go api.serve(t, ln, certs)
	allDeployed(t, s, changes)
	api.mu.Lock()
	defer api.mu.Unlock()
	for _, n := range names {
		p := PEMPath(certs, n)
		disk, _ := os.ReadFile(p)
		if got := pemSerial([]byte(api.committed[p])); got != pemSerial(disk) || got == pemSerial(olds[n]) || api.restarts != 1 {
			t.Errorf("%s: HAProxy serves serial %s, the file holds %s (previous %s), %d restarts", n, got, pemSerial(disk), pemSerial(olds[n]), api.restarts)
		}
	}
}

// The connection is cut between a commit's answer and its check, or
// just after a commit (its answer lost), and the new connection that
// would settle it is cut too (a review's double cut): the update fails,
// and that certificate is set back with the others, though it could not
// be checked. HAProxy then serves what the rolled-back files hold.
func TestHotUpdateSetsBackACommitItCouldNotCheck(t *testing.T) {
	for _, tc := range []struct {
		name string
		api  *fakeRuntimeAPI
		want string
	}{
		{"check cut", &fakeRuntimeAPI{failAfter: -2, cutShowAt: 3, cutListAt: 2}, "show ssl cert: unexpected EOF; the 3 certificates"},
		{"commit's answer lost", &fakeRuntimeAPI{failAfter: -2, loseCommitAt: 3, cutListAt: 2}, "show ssl cert: unexpected EOF; the 3 certificates"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s, certs, d, ln := realCertFixture(t)
			names := numbered("k%02d.test", 6)
			api := tc.api
			api.committed = map[string]string{}
			olds, changes := loadedTwice(t, s, certs, d, api, names...)
			for _, n := range names {
				api.committed[PEMPath(certs, n)] = string(olds[n]) // as HAProxy loaded them
			}
			go api.serve(t, ln, certs)
			allRolledBack(t, s, changes, tc.want)
			servesPrevious(t, api, certs, olds, names)
		})
	}
}

// HAProxy restarts while the update reads what it holds, before any
// certificate is sent (a review's finding): the update has not yet
// learned which certificates are new, nor the crt-list's name. The new
// process loaded every PEM from disk: the five new ones are taken out
// of it again (not set to an empty PEM, which HAProxy refuses, ending
// the undo), the others set back.
func TestHotUpdateRestartBeforeAnyCertificate(t *testing.T) {
	s, certs, d, ln := realCertFixture(t)
	names := numbered("e%02d.test", 10)
	api := &fakeRuntimeAPI{failAfter: -2, restartAtList: 1}
	olds, changes := loadedTwice(t, s, certs, d, api, names...)
	for i := range 5 {
		n := fmt.Sprintf("n%02d.test", i)
		cur := selfSigned(t, n)
		if _, _, err := s.Save(&store.Lineage{Name: n, Domains: []string{n}}, store.Files{Cert: cur, Chain: cur, Fullchain: cur, Key: cur}); err != nil {
			t.Fatal(err)
		}
		changes = append(changes, Change{Name: n, Domains: []string{n}, Deploy: d})
	}
	go api.serve(t, ln, certs)
	allRolledBack(t, s, changes, "now 4001) and loaded all 15 new PEMs from disk; the 15 certificates it loaded from disk were set back")
	servesPrevious(t, api, certs, olds, names)
	api.mu.Lock()
	defer api.mu.Unlock()
	for i := range 5 {
		p := PEMPath(certs, fmt.Sprintf("n%02d.test", i))
		if slices.Contains(api.certs, p) || api.listed[p] {
			t.Errorf("%s: still in HAProxy (store %v, listed %v) after its file was removed", p, slices.Contains(api.certs, p), api.listed[p])
		}
		if _, err := os.Stat(p); err == nil {
			t.Errorf("%s: the new PEM is still on disk", p)
		}
	}
}

// HAProxy reloads (master-worker) in the middle of an update: lbcert's
// session stays on the old worker, which still answers with its own
// process id, while the new worker has loaded every new PEM from disk.
// When the update then fails (its 13th set goes into another client's
// transaction), lbcert asks a new connection, learns of
// the new worker, and sets every certificate back there, not only those
// it committed on the old one (a review's finding).
func TestHotUpdateAcrossAReloadAsksANewConnection(t *testing.T) {
	s, certs, d, ln := realCertFixture(t)
	names := numbered("m%02d.test", 20)
	api := &fakeRuntimeAPI{failAfter: -2, reloadAtSet: 4, otherAt: 13, other: "/etc/haproxy/other/x.pem"}
	olds, changes := loadedTwice(t, s, certs, d, api, names...)
	go api.serve(t, ln, certs)
	allRolledBack(t, s, changes, "restarted or reloaded during the update (process 4000, now 4001)")
	servesPrevious(t, api, certs, olds, names)
}

// allRolledBack runs changes and fails unless every one was rolled back
// with an error that says want.
func allRolledBack(t *testing.T, s *store.Store, changes []Change, want string) {
	t.Helper()
	for _, r := range (&Runner{Store: s}).Run(context.Background(), changes) {
		if r.Err == nil || !r.RolledBack || !strings.Contains(r.Err.Error(), want) {
			t.Fatalf("%s: rolled back %v, err %v", r.Name, r.RolledBack, r.Err)
		}
	}
}

// allDeployed fails unless every change deploys without an error.
func allDeployed(t *testing.T, s *store.Store, changes []Change) {
	t.Helper()
	for _, r := range (&Runner{Store: s}).Run(context.Background(), changes) {
		if r.Err != nil || r.RolledBack {
			t.Fatalf("%s: rolled back %v, %v", r.Name, r.RolledBack, r.Err)
		}
	}
}

// servesPrevious fails unless HAProxy's memory and the PEM file hold,
// for each of names, the certificate they held before (olds).
func servesPrevious(t *testing.T, api *fakeRuntimeAPI, certs string, olds map[string][]byte, names []string) {
	t.Helper()
	api.mu.Lock()
	defer api.mu.Unlock()
	for _, n := range names {
		p := PEMPath(certs, n)
		disk, _ := os.ReadFile(p)
		if got, want := pemSerial([]byte(api.committed[p])), pemSerial(olds[n]); got != want || pemSerial(disk) != want {
			t.Errorf("%s: HAProxy serves serial %s, the file holds %s, want the previous %s", n, got, pemSerial(disk), want)
		}
	}
}

// numbered is n names made by format from 0 to n-1.
func numbered(format string, n int) []string {
	var names []string
	for i := range n {
		names = append(names, fmt.Sprintf(format, i))
	}
	return names
}
