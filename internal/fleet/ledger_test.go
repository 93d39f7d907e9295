package fleet

import (
	"context"
	"errors"
	"fmt"
	"github.com/lbcert/lbcert/internal/hint"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/lbcert/lbcert/internal/fleet/rdb"
	"github.com/lbcert/lbcert/internal/pace"
	"github.com/lbcert/lbcert/internal/store"
)

// noteIssued keeps every recent certificate of a batch, in one file,
// and leaves out old ones and those without a serial.
func TestNoteIssuedBatch(t *testing.T) {
	n := &Node{Local: store.New(t.TempDir())}
	now := time.Now().UTC()
	lin := func(name, serial string, at time.Time) *store.Lineage {
		return &store.Lineage{Name: name, Domains: []string{name}, Server: "https://ca.example/dir", IssuedAt: at, Cert: store.CertInfo{Serial: serial}}
	}
	n.noteIssued(lin("a.example", "0a", now), lin("b.example", "0b", now.Add(-time.Hour)),
		lin("old.example", "0c", now.Add(-LedgerWindow-time.Hour)), lin("noserial.example", "", now))
	n.noteIssued(lin("c.example", "0d", now))
	m := readLedger(n.Local)
	if len(m) != 3 || m["0a"].Set != LedgerSet("https://ca.example/dir", []string{"a.example"}) || m["0b"].At.IsZero() || m["0d"].Set == "" {
		t.Fatalf("ledger %v: want 0a, 0b and 0d", m)
	}
}

// Present reuses a list of live agents found within agentsFresh (a batch
// presents many tokens a second), and asks again for an older or an
// empty one (here: a node without Redis, which fails when asked).
func TestLiveAgentsReused(t *testing.T) {
	want := []AgentInfo{{Node: "lb1", Addr: "127.0.0.1:1"}}
	tok := &Tokens{N: &Node{}, agents: want, agentsAt: time.Now()}
	if got, err := tok.liveAgents(context.Background()); err != nil || len(got) != 1 || got[0] != want[0] {
		t.Fatalf("fresh list: %v %v", got, err)
	}
	for _, stale := range []*Tokens{
		{N: &Node{}, agents: want, agentsAt: time.Now().Add(-2 * agentsFresh)},
		{N: &Node{}, agentsAt: time.Now()},
	} {
		func() {
			defer func() { recover() }() // no Redis behind this node: asking it panics or fails
			if got, err := stale.liveAgents(context.Background()); err == nil && len(got) > 0 {
				t.Fatalf("a stale or empty list was reused: %v", got)
			}
		}()
	}
}

// The workers of one process hold the short write lock together; another
// holder of the lock file (another process: another open file) gets it
// only once none of them holds it.
func TestWriteLockShared(t *testing.T) {
	st := store.New(t.TempDir())
	lock := WriteLock(st)
	ctx := context.Background()
	u1, err1 := lock(ctx)
	u2, err2 := lock(ctx) // a second worker: no wait
	if err1 != nil || err2 != nil {
		t.Fatal(err1, err2)
	}
	other := func() error {
		ctx, cancel := context.WithTimeout(ctx, 50*time.Millisecond)
		defer cancel()
		l, err := st.WriteLock(ctx)
		if err == nil {
			l.Unlock()
		}
		return err
	}
	if other() == nil {
		t.Fatal("another process took the lock while two workers held it")
	}
	u1()
	u1() // twice: the same holder
	if other() == nil {
		t.Fatal("another process took the lock while a worker held it")
	}
	u2()
	if err := other(); err != nil {
		t.Fatalf("after both workers let go: %v", err)
	}
}

// An order's ledger place is kept on the ordering node's disk from the
// moment it is taken: a run killed after the CA issued (seed 1 of the
// fault test: two such runs, each followed by a Redis loss, and a sixth
// certificate for one set) still counts in a Redis rebuilt from the
// nodes' copies. The place makes way for the certificate once noted
// (one entry, not two), and goes when the order issued nothing.
// ledgerServer is the CA the ledger tests order from.
const ledgerServer = "https://ca.example/dir"

