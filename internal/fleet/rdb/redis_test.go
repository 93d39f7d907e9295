package rdb

import (
	"context"
	"errors"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/lbcert/lbcert/internal/testenv"
)

// A real redis-server: the scripts are the point, and only Redis runs Lua.
func dial(t *testing.T) *Shared {
	t.Helper()
	r, err := testenv.StartRedis(t.TempDir(), "s3cret-pass", nil)
	if err != nil {
		t.Fatalf("start redis: %v", err)
	}
	t.Cleanup(r.Stop)
	s, err := Dial(context.Background(), Options{URL: r.URL(), Password: "s3cret-pass"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

func TestLeaseIsExclusiveAndFenced(t *testing.T) {
	s := dial(t)
	ctx := context.Background()
	// 20 holders race for one name: exactly one wins.
	var wins atomic.Int32
	var wg sync.WaitGroup
	for i := range 20 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			tok, err := s.Acquire(ctx, "foo.com", "node"+itoa(int64(i)), time.Minute)
			if err != nil {
				t.Error(err)
			}
			if tok > 0 {
				wins.Add(1)
			}
		}()
	}
	wg.Wait()
	if wins.Load() != 1 {
		t.Fatalf("%d holders got the lease, want 1", wins.Load())
	}

	// A short lease expires; the next holder gets a larger token, and the
	// stale holder can neither extend nor release the new one.
	t1, _ := s.Acquire(ctx, "bar.com", "a", 100*time.Millisecond)
	time.Sleep(200 * time.Millisecond)
	t2, _ := s.Acquire(ctx, "bar.com", "b", time.Minute)
	if t1 == 0 || t2 <= t1 {
		t.Fatalf("tokens %d then %d: want growing", t1, t2)
	}
	if ok, _ := s.Extend(ctx, "bar.com", "a", t1, time.Minute); ok {
		t.Error("stale holder extended the new holder's lease")
	}
	s.Release(ctx, "bar.com", "a", t1)
	if tok, _ := s.Acquire(ctx, "bar.com", "c", time.Minute); tok != 0 {
		t.Error("stale holder's release freed the new holder's lease")
	}
	if ok, _ := s.Extend(ctx, "bar.com", "b", t2, time.Minute); !ok {
		t.Error("holder could not extend its own lease")
	}
	s.Release(ctx, "bar.com", "b", t2)
	if tok, _ := s.Acquire(ctx, "bar.com", "c", time.Minute); tok <= t2 {
		t.Errorf("after release: token %d, want > %d", tok, t2)
	}
}

// A node's list of leases keeps a name while any process of the node
// holds it: a stale release by one whose lease expired, and a name that
// lost its lease, leave the list only when no process of the node holds
// it now.
func TestNodesLeaseListFollowsItsHolders(t *testing.T) {
	s := dial(t)
	ctx := context.Background()
	t1, _ := s.Acquire(ctx, "x.com", "lb1/100", 100*time.Millisecond)
	time.Sleep(200 * time.Millisecond)
	t2, _ := s.Acquire(ctx, "x.com", "lb1/200", time.Minute)
	if t1 == 0 || t2 == 0 {
		t.Fatalf("tokens %d, %d", t1, t2)
	}
	s.Release(ctx, "x.com", "lb1/100", t1) // stale: lb1/200 holds it
	held, err := s.LeasesOf(ctx, "lb1")
	if err != nil || held["x.com"] != (Held{Holder: "lb1/200", Token: t2}) {
		t.Fatalf("after a stale release: %v %v; want x.com held by lb1/200", held, err)
	}
	// Another node's process takes a name lb1's lease of which expired:
	// it leaves lb1's list, and its own release empties it.
	t3, _ := s.Acquire(ctx, "y.com", "lb1/100", 100*time.Millisecond)
	time.Sleep(200 * time.Millisecond)
	t4, _ := s.Acquire(ctx, "y.com", "lb2/300", time.Minute)
	if held, _ := s.LeasesOf(ctx, "lb1"); t3 == 0 || t4 == 0 || len(held) != 1 {
		t.Fatalf("lb1 lists %v; want only x.com", held)
	}
	if n, _ := s.c.SIsMember(ctx, s.k("leases", "lb1"), "y.com").Result(); n {
		t.Fatal("y.com is still on lb1's list though lb2 holds it")
	}
	s.Release(ctx, "x.com", "lb1/200", t2)
	if held, _ := s.LeasesOf(ctx, "lb1"); len(held) != 0 {
		t.Fatalf("after its holder's release lb1 lists %v", held)
	}
}

func TestPublishRefusesStaleWriters(t *testing.T) {
	s := dial(t)
	ctx := context.Background()
	nb := time.Now().Truncate(time.Millisecond)
	t1, _ := s.Acquire(ctx, "foo.com", "a", 50*time.Millisecond)
	time.Sleep(100 * time.Millisecond)
	t2, _ := s.Acquire(ctx, "foo.com", "b", time.Minute)
	v, _ := s.NextVersion(ctx, "foo.com", 0)
	if err := s.Publish(ctx, &Bundle{Name: "foo.com", Version: v, Fence: t2, NotBefore: nb, Meta: []byte("{}"), SealedKey: []byte("x")}); err != nil {
		t.Fatal(err)
	}
	// The stale holder's certificate is even newer, but its lease was
	// taken over: refused.
	v2, _ := s.NextVersion(ctx, "foo.com", 0)
	if err := s.Publish(ctx, &Bundle{Name: "foo.com", Version: v2, Fence: t1, NotBefore: nb.Add(time.Minute)}); !stale(err, "lease") {
		t.Errorf("stale lease publish: %v, want ErrStale", err)
	}
	// An older certificate never replaces a newer one, even unfenced (a
	// re-seed from an out-of-date disk).
	if err := s.Publish(ctx, &Bundle{Name: "foo.com", Version: v2, NotBefore: nb.Add(-time.Hour)}); !stale(err, "older") {
		t.Errorf("older certificate publish: %v, want ErrStale", err)
	}
	if _, err := s.Fullchain(ctx, "nosuch.com"); !errors.Is(err, ErrNoBundle) {
		t.Errorf("full chain of a missing bundle: %v", err)
	}
	b, err := s.Bundle(ctx, "foo.com")
	if err != nil || b.Version != v || b.Fence != t2 || string(b.SealedKey) != "x" || !b.NotBefore.Equal(nb) {
		t.Fatalf("bundle %+v, %v", b, err)
	}
	if v2 <= v {
		t.Errorf("versions %d then %d", v, v2)
	}
	// A wiped counter does not reuse versions: the floor and the bundle win.
	s.Client().Del(ctx, s.k("ver", "foo.com"))
	if v3, _ := s.NextVersion(ctx, "foo.com", 7); v3 != 8 {
		t.Errorf("next version after wipe with floor 7: %d, want 8", v3)
	}
	names, _ := s.Names(ctx)
	if len(names) != 1 || names[0] != "foo.com" {
		t.Errorf("names %v", names)
	}
}

func stale(err error, why string) bool {
	var e *ErrStale
	return errors.As(err, &e) && e.Why == why
}

// One version number names one certificate: a publish under a number
// the fleet already holds is refused, whatever its lease or notBefore.
func TestPublishNeverReusesAVersion(t *testing.T) {
	s := dial(t)
	ctx := context.Background()
	nb := time.Now().Truncate(time.Millisecond)
	tok, _ := s.Acquire(ctx, "v.com", "a", time.Minute)
	if err := s.Publish(ctx, &Bundle{Name: "v.com", Version: 2, Fence: tok, NotBefore: nb}); err != nil {
		t.Fatal(err)
	}
	if err := s.Publish(ctx, &Bundle{Name: "v.com", Version: 2, Fence: tok, NotBefore: nb.Add(time.Hour)}); !stale(err, "version") {
		t.Fatalf("same version again: %v", err)
	}
	// A key sealed under another epoch than meta's is refused (I5).
	s.Client().HSet(ctx, s.k("meta"), "epoch", 2)
	if err := s.Publish(ctx, &Bundle{Name: "v.com", Version: 3, Epoch: 1, Fence: tok, NotBefore: nb.Add(time.Hour)}); !stale(err, "epoch") {
		t.Fatalf("old epoch: %v", err)
	}
	if err := s.Publish(ctx, &Bundle{Name: "v.com", Version: 3, Epoch: 2, Fence: tok, NotBefore: nb.Add(time.Hour)}); err != nil {
		t.Fatalf("current epoch: %v", err)
	}
}

// A delete is fenced against the lease holder that took the name before
// it, and a later lease clears the tombstone; an unfenced re-seed never
// brings the name back; a tombstone seeded into a rebuilt Redis removes
// a bundle issued before the delete.
func TestDeleteIsFencedAndSticks(t *testing.T) {
	s := dial(t)
	ctx := context.Background()
	nb := time.Now().Truncate(time.Millisecond)
	held, _ := s.Acquire(ctx, "d.com", "a", time.Minute)
	fence, _, err := s.DeleteBundle(ctx, "d.com", nb)
	if err != nil || fence <= held {
		t.Fatalf("delete: fence %d after lease %d, %v", fence, held, err)
	}
	if err := s.Publish(ctx, &Bundle{Name: "d.com", Version: 1, Fence: held, NotBefore: nb}); !stale(err, "lease") && !stale(err, "deleted") {
		t.Fatalf("publish by the holder from before the delete: %v", err)
	}
	if err := s.Publish(ctx, &Bundle{Name: "d.com", Version: 1, NotBefore: nb}); !stale(err, "deleted") {
		t.Fatalf("unfenced re-seed of a deleted name: %v", err)
	}
	s.Release(ctx, "d.com", "a", held)
	later, _ := s.Acquire(ctx, "d.com", "b", time.Minute)
	if err := s.Publish(ctx, &Bundle{Name: "d.com", Version: 1, Fence: later, NotBefore: nb, IssuedAt: nb}); err != nil {
		t.Fatalf("a new issue after the delete: %v", err)
	}
	if ok, _ := s.IsDeleted(ctx, "d.com"); ok {
		t.Fatal("the tombstone outlived a new issue")
	}
	// Redis emptied; one node republishes the old certificate, another
	// its tombstone of a later delete: the tombstone wins, in either order.
	s.Client().FlushAll(ctx)
	if err := s.Publish(ctx, &Bundle{Name: "d.com", Version: 1, NotBefore: nb, IssuedAt: nb}); err != nil {
		t.Fatal(err)
	}
	if err := s.SeedTombstone(ctx, "d.com", fence+5, nb.Add(time.Minute), 0); err != nil {
		t.Fatal(err)
	}
	if names, _ := s.Names(ctx); len(names) != 0 {
		t.Fatalf("names after the tombstone came back: %v", names)
	}
	if err := s.Publish(ctx, &Bundle{Name: "d.com", Version: 2, NotBefore: nb.Add(time.Second), IssuedAt: nb}); !stale(err, "deleted") {
		t.Fatalf("re-seed after the tombstone: %v", err)
	}
	// A certificate issued after the delete (the name was issued again,
	// and Redis lost it) is given back, and beats the older tombstone in
	// either order.
	if err := s.Publish(ctx, &Bundle{Name: "d.com", Version: 3, NotBefore: nb.Add(2 * time.Minute), IssuedAt: nb.Add(2 * time.Minute)}); err != nil {
		t.Fatalf("re-seed of a certificate issued after the delete: %v", err)
	}
	if err := s.SeedTombstone(ctx, "d.com", fence+5, nb.Add(time.Minute), 0); err != nil {
		t.Fatal(err)
	}
	if names, _ := s.Names(ctx); len(names) != 1 {
		t.Fatalf("an older tombstone removed a certificate issued after it: %v", names)
	}
	if ok, _ := s.IsDeleted(ctx, "d.com"); ok {
		t.Fatal("an older tombstone was recorded beside a newer certificate")
	}
}

// A lineage born before a delete and renewed after it, by a node that
// rebuilt Redis without the delete (hostile review: the deleting node
// was down when Redis was emptied, and the name was renewed meanwhile),
// is not the name issued again: the tombstone, when it comes back,
// removes it, and an unfenced republish of it is refused (I3).
func TestTombstoneBeatsARenewalOfALineageBornBefore(t *testing.T) {
	s := dial(t)
	ctx := context.Background()
	born := time.Now().Add(-time.Hour).Truncate(time.Millisecond)
	deleted := born.Add(30 * time.Minute)
	renewed := deleted.Add(10 * time.Minute)
	if err := s.Publish(ctx, &Bundle{Name: "r.com", Version: 2, NotBefore: renewed, IssuedAt: renewed, Born: born}); err != nil {
		t.Fatal(err)
	}
	if err := s.SeedTombstone(ctx, "r.com", 7, deleted, 1); err != nil {
		t.Fatal(err)
	}
	if names, _ := s.Names(ctx); len(names) != 0 {
		t.Fatalf("a renewal of a lineage born before the delete outlived the tombstone: %v", names)
	}
	if ok, _ := s.IsDeleted(ctx, "r.com"); !ok {
		t.Fatal("the tombstone was not recorded")
	}
	if err := s.Publish(ctx, &Bundle{Name: "r.com", Version: 3, NotBefore: renewed.Add(time.Second), IssuedAt: renewed, Born: born}); !stale(err, "deleted") {
		t.Fatalf("unfenced republish of that renewal: %v, want refused as deleted", err)
	}
	// Born after the delete: the name was issued again, and stands.
	if err := s.Publish(ctx, &Bundle{Name: "r.com", Version: 4, NotBefore: renewed.Add(2 * time.Second), IssuedAt: renewed, Born: renewed}); err != nil {
		t.Fatalf("a lineage born after the delete: %v", err)
	}
}

func TestLedgerCapsExactSets(t *testing.T) {
	s := dial(t)
	ctx := context.Background()
	now := time.Now()
	week := 7 * 24 * time.Hour
	var ok atomic.Int32
	var wg sync.WaitGroup
	for i := range 10 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			got, _, err := s.LedgerTake(ctx, "a.com,www.a.com", "id"+itoa(int64(i)), 3, week, now, nil)
			if err != nil {
				t.Error(err)
			}
			if got {
				ok.Add(1)
			}
		}()
	}
	wg.Wait()
	if ok.Load() != 3 {
		t.Fatalf("%d places taken, want 3", ok.Load())
	}
	got, free, _ := s.LedgerTake(ctx, "a.com,www.a.com", "late", 3, week, now, nil)
	if got || free.Sub(now.Add(week)).Abs() > time.Second {
		t.Errorf("full ledger: got=%v free at %v", got, free)
	}
	// Giving back every id frees every place that was taken.
	for i := range 10 {
		s.LedgerGive(ctx, "a.com,www.a.com", "id"+itoa(int64(i)))
	}
	if n, _ := s.LedgerCount(ctx, "a.com,www.a.com", week, now); n != 0 {
		t.Errorf("count after giving every place back: %d, want 0", n)
	}
	// Entries older than the window do not count.
	s.LedgerSeed(ctx, "b.com", "old", now.Add(-8*24*time.Hour), week)
	s.LedgerSeed(ctx, "b.com", "new", now.Add(-time.Hour), week)
	s.LedgerSeed(ctx, "b.com", "new", now.Add(-time.Hour), week)
	if n, _ := s.LedgerCount(ctx, "b.com", week, now); n != 1 {
		t.Errorf("seeded count %d, want 1", n)
	}
}

