package deploy

import (
	"bufio"
	"bytes"
	"context"
	"crypto/x509"
	pemblock "encoding/pem"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/lbcert/lbcert/internal/store"
)

// PEMPath is where a lineage's combined PEM goes in the HAProxy directory.
func PEMPath(certsDir, name string) string {
	return filepath.Join(certsDir, name+".pem")
}

// CombinedPEM is what HAProxy loads: the full chain, then the key, with
// no blank lines, because the runtime API ends a payload at a blank line.
func CombinedPEM(fullchain, key []byte) []byte {
	var b bytes.Buffer
	for _, part := range [][]byte{fullchain, key} {
		for _, line := range bytes.Split(part, []byte("\n")) {
			if len(bytes.TrimSpace(line)) > 0 {
				b.Write(bytes.TrimRight(line, "\r"))
				b.WriteByte('\n')
			}
		}
	}
	return b.Bytes()
}

func (r *Runner) runHAProxy(ctx context.Context, g *group, changes []Change, results []Result) {
	d := g.d
	if err := os.MkdirAll(d.HAProxyCerts, 0o700); err != nil {
		r.rollback(g, changes, results, fmt.Errorf("haproxy certificate directory %s: %v", d.HAProxyCerts, err), nil)
		return
	}
	w := &pemWrites{r: r, dir: d.HAProxyCerts, changes: changes, old: map[int][]byte{}, pems: map[int][]byte{}, written: map[int]bool{}}
	undo := w.undo
	if err := w.writeAll(g.changes); err != nil {
		r.rollback(g, changes, results, err, undo)
		return
	}
	// Over the runtime API, HAProxy tests each certificate itself: "set
	// ssl cert" parses the PEM as a reload would (chain, key, the key
	// matching the certificate) and refuses a bad one, and the update
	// then undoes itself. "haproxy -c" is for the reload, so it runs
	// only when the update fails and a reload follows: it reads every
	// PEM of the directory (about 80 s for 100,000), which a node
	// serving many certificates would otherwise spend on each renewal.
	if d.HAProxySocket != "" {
		err := r.hotUpdate(ctx, d, g, changes, w.pems, w.old)
		if err == nil {
			slog.Info("haproxy updated over its runtime API, no reload", "socket", d.HAProxySocket, "certificates", len(g.changes))
			for _, i := range g.changes {
				results[i].Deployed = true
			}
			return
		}
		r.apiFailures.Add(1)
		var nl *notLoadedError
		if d.ReloadCmd == "" || errors.As(err, &nl) && !configLoads(d.HAProxyConf, nl.dir) {
			// A reload would not help a config that never loads the
			// directory: the new PEM would be written and never served,
			// and a node would report a certificate it does not serve.
			r.rollback(g, changes, results, fmt.Errorf("haproxy runtime API %s: %v", d.HAProxySocket, err), undo)
			return
		}
		slog.Warn("haproxy runtime API update failed; testing the config and reloading instead", "socket", d.HAProxySocket, "err", err)
	}
	limit := testLimit(d)
	out, err := run(ctx, limit, nil, "", d.HAProxyBin, "-c", "-f", d.HAProxyConf)
	if err != nil {
		r.rollback(g, changes, results, &testFailed{cmdError(fmt.Sprintf("haproxy -c -f %s failed", d.HAProxyConf), err, out), out}, undo)
		return
	}
	out, err = run(ctx, limit, nil, d.ReloadCmd)
	if err != nil {
		r.rollback(g, changes, results, cmdError(fmt.Sprintf("reload command %q failed", d.ReloadCmd), err, out), undo)
		return
	}
	slog.Info("haproxy tested and reloaded", "conf", d.HAProxyConf, "certificates", len(g.changes))
	for _, i := range g.changes {
		results[i].Deployed = true
	}
}

// pemWrites writes one group's combined PEMs, all with one pair of
// file-system syncs (store.WriteFiles): a node joining a fleet writes
// thousands. It keeps what each PEM held, so a failure can put it back
// exactly; and which were written at all: a PEM whose atomic write
// failed (say on ENOSPC) is intact and needs no restoring, and trying
// would only fail again and report a rollback problem that does not exist.
type pemWrites struct {
	r       *Runner
	dir     string
	changes []Change

	mu      sync.Mutex
	old     map[int][]byte
	pems    map[int][]byte
	written map[int]bool
}

