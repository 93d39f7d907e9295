package deploy

import (
	"cmp"
	"context"
	"fmt"
	"io"
	"path/filepath"
	"strings"
	"time"
)

// Pipelining the runtime API. HAProxy runs the commands of an
// interactive session one after another, in the order they arrive, and
// reads the next from its input while lbcert reads the answers. Sent one
// at a time, every command waits a round trip: HAProxy idles while
// lbcert reads the answer and writes the next command, and on a loaded
// host each of those waits is a scheduling delay. A node joining a
// fleet sends four or five commands for each of 100,000 certificates,
// and the update of a slice is the part that sets the join's pace. So
// commands go out ahead of their answers, which are checked in order as
// they come, with one exception: a commit.
//
// A "commit ssl cert" is never queued behind another command: it is
// written once every answer before it was read (the commands after it
// may follow it in the same write). HAProxy 2.6 cannot survive a client
// that goes away with a commit queued behind others: the answers of the
// commands before it fail to reach the closed socket, the commit's first
// line of output then fails too, and HAProxy releases the commit half
// done, freeing the new certificate the open transaction still points
// to. The next abort, set or commit of that transaction crashes HAProxy
// (a double free, seen as a segfault in
// ssl_sock_free_cert_key_and_chain_contents), and lbcert's next update
// aborts a transaction it finds open in its directory. A commit that
// nothing unanswered precedes is processed before any of its session's
// output can fail, so a client killed at any moment leaves at most a
// transaction opened by a set, which an abort ends safely. (A test
// program cutting pipelined updates at random crashed HAProxy 2.6.12
// within 50 to 700 cuts; with every commit written after all answers
// before it, 24,000 cuts did not.) So a certificate costs one round
// trip: its commit, its check and the next one's "new" and set, in one
// write.
//
// Only the plain path is pipelined: every answer as expected. The first
// answer that is not (a refused PEM, a lock held by another client, a
// transaction someone else opened) stops the sending; the answers of
// what was already sent are still read; then what HAProxy holds is read
// afresh and every certificate whose answers were not all as expected
// is settled by asking HAProxy (reconcile), and the certificates from
// there on go through the one-command-at-a-time update, which handles
// every such case (retries on a lock, collisions, lost answers). A
// session that breaks is settled the same way, over a new connection: a
// commit that went out and whose answer was lost may have been made, and
// fails the update; a certificate whose commit had not gone out was not
// committed, and goes to the one-at-a-time update with the rest. A set
// that went into another client's transaction (opened outside lbcert's
// directory while the pipeline ran) is the one set that does: its commit
// is not sent, and reconcile aborts that transaction first (taken).

// hotWindow is how many certificates' commands may be in flight at once
// in an update: a certificate's commit and check, and the next one's
// "new" and set, whose commit waits for their answers. addWindow is how
// many crt-list additions go ahead of their answers: each answer is
// short, and the additions far fewer bytes than a socket's buffers hold,
// so neither side ever waits on the other's reading.
const (
	hotWindow = 2
	addWindow = 64
)

// pipelining is off in the tests of the one-command-at-a-time update.
var pipelining = true

// pipeGroup is the commands of one certificate, sent together, and the
// check of each answer.
type pipeGroup struct {
	cmds  []string
	check func(k int, out string) bool // answer k is the expected one
	wrote func(k int)                  // command k is being written (nil: not told)
}

// pipeline sends groups in order over the session, the commands of up
// to window groups ahead of their answers, each commit only once every
// answer before it was read (see above), and reads every answer of what
// it sent. ok[i] is whether every answer of group i was as expected. It
// stops sending at the first answer that is not; sent is how many groups
// were written, whole or in part. err is a broken session (closed
// then): the answers of groups from the one that failed on are unknown.
func (a *runtimeAPI) pipeline(ctx context.Context, groups []pipeGroup, window int) (sent int, ok []bool, err error) {
	ok = make([]bool, len(groups))
	s, err := a.session(ctx)
	if err != nil {
		return 0, ok, err
	}
	fail := func(e error) (int, []bool, error) {
		a.close()
		return sent, ok, e
	}
	type place struct{ g, k int }
	var cmds []place
	for g := range groups {
		for k := range groups[g].cmds {
			cmds = append(cmds, place{g, k})
		}
	}
	cmd := func(p place) string { return groups[p.g].cmds[p.k] }
	// next is the first command not written, read the first not
	// answered: the commands in flight are read up to next.
	next, read, stop, good := 0, 0, false, true
	var out strings.Builder
	for {
		out.Reset()
		for !stop && next < len(cmds) {
			p := cmds[next]
			if read < next && (afterAllAnswers(cmd(p)) || p.g-cmds[read].g >= window) {
				break
			}
			out.WriteString(cmd(p))
			next, sent = next+1, p.g+1 // a write that fails may have gone out in part
			if w := groups[p.g].wrote; w != nil {
				w(p.k)
			}
		}
		if out.Len() > 0 {
			s.conn.SetDeadline(time.Now().Add(30 * time.Second))
			if _, err := io.WriteString(s.conn, out.String()); err != nil {
				return fail(err)
			}
		}
		if read == next {
			break
		}
		p := cmds[read]
		s.conn.SetDeadline(time.Now().Add(30 * time.Second))
		answer, err := s.answer()
		if err != nil {
			return fail(err)
		}
		answer = strings.TrimSpace(answer)
		if !groups[p.g].check(p.k, answer) || strings.Contains(answer, lockedAnswer) {
			good, stop = false, true
		}
		if read++; read == len(cmds) || cmds[read].g != p.g {
			ok[p.g], good = good, true
		}
	}
	s.used = time.Now()
	return sent, ok, nil
}

