// Package fleet is lbcert's fleet mode: load balancers that share one
// Redis (package fleet/rdb) so that exactly one of them orders each
// name, any of them answers any HTTP-01 token, and private keys leave a
// node only sealed under the fleet's data key.
//
// A node's own state lives in <dir>/fleet/: its age identity (0600, never
// sent anywhere), the fleet it belongs to, the data key wrapped for its
// identity, and its last verified copy of the membership. That copy is
// what rebuilds an emptied Redis (Reseed): an empty Redis never means
// "order everything again", and a Redis that somebody else filled is
// not trusted (see crypto.go).
//
// A fleet may stage rollouts (rollout.go): a new version reaches the
// members one wave at a time. Their invariants are package catalog's
// R1 to R5: no node of a later wave serves a version before every
// earlier wave passed, except by the expiry override (R1); a failed
// check holds the version on every node it has not reached (R2); no
// node serves an expired certificate while a valid one exists (R3);
// the rollout's state survives the loss of Redis (R4); a node that
// joins gets the version its wave may serve (R5). The randomized fleet
// test (internal/e2e, TestFleetRandomFaults) checks R1 and R3 on what
// the load balancers serve while its faults run, and that a held or
// aborted rollout's nodes converge to the version it keeps.
package fleet

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"filippo.io/age"

	"github.com/lbcert/lbcert/internal/fleet/rdb"
	"github.com/lbcert/lbcert/internal/hint"
	"github.com/lbcert/lbcert/internal/store"
)

// Member is one approved node, as the membership records hold it.
type Member struct {
	Node      string    `json:"node"`
	Recipient string    `json:"recipient"` // age1...: the node's public identity
	By        string    `json:"approved_by,omitempty"`
	At        time.Time `json:"approved_at,omitzero"`
	// MAC binds node and recipient under the current data key: a member
	// planted in Redis by someone without the key is never trusted.
	MAC string `json:"mac"`
}

// Epoch is one generation of the data key.
type Epoch struct {
	N     int    `json:"n"`
	KeyID string `json:"key_id"`
	// Link is a MAC of this epoch (and of Removed) under the previous
	// one's key: only a holder of the old key can make a rotation members
	// accept, or tell a node it was removed.
	Link string `json:"link,omitempty"`
	// Removed is the node the rotation took out. Only a node this names
	// takes itself for removed: one that merely finds no key wrapped for
	// it (Redis lost it, or a rebuild from a member's older copy left it
	// out) waits for a member to put it back (putBackLost).
	Removed string `json:"removed,omitempty"`
}

// linked says whether ep was made by a holder of prev, the previous
// epoch's key.
func (ep Epoch) linked(prev []byte, fleetID string) bool {
	parts := []string{"epoch", fleetID, strconv.Itoa(ep.N), ep.KeyID}
	if ep.Removed != "" {
		parts = append(parts, "removed", ep.Removed)
	}
	return prev != nil && macOK(prev, ep.Link, parts...)
}

// NotWrapped is a member that finds no data key wrapped for it under an
// epoch that does not name it removed: Redis lost it. A member that
// holds the node's record puts it back; until then the node serves what
// it has.
type NotWrapped struct {
	Node  string
	Epoch int
}

func (e *NotWrapped) Error() string {
	return fmt.Sprintf("the fleet's data key of epoch %d is not wrapped for node %s in Redis, and no member removed it (Redis lost it); waiting for a member to put it back", e.Epoch, e.Node)
}

// local is <dir>/fleet/state.json.
type local struct {
	Fleet string `json:"fleet_id"`
	Node  string `json:"node"`
	Epoch int    `json:"epoch"` // 0: asked to join, not approved yet
	// Gen is the Redis generation this node last published its disk
	// into: a rebuilt Redis has a new one.
	Gen     string   `json:"redis_gen,omitempty"`
	Epochs  []Epoch  `json:"epochs,omitempty"`
	Members []Member `json:"members,omitempty"`
	// Removed is the epoch from which this node was no longer given the
	// key: it learnt it was removed, and never acts as a member again
	// (nor rebuilds an emptied Redis with the key it still has).
	Removed int `json:"removed_at_epoch,omitempty"`
}

// Node is this host as a member of a fleet: its Redis, identity and keys.
type Node struct {
	Shared *rdb.Shared
	Local  *store.Store
	Name   string
	ID     string // fleet ID

	identity    *age.X25519Identity
	mu          sync.Mutex
	keys        map[int][]byte // data keys by epoch
	epoch       int            // current
	members     []Member
	stMu        sync.Mutex // guards st
	st          local
	roOnce      sync.Once
	ro          *rolloutCache // rollout.go
	resMu       sync.Mutex
	ledgerCache *ledgerCache        // under ledgerMu (ledger.go)
	reserved    map[string][]string // ledger set -> places this process's orders took, oldest first (ledger.go)
	seen        map[string]int      // the agent's copy of seen.json, under seenMu
}

func fleetDir(st *store.Store) string { return filepath.Join(st.Dir, "fleet") }

// Removed is a node that was taken out of its fleet: it is not given
// the current data key, and its agent answers no token.
type Removed struct {
	Node, Fleet, Dir string
	Epoch            int
}

func (e *Removed) Error() string {
	return fmt.Sprintf("node %s is not given the fleet's data key of epoch %d: it was removed from fleet %s", e.Node, e.Epoch, e.Fleet)
}

// HintText makes *Removed a hint.Hinter.
func (e *Removed) HintText() string {
	return "to serve this fleet again, remove " + e.Dir + " and join anew"
}

// NotMember says how to become one.
type NotMember struct{ Dir string }

func (e *NotMember) Error() string {
	return fmt.Sprintf("%s is not a member of a fleet", e.Dir)
}

// HintText makes *NotMember a hint.Hinter.
func (e *NotMember) HintText() string {
	return "on the first node run 'lbcert --redis URL fleet init'; on the others 'lbcert --redis URL fleet join --node NAME', then 'fleet approve' on a member"
}