// budgetNode starts a one-node fleet on its own Redis, with the fleet's
// budget at a cap of 3.
func budgetNode(t *testing.T) (*Node, *rdb.Shared, *Budget) {
	t.Helper()
	_, sh := startRedis(t)
	n, err := Init(context.Background(), sh, store.New(t.TempDir()), "lb1")
	if err != nil {
		t.Fatal(err)
	}
	pb, err := pace.Open(t.TempDir(), pace.Limits{}, time.Now)
	if err != nil {
		t.Fatal(err)
	}
	return n, sh, &Budget{Pace: pb, N: n, Cap: 3, Now: time.Now}
}

func TestLedgerPlaceSurvivesRedisLoss(t *testing.T) {
	n, sh, b := budgetNode(t)
	ctx := context.Background()
	const server = ledgerServer
	k := pace.Key{Server: server}
	set := LedgerSet(server, []string{"a.example"})
	count := func() int {
		t.Helper()
		c, err := sh.LedgerCount(ctx, set, LedgerWindow, time.Now())
		if err != nil {
			t.Fatal(err)
		}
		return c
	}
	rebuild := func() {
		t.Helper()
		sh.Client().FlushAll(ctx)
		if err := n.CheckSeeded(ctx); err != nil {
			t.Fatal(err)
		}
	}
	// Killed after the CA issued: the place comes back with the rebuild.
	if err := b.Reserve(k, pace.Order{Names: []string{"a.example"}}); err != nil {
		t.Fatal(err)
	}
	rebuild()
	if c := count(); c != 1 {
		t.Fatalf("after a rebuild, a killed order's place: count %d, want 1", c)
	}
	// The next order issues: its place makes way for its certificate.
	if err := b.Reserve(k, pace.Order{Names: []string{"a.example"}}); err != nil {
		t.Fatal(err)
	}
	l := &store.Lineage{Name: "a.example", Domains: []string{"a.example"}, Server: server, IssuedAt: time.Now(), Cert: store.CertInfo{Serial: "0a"}}
	l.LedgerID = n.takeReserved(set) // as publish does
	n.noteIssued(l)
	if m := readLedger(n.Local); len(m) != 2 || l.LedgerID == "" || m[l.LedgerID].Set != set {
		t.Fatalf("node's copy after the certificate: %v, want the first place and the certificate under its place (%q)", m, l.LedgerID)
	}
	// Another node installs it: the same key, so one entry in Redis.
	other := &Node{Local: store.New(t.TempDir())}
	other.noteIssued(l)
	if m := readLedger(other.Local); len(m) != 1 || m[l.LedgerID].Set != set {
		t.Fatalf("an installer's copy: %v", m)
	}
	rebuild()
	if c := count(); c != 2 {
		t.Fatalf("after a rebuild: count %d, want 2 (one place, one certificate)", c)
	}
	// An order that issued nothing gives its place back, on disk too.
	if err := b.Reserve(k, pace.Order{Names: []string{"a.example"}}); err != nil {
		t.Fatal(err)
	}
	if err := b.Refund(k, pace.Order{Names: []string{"a.example"}}); err != nil {
		t.Fatal(err)
	}
	rebuild()
	if c := count(); c != 2 {
		t.Fatalf("after a refund and a rebuild: count %d, want 2", c)
	}
}

// twoNodes starts a fleet of lb1 and lb2 on its own Redis.
func twoNodes(t *testing.T) (*rdb.Shared, *Node, *Node) {
	t.Helper()
	_, sh := startRedis(t)
	dir := t.TempDir()
	lb1 := firstNode(t, sh, dir)
	return sh, lb1, joinApproved(t, sh, lb1, dir, "lb2")
}