// afterAllAnswers is a command the pipeline writes only once every
// answer before it was read.
func afterAllAnswers(cmd string) bool { return strings.HasPrefix(cmd, "commit ") }

// hotCert is one certificate of an update over the runtime API.
type hotCert struct {
	path   string
	pem    []byte // what HAProxy is to hold
	prev   []byte // what the PEM held before, to set back on a failure
	serial string // pem's serial, "" when it cannot be read
	isNew  bool   // HAProxy holds no certificate under path yet
}

func (c hotCert) committedPEM() committedPEM {
	return committedPEM{path: c.path, prev: c.prev, isNew: c.isNew}
}

// seen is what a certificate's pipelined answers said, for reconcile.
type seen struct {
	setSent   bool   // its set was written, or may have been in part
	sent      bool   // its commit was written, or may have been in part
	answered  bool   // its commit's answer was read
	committed bool   // and said the commit was made
	into      string // the certificate whose open transaction its set went into, if another's
}

// group is c's commands for the pipeline: "new ssl cert" for a new
// one, its set and commit, and a "show ssl cert" that says HAProxy
// serves c's serial under c's path (holds).
func (c hotCert) group(sn *seen) pipeGroup {
	cmds := []string{
		"set ssl cert " + c.path + " <<\n" + payload(c.pem) + "\n",
		"commit ssl cert " + c.path + "\n",
		"show ssl cert " + c.path + "\n",
	}
	if c.isNew {
		cmds = append([]string{"new ssl cert " + c.path + "\n"}, cmds...)
	}
	base := len(cmds) - 3
	wrote := func(k int) {
		sn.setSent = sn.setSent || k == base
		sn.sent = sn.sent || k-base == 1
	}
	return pipeGroup{cmds: cmds, wrote: wrote, check: func(k int, out string) bool {
		switch k - base {
		case -1:
			return strings.Contains(out, "New empty certificate store")
		case 0:
			if strings.Contains(out, "for certificate "+c.path+"!") {
				return true
			}
			if m := updatedOther.FindStringSubmatch(out); m != nil {
				sn.into = m[1]
			}
			return false
		case 1:
			sn.answered, sn.committed = true, strings.Contains(out, "Success!")
			return sn.committed
		}
		_, ok := servesSerial(out, c.serial)
		return ok || c.serial == ""
	}}
}

// pipelined updates certs through the pipeline and adds what HAProxy
// committed to committed. It returns, in order, the certificates it did
// not settle, for the one-command-at-a-time update: those whose answers
// were not all as expected and that reconcile found not committed, and
// those the pipeline never sent.
func (a *runtimeAPI) pipelined(ctx context.Context, dir string, certs []hotCert, committed *[]committedPEM) ([]hotCert, error) {
	groups := make([]pipeGroup, len(certs))
	seens := make([]seen, len(certs))
	for k, c := range certs {
		groups[k] = c.group(&seens[k])
	}
	sent, ok, perr := a.pipeline(ctx, groups, hotWindow)
	var unsure []int
	for k := range sent {
		if ok[k] {
			*committed = append(*committed, certs[k].committedPEM())
		} else {
			unsure = append(unsure, k)
		}
	}
	if len(unsure) == 0 {
		return certs[sent:], nil
	}
	// A commit HAProxy answered is made, whatever follows: it is set
	// back if the update fails, even when reconcile cannot read HAProxy
	// again (a second connection cut: a review saw HAProxy keep serving
	// such a certificate after the undo said every one was set back).
	for _, k := range unsure {
		if seens[k].committed {
			*committed = append(*committed, certs[k].committedPEM())
		}
	}
	// A transaction reconcile finds open on one of these is this
	// update's own set's: aborting it is no news.
	a.ownSets = map[string]bool{}
	for _, k := range unsure {
		if seens[k].setSent {
			a.ownSets[certs[k].path] = true
		}
	}
	rest, err := a.reconcile(ctx, dir, certs, unsure, seens, perr, committed)
	a.ownSets = nil
	if err != nil {
		return nil, err
	}
	return append(rest, certs[sent:]...), nil
}