// The places a node knows of go back in before the count: a Redis that
// came back from an older snapshot, without them, does not give their
// places again; what is known twice, or from before the window, counts
// once or not at all.
func TestLedgerTakePutsBackKnownPlaces(t *testing.T) {
	s := dial(t)
	ctx := context.Background()
	now := time.Now()
	week := 7 * 24 * time.Hour
	if ok, _, _ := s.LedgerTake(ctx, "c.com", "first", 3, week, now, nil); !ok {
		t.Fatal("an empty set refused a place")
	}
	known := map[string]time.Time{"first": now, "lost1": now.Add(-time.Hour), "lost2": now.Add(-2 * time.Hour), "stale": now.Add(-8 * 24 * time.Hour)}
	ok, free, err := s.LedgerTake(ctx, "c.com", "fourth", 3, week, now, known)
	if err != nil || ok {
		t.Fatalf("with three places known, one of them in Redis: took=%v err=%v, want refused", ok, err)
	}
	if want := now.Add(-2 * time.Hour).Add(week); free.Sub(want).Abs() > time.Second {
		t.Errorf("frees at %v, want %v (the oldest known place's end)", free, want)
	}
	if n, _ := s.LedgerCount(ctx, "c.com", week, now); n != 3 {
		t.Errorf("count %d, want 3 (the stale place is not put back)", n)
	}
}