// writeAll reads what the PEMs of changes idx hold and what they are to
// hold, side by side, then writes them.
func (w *pemWrites) writeAll(idx []int) error {
	if err := eachAtOnce(idx, pemReaders, w.read); err != nil {
		return err
	}
	files := make([]store.FileWrite, len(idx))
	for k, i := range idx {
		files[k] = store.FileWrite{Path: PEMPath(w.dir, w.changes[i].Name), Data: w.pems[i], Perm: 0o600}
	}
	err := writePEMs(files, func(k int) { w.written[idx[k]] = true })
	if err == nil || w.written[idx[len(idx)-1]] {
		return err // all written: nil, or the last sync failed
	}
	// The batch needs room for every temporary file at once, and stops
	// at the first PEM it cannot replace: the PEMs it did not write are
	// written one at a time, so that a disk nearly full takes the deploy
	// it took before, and an error names its own PEM.
	for k, i := range idx {
		if w.written[i] {
			continue
		}
		if err := writePEM(files[k].Path, files[k].Data, files[k].Perm); err != nil {
			return fmt.Errorf("write %s: %w", files[k].Path, err)
		}
		w.written[i] = true
	}
	return nil
}

// read reads PEM i as it is, and makes what it is to hold.
func (w *pemWrites) read(i int) error {
	c := w.changes[i]
	p := PEMPath(w.dir, c.Name)
	prev, err := os.ReadFile(p)
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("read %s: %v", p, err)
	}
	full, err1 := w.r.Store.ReadFullchain(c.Name)
	key, err2 := w.r.Store.ReadKey(c.Name)
	if err := errors.Join(err1, err2); err != nil {
		return fmt.Errorf("read lineage %s: %v", c.Name, err)
	}
	pem := CombinedPEM(full, key)
	w.mu.Lock()
	w.old[i], w.pems[i] = prev, pem
	w.mu.Unlock()
	return nil
}

// undo puts PEM i back as it was; it runs once every write has ended.
func (w *pemWrites) undo(i int) error {
	if !w.written[i] {
		return nil
	}
	p := PEMPath(w.dir, w.changes[i].Name)
	if prev, ok := w.old[i]; ok && prev != nil {
		return writePEM(p, prev, 0o600)
	}
	err := os.Remove(p)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	return err
}

// notLoadedError is a new certificate for a directory the running HAProxy
// has no crt-list for.
type notLoadedError struct{ pem, dir string }

func (e *notLoadedError) Error() string {
	return fmt.Sprintf("%s is new and HAProxy has no crt-list for %s: add 'crt %s' to a bind line", e.pem, e.dir, e.dir)
}

// configLoads reports whether HAProxy's config names dir on a bind line
// (crt DIR or crt-list), so that a reload would load it.
func configLoads(conf, dir string) bool {
	data, err := os.ReadFile(conf)
	if err != nil {
		return true // the config test already passed; let the reload say
	}
	for _, line := range strings.Split(string(data), "\n") {
		f := strings.Fields(line)
		for i := 0; i+1 < len(f); i++ {
			if (f[i] == "crt" || f[i] == "crt-list") && filepath.Clean(f[i+1]) == dir {
				return true
			}
		}
	}
	return false
}

// writePEM and writePEMs write combined PEMs; tests replace them to
// fail on cue.
var (
	writePEM  = store.WriteFile
	writePEMs = store.WriteFiles
)

// pemReaders is how many PEMs are read at once.
const pemReaders = 16

// eachAtOnce calls f for every index of idx, n at a time, and returns the
// error of the first index (in idx's order) that failed; after a
// failure it starts no more.
func eachAtOnce(idx []int, n int, f func(i int) error) error {
	errs := make([]error, len(idx))
	var failed atomic.Bool
	next := make(chan int)
	var wg sync.WaitGroup
	for range min(n, len(idx)) {
		wg.Go(func() {
			for k := range next {
				if failed.Load() {
					continue
				}
				if errs[k] = f(idx[k]); errs[k] != nil {
					failed.Store(true)
				}
			}
		})
	}
	for k := range idx {
		next <- k
	}
	close(next)
	wg.Wait()
	for _, err := range errs {
		if err != nil {
			return err
		}
	}
	return nil
}