// reconcile settles the certificates unsure, whose pipelined answers
// were not all as expected, as the one-command-at-a-time update would
// (replace). A set that went into another client's transaction outside
// dir fails the update: that transaction holds this certificate's key,
// and is aborted (taken). Then any transaction left open in dir is
// aborted (state), and for each certificate:
//   - its commit made: it is committed, and its check is read again
//     (holds); another serial there (another client's set) fails the
//     update, as does a check that cannot be read;
//   - its commit sent and its answer never read (the session broke):
//     HAProxy may have made it, so it counts as committed if HAProxy
//     serves its serial, and the update fails, as on a lost answer;
//   - its set or commit refused, or locked, or its commit not sent
//     (the sending stopped before it, or the session broke before it
//     was written: the set's transaction is aborted with the others):
//     nothing of it was committed; a new one's empty store is taken out
//     again, and it is returned, with the rest, for the one-at-a-time
//     update, which waits out a lock and fails as before on a refusal.
func (a *runtimeAPI) reconcile(ctx context.Context, dir string, certs []hotCert, unsure []int, seens []seen, broke error, committed *[]committedPEM) (rest []hotCert, err error) {
	// unsure[:settled] are settled. When reconcile fails before it has
	// settled one whose commit went out and whose answer was lost (the
	// new connection cut too), HAProxy may hold it: it is set back with
	// the committed ones (setting back one not committed changes
	// nothing).
	settled := 0
	defer func() {
		for _, k := range unsure[settled:] {
			if sn := seens[k]; err != nil && sn.sent && !sn.answered {
				*committed = append(*committed, certs[k].committedPEM())
			}
		}
	}()
	paths := make([]string, len(unsure))
	for j, k := range unsure {
		if into := seens[k].into; into != "" && filepath.Dir(into) != dir {
			return nil, a.taken(ctx, certs[k].path, into)
		}
		paths[j] = certs[k].path
	}
	known, _, _, err := a.state(ctx, dir, paths)
	if err != nil {
		return nil, err
	}
	var lost error
	for j, k := range unsure {
		settled = j
		c, sn := certs[k], seens[k]
		switch {
		case !known[c.path]:
		case sn.committed: // in committed already (pipelined)
			if err := a.holds(ctx, c.path, c.pem); err != nil {
				return nil, err
			}
			continue
		case sn.sent && !sn.answered && broke != nil:
			if a.holds(ctx, c.path, c.pem) == nil {
				*committed = append(*committed, c.committedPEM())
			} else if c.isNew {
				a.dropEmpty(ctx, c.path)
			}
			lost = cmp.Or(lost, fmt.Errorf("commit ssl cert %s: its answer was lost: %v", c.path, broke))
			continue
		case c.isNew:
			if err := a.expect(ctx, "del ssl cert "+c.path, "deleted"); err != nil {
				return nil, err
			}
		}
		rest = append(rest, c)
	}
	settled = len(unsure)
	if lost != nil {
		return nil, lost
	}
	return rest, nil
}

// listAll adds the committed certificates the directory's crt-list does
// not serve (the new ones) to it, pipelined; an add whose answer was not
// "Success!" (the lock held by another client) is sent again, alone.
func (a *runtimeAPI) listAll(ctx context.Context, crtList string, listed map[string]bool, committed []committedPEM) error {
	if crtList == "" {
		return nil
	}
	var adds []string
	for _, c := range committed {
		if !listed[c.path] {
			adds = append(adds, "add ssl crt-list "+crtList+" "+c.path+"\n")
		}
	}
	groups := make([]pipeGroup, len(adds))
	for k, cmd := range adds {
		groups[k] = pipeGroup{cmds: []string{cmd}, check: func(_ int, out string) bool { return strings.Contains(out, "Success!") }}
	}
	sent, ok, err := a.pipeline(ctx, groups, addWindow)
	if err != nil {
		return fmt.Errorf("add ssl crt-list: %v", err)
	}
	for k := range sent {
		if !ok[k] {
			if err := a.expect(ctx, adds[k], "Success!"); err != nil {
				return err
			}
		}
	}
	for _, cmd := range adds[sent:] {
		if err := a.expect(ctx, cmd, "Success!"); err != nil {
			return err
		}
	}
	return nil
}