// A node that never saw a set's certificates (it joined after them, and
// every node that installed them has left: seed 2 of the fault test,
// six certificates for one set) holds them after it copies the fleet's
// ledger, and rebuilds them into an emptied Redis alone. A place given
// back after the copy leaves the copy at the next one.
func TestCopiedLedgerRebuildsAlone(t *testing.T) {
	sh, lb1, lb2 := twoNodes(t)
	ctx := context.Background()
	const server = "https://ca.example/dir"
	k, o := pace.Key{Server: server}, pace.Order{Names: []string{"a.example"}}
	pb, err := pace.Open(t.TempDir(), pace.Limits{}, time.Now)
	if err != nil {
		t.Fatal(err)
	}
	b := &Budget{Pace: pb, N: lb1, Cap: 3, Now: time.Now}
	for i := range 2 { // two certificates issued through lb1
		if err := b.Reserve(k, o); err != nil {
			t.Fatal(err)
		}
		l := &store.Lineage{Name: "a.example", Domains: o.Names, Server: server, IssuedAt: time.Now(), Cert: store.CertInfo{Serial: fmt.Sprintf("0%d", i)}}
		l.LedgerID = lb1.takeReserved(LedgerSet(server, o.Names))
		lb1.noteIssued(l)
	}
	if err := b.Reserve(k, o); err != nil { // a third order, in flight
		t.Fatal(err)
	}
	if err := lb2.copyLedger(ctx); err != nil {
		t.Fatal(err)
	}
	if err := b.Refund(k, o); err != nil { // it issued nothing
		t.Fatal(err)
	}
	if err := lb2.copyLedger(ctx); err != nil {
		t.Fatal(err)
	}
	if m := readLedger(lb2.Local); len(m) != 2 {
		t.Fatalf("lb2's copy: %v, want the two certificates' places", m)
	} else {
		for k, e := range m {
			if e.Key == "" || e.At.IsZero() {
				t.Fatalf("lb2's copy of %s: %+v", k, e)
			}
		}
	}
	sh.Client().FlushAll(ctx)
	if err := lb2.CheckSeeded(ctx); err != nil {
		t.Fatal(err)
	}
	set := LedgerSet(server, o.Names)
	if c, err := sh.LedgerCount(ctx, set, LedgerWindow, time.Now()); err != nil || c != 2 {
		t.Fatalf("rebuilt from lb2 alone: count %d, %v; want 2", c, err)
	}
}

// A Redis that comes back from an older snapshot, or loses its last
// writes in a failover, is not empty: nothing rebuilds its ledger. The
// places the ordering node noted itself go back in with the next take,
// so a fourth certificate for a set at its cap of 3 is refused (seeds 3
// and 9 of the fault test: five certificates for one set). A copy of
// another node's place is not put back: it may have been given back.
func TestLedgerSurvivesAnOlderSnapshot(t *testing.T) {
	n, sh, b := budgetNode(t)
	ctx := context.Background()
	const server = ledgerServer
	k, o := pace.Key{Server: server}, pace.Order{Names: []string{"a.example", "www.a.example"}}
	set := LedgerSet(server, o.Names)
	key := func() string {
		keys, _ := sh.Client().Keys(ctx, "*ledger*").Result()
		if len(keys) != 1 {
			t.Fatalf("ledger keys %v, want one", keys)
		}
		return keys[0]
	}
	for i := range 3 {
		if err := b.Reserve(k, o); err != nil {
			t.Fatalf("order %d: %v", i+1, err)
		}
		l := &store.Lineage{Name: "a.example", Domains: o.Names, Server: server, IssuedAt: time.Now(), Cert: store.CertInfo{Serial: fmt.Sprintf("0%d", i)}}
		l.LedgerID = n.takeReserved(set)
		n.noteIssued(l)
	}
	// The snapshot Redis comes back from was taken before the last two.
	lk := key()
	members, _ := sh.Client().ZRange(ctx, lk, 0, -1).Result()
	sh.Client().ZRem(ctx, lk, members[1], members[2])
	// And a copy of another node's place that was given back meanwhile.
	n.editLedger(func(m map[string]issued) bool {
		m["lb2:given-back"] = issued{Set: set, At: time.Now(), From: "redis:old"}
		return true
	})
	err := b.Reserve(k, o)
	var d *pace.Denied
	if !errors.As(err, &d) {
		t.Fatalf("a fourth certificate for the set after the rollback: %v, want refused", err)
	}
	if c, _ := sh.LedgerCount(ctx, set, LedgerWindow, time.Now()); c != 3 {
		t.Fatalf("count %d after the take, want the three certificates", c)
	}
}