// hotUpdate replaces certificates HAProxy already has with set/commit ssl
// cert, and adds new ones to the crt-list that holds the certificate
// directory (HAProxy 2.2+ treats a "crt DIR" as a crt-list named by the
// directory), so no reload and no dropped connections.
//
// It is all or nothing: when a command fails midway, the certificates
// already committed are set back to their previous PEM (old) through the
// same API, and new ones are taken out again, so HAProxy's memory agrees
// with the files the caller then rolls back on disk.
func (r *Runner) hotUpdate(ctx context.Context, d store.Deploy, g *group, changes []Change, pems, old map[int][]byte) (err error) {
	api := &runtimeAPI{addr: d.HAProxySocket, keep: true}
	defer api.close() // after the undo below, which may still use it
	dir := filepath.Clean(d.HAProxyCerts)
	certs := make([]hotCert, 0, len(g.changes))
	paths := make([]string, 0, len(g.changes))
	for _, i := range g.changes {
		p := PEMPath(d.HAProxyCerts, changes[i].Name)
		certs = append(certs, hotCert{path: p, pem: pems[i], prev: old[i], serial: pemSerial(pems[i])})
		paths = append(paths, p)
	}
	var committed []committedPEM
	crtList := ""
	pid := api.processID(ctx)
	defer func() {
		if err != nil {
			err = api.undoFailed(ctx, pid, dir, crtList, certs, committed, err)
		}
	}()
	known, crtList, listed, err := api.state(ctx, dir, paths)
	if err != nil {
		return err
	}
	for k := range certs {
		if certs[k].isNew = !known[certs[k].path]; certs[k].isNew && crtList == "" {
			return &notLoadedError{pem: certs[k].path, dir: dir}
		}
	}
	rest := certs
	if pipelining {
		if rest, err = api.pipelined(ctx, dir, certs, &committed); err != nil {
			return err
		}
		if err := api.listAll(ctx, crtList, listed, committed); err != nil {
			return err
		}
		if len(rest) == 0 {
			return nil
		}
	}
	// What the pipeline did not settle, one command at a time, on what
	// HAProxy holds now.
	paths = paths[:0]
	for _, c := range rest {
		paths = append(paths, c.path)
	}
	known, crtList, listed, err = api.state(ctx, dir, paths)
	if err != nil {
		return err
	}
	for _, c := range rest {
		if c.isNew = !known[c.path]; c.isNew && crtList == "" {
			return &notLoadedError{pem: c.path, dir: dir}
		}
		if err := api.updateOne(ctx, c, crtList, listed, &committed); err != nil {
			return err
		}
	}
	return nil
}

// updateOne puts one certificate in HAProxy's memory, a command at a
// time, and adds it to committed once HAProxy holds it.
func (a *runtimeAPI) updateOne(ctx context.Context, c hotCert, crtList string, listed map[string]bool, committed *[]committedPEM) error {
	if c.isNew {
		if err := a.expect(ctx, "new ssl cert "+c.path, "New empty certificate store"); err != nil {
			return err
		}
	}
	if err := a.replace(ctx, c.path, c.pem); err != nil {
		if e := new(collisionError); errors.As(err, &e) && e.committed {
			// Committed with another client's PEM: set back too.
			*committed = append(*committed, c.committedPEM())
		} else if c.isNew {
			// The empty store "new ssl cert" made would stay in
			// HAProxy's memory, named as this certificate. If it does
			// (HAProxy gone meanwhile), the next update adds it to the
			// crt-list as it finds it unlisted.
			a.dropEmpty(ctx, c.path)
		}
		return err
	}
	*committed = append(*committed, c.committedPEM())
	if crtList != "" && !listed[c.path] {
		// New, or a store HAProxy holds that the directory's crt-list
		// does not serve: one a run killed after its "new ssl cert"
		// left behind.
		return a.expect(ctx, "add ssl crt-list "+crtList+" "+c.path, "Success!")
	}
	return nil
}

// dropEmpty takes the empty store an update's "new ssl cert" made out of
// HAProxy's memory again, when nothing was committed to it.
func (a *runtimeAPI) dropEmpty(ctx context.Context, path string) {
	if err := a.expect(ctx, "del ssl cert "+path, "deleted"); err != nil {
		slog.Debug("could not take an empty certificate store out of haproxy", "certificate", path, "err", err)
	}
}