func TestUnreachableRedisIsUnavailable(t *testing.T) {
	port, _ := testenv.FreePort()
	_, err := Dial(context.Background(), Options{URL: "redis://127.0.0.1:" + itoa(int64(port)) + "/0"})
	var u *Unavailable
	if !errors.As(err, &u) {
		t.Fatalf("dial a closed port: %v, want *Unavailable", err)
	}
	for _, bad := range []string{"redis://user:pw@127.0.0.1:1/0", "http://x", "redis://h/abc", "redis-sentinel://h:1", "redis://h/0/1"} {
		if _, err := Dial(context.Background(), Options{URL: bad}); err == nil || errors.As(err, &u) {
			t.Errorf("%s: %v, want a settings error", bad, err)
		}
	}
}

// A Redis Cluster node is refused at once, saying why and what to use.
func TestClusterIsRefused(t *testing.T) {
	// The cluster bus listens on the port plus 10,000 unless told
	// otherwise, and that port may be another test's: name a free one.
	bus, err := testenv.FreePort()
	if err != nil {
		t.Fatal(err)
	}
	r, err := testenv.StartRedisConf(t.TempDir(), "cluster-enabled yes\ncluster-port "+itoa(int64(bus))+"\n")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(r.Stop)
	_, err = Dial(context.Background(), Options{URL: r.URL()})
	if err == nil || !strings.Contains(err.Error(), "Redis Cluster, which lbcert does not support") || !strings.Contains(err.Error(), "Sentinel") {
		t.Fatalf("dial a cluster node: %v", err)
	}
}