// After such a rollback a node that knows none of the set's places (it
// joined since) orders against what the other nodes' agents put back
// at their reconcile: every place a node noted itself, none of its
// copies of other nodes' places (torture seed 12 at 5002a9e: two nodes
// that joined after the set's three certificates each ordered one).
func TestAgentsPutTheLedgerBack(t *testing.T) {
	sh, lb1, lb2 := twoNodes(t)
	ctx := context.Background()
	const server = ledgerServer
	k, o := pace.Key{Server: server}, pace.Order{Names: []string{"b.example"}}
	set := LedgerSet(server, o.Names)
	var ls []*store.Lineage
	for i := range 3 {
		ls = append(ls, &store.Lineage{Name: "b.example", Domains: o.Names, Server: server, IssuedAt: time.Now(), Cert: store.CertInfo{Serial: fmt.Sprintf("b%d", i)}, LedgerID: fmt.Sprintf("lb9:%d", i)})
	}
	lb1.noteIssued(ls...) // lb1's agent installed all three
	lb1.editLedger(func(m map[string]issued) bool {
		m["lb9:given-back"] = issued{Set: set, At: time.Now(), From: "redis:old"}
		return true
	})
	if err := lb1.putBackLedger(ctx); err != nil {
		t.Fatal(err)
	}
	count := func() int {
		c, err := sh.LedgerCount(ctx, set, LedgerWindow, time.Now())
		if err != nil {
			t.Fatal(err)
		}
		return c
	}
	if c := count(); c != 3 {
		t.Fatalf("after lb1 put its places back: count %d, want 3 (its copy of a given-back place stays out)", c)
	}
	sh.Client().FlushDB(ctx) // not a rebuild: as if Redis came back without the ledger
	if err := lb1.putBackLedger(ctx); err != nil {
		t.Fatal(err)
	}
	pb, err := pace.Open(t.TempDir(), pace.Limits{}, time.Now)
	if err != nil {
		t.Fatal(err)
	}
	b := &Budget{Pace: pb, N: lb2, Cap: 3, Now: time.Now}
	if err := b.Reserve(k, o); !errors.As(err, new(*pace.Denied)) {
		t.Fatalf("lb2 orders a fourth certificate for the set: %v, want refused", err)
	}
}

// One CA however its directory is spelt: a capital in the host, a
// trailing slash or dot, the default port. A second spelling must not
// open a second cap of 3 for the same set (hostile review: a fourth
// certificate through https://LOCALHOST:PORT/dir).
func TestLedgerSetIsOneCAHoweverSpelt(t *testing.T) {
	want := LedgerSet("https://ca.example:14000/dir", []string{"a.example", "www.a.example"})
	for _, server := range []string{"https://CA.example:14000/dir", "https://ca.example.:14000/dir/", "https://ca.example:14000/dir"} {
		if got := LedgerSet(server, []string{"WWW.a.example", "a.example"}); got != want {
			t.Errorf("%s: %q, want %q", server, got, want)
		}
	}
	if LedgerSet("https://ca.example:443/dir", []string{"a.example"}) != LedgerSet("https://ca.example/dir", []string{"a.example"}) {
		t.Error("the default port makes another set")
	}
	if LedgerSet("https://other.example/dir", []string{"a.example"}) == LedgerSet("https://ca.example/dir", []string{"a.example"}) {
		t.Error("two CAs share a set")
	}
}