// processID is the id of the HAProxy process that answers the runtime
// API, from "show info"; "" when it cannot be read. A restart changes
// it, and so does a reload, for a new connection: a reload's new worker
// answers new connections, while a session kept open stays on the old
// worker until it ends.
func (a *runtimeAPI) processID(ctx context.Context) string {
	out, err := a.call(ctx, "show info")
	if m := infoPid.FindStringSubmatch(out); err == nil && m != nil {
		return m[1]
	}
	return ""
}

var infoPid = regexp.MustCompile(`(?m)^Pid: *([0-9]+)`)

// restartWait is how long a failed update waits for HAProxy's runtime
// API to answer again, to learn whether HAProxy restarted; tests shorten
// it.
var restartWait = 5 * time.Second

// answering is the id of the process answering a new connection, asked
// again until restartWait has passed; "" when none answered.
func (a *runtimeAPI) answering(ctx context.Context) string {
	a.close()
	deadline := time.Now().Add(restartWait)
	for {
		if pid := a.processID(ctx); pid != "" || !time.Now().Before(deadline) {
			return pid
		}
		select {
		case <-ctx.Done():
			return ""
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// undoFailed sets HAProxy's memory back after an update that failed
// with err, to agree with the files the caller rolls back next: the
// certificates committed, or, when HAProxy restarted or reloaded during
// the update (pid, the process answering at its start, no longer
// answers a new connection), every certificate of the update, in the
// new process. That process loaded each PEM written for the update from
// disk, committed or not, and would otherwise serve certificates the
// files no longer hold, with no error saying which: a new certificate
// (no file before) is taken out of it, the others set back. When the
// runtime API does not answer again, the error says what may have
// happened.
func (a *runtimeAPI) undoFailed(ctx context.Context, pid, dir, crtList string, certs []hotCert, committed []committedPEM, err error) error {
	what := "certificates already committed"
	if pid != "" {
		switch now := a.answering(ctx); {
		case now == "":
			err = fmt.Errorf("%v; HAProxy's runtime API did not answer again within %s (had HAProxy restarted, it would serve the new PEMs until a reload or the next run)", err, restartWait)
		case now != pid:
			if crtList == "" {
				// The update failed before it read the crt-list's name.
				_, crtList, _, _ = a.state(ctx, dir, nil)
			}
			committed = committed[:0]
			for _, c := range certs {
				committed = append(committed, committedPEM{path: c.path, prev: c.prev, isNew: c.prev == nil})
			}
			what = "certificates it loaded from disk"
			err = fmt.Errorf("%v; HAProxy restarted or reloaded during the update (process %s, now %s) and loaded all %d new PEMs from disk", err, pid, now, len(certs))
		}
	}
	if len(committed) == 0 {
		return err
	}
	return a.undoAll(ctx, crtList, committed, what, err)
}

// committedPEM is a certificate an update committed in HAProxy's
// memory, with what to set back if the update fails.
type committedPEM struct {
	path  string
	prev  []byte
	isNew bool
}

// undoAll sets the committed certificates back in HAProxy's memory,
// newest first, after the update failed with err, and returns err with
// what the undo did. The first undo that fails ends the undo: HAProxy's
// memory can no longer be set back through the API (most often its
// socket is gone), and trying the rest would cost two commands, and up
// to a dial timeout, per certificate. The error names that one failure
// and a count, never one line per certificate: it is saved in the
// record of every lineage of the deploy.
func (a *runtimeAPI) undoAll(ctx context.Context, crtList string, committed []committedPEM, what string, err error) error {
	for i := len(committed) - 1; i >= 0; i-- {
		c := committed[i]
		uerr := undoOne(ctx, a, crtList, c.path, c.prev, c.isNew)
		for try := 1; try < 3 && errors.As(uerr, new(*collisionError)); try++ {
			// Another client's transaction got in the way, and was
			// aborted: the same undo again most likely goes through.
			uerr = undoOne(ctx, a, crtList, c.path, c.prev, c.isNew)
		}
		if uerr != nil {
			return fmt.Errorf("%v; and setting HAProxy's memory back failed at %d of the %d %s: %v (reload or restart HAProxy to load the files on disk)", err, len(committed)-i, len(committed), what, uerr)
		}
	}
	return fmt.Errorf("%v; the %d %s were set back in HAProxy's memory", err, len(committed), what)
}

// state is what HAProxy holds for the certificate directory dir: every
// certificate in its memory (known, with a transaction left open in dir
// aborted), the crt-list that loads dir ("" when none does), and the
// certificates that crt-list serves. The crt-list is read only when it
// matters, when one of paths is known: a node joining a fleet adds
// 100,000 certificates HAProxy does not hold, in slices, and would read
// a list growing to 100,000 lines for each.
func (a *runtimeAPI) state(ctx context.Context, dir string, paths []string) (known map[string]bool, crtList string, listed map[string]bool, err error) {
	if known, err = a.loaded(ctx, dir); err != nil {
		return nil, "", nil, err
	}
	lists, err := a.lines(ctx, "show ssl crt-list")
	if err != nil {
		return nil, "", nil, err
	}
	for _, l := range lists {
		if filepath.Clean(l) == dir {
			crtList = l
		}
	}
	listed = map[string]bool{}
	if crtList == "" || !slices.ContainsFunc(paths, func(p string) bool { return known[p] }) {
		return known, crtList, listed, nil
	}
	entries, err := a.lines(ctx, "show ssl crt-list "+crtList)
	if err != nil {
		return nil, "", nil, err
	}
	for _, l := range entries {
		listed[strings.Fields(l)[0]] = true
	}
	return known, crtList, listed, nil
}

// undoOne takes a certificate the update added out of HAProxy's memory
// again, or sets one it replaced back to its previous PEM.
func undoOne(ctx context.Context, api *runtimeAPI, crtList, path string, prev []byte, isNew bool) error {
	if !isNew {
		return api.replace(ctx, path, prev)
	}
	if crtList != "" {
		if err := api.expect(ctx, "del ssl crt-list "+crtList+" "+path, ""); err != nil {
			return err
		}
	}
	return api.expect(ctx, "del ssl cert "+path, "")
}

// loaded is the set of certificates HAProxy holds. A transaction left
// open (by a run killed between its set and its commit, or a set HAProxy
// ran after lbcert gave up on it) is aborted when it is in lbcert's
// directory, dir: HAProxy allows one at a time, so every update would
// fail behind it, and committing it could serve another lineage's
// certificate. One elsewhere is the operator's: an error names it.
func (a *runtimeAPI) loaded(ctx context.Context, dir string) (map[string]bool, error) {
	for try := 1; ; try++ {
		known, foreign, err := a.certificates(ctx, dir)
		if err != nil || foreign == "" {
			return known, err
		}
		// Another client's update in progress: give it a few seconds.
		if try == 25 {
			return nil, fmt.Errorf("HAProxy has a certificate transaction open on %s: commit or abort it ('abort ssl cert %s' on its runtime API)", foreign, foreign)
		}
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// certificates reads "show ssl cert" for loaded: the certificates, and a
// transaction open outside dir, if any; one open in dir is aborted.
func (a *runtimeAPI) certificates(ctx context.Context, dir string) (known map[string]bool, foreign string, err error) {
	lines, err := a.lines(ctx, "show ssl cert")
	if err != nil {
		return nil, "", err
	}
	known = map[string]bool{}
	for _, l := range lines {
		open, ok := strings.CutPrefix(l, "*")
		switch {
		case !ok:
			known[l] = true
		case filepath.Dir(open) != filepath.Clean(dir):
			foreign = open
		default:
			if err := a.expect(ctx, "abort ssl cert "+open, "Transaction aborted"); err != nil {
				return nil, "", err
			}
			if a.ownSets[open] {
				slog.Info("aborted the haproxy certificate transaction of this update's set, whose commit was not made", "certificate", open)
			} else {
				slog.Warn("aborted a haproxy certificate transaction left open", "certificate", open)
			}
		}
	}
	return known, foreign, nil
}

// replace puts pem in HAProxy's memory for the certificate at path: a
// transaction, then its commit. HAProxy keeps one certificate
// transaction at a time, for every client of its runtime API, and a
// transaction that is not committed is aborted, so that none is left
// open to fail every later update. The answer to the set must name
// path: while another client has a transaction open on another
// certificate, HAProxy adds the set to that one ("Transaction updated
// for certificate <the other>"), and the other's commit would then serve
// this PEM, key included, for its certificate: lbcert aborts it.
func (a *runtimeAPI) replace(ctx context.Context, path string, pem []byte) error {
	out, err := a.call(ctx, "set ssl cert "+path+" <<\n"+payload(pem)+"\n")
	switch m := updatedOther.FindStringSubmatch(out); {
	case err != nil:
		// The set may have reached HAProxy before the connection failed.
		return joinAbort(fmt.Errorf("set ssl cert %s: %v", path, err), a.abort(ctx, path))
	case strings.Contains(out, "for certificate "+path+"!"):
	case m != nil:
		return a.taken(ctx, path, m[1])
	default:
		return fmt.Errorf("set ssl cert %s: HAProxy answered %q", path, strings.Join(strings.Fields(out), " "))
	}
	if err := a.expect(ctx, "commit ssl cert "+path, "Success!"); err != nil {
		err = joinAbort(err, a.abort(ctx, path))
		if pemSerial(pem) != "" && a.holds(ctx, path, pem) == nil {
			// The commit went through and its answer was lost: HAProxy
			// serves pem, so an undo must set it back.
			return &collisionError{committed: true, error: err}
		}
		return err
	}
	if err := a.holds(ctx, path, pem); err != nil {
		if !errors.As(err, new(*collisionError)) {
			// HAProxy answered the commit: whatever the check after it
			// could not read (the connection cut), the PEM is in its
			// memory, and an undo must set it back.
			return &collisionError{committed: true, error: err}
		}
		return err
	}
	return nil
}

// holds checks, after a commit, that HAProxy serves pem's certificate
// for path. Between lbcert's set and its commit another client's set
// for another certificate is added to lbcert's transaction ("Transaction
// updated for certificate <path>"): the commit then succeeds, with the
// other client's certificate and key, under path. A pem whose serial
// cannot be read is not checked.
func (a *runtimeAPI) holds(ctx context.Context, path string, pem []byte) error {
	want := pemSerial(pem)
	if want == "" {
		return nil
	}
	out, err := a.call(ctx, "show ssl cert "+path)
	if err != nil {
		return fmt.Errorf("show ssl cert %s: %v", path, err)
	}
	got, ok := servesSerial(out, want)
	if ok {
		return nil
	}
	return &collisionError{committed: true, error: fmt.Errorf("after commit ssl cert %s HAProxy serves serial %s, not %s: another runtime-API client's set went into lbcert's transaction (only one client at a time may update certificates; reload or restart HAProxy to serve the files on disk)", path, got, want)}
}

var showSerial = regexp.MustCompile(`(?m)^Serial: *([0-9A-Fa-f]+)`)

// servesSerial reads the serial out of an answer to "show ssl cert
// <path>" ("none" when it has none) and whether it is want.
func servesSerial(out, want string) (got string, ok bool) {
	m := showSerial.FindStringSubmatch(out)
	if m == nil {
		return "none", false
	}
	return m[1], strings.EqualFold(strings.TrimLeft(m[1], "0"), want)
}

// pemSerial is the serial of the first certificate in pem, in hex with
// no leading zeros, or "" when there is none.
func pemSerial(pem []byte) string {
	for rest := pem; ; {
		var b *pemblock.Block
		if b, rest = pemblock.Decode(rest); b == nil {
			return ""
		}
		if b.Type != "CERTIFICATE" {
			continue
		}
		c, err := x509.ParseCertificate(b.Bytes)
		if err != nil {
			return ""
		}
		return strings.TrimLeft(strings.ToUpper(c.SerialNumber.Text(16)), "0")
	}
}

var (
	updatedOther = regexp.MustCompile(`Transaction updated for certificate (\S+)!`)
	ongoingAbout = regexp.MustCompile(`ongoing transaction is about '([^']+)'`)
)

// abort ends this client's transaction on path, if one is open. When
// the one open is on another certificate, a set of path whose answer was
// lost may have gone into it: it is aborted as taken says.
func (a *runtimeAPI) abort(ctx context.Context, path string) error {
	out, err := a.call(ctx, "abort ssl cert "+path)
	m := ongoingAbout.FindStringSubmatch(out)
	switch {
	case err != nil:
		return fmt.Errorf("abort ssl cert %s: %v (a transaction may be left open: 'show ssl cert' on the runtime API lists it)", path, err)
	case strings.Contains(out, "Transaction aborted") || strings.Contains(out, "No ongoing transaction"):
		return nil
	case m != nil && m[1] != path:
		return a.taken(ctx, path, m[1])
	}
	return fmt.Errorf("abort ssl cert %s: HAProxy answered %q", path, strings.Join(strings.Fields(out), " "))
}

// taken is a set of path that HAProxy added to the transaction another
// client had open on other. That transaction holds path's certificate and
// key now, so lbcert aborts it: the other client's commit fails, which
// it can see, instead of serving the wrong certificate, which it cannot.
func (a *runtimeAPI) taken(ctx context.Context, path, other string) error {
	what := fmt.Sprintf("HAProxy added %s to a certificate transaction another client had open on %s", path, other)
	out, err := a.call(ctx, "abort ssl cert "+other)
	if err == nil && strings.Contains(out, "Transaction aborted") {
		return &collisionError{error: fmt.Errorf("%s; lbcert aborted that transaction, which held this certificate's key (only one client at a time may update certificates on HAProxy's runtime API)", what)}
	}
	if err == nil {
		err = fmt.Errorf("HAProxy answered %q", strings.Join(strings.Fields(out), " "))
	}
	return fmt.Errorf("%s, and aborting it failed: %v; if it was committed, %s serves this certificate: reload or restart HAProxy", what, err, other)
}

// collisionError is another runtime-API client's transaction meeting
// lbcert's: lbcert's set went into theirs (and that one was aborted), or
// theirs into lbcert's (and was committed under lbcert's name). With
// committed, it is also a commit whose answer was lost but which
// HAProxy made, or a commit whose check could not be read: either way,
// HAProxy's memory holds a PEM to set back.
type collisionError struct {
	error
	committed bool // a PEM was committed under lbcert's name
}

func (e *collisionError) Unwrap() error { return e.error }

// joinAbort adds a failed abort to err.
func joinAbort(err, abortErr error) error {
	if abortErr == nil {
		return err
	}
	return fmt.Errorf("%v; and %v", err, abortErr)
}

// payload is a PEM as a runtime-API payload, which ends at the first
// blank line: blank lines are dropped (a previous PEM on disk, written by
// someone else, may have them), and so are carriage returns.
func payload(pem []byte) string { return string(CombinedPEM(pem, nil)) }

// runtimeAPI speaks HAProxy's runtime API: one command per connection
// (the non-interactive mode: HAProxy answers and closes), or, with keep,
// every command on one interactive session. A node joining a fleet
// updates 100,000 certificates over it, three to five commands each,
// and HAProxy handles one command at a time: a connection per command
// made each one a connect, accept and close on both sides, about a
// fifth of the update's time (internal/bench/README.md).
type runtimeAPI struct {
	addr    string // a unix socket path, or host:port
	keep    bool   // the commands share one interactive session
	sess    *cliSession
	ownSets map[string]bool // certificates whose transaction this update's pipelined set opened
}

// cliSession is an interactive session of HAProxy's runtime API (its
// "prompt" mode), where each answer ends with an empty line and the
// prompt "> ".
type cliSession struct {
	conn net.Conn
	r    *bufio.Reader
	used time.Time
}

// sessionIdle is how long a session may stay unused before it is
// dropped for a new one: HAProxy closes a session idle for its "stats
// timeout" (10 s by default), and a command written as it closes would
// be lost with no way to tell whether it ran. promptWait is how long
// the answer to "prompt" may take: HAProxy answers it at once, and a
// socket that does not (not HAProxy's) should fail the update as soon
// as a connection refused would, not after a command's 30 s.
var (
	sessionIdle = time.Second
	promptWait  = 5 * time.Second
)

func (a *runtimeAPI) dial(ctx context.Context) (net.Conn, error) {
	network, addr := "unix", a.addr
	if !strings.HasPrefix(addr, "/") && strings.Contains(addr, ":") {
		network = "tcp"
	}
	dl := net.Dialer{Timeout: 5 * time.Second}
	return dl.DialContext(ctx, network, addr)
}

func (a *runtimeAPI) do(ctx context.Context, cmd string) (string, error) {
	if !strings.HasSuffix(cmd, "\n") {
		cmd += "\n"
	}
	if a.keep {
		return a.inSession(ctx, cmd)
	}
	conn, err := a.dial(ctx)
	if err != nil {
		return "", err
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(30 * time.Second))
	if _, err := io.WriteString(conn, cmd); err != nil {
		return "", err
	}
	if uc, ok := conn.(interface{ CloseWrite() error }); ok {
		uc.CloseWrite()
	}
	out, err := io.ReadAll(bufio.NewReader(conn))
	return strings.TrimSpace(string(out)), err
}

// inSession runs cmd on the session, opening one when there is none. A
// session that fails is closed, and the next command opens another: the
// error is the command's, as a connection's would be.
func (a *runtimeAPI) inSession(ctx context.Context, cmd string) (string, error) {
	s, err := a.session(ctx)
	if err != nil {
		return "", err
	}
	s.conn.SetDeadline(time.Now().Add(30 * time.Second))
	if _, err := io.WriteString(s.conn, cmd); err != nil {
		a.close()
		return "", err
	}
	out, err := s.answer()
	if err != nil {
		a.close()
		return strings.TrimSpace(out), err
	}
	s.used = time.Now()
	return strings.TrimSpace(out), nil
}

// session is the open session, or a new one when there is none or it
// has been idle too long.
func (a *runtimeAPI) session(ctx context.Context) (*cliSession, error) {
	if a.sess != nil && time.Since(a.sess.used) > sessionIdle {
		a.close()
	}
	if a.sess != nil {
		return a.sess, nil
	}
	conn, err := a.dial(ctx)
	if err != nil {
		return nil, err
	}
	a.sess = &cliSession{conn: conn, r: bufio.NewReader(conn)}
	conn.SetDeadline(time.Now().Add(promptWait))
	if _, err := io.WriteString(conn, "prompt\n"); err != nil {
		a.close()
		return nil, err
	}
	if _, err := a.sess.answer(); err != nil {
		a.close()
		return nil, fmt.Errorf("start an interactive session: %w", err)
	}
	return a.sess, nil
}

// answer reads one answer: the lines up to an empty line that the
// prompt follows. The connection closing first is an error (the answer
// may be cut), with what was read.
func (s *cliSession) answer() (string, error) {
	var b strings.Builder
	for {
		line, err := s.r.ReadString('\n')
		if err != nil {
			b.WriteString(line)
			if err == io.EOF {
				err = io.ErrUnexpectedEOF
			}
			return b.String(), err
		}
		if line == "\n" {
			if p, err := s.r.Peek(2); err == nil && string(p) == "> " {
				s.r.Discard(2)
				return b.String(), nil
			}
		}
		b.WriteString(line)
	}
}

// close ends the session, if one is open.
func (a *runtimeAPI) close() {
	if a.sess != nil {
		a.sess.conn.Close()
		a.sess = nil
	}
}

// lockedAnswer is HAProxy's answer while another command holds its
// certificate lock (even a "show ssl cert <path>"): the command was not
// run, and is sent again after a pause, up to lockedTries times (pauses
// from 5 ms doubling to 200 ms, about 4 s in all).
const (
	lockedAnswer = "currently locked"
	lockedTries  = 25
)

// call runs cmd, again while HAProxy answers lockedAnswer.
func (a *runtimeAPI) call(ctx context.Context, cmd string) (string, error) {
	pause := 5 * time.Millisecond
	for try := 1; ; try++ {
		out, err := a.do(ctx, cmd)
		if err != nil || !strings.Contains(out, lockedAnswer) || try == lockedTries {
			return out, err
		}
		select {
		case <-ctx.Done():
			return out, ctx.Err()
		case <-time.After(pause):
		}
		pause = min(2*pause, 200*time.Millisecond)
	}
}

// expect runs cmd and fails unless the answer contains want. The error
// names the command's first word only: payloads hold private keys.
func (a *runtimeAPI) expect(ctx context.Context, cmd, want string) error {
	out, err := a.call(ctx, cmd)
	verb := strings.Join(strings.Fields(cmd)[:min(4, len(strings.Fields(cmd)))], " ")
	if err != nil {
		return fmt.Errorf("%s: %v", verb, err)
	}
	if !strings.Contains(out, want) {
		return fmt.Errorf("%s: HAProxy answered %q", verb, strings.Join(strings.Fields(out), " "))
	}
	return nil
}

// lines runs a "show" command and returns its non-comment lines.
func (a *runtimeAPI) lines(ctx context.Context, cmd string) ([]string, error) {
	out, err := a.call(ctx, cmd)
	if err != nil {
		return nil, fmt.Errorf("%s: %v", cmd, err)
	}
	var res []string
	for _, l := range strings.Split(out, "\n") {
		if l = strings.TrimSpace(l); l != "" && !strings.HasPrefix(l, "#") {
			res = append(res, l)
		}
	}
	return res, nil
}