// Two nodes registering the same account at once: the fleet keeps one
// node's key with that node's registration, never a mix.
func TestAccountIsCreatedWhole(t *testing.T) {
	s := dial(t)
	ctx := context.Background()
	var wg sync.WaitGroup
	var wins atomic.Int32
	s.Client().HSet(ctx, s.k("meta"), "epoch", 1)
	if _, err := s.CreateAccount(ctx, "https://ca/dir", "ops@example.com", 2, []byte("k"), []byte("r")); err != ErrEpoch {
		t.Fatalf("an account sealed under another epoch: %v", err)
	}
	for i := range 10 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			id := itoa(int64(i))
			ok, err := s.CreateAccount(ctx, "https://ca/dir", "ops@example.com", 1, []byte("key-"+id), []byte("reg-"+id))
			if err != nil {
				t.Error(err)
			}
			if ok {
				wins.Add(1)
			}
		}()
	}
	wg.Wait()
	key, reg, _, err := s.Account(ctx, "https://ca/dir", "ops@example.com")
	if err != nil || wins.Load() != 1 || strings.TrimPrefix(string(key), "key-") != strings.TrimPrefix(string(reg), "reg-") {
		t.Fatalf("wins %d, key %q, reg %q, %v", wins.Load(), key, reg, err)
	}
}

