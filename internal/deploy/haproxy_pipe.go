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
// fleet sends four commands for each of 100,000 certificates, and the
// update of a slice is the part that sets the join's pace. So the
// commands of up to pipeWindow certificates are in flight at once, and
// their answers are checked in order as they come.
//
// Only the plain path is pipelined: every answer as expected. The first
// answer that is not (a refused PEM, a lock held by another client, a
// transaction someone else opened) stops the sending; the answers of
// what was already sent are still read; then what HAProxy holds is read
// afresh and every certificate whose answers were not all as expected
// is settled by asking HAProxy (reconcile), and the certificates from
// there on go through the one-command-at-a-time update, which handles
// every such case (retries on a lock, collisions, lost answers).
//
// One case costs more pipelined than one at a time: another client
// opening a transaction outside lbcert's directory while the pipeline
// runs. HAProxy adds lbcert's next set to that transaction, and the sets
// already sent behind it too, each replacing the last, up to a window's
// worth; their commits are refused, as they name another certificate.
// Nothing more is sent once that answer is read, and reconcile aborts
// the other transaction before anything else (taken), a millisecond or
// so later than one at a time would. The other client's commit in that
// moment would serve one of lbcert's certificates under its name, as it
// would one at a time; a window of one when such a transaction is seen
// would not help, as one opened before the update is waited out (loaded).

// pipeWindow is how many certificates' commands are sent ahead of their
// answers: enough to keep HAProxy's input full, and far less than a
// socket's buffers hold, so that neither side ever waits on the other's
// reading.
const pipeWindow = 8

// pipelining is off in the tests of the one-command-at-a-time update.
var pipelining = true

// pipeGroup is the commands of one certificate, sent together, and the
// check of each answer.
type pipeGroup struct {
	cmds  []string
	check func(k int, out string) bool // answer k is the expected one
}

// pipeline sends groups in order over the session, up to window groups
// ahead of their answers, and reads every answer of what it sent. ok[i]
// is whether every answer of group i was as expected. It stops sending
// after the first group that was not; sent is how many groups were
// written, whole or in part. err is a broken session (closed then): the
// answers of groups from the one that failed on are unknown.
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
	read, stop := 0, false
	for read < sent || !stop && sent < len(groups) {
		for !stop && sent < len(groups) && sent-read < window {
			s.conn.SetDeadline(time.Now().Add(30 * time.Second))
			sent++ // a write that fails may have gone out in part
			if _, err := io.WriteString(s.conn, strings.Join(groups[sent-1].cmds, "")); err != nil {
				return fail(err)
			}
		}
		g, good := groups[read], true
		for k := range g.cmds {
			s.conn.SetDeadline(time.Now().Add(30 * time.Second))
			out, err := s.answer()
			if err != nil {
				return fail(err)
			}
			out = strings.TrimSpace(out)
			if !g.check(k, out) || strings.Contains(out, lockedAnswer) {
				good = false
			}
		}
		ok[read] = good
		stop = stop || !good
		read++
	}
	s.used = time.Now()
	return sent, ok, nil
}

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
	return pipeGroup{cmds: cmds, check: func(k int, out string) bool {
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
	sent, ok, perr := a.pipeline(ctx, groups, pipeWindow)
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
	rest, err := a.reconcile(ctx, dir, certs, unsure, seens, perr, committed)
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
//   - its commit's answer never read (the session broke): HAProxy may
//     have made it, so it counts as committed if HAProxy serves its
//     serial, and the update fails, as on a lost answer;
//   - its set or commit refused, or locked: nothing of it was
//     committed; a new one's empty store is taken out again, and it is
//     returned, with the rest, for the one-at-a-time update, which
//     waits out a lock and fails as before on a refusal.
func (a *runtimeAPI) reconcile(ctx context.Context, dir string, certs []hotCert, unsure []int, seens []seen, broke error, committed *[]committedPEM) ([]hotCert, error) {
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
	var rest []hotCert
	var lost error
	for _, k := range unsure {
		c, sn := certs[k], seens[k]
		switch {
		case !known[c.path]:
		case sn.committed:
			*committed = append(*committed, c.committedPEM())
			if err := a.holds(ctx, c.path, c.pem); err != nil {
				return nil, err
			}
			continue
		case !sn.answered:
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
	sent, ok, err := a.pipeline(ctx, groups, 8*pipeWindow)
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