// ledgerWriter is one process of TestLedgerEditsOfTwoProcesses: it
// notes 150 order places in the node's copy of the ledger at dir.
func ledgerWriter(dir, prefix string) {
	n := &Node{Local: store.New(dir)}
	for i := range 150 {
		n.noteReserved("set", fmt.Sprintf("%s-%d", prefix, i), time.Now())
	}
}

// Two processes of one node (an agent and a cron's renew) that note
// ledger entries at the same time lose none of them: each edit reads
// and writes the file under the node's ledger lock, not only under a
// lock of its own process.
func TestLedgerEditsOfTwoProcesses(t *testing.T) {
	dir := t.TempDir()
	var cmds []*exec.Cmd
	for _, prefix := range []string{"a", "b", "c"} {
		c := exec.Command(os.Args[0], "-test.run=^$")
		c.Env = append(os.Environ(), "LBCERT_TEST_LEDGER_WRITER="+dir, "LBCERT_TEST_LEDGER_PREFIX="+prefix)
		c.Stderr = os.Stderr
		if err := c.Start(); err != nil {
			t.Fatal(err)
		}
		cmds = append(cmds, c)
	}
	for _, c := range cmds {
		if err := c.Wait(); err != nil {
			t.Fatal(err)
		}
	}
	m := readLedger(store.New(dir))
	var lost []string
	for _, prefix := range []string{"a", "b", "c"} {
		for i := range 150 {
			if _, ok := m[fmt.Sprintf("%s-%d", prefix, i)]; !ok {
				lost = append(lost, fmt.Sprintf("%s-%d", prefix, i))
			}
		}
	}
	if len(lost) > 0 {
		t.Fatalf("%d of 450 entries lost (%v...): processes overwrote each other's edits", len(lost), lost[:min(5, len(lost))])
	}
}

// A node that cannot keep its copy of the ledger orders nothing: the
// place it took in Redis and the pace tokens go back, and the error
// says what to fix (hostile review: with ledger.lock a directory, a
// FLUSHALL let one set reach 6 certificates).
func TestLedgerFailsClosed(t *testing.T) {
	n, sh, b := budgetNode(t)
	ctx := context.Background()
	k := pace.Key{Server: ledgerServer}
	set := LedgerSet(ledgerServer, []string{"a.example"})
	lock := filepath.Join(fleetDir(n.Local), "ledger.lock")
	os.Remove(lock)
	if err := os.Mkdir(lock, 0o700); err != nil {
		t.Fatal(err)
	}
	err := b.Reserve(k, pace.Order{Names: []string{"a.example"}})
	if err == nil || !strings.Contains(err.Error(), "cannot keep its copy of the issuance ledger") {
		t.Fatalf("Reserve with an unwritable ledger copy: %v, want a refusal", err)
	}
	if c, _ := sh.LedgerCount(ctx, set, LedgerWindow, time.Now()); c != 0 {
		t.Fatalf("the refused order left %d places in Redis", c)
	}
	os.Remove(lock)
	if err := b.Reserve(k, pace.Order{Names: []string{"a.example"}}); err != nil {
		t.Fatalf("after the fix: %v", err)
	}
}