// A password in a --redis URL is never repeated in a message, even when
// the URL does not parse.
func TestRedactNeverEchoesAPassword(t *testing.T) {
	for _, raw := range []string{
		"redis://user:s3cret@127.0.0.1:6379/0",
		"redis://:s3cret@[::1:6379/0",
		"redis://u:s3cret%zz@host/0",
		"s3cret@no-scheme",
		"redis://127.0.0.1:6379/0?password=s3cret",
		"redis://127.0.0.1:6379/0#s3cret",
		"redis-sentinel://127.0.0.1:26379/m/0?sentinel_password=s3cret",
		"redis://%zz@127.0.0.1/0?password=s3cret",
	} {
		if got := redact(raw); strings.Contains(got, "s3cret") {
			t.Errorf("redact(%q) = %q", raw, got)
		}
		_, err := Dial(context.Background(), Options{URL: raw})
		if err == nil || strings.Contains(err.Error(), "s3cret") {
			t.Errorf("Dial(%q): %v", raw, err)
		}
	}
}

// An empty Sentinel master name is bad input, not an unreachable Redis.
func TestSentinelURLNeedsAMaster(t *testing.T) {
	for _, raw := range []string{"redis-sentinel://127.0.0.1:1//0", "redis-sentinel://127.0.0.1:1/", "redis-sentinel:///mymaster/0", "redis:///0", "rediss://:6380/0", "redis-sentinel://:26379/m/0", "redis-sentinel://,127.0.0.1/m/0"} {
		_, err := Dial(context.Background(), Options{URL: raw})
		var u *Unavailable
		if err == nil || errors.As(err, &u) {
			t.Errorf("Dial(%q): %v, want a bad-input error", raw, err)
		}
	}
}