// CheckMember says whether st's directory has joined a fleet (approved
// or not), without writing anything: commands that need a member refuse
// a directory that is not one before they take its lock, which would
// create it.
func CheckMember(st *store.Store) error {
	_, err := readLocal(st)
	return err
}

// CheckNodeName refuses a --node that cannot name a member.
func CheckNodeName(node string) error { return checkNodeName(node) }

func readLocal(st *store.Store) (*local, error) {
	data, err := os.ReadFile(filepath.Join(fleetDir(st), "state.json"))
	if errors.Is(err, os.ErrNotExist) {
		return nil, &NotMember{Dir: st.Dir}
	}
	if err != nil {
		return nil, err
	}
	var l local
	if err := json.Unmarshal(data, &l); err != nil {
		return nil, fmt.Errorf("%s: %v", filepath.Join(fleetDir(st), "state.json"), err)
	}
	return &l, nil
}

// save writes this node's fleet state after mutate, merged with what
// another process of this node wrote meanwhile (a 'fleet remove' run
// beside a long-running agent, whose copy is older): the epochs are a
// union and only move forward, and the members are those of the newest
// epoch, never an older process's.
func (n *Node) save(mutate func(l *local)) error {
	unlock, err := lockState(n.Local)
	if err != nil {
		return err
	}
	defer unlock()
	disk, derr := readLocal(n.Local)
	n.stMu.Lock() // not n.mu: Refresh holds it while it follows a rotation
	defer n.stMu.Unlock()
	mutate(&n.st)
	if derr == nil {
		seen := map[int]bool{}
		var eps []Epoch
		for _, ep := range append(disk.Epochs, n.st.Epochs...) {
			if !seen[ep.N] {
				seen[ep.N] = true
				eps = append(eps, ep)
			}
		}
		sort.Slice(eps, func(i, j int) bool { return eps[i].N < eps[j].N })
		n.st.Epochs = eps
		if disk.Epoch > n.st.Epoch {
			n.st.Epoch, n.st.Members = disk.Epoch, disk.Members
		}
	}
	return writeLocal(n.Local, &n.st)
}

// lockState takes <dir>/fleet/state.lock: the processes of one node
// write state.json one at a time.
func lockState(st *store.Store) (func(), error) { return lockFleetFile(st, "state.lock") }