// An order that issued nothing gives its place back even when Redis is
// away for a moment (restarting): a place kept would count for 7 days
// (the fault test, seed 7: a name held at its cap of 3 by two
// certificates and a refunded order, refunded while Redis was down).
func TestRefundWaitsForRedis(t *testing.T) {
	r, sh := startRedis(t)
	n, err := Init(context.Background(), sh, store.New(t.TempDir()), "lb1")
	if err != nil {
		t.Fatal(err)
	}
	pb, _ := pace.Open(t.TempDir(), pace.Limits{}, time.Now)
	b := &Budget{Pace: pb, N: n, Cap: 3, Now: time.Now}
	k, o := pace.Key{Server: ledgerServer}, pace.Order{Names: []string{"a.example"}}
	set := LedgerSet(ledgerServer, o.Names)
	if err := b.Reserve(k, o); err != nil {
		t.Fatal(err)
	}
	r.Kill()
	go func() {
		time.Sleep(1500 * time.Millisecond)
		r.Start()
	}()
	if err := b.Refund(k, o); err != nil {
		t.Fatalf("refund across a Redis restart: %v", err)
	}
	if c, err := sh.LedgerCount(context.Background(), set, LedgerWindow, time.Now()); err != nil || c != 0 {
		t.Fatalf("after the refund: %d places (%v), want 0", c, err)
	}
	if m := readLedger(n.Local); len(m) != 0 {
		t.Fatalf("the node's copy still holds %v", m)
	}
}

// A ledger lock held past its bound (a run stopped inside an edit) is
// an error naming the file, not a wait for ever; the order it was for
// is not placed.
func TestStuckLedgerLockIsSaid(t *testing.T) {
	// The lock is waited for past the Redis deadline the place was taken
	// under: the place must go back under a deadline of its own.
	defer func(w, d time.Duration) { fleetFileWait, redisDeadline = w, d }(fleetFileWait, redisDeadline)
	fleetFileWait, redisDeadline = 3*time.Second, 2*time.Second
	n, sh, b := budgetNode(t)
	unlock, err := lockFleetFile(n.Local, "ledger.lock")
	if err != nil {
		t.Fatal(err)
	}
	defer unlock()
	start := time.Now()
	err = b.Reserve(pace.Key{Server: ledgerServer}, pace.Order{Names: []string{"a.example"}})
	if err == nil || !strings.Contains(err.Error(), "ledger.lock has been held by another process") || time.Since(start) > 10*time.Second {
		t.Fatalf("Reserve under a stuck ledger lock: %v after %s", err, time.Since(start))
	}
	// What to do is to find the holder, not to fix the files.
	if h := hint.Of(err); !strings.HasPrefix(h, "find it with: fuser -v ") {
		t.Fatalf("the hint for a stuck ledger lock: %q", h)
	}
	// The place it took in Redis went back, though the wait used up
	// the Redis deadline Reserve had taken it under.
	if c, _ := sh.LedgerCount(context.Background(), LedgerSet(ledgerServer, []string{"a.example"}), LedgerWindow, time.Now()); c != 0 {
		t.Fatalf("the order not placed left %d places in Redis", c)
	}
}

// A copy of the ledger that is no ledger (truncated) is neither
// overwritten, which would drop the places only it held, nor ordered
// past; moved aside, ordering goes on.
func TestCorruptLedgerCopyFailsClosed(t *testing.T) {
	n, sh, b := budgetNode(t)
	k, o := pace.Key{Server: ledgerServer}, pace.Order{Names: []string{"a.example"}}
	if err := b.Reserve(k, o); err != nil {
		t.Fatal(err)
	}
	path := ledgerPath(n.Local)
	data, _ := os.ReadFile(path)
	if err := os.WriteFile(path, data[:len(data)/2], 0o600); err != nil {
		t.Fatal(err)
	}
	err := b.Reserve(k, o)
	if err == nil || !strings.Contains(err.Error(), "is not a ledger") {
		t.Fatalf("Reserve over a truncated copy: %v", err)
	}
	if now, _ := os.ReadFile(path); len(now) != len(data)/2 {
		t.Fatal("the truncated copy was overwritten")
	}
	if c, _ := sh.LedgerCount(context.Background(), LedgerSet(ledgerServer, o.Names), LedgerWindow, time.Now()); c != 1 {
		t.Fatalf("places in Redis: %d, want the first order's only", c)
	}
	os.Rename(path, path+".bad")
	if err := b.Reserve(k, o); err != nil {
		t.Fatalf("after moving it aside: %v", err)
	}
}