// A database number the Redis does not have is named as bad input, with
// what to do, not relayed as Redis's bare "ERR DB index is out of range".
func TestDatabaseOutOfRange(t *testing.T) {
	r, err := testenv.StartRedis(t.TempDir(), "s3cret-pass", nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(r.Stop)
	_, err = Dial(context.Background(), Options{URL: "redis://" + r.Addr() + "/99", Password: "s3cret-pass"})
	if err == nil || !strings.Contains(err.Error(), "--redis") || !strings.Contains(err.Error(), "no database 99") {
		t.Fatalf("Dial to database 99: %v", err)
	}
}

// A URL that names the wrong thing says so, as bad input, not as a
// Redis that is away: a Sentinel URL at a plain Redis, and a master name
// the Sentinels do not monitor (go-redis says "all sentinels specified
// in configuration are unreachable: redis: nil" for both).
func TestSentinelURLNamesTheWrongThing(t *testing.T) {
	r, err := testenv.StartRedis(t.TempDir(), "s3cret-pass", nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(r.Stop)
	sen, err := testenv.StartSentinel(t.TempDir(), "mym", r)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(sen.Stop)
	for raw, want := range map[string]string{
		"redis-sentinel://" + r.Addr() + "/mym/0":      "the server there is a Redis, not a Sentinel",
		"redis-sentinel://" + sen.Addr() + "/nosuch/0": `no Sentinel there monitors a master named "nosuch"`,
		"redis://" + sen.Addr() + "/0":                 "the server there is a Sentinel, not a Redis",
	} {
		_, err := Dial(context.Background(), Options{URL: raw, Password: "s3cret-pass"})
		var u *Unavailable
		if err == nil || errors.As(err, &u) || !strings.Contains(err.Error(), want) {
			t.Errorf("Dial(%q): %v, want %q", raw, err, want)
		}
	}
	for _, raw := range []string{"redis-sentinel://" + sen.Addr() + "/mym/0", "redis://" + r.Addr() + "/0"} {
		s, err := Dial(context.Background(), Options{URL: raw, Password: "s3cret-pass"})
		if err != nil {
			t.Fatalf("Dial(%q): %v", raw, err)
		}
		s.Close()
	}
}

// A delete returns the highest version the fleet gave the name, and the
// tombstones carry it: every node keeps it, so a name issued again
// after Redis lost its counter is numbered above (I2; seed 1 of the
// fault test numbered a name issued again 1, as before its delete).
func TestDeleteKeepsTheVersion(t *testing.T) {
	s := dial(t)
	ctx := context.Background()
	nb := time.Now().Truncate(time.Millisecond)
	for v := 1; v <= 2; v++ {
		if _, err := s.NextVersion(ctx, "k.com", 0); err != nil {
			t.Fatal(err)
		}
		if err := s.Publish(ctx, &Bundle{Name: "k.com", Version: v, NotBefore: nb.Add(time.Duration(v) * time.Second)}); err != nil {
			t.Fatal(err)
		}
	}
	s.NextVersion(ctx, "k.com", 0) // a version handed out, never published
	_, v, err := s.DeleteBundle(ctx, "k.com", nb.Add(time.Minute))
	if err != nil || v != 3 {
		t.Fatalf("delete: version %d, %v; want 3", v, err)
	}
	ts, err := s.Tombstones(ctx)
	if err != nil || ts["k.com"].Version != 3 {
		t.Fatalf("tombstones: %v, %v; want k.com at version 3", ts, err)
	}
	s.Client().FlushAll(ctx)
	if err := s.SeedTombstone(ctx, "k.com", 1, nb.Add(time.Minute), v); err != nil {
		t.Fatal(err)
	}
	if n, err := s.NextVersion(ctx, "k.com", 0); err != nil || n != 4 {
		t.Fatalf("a name issued again after the rebuild: version %d, %v; want 4", n, err)
	}
}

// An address without a port gets the default one, an IPv6 address
// bracketed or not ("redis://[::1]/0" once dialled "[[::1]]:6379").
func TestWithPort(t *testing.T) {
	for in, want := range map[string]string{
		"127.0.0.1": "127.0.0.1:6379", "127.0.0.1:7000": "127.0.0.1:7000", "[::1]": "[::1]:6379",
		"[::1]:7000": "[::1]:7000", "redis.internal": "redis.internal:6379",
	} {
		if got := withPort(in, "6379"); got != want {
			t.Errorf("withPort(%q) = %q, want %q", in, got, want)
		}
	}
}

// A port that is no port, or a host that is no host name, is bad input
// said as such, not "Redis unreachable" after a dial (helper-31 finding
// 9: exit 4 and "check that Redis runs" for redis://127.0.0.1:99999/0).
func TestURLHostsAreChecked(t *testing.T) {
	for raw, bad := range map[string]string{
		"redis://127.0.0.1:99999/0":                         "not a port",
		"redis://127.0.0.1:0/0":                             "not a port",
		"redis://127.0.0.1:x/0":                             "is not a URL",
		"redis://bad_host!:6379/0":                          "not a host name",
		"redis-sentinel://a:26379,b:70000/mymaster":         "not a port",
		"redis://127.0.0.1:6379/0":                          "",
		"redis://[::1]:6379/0":                              "",
		"redis://redis.internal/0":                          "",
		"redis-sentinel://s1.example,10.0.0.2:26380/master": "",
		"rediss://my_redis.example:6380/2":                  "",
		// helper-32 finding F.
		"redis://127.0.0.1:/0":          "not a port",
		"redis://a..b:6379/0":           "not a host name",
		"redis://999.1.1.1:6379/0":      "not a host name",
		"redis://127.0.0.1.:6379/0":     "not a host name",
		"redis://[fe80::1%25lo]:6379/0": "",
		"redis://redis.example.:6379/0": "",
		"redis://127.0.0.1%25lo:6379/0": "not a host name",
	} {
		err := CheckURL(raw)
		switch {
		case bad == "" && err != nil:
			t.Errorf("%s: %v, want it accepted", raw, err)
		case bad != "" && (err == nil || !strings.Contains(err.Error(), bad)):
			t.Errorf("%s: %v, want it refused as %q", raw, err, bad)
		}
	}
}