// lockFleetFile takes the lock file name under <dir>/fleet/, for the
// processes of one node (an agent, a cron's renew, an operator's issue)
// that edit one file there: it is released by the function returned.
func lockFleetFile(st *store.Store, name string) (func(), error) {
	if err := os.MkdirAll(fleetDir(st), 0o700); err != nil {
		return nil, err
	}
	f, err := os.OpenFile(filepath.Join(fleetDir(st), name), os.O_RDWR|os.O_CREATE|syscall.O_NOFOLLOW, 0o600)
	if err != nil {
		return nil, err
	}
	// Held for a file edit, not a run: one stuck past fleetFileWait (a
	// run stopped with Ctrl-Z inside an edit) is said, not waited on
	// for ever.
	deadline := time.Now().Add(fleetFileWait)
	for {
		err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB)
		if err == nil {
			return func() { f.Close() }, nil
		}
		if err != syscall.EWOULDBLOCK || time.Now().After(deadline) {
			f.Close()
			if err == syscall.EWOULDBLOCK {
				return nil, hint.Wrap(fmt.Errorf("%s has been held by another process for %s", f.Name(), fleetFileWait), "find it with: fuser -v %s (a stopped or hung lbcert, or anything else that locked it), then let it finish or stop it", f.Name())
			}
			return nil, err
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// fleetFileWait bounds the wait for a lock of lockFleetFile.
var fleetFileWait = 30 * time.Second

func writeLocal(st *store.Store, l *local) error {
	if err := os.MkdirAll(fleetDir(st), 0o700); err != nil {
		return err
	}
	data, _ := json.MarshalIndent(l, "", "  ")
	return store.WriteFile(filepath.Join(fleetDir(st), "state.json"), append(data, '\n'), 0o600)
}

// identity loads the node's age identity, making one if asked.
func loadIdentity(st *store.Store, create bool) (*age.X25519Identity, error) {
	path := filepath.Join(fleetDir(st), "identity.txt")
	data, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) && create {
		id, err := age.GenerateX25519Identity()
		if err != nil {
			return nil, err
		}
		if err := os.MkdirAll(fleetDir(st), 0o700); err != nil {
			return nil, err
		}
		if err := store.WriteFile(path, []byte("# lbcert fleet identity: keep it on this node only\n"+id.String()+"\n"), 0o600); err != nil {
			return nil, err
		}
		return id, nil
	}
	if err != nil {
		return nil, err
	}
	ids, err := age.ParseIdentities(bytes.NewReader(data))
	if err != nil || len(ids) != 1 {
		return nil, fmt.Errorf("%s: not one age identity", path)
	}
	x, ok := ids[0].(*age.X25519Identity)
	if !ok {
		return nil, fmt.Errorf("%s: not an X25519 identity", path)
	}
	return x, nil
}

// localKey is the data key of epoch e as this node saved it, wrapped for
// its own identity.
func (n *Node) saveLocalKey(e int, key []byte) error {
	w, err := wrap(key, n.identity.Recipient().String())
	if err != nil {
		return err
	}
	return store.WriteFile(filepath.Join(fleetDir(n.Local), "datakey-"+strconv.Itoa(e)+".age"), w, 0o600)
}

func (n *Node) loadLocalKey(e int) ([]byte, error) {
	w, err := os.ReadFile(filepath.Join(fleetDir(n.Local), "datakey-"+strconv.Itoa(e)+".age"))
	if err != nil {
		return nil, err
	}
	return unwrap(w, n.identity)
}

// Fingerprint is the node's public identity, age1...
func (n *Node) Fingerprint() string { return n.identity.Recipient().String() }

// Epoch is the current data key generation.
func (n *Node) Epoch() int {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.epoch
}

func (n *Node) key(e int) ([]byte, error) {
	n.mu.Lock()
	defer n.mu.Unlock()
	k, ok := n.keys[e]
	if !ok {
		return nil, &NoKey{Epoch: e}
	}
	return k, nil
}

// NoKey is a data key this node never had: an epoch from before it
// joined (a Redis a lagging node rebuilt at an older epoch), or one
// rotated without it.
type NoKey struct{ Epoch int }

func (e *NoKey) Error() string {
	return fmt.Sprintf("no data key for epoch %d on this node (it joined the fleet later, was removed from it, or the key was rotated without it)", e.Epoch)
}

// keyFor is the data key of epoch e, following a rotation that ran
// since this process opened the fleet (a batch started before 'fleet
// remove' finishes under the new key, instead of failing).
func (n *Node) keyFor(ctx context.Context, e int) ([]byte, error) {
	if k, err := n.key(e); err == nil || e <= n.Epoch() {
		return k, err
	}
	if err := n.Refresh(ctx); err != nil {
		return nil, err
	}
	return n.key(e)
}

func (n *Node) current() (int, []byte) {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.epoch, n.keys[n.epoch]
}

func newFleetID() string {
	b := make([]byte, 12)
	rand.Read(b)
	return hex.EncodeToString(b)
}

// Init creates a fleet in an empty Redis with this node as its first
// member, and imports the node's lineages and accounts.
func Init(ctx context.Context, sh *rdb.Shared, st *store.Store, node string) (*Node, error) {
	if err := checkNodeName(node); err != nil {
		return nil, err
	}
	if l, err := readLocal(st); err == nil {
		return nil, hint.Wrap(fmt.Errorf("%s already belongs to fleet %s as node %s", st.Dir, l.Fleet, l.Node), "%s", "a node belongs to one fleet; to start over, remove "+fleetDir(st)+" first")
	}
	if meta, err := sh.HGetAll(ctx, "meta"); err != nil {
		return nil, err
	} else if meta["id"] != "" {
		return nil, hint.Wrap(fmt.Errorf("%s already holds fleet %s", sh.Addr(), meta["id"]), "%s", "join it instead: lbcert --redis URL fleet join --node "+node)
	}
	id, err := loadIdentity(st, true)
	if err != nil {
		return nil, err
	}
	key, err := newDataKey()
	if err != nil {
		return nil, err
	}
	n := &Node{Shared: sh, Local: st, Name: node, ID: newFleetID(), identity: id, keys: map[int][]byte{1: key}, epoch: 1}
	ep := Epoch{N: 1, KeyID: keyID(key)}
	me := n.member(node, id.Recipient().String(), node, key)
	n.members = []Member{me}
	n.st = local{Fleet: n.ID, Node: node, Epoch: 1, Epochs: []Epoch{ep}, Members: n.members}
	n.st.Gen = newFleetID()
	created, err := sh.Create(ctx, "meta", "id", n.ID, "epoch", "1", "gen", n.st.Gen, "created", time.Now().UTC().Format(time.RFC3339), "creator", node)
	if err != nil {
		return nil, err
	}
	if !created {
		return nil, errors.New("another node created a fleet in this Redis at the same moment; join it instead")
	}
	if err := n.writeShared(ctx, ep); err != nil {
		return nil, err
	}
	if err := n.saveLocalKey(1, key); err != nil {
		return nil, err
	}
	if err := writeLocal(st, &n.st); err != nil {
		return nil, err
	}
	return n, nil
}

// member makes a member record MACed under key.
func (n *Node) member(node, recipient, by string, key []byte) Member {
	return Member{Node: node, Recipient: recipient, By: by, At: time.Now().UTC().Truncate(time.Second),
		MAC: mac(key, "member", n.ID, node, recipient)}
}

// writeShared writes the epoch record, every member and their wrapped keys.
func (n *Node) writeShared(ctx context.Context, ep Epoch) error {
	epoch, key := n.current()
	epj, _ := json.Marshal(ep)
	if err := n.Shared.HSet(ctx, "epochs", strconv.Itoa(ep.N), string(epj)); err != nil {
		return err
	}
	for _, m := range n.members {
		if err := n.putMember(ctx, epoch, key, m); err != nil {
			return err
		}
	}
	return nil
}

// putMember writes m's data key of epoch (key, wrapped for m), then m's
// record: a record in Redis always has its key beside it.
func (n *Node) putMember(ctx context.Context, epoch int, key []byte, m Member) error {
	w, err := wrap(key, m.Recipient)
	if err != nil {
		return err
	}
	mj, _ := json.Marshal(m)
	if err := n.Shared.HSet(ctx, "wrapped:"+strconv.Itoa(epoch), m.Node, string(w)); err != nil {
		return err
	}
	return n.Shared.HSet(ctx, "members", m.Node, string(mj))
}

// Join asks to join the fleet in Redis: it makes this node's identity
// and leaves a join request for a member to approve.
func Join(ctx context.Context, sh *rdb.Shared, st *store.Store, node string) (fingerprint, fleetID string, err error) {
	if err := checkNodeName(node); err != nil {
		return "", "", err
	}
	meta, err := sh.HGetAll(ctx, "meta")
	if err != nil {
		return "", "", err
	}
	if meta["id"] == "" {
		return "", "", hint.Wrap(fmt.Errorf("%s holds no fleet", sh.Addr()), "create it on the first node with 'lbcert --redis URL fleet init'")
	}
	if l, err := readLocal(st); err == nil && (l.Fleet != meta["id"] || l.Node != node) {
		return "", "", fmt.Errorf("%s already belongs to fleet %s as node %s", st.Dir, l.Fleet, l.Node)
	} else if err == nil && l.Epoch > 0 {
		if l.Removed > 0 {
			return "", "", hint.Wrap(fmt.Errorf("node %s was removed from fleet %s", node, l.Fleet), "%s", "to join again, move "+fleetDir(st)+" aside first (it holds the identity the fleet no longer trusts), then run join")
		}
		return "", "", fmt.Errorf("node %s is already an approved member of fleet %s", node, l.Fleet)
	}
	if m, _ := sh.HGet(ctx, "members", node); m != "" {
		return "", "", hint.Wrap(fmt.Errorf("fleet %s already has a member named %s", meta["id"], node), "%s", "pick another --node, or 'fleet remove "+node+"' on a member first")
	}
	id, err := loadIdentity(st, true)
	if err != nil {
		return "", "", err
	}
	fp := id.Recipient().String()
	host, _ := os.Hostname()
	req, _ := json.Marshal(map[string]string{"recipient": fp, "host": host, "at": time.Now().UTC().Format(time.RFC3339)})
	if err := sh.HSet(ctx, "join", node, string(req)); err != nil {
		return "", "", err
	}
	if err := writeLocal(st, &local{Fleet: meta["id"], Node: node}); err != nil {
		return "", "", err
	}
	return fp, meta["id"], nil
}

// Open loads this node's fleet membership and keys, checking every
// record it trusts, and re-seeds Redis from this node when Redis holds
// no fleet at all.
func Open(ctx context.Context, sh *rdb.Shared, st *store.Store) (*Node, error) {
	l, err := readLocal(st)
	if err != nil {
		return nil, err
	}
	id, err := loadIdentity(st, false)
	if err != nil {
		return nil, err
	}
	n := &Node{Shared: sh, Local: st, Name: l.Node, ID: l.Fleet, identity: id, keys: map[int][]byte{}, st: *l, epoch: l.Epoch}
	if l.Removed > 0 {
		return nil, &Removed{Node: l.Node, Fleet: l.Fleet, Epoch: l.Removed, Dir: fleetDir(st)}
	}
	meta, err := sh.HGetAll(ctx, "meta")
	if err != nil {
		return nil, err
	}
	if meta["id"] == "" {
		if l.Epoch == 0 {
			return nil, fmt.Errorf("%s holds no fleet, and node %s was never approved, so it cannot rebuild it", sh.Addr(), l.Node)
		}
		if err := n.loadLocalKeys(); err != nil {
			return nil, err
		}
		n.members = l.Members
		slog.Warn("the fleet's Redis is empty; rebuilding it from this node", "redis", sh.Addr(), "fleet", n.ID)
		if err := n.Reseed(ctx); err != nil {
			return nil, err
		}
		return n, nil
	}
	if meta["id"] != l.Fleet {
		return nil, hint.Wrap(fmt.Errorf("%s holds fleet %s, but this node belongs to fleet %s; refusing to trust it", sh.Addr(), meta["id"], l.Fleet),
			"point --redis at this node's fleet; a Redis that lost the fleet is rebuilt by its members only when it is empty")
	}
	cur, _ := strconv.Atoi(meta["epoch"])
	if l.Epoch == 0 {
		return n, n.openApproved(ctx, cur)
	}
	if err := n.openKnown(ctx, cur); err != nil {
		return nil, err
	}
	if err := n.loadMembers(ctx, false); err != nil {
		return nil, err
	}
	// A newly approved node adds the certificates it had before joining;
	// every member adds its own after another rebuilt Redis.
	if err := n.catchUp(ctx); err != nil {
		return nil, err
	}
	return n, nil
}

// openApproved opens the fleet for a node approved since it asked to
// join, the fleet at epoch cur: trust on first use (the operator checked
// the fingerprint when approving), and what the fleet holds wins over
// what this node held before it joined.
func (n *Node) openApproved(ctx context.Context, cur int) error {
	w, err := n.Shared.HGet(ctx, "wrapped:"+strconv.Itoa(cur), n.Name)
	if err != nil {
		return err
	}
	if w == "" {
		return hint.Wrap(fmt.Errorf("node %s has asked to join fleet %s but is not approved yet", n.Name, n.ID), "on a member run: lbcert --redis URL fleet approve %s --fingerprint %s", n.Name, n.identity.Recipient())
	}
	key, err := unwrap([]byte(w), n.identity)
	if err != nil {
		return fmt.Errorf("the data key wrapped for node %s does not open with its identity: %v", n.Name, err)
	}
	n.keys[cur], n.epoch = key, cur
	if err := n.pin(ctx, cur); err != nil {
		return err
	}
	if err := n.loadMembers(ctx, false); err != nil {
		return err
	}
	return n.importJoined(ctx)
}

// openKnown opens the fleet, at epoch cur, for a member that holds a
// data key: a Redis at an older epoch (a restored backup, or a removed
// node's rebuild) gets this node's newer membership back (invariant
// I5); a newer epoch is followed.
func (n *Node) openKnown(ctx context.Context, cur int) error {
	if err := n.loadLocalKeys(); err != nil {
		return err
	}
	switch {
	case cur < n.st.Epoch:
		if err := n.loadMembersFromDisk(); err != nil {
			return err
		}
		return n.repair(ctx)
	case cur > n.st.Epoch:
		return n.follow(ctx, cur)
	}
	return nil
}

// loadMembersFromDisk takes the membership from this node's verified
// copy, as a rebuild does.
func (n *Node) loadMembersFromDisk() error {
	n.mu.Lock()
	defer n.mu.Unlock()
	n.members = append([]Member(nil), n.st.Members...)
	return nil
}

func (n *Node) loadLocalKeys() error {
	for _, ep := range n.st.Epochs {
		k, err := n.loadLocalKey(ep.N)
		if err != nil {
			continue // an old epoch may have been pruned
		}
		if keyID(k) != ep.KeyID {
			return fmt.Errorf("%s: data key of epoch %d does not match its id", fleetDir(n.Local), ep.N)
		}
		n.keys[ep.N] = k
	}
	if _, ok := n.keys[n.st.Epoch]; !ok {
		return fmt.Errorf("%s: the data key of epoch %d is missing", fleetDir(n.Local), n.st.Epoch)
	}
	return nil
}

// Refresh follows a data key rotation made since this node opened the
// fleet (a long-running agent), so it can open what is sealed under the
// new key: one another process of this node made or followed first,
// from the node's disk (adoptDisk), then one Redis names.
func (n *Node) Refresh(ctx context.Context) error {
	if err := n.adoptDisk(); err != nil {
		return err
	}
	raw, err := n.Shared.HGet(ctx, "meta", "epoch")
	if err != nil {
		return err
	}
	cur, _ := strconv.Atoi(raw)
	if cur <= n.Epoch() {
		return nil
	}
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.follow(ctx, cur)
}

// adoptDisk takes a newer epoch another process of this node saved (a
// 'fleet remove' run beside the agent, which rotated the key): its key
// and the members under it, from the node's disk. Without it, an agent
// that had not followed that rotation before Redis lost it would go on
// under the older key, which the removed node holds, and would not see
// that a Redis the removed node rebuilt is older than the fleet.
func (n *Node) adoptDisk() error {
	disk, err := readLocal(n.Local)
	if err != nil || disk.Epoch <= n.Epoch() || disk.Removed > 0 {
		return err // a removal another process learnt: Refresh finds it too
	}
	i := slices.IndexFunc(disk.Epochs, func(ep Epoch) bool { return ep.N == disk.Epoch })
	key, err := n.loadLocalKey(disk.Epoch)
	if i < 0 || err != nil || keyID(key) != disk.Epochs[i].KeyID {
		return fmt.Errorf("%s: the data key of epoch %d does not match its record", fleetDir(n.Local), disk.Epoch)
	}
	n.mu.Lock()
	n.keys[disk.Epoch], n.epoch, n.members = key, disk.Epoch, slices.Clone(disk.Members)
	n.mu.Unlock()
	return n.save(func(*local) {}) // save merges the newer epoch and members into this process's copy
}

// follow accepts the rotations from this node's epoch up to cur, each
// only if it is linked to the key before it.
func (n *Node) follow(ctx context.Context, cur int) error {
	eps, err := n.Shared.HGetAll(ctx, "epochs")
	if err != nil {
		return err
	}
	for e := n.epoch + 1; e <= cur; e++ {
		var ep Epoch
		if err := json.Unmarshal([]byte(eps[strconv.Itoa(e)]), &ep); err != nil {
			return fmt.Errorf("fleet %s: epoch %d has no valid record", n.ID, e)
		}
		// The link first: only a rotation a holder of the previous key
		// made can tell this node it was removed (a record planted in
		// Redis by anyone else must not lock a member out for good).
		prev := n.keys[e-1]
		if !ep.linked(prev, n.ID) {
			return fmt.Errorf("fleet %s: epoch %d is not linked to epoch %d's key; refusing a data key no member made", n.ID, e, e-1)
		}
		w, err := n.Shared.HGet(ctx, "wrapped:"+strconv.Itoa(e), n.Name)
		if err != nil {
			return err
		}
		if w == "" && ep.Removed != n.Name {
			return &NotWrapped{Node: n.Name, Epoch: e}
		}
		if w == "" {
			n.save(func(l *local) { l.Removed = e })
			return &Removed{Node: n.Name, Fleet: n.ID, Epoch: e, Dir: fleetDir(n.Local)}
		}
		key, err := unwrap([]byte(w), n.identity)
		if err != nil {
			return fmt.Errorf("epoch %d: %v", e, err)
		}
		if keyID(key) != ep.KeyID {
			return fmt.Errorf("fleet %s: epoch %d's key does not match its record; refusing it", n.ID, e)
		}
		n.keys[e] = key
		n.epoch = e
		if err := n.pin(ctx, e); err != nil {
			return err
		}
	}
	return nil
}

// pin saves the key of epoch e and e's record locally.
func (n *Node) pin(ctx context.Context, e int) error {
	key := n.keys[e]
	if err := n.saveLocalKey(e, key); err != nil {
		return err
	}
	eps, err := n.Shared.HGetAll(ctx, "epochs")
	if err != nil {
		return err
	}
	var ep Epoch
	json.Unmarshal([]byte(eps[strconv.Itoa(e)]), &ep)
	if ep.KeyID != keyID(key) {
		return fmt.Errorf("fleet %s: epoch %d's record does not match its key", n.ID, e)
	}
	// The members as of the new key, in the same write: a copy on disk
	// of epoch e with the members of an older key (the process stopped
	// between the two) verifies no member, and could not rebuild the
	// membership after a Redis loss.
	raw, err := n.Shared.HGetAll(ctx, "members")
	if err != nil {
		return err
	}
	ms := verifiedMembers(raw, key, n.ID)
	ms = append(ms, n.carried(ep, key, ms)...)
	sort.Slice(ms, func(i, j int) bool { return ms[i].Node < ms[j].Node })
	listed := slices.ContainsFunc(ms, func(m Member) bool { return m.Node == n.Name })
	if listed {
		n.members = ms
	}
	return n.save(func(l *local) {
		l.Epoch = max(l.Epoch, e)
		l.Epochs = append(l.Epochs, ep)
		if listed { // as loadMembers: a list without this node is not kept
			l.Members = ms
		}
	})
}

// carried are the members of this node's copy under the previous epoch
// that the rotation to ep (key) neither removed nor lists: the node
// that rotated had an older copy (it rebuilt Redis from it, or Redis
// had lost their records). Only a removal takes a member out, so they
// are members under ep too: their records are made again under key,
// and the next loadMembers puts them and their wrapped keys into Redis
// (putBackLost). The caller holds n.mu.
func (n *Node) carried(ep Epoch, key []byte, listed []Member) []Member {
	prev := n.keys[ep.N-1]
	if ep.Removed == "" || prev == nil {
		return nil
	}
	var out []Member
	for _, m := range n.copyMembers() {
		if m.Node == ep.Removed || slices.ContainsFunc(listed, func(l Member) bool { return l.Node == m.Node }) ||
			!macOK(prev, m.MAC, "member", n.ID, m.Node, m.Recipient) {
			continue
		}
		m.MAC = mac(key, "member", n.ID, m.Node, m.Recipient)
		out = append(out, m)
	}
	return out
}

// loadMembers reads the members whose records verify under the current
// key, puts back the records Redis lost (putBackLost), and keeps a copy
// on disk for re-seeding. held says the caller holds the membership
// lock.
func (n *Node) loadMembers(ctx context.Context, held bool) error {
	raw, err := n.Shared.HGetAll(ctx, "members")
	if err != nil {
		return err
	}
	if len(raw) == 0 {
		// An emptied Redis (FLUSHALL, before the rebuild): the copy on
		// disk is what rebuilds it, so it must not be emptied too.
		return nil
	}
	epoch, key := n.current()
	wrapped, err := n.Shared.HGetAll(ctx, "wrapped:"+strconv.Itoa(epoch))
	if err != nil {
		return err
	}
	ms := verifiedMembers(raw, key, n.ID)
	if lost := n.lostMembers(ms, wrapped, key); len(lost) > 0 {
		if ms, err = n.putBackLost(ctx, held); err != nil {
			return err
		}
	}
	if !slices.ContainsFunc(ms, func(m Member) bool { return m.Node == n.Name }) {
		// Under this node's key its own record always verifies: Redis
		// holds another epoch's records, or lost the writes and this
		// node could not put them back. The verified copy stays what it
		// was: it is what puts the membership back (repair).
		slog.Warn("the fleet's member records in Redis do not list this node under its key; keeping its verified copy", "node", n.Name, "epoch", n.Epoch())
		return nil
	}
	n.mu.Lock()
	n.members = ms
	n.mu.Unlock()
	if !membersEqual(ms, n.copyMembers()) {
		return n.save(func(l *local) { l.Members = ms })
	}
	return nil
}

// copyMembers is this node's verified copy of the members, as saved.
func (n *Node) copyMembers() []Member {
	n.stMu.Lock()
	defer n.stMu.Unlock()
	return slices.Clone(n.st.Members)
}

// lostMembers are the members of this node's verified copy that hold
// key and that ms (what Redis lists) lacks, or whose wrapped key
// (wrapped: node -> key of this epoch) Redis lacks.
func (n *Node) lostMembers(ms []Member, wrapped map[string]string, key []byte) []Member {
	var lost []Member
	for _, m := range n.copyMembers() {
		if !macOK(key, m.MAC, "member", n.ID, m.Node, m.Recipient) {
			continue
		}
		if wrapped[m.Node] == "" || !slices.ContainsFunc(ms, func(r Member) bool { return r.Node == m.Node }) {
			lost = append(lost, m)
		}
	}
	return lost
}

// putBackLost writes back the member records (and wrapped keys) of the
// current epoch that Redis lost and this node's verified copy holds,
// under the membership lock, and returns the members Redis then lists.
//
// Redis loses a record without the membership changing: a rebuild from
// a member whose copy predates the latest approval, a restart from an
// older snapshot, a failover that dropped the last writes. Left out,
// the member would get no key at the next rotation: removed without
// anyone asking. Putting it back cannot readmit a removed node (I5):
// every removal rotates the key, and a record verifies only under the
// key of the epoch whose members approved it; a rotation made meanwhile
// is seen under the lock and nothing is written.
func (n *Node) putBackLost(ctx context.Context, held bool) ([]Member, error) {
	var ms []Member
	put := func() error {
		cur, err := n.Shared.HGet(ctx, "meta", "epoch")
		if err != nil {
			return err
		}
		epoch, key := n.current()
		raw, err := n.Shared.HGetAll(ctx, "members")
		if err != nil {
			return err
		}
		ms = verifiedMembers(raw, key, n.ID)
		if cur != strconv.Itoa(epoch) {
			return nil // rotated meanwhile (Refresh follows), or a rebuild under way
		}
		wrapped, err := n.Shared.HGetAll(ctx, "wrapped:"+cur)
		if err != nil {
			return err
		}
		lost := n.lostMembers(ms, wrapped, key)
		for _, m := range lost {
			if err := n.putMember(ctx, epoch, key, m); err != nil {
				return err
			}
			if !slices.ContainsFunc(ms, func(r Member) bool { return r.Node == m.Node }) {
				ms = append(ms, m)
			}
		}
		if len(lost) > 0 {
			slog.Warn("the fleet's Redis had lost member records (a rebuild from an older copy, an older snapshot or a failover); put back this node's copy of them", "nodes", memberNames(lost), "epoch", epoch)
		}
		sort.Slice(ms, func(i, j int) bool { return ms[i].Node < ms[j].Node })
		return nil
	}
	if held {
		return ms, put()
	}
	return ms, n.locked(ctx, put)
}

func memberNames(ms []Member) []string {
	var s []string
	for _, m := range ms {
		s = append(s, m.Node)
	}
	return s
}

// verifiedMembers are the member records (node -> JSON) that verify
// under key, sorted by node.
func verifiedMembers(raw map[string]string, key []byte, fleetID string) []Member {
	var ms []Member
	for node, j := range raw {
		var m Member
		if json.Unmarshal([]byte(j), &m) != nil || m.Node != node || !macOK(key, m.MAC, "member", fleetID, m.Node, m.Recipient) {
			slog.Warn("ignoring a fleet member record that does not verify under the fleet's key", "node", node)
			continue
		}
		ms = append(ms, m)
	}
	sort.Slice(ms, func(i, j int) bool { return ms[i].Node < ms[j].Node })
	return ms
}

func membersEqual(a, b []Member) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

// Members are the verified members.
func (n *Node) Members() []Member {
	n.mu.Lock()
	defer n.mu.Unlock()
	return append([]Member(nil), n.members...)
}

// Approve lets node read the fleet's keys, if its join request carries
// fingerprint: an operator who read the fingerprint on the new node
// itself can be sure the request came from there.
func (n *Node) Approve(ctx context.Context, node, fingerprint string) error {
	return n.withMembership(ctx, func() error { return n.approve(ctx, node, fingerprint) })
}

func (n *Node) approve(ctx context.Context, node, fingerprint string) error {
	raw, err := n.Shared.HGet(ctx, "join", node)
	if err != nil {
		return err
	}
	if checkNodeName(node) != nil {
		return fmt.Errorf("%q cannot name a node: a node's name has only letters, digits, '-', '_' and '.'", node)
	}
	if raw == "" && slices.ContainsFunc(n.Members(), func(m Member) bool { return m.Node == node }) {
		return fmt.Errorf("%s is already a member of fleet %s", node, n.ID)
	}
	if raw == "" {
		return hint.Wrap(fmt.Errorf("fleet %s has no join request from %s", n.ID, node), "%s", "run 'lbcert --redis URL fleet join --node "+node+"' on that node first")
	}
	var req struct{ Recipient string }
	json.Unmarshal([]byte(raw), &req)
	if req.Recipient != fingerprint {
		return hint.Wrap(fmt.Errorf("refusing: %s asked to join with fingerprint %s, not %s", node, req.Recipient, fingerprint),
			"read the fingerprint on the new node itself ('lbcert fleet join' prints it); a different one means the request did not come from there")
	}
	if _, err := age.ParseX25519Recipient(fingerprint); err != nil {
		return fmt.Errorf("fingerprint %q: %v", fingerprint, err)
	}
	epoch, key := n.current()
	m := n.member(node, fingerprint, n.Name, key)
	w, err := wrap(key, fingerprint)
	if err != nil {
		return err
	}
	mj, _ := json.Marshal(m)
	if err := n.Shared.HSet(ctx, "wrapped:"+strconv.Itoa(epoch), node, string(w)); err != nil {
		return err
	}
	if err := n.Shared.HSet(ctx, "members", node, string(mj)); err != nil {
		return err
	}
	if err := n.Shared.HDel(ctx, "join", node); err != nil {
		return err
	}
	return n.loadMembers(ctx, true)
}

// Remove takes node out of the fleet: its membership and wrapped keys
// go, the data key is rotated and every sealed key re-sealed under the
// new one, so node can open nothing published afterwards. Its key of the
// last epoch it was a member of stays: a node that had not followed that
// epoch yet (a removal of another node just before) can follow it to the
// new one, whose record names it removed, and stop; without it, it took
// the missing key for one Redis lost and went on answering tokens
// (torture seed 5: I5). Nothing stays sealed under that epoch.
func (n *Node) Remove(ctx context.Context, node string) (resealed int, err error) {
	err = n.withMembership(ctx, func() error {
		resealed, err = n.remove(ctx, node)
		return err
	})
	return resealed, err
}

func (n *Node) remove(ctx context.Context, node string) (resealed int, err error) {
	if node == n.Name {
		return 0, errors.New("a node cannot remove itself: run 'fleet remove' on another member")
	}
	found := false
	var keep []Member
	for _, m := range n.Members() {
		if m.Node == node {
			found = true
			continue
		}
		keep = append(keep, m)
	}
	if !found {
		return 0, hint.Wrap(fmt.Errorf("fleet %s has no member %q", n.ID, node), "%s", "'lbcert --redis URL fleet status' lists the members")
	}
	// Every sealed key must open before anything changes: a rotation that
	// stopped half-way on a bundle moved or tampered with would leave
	// keys sealed under two epochs and a removed node still listed.
	if err := n.CheckBundles(ctx); err != nil {
		return 0, err
	}
	oldEpoch, oldKey := n.current()
	newKey, err := newDataKey()
	if err != nil {
		return 0, err
	}
	e := oldEpoch + 1
	ep := Epoch{N: e, KeyID: keyID(newKey)}
	ep.Removed = node
	ep.Link = mac(oldKey, "epoch", n.ID, strconv.Itoa(e), ep.KeyID, "removed", node)
	n.mu.Lock()
	n.keys[e], n.epoch = newKey, e
	for i := range keep {
		keep[i].MAC = mac(newKey, "member", n.ID, keep[i].Node, keep[i].Recipient)
	}
	n.members = keep
	n.mu.Unlock()
	// Order matters to readers that run meanwhile: the removed node's
	// record and keys go first; the new epoch's wrapped keys exist
	// before anything is sealed under it; meta names the new epoch last.
	if err := n.Shared.HDel(ctx, "members", node); err != nil {
		return 0, err
	}
	for i := 1; i < oldEpoch; i++ {
		if err := n.Shared.HDel(ctx, "wrapped:"+strconv.Itoa(i), node); err != nil {
			return 0, err
		}
	}
	if err := n.writeShared(ctx, ep); err != nil {
		return 0, err
	}
	if err := n.saveLocalKey(e, newKey); err != nil {
		return 0, err
	}
	if err := n.save(func(l *local) { l.Epoch, l.Epochs, l.Members = e, append(l.Epochs, ep), keep }); err != nil {
		return 0, err
	}
	// The new epoch is the fleet's before anything is re-sealed: from
	// here on Redis refuses a key sealed under the old one (invariant
	// I5), so a run that opened the fleet earlier re-seals under the new
	// key at its publish, and nothing it publishes can slip past the
	// re-sealing below.
	if err := n.Shared.NameEpoch(ctx, e); err != nil {
		return 0, err
	}
	return n.resealAll(ctx)
}

// CheckBundles opens every bundle's sealed key, and says which do not.
func (n *Node) CheckBundles(ctx context.Context) error {
	names, err := n.Shared.Names(ctx)
	if err != nil {
		return err
	}
	var bad []string
	for _, name := range names {
		b, err := n.Shared.Bundle(ctx, name)
		if errors.Is(err, rdb.ErrNoBundle) {
			continue
		}
		if err != nil {
			return err
		}
		if _, err := n.openAnyEpoch(b); err != nil {
			bad = append(bad, name)
		}
	}
	if len(bad) > 0 {
		return hint.Wrap(fmt.Errorf("refusing to rotate the data key: the sealed key of %s does not open (moved from another name or fleet, or tampered with)", strings.Join(bad, ", ")),
			"renew those names with 'renew --force --name NAME' on a member, or delete them, then run this again")
	}
	return nil
}

// resealAll re-seals every bundle's and account's key under the current
// data key.
func (n *Node) resealAll(ctx context.Context) (int, error) { return n.reseal(ctx, false) }

// reseal re-seals every bundle and account key under the current data
// key; with dropStrangers (a repair after a removed node rebuilt Redis)
// a bundle under an older key that no current member published is
// dropped instead, and the members give their own copies back.
func (n *Node) reseal(ctx context.Context, dropStrangers bool) (int, error) {
	epoch, key := n.current()
	names, err := n.Shared.Names(ctx)
	if err != nil {
		return 0, err
	}
	count, err := n.resealBundles(ctx, names, n.Shared.Bundle, n.Shared.ResealKey, dropStrangers, n.Shared.DropBundle)
	if err != nil {
		return count, err
	}
	prevs, err := n.resealPrevs(ctx, dropStrangers)
	count += prevs
	if err != nil {
		return count, err
	}
	accts, err := n.Shared.Accounts(ctx)
	if err != nil {
		return count, err
	}
	for _, a := range accts {
		done, err := n.resealAccount(ctx, a[0], a[1], epoch, key)
		if err != nil {
			return count, err
		}
		if done {
			count++
		}
	}
	return count, nil
}

// resealAccount re-seals the fleet's account at server for email under
// key (epoch's) when it is under an older one. An older key this node
// never had (it joined after it) is not needed: its own copy of the
// account (SyncAccounts) is the same account.
func (n *Node) resealAccount(ctx context.Context, server, email string, epoch int, key []byte) (bool, error) {
	sealedKey, _, e, err := n.Shared.Account(ctx, server, email)
	if err != nil || e == epoch || len(sealedKey) == 0 {
		return false, err
	}
	ad := accountAD(n.ID, server, email)
	var pem []byte
	old, err := n.key(e)
	switch {
	case errors.As(err, new(*NoKey)):
		if pem, _, err = n.Local.ReadAccount(server, email); err != nil || len(pem) == 0 {
			return false, fmt.Errorf("re-seal the account %s at %s: %w (and no copy of it on this node)", email, server, &NoKey{Epoch: e})
		}
	case err != nil:
		return false, err
	default:
		if pem, err = open(old, ad, sealedKey); err != nil {
			return false, fmt.Errorf("re-seal the account %s at %s: %v", email, server, err)
		}
	}
	s, err := seal(key, ad, pem)
	if err != nil {
		return false, err
	}
	return true, n.Shared.SetAccountKeyKeepReg(ctx, server, email, epoch, s)
}

// resealBundles re-seals the key of each bundle read of names that is
// under an older data key, with write; with dropStrangers (a repair
// after a removed node rebuilt Redis), one that no current member
// published is dropped instead, and the members give their own copies
// back.
func (n *Node) resealBundles(ctx context.Context, names []string, read func(context.Context, string) (*rdb.Bundle, error),
	write func(ctx context.Context, name string, version, epoch int, sealed []byte) (bool, error),
	dropStrangers bool, drop func(context.Context, string) error) (int, error) {
	epoch, key := n.current()
	count := 0
	for _, name := range names {
		b, err := read(ctx, name)
		if errors.Is(err, rdb.ErrNoBundle) {
			continue
		}
		if err != nil {
			return count, err
		}
		if b.Epoch == epoch {
			continue
		}
		if dropStrangers && !n.sealedByMember(b) {
			slog.Warn("dropping a certificate sealed by a node that is not a member; the members give theirs back", "name", name, "version", b.Version, "node", b.Node)
			if err := drop(ctx, name); err != nil {
				return count, err
			}
			continue
		}
		pem, err := n.openAnyEpoch(b)
		if dropStrangers && errors.As(err, new(*NoKey)) {
			// A repair by a node that joined after that key: the bundle
			// must not stay under it (a removed node may hold it), and
			// the members that serve it give it back under the current
			// key (giveBack).
			slog.Warn("dropping a certificate sealed under a data key from before this node joined; the members give theirs back", "name", name, "version", b.Version, "epoch", b.Epoch)
			if err := drop(ctx, name); err != nil {
				return count, err
			}
			continue
		}
		if err != nil {
			return count, fmt.Errorf("re-seal %s: %v", name, err)
		}
		sealed, err := seal(key, bundleAD(n.ID, name, b.Version), pem)
		if err != nil {
			return count, err
		}
		if ok, err := write(ctx, name, b.Version, epoch, sealed); err != nil {
			return count, err
		} else if ok {
			count++
		}
	}
	return count, nil
}

// SealBundleKey seals a certificate's private key for publishing.
func (n *Node) SealBundleKey(name string, version int, pem []byte) (epoch int, sealed []byte, err error) {
	epoch, key := n.current()
	sealed, err = seal(key, bundleAD(n.ID, name, version), pem)
	return epoch, sealed, err
}

// OpenBundleKey opens a bundle's private key, for installing it: one
// sealed under an older data key than this node's is not opened (a
// re-seal is on its way, or a removed node sealed it).
func (n *Node) OpenBundleKey(ctx context.Context, b *rdb.Bundle) ([]byte, error) {
	if b.Epoch < n.Epoch() {
		return nil, fmt.Errorf("%s version %d: %w", b.Name, b.Version, errOlderKey)
	}
	key, err := n.keyFor(ctx, b.Epoch)
	if err != nil {
		return nil, err
	}
	pem, err := open(key, bundleAD(n.ID, b.Name, b.Version), b.SealedKey)
	if err != nil {
		return nil, fmt.Errorf("%s version %d: %w", b.Name, b.Version, err)
	}
	return pem, nil
}

// openAnyEpoch opens a bundle's key under whichever epoch sealed it, for
// re-sealing it.
func (n *Node) openAnyEpoch(b *rdb.Bundle) ([]byte, error) {
	key, err := n.key(b.Epoch)
	if err != nil {
		return nil, err
	}
	pem, err := open(key, bundleAD(n.ID, b.Name, b.Version), b.SealedKey)
	if err != nil {
		return nil, fmt.Errorf("%s version %d: %w", b.Name, b.Version, err)
	}
	return pem, nil
}

func checkNodeName(node string) error {
	if node == "" {
		return errors.New("--node is required: a short name for this node, such as lb2")
	}
	if len(node) > 63 {
		return fmt.Errorf("--node %q: longer than 63 characters", node)
	}
	for _, c := range node {
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-' || c == '_' || c == '.') {
			return fmt.Errorf("--node %q: only letters, digits, '-', '_' and '.' are allowed", node)
		}
	}
	return nil
}
