// Package catalog is the shared half of lbcert's storage seam: the
// record of which certificate lineages exist, their versions and
// settings, what renew learnt about them (Status), who may order them
// (leases), which were deleted (tombstones) and the ACME accounts. The
// node-local half, what one host serves, is package store's Local.
//
// Fleet or single host is chosen once, by choosing the implementation:
// Dir is the state directory of a single host (the catalog and the
// node's Local are then the same directory); package fleet implements
// it on the fleet's Redis, shared by every node. The engine (package
// engine) sees only these interfaces, so issue, batch, renew and the
// fleet agent run one pipeline whichever it is.
//
// # The contract
//
// Every implementation keeps these; callers may rely on them.
//
//   - Head is the newest version of a lineage: its metadata with Version
//     set. Versions are numbered by the catalog alone, from 1, in
//     Publish; Fetch gives a version's files (the private key in the
//     clear, for this node only) while the catalog still holds it, and
//     ErrSuperseded once a newer version replaced it.
//   - Publish is atomic and fenced: it records a certificate obtained
//     under lease and returns its version, or refuses with ErrStale when
//     a newer lease was handed out since lease was taken (the holder
//     stalled, or the name was deleted meanwhile) or a certificate
//     issued later is already there. A refused Publish records nothing.
//   - SetMeta replaces the settings of the version named by l.Version,
//     keeping its certificate, if that version is still the head.
//   - Delete removes a lineage for every reader at once and leaves a
//     tombstone; it is fenced: it moves the lease counter past every
//     lease handed out, so a run that held the lease publishes nothing
//     afterwards. A deleted name comes back only through a new Publish
//     under a lease taken after the delete.
//   - Status is what renew learnt (ARI, backoff); a status that cannot
//     be read counts as none, because everything in it can be learnt
//     again.
//   - Acquire hands out at most one lease per name at a time among every
//     process that shares the catalog; a lease may be lost (its holder
//     stalled past its TTL), and Lease.Token is a fencing counter that
//     only grows, so Publish can tell a stale holder from a current one.
//     Callers re-check whether their work is still needed after
//     acquiring, and tolerate ErrLeaseHeld (defer the name, never wait).
//
// # The fleet's invariants
//
// On one host most of these hold trivially (one process holds the state
// directory's lock); in a fleet each is enforced in exactly one place,
// named here, and checked after random faults by the randomized fleet
// test (internal/e2e, TestFleetRandomFaults).
//
//   - I1 convergence. Within 30 s of quiet, every approved node, the
//     ordering node included, serves the newest version of every live
//     lineage, deployed with that node's own deploy settings, as its
//     load balancer really serves it; 'fleet status' says a node is
//     behind exactly when it is. Enforced by the one install step
//     (engine.Node), which every command and the agent use, and which
//     compares serials and settings, not only version numbers.
//   - I2 one version, one certificate. A (name, version) names exactly
//     one certificate fleet-wide. Only Publish numbers versions, in one
//     Redis script, above every number the catalog and the publishing
//     node have seen; a node never mints one, not even when Redis does
//     not answer (the certificate then waits on that node, unnumbered,
//     until Redis does). A node that holds a number the catalog gave to
//     another certificate (Redis lost writes) replaces it (store.Local's
//     Stage).
//   - I3 deletes stick. Delete is fenced (above) and its tombstone is
//     kept by every node (store.Local's Forget), so it survives an
//     emptied or new Redis: a node rebuilding the catalog publishes its
//     tombstones (before it says it has looked, which a rebuilder
//     waits for), and a tombstone wins over any lineage born before it
//     (store.Lineage's Born, which renewals keep), in whatever order
//     nodes rebuild. Delete returns once every other live agent has the
//     tombstone on its disk (fleet's awaitTaken, bounded). Known limit:
//     a delete that only down nodes hold is missing from a Redis rebuilt
//     meanwhile, until one of them returns.
//   - I4 the issuance ledger survives Redis loss: every node keeps the
//     issue times of the certificates it has published or installed in
//     the last 7 days, the place of every order it started until its
//     certificate is noted (a run killed after the CA issued still
//     counts), and a copy of the fleet's whole ledger (its agent copies
//     it at start and every 10 minutes, so a fleet whose nodes were all
//     replaced still knows); it rebuilds an emptied ledger from them,
//     and, as a Redis back from an older snapshot or one that lost
//     writes in a failover is not empty, every agent puts back the
//     places its node noted itself at each reconcile, and a node
//     ordering puts back its own for the set before it takes one. So
//     through any
//     one Redis loss a fleet orders at most its cap plus one
//     certificate per exact set of names in 7 days, never more than the
//     CA's 5.
//   - I5 key custody. Keys are sealed under the fleet's current data
//     key, and Publish refuses a key sealed under any other: from the
//     moment 'fleet remove' returns, nothing is sealed under a key the
//     removed node can unwrap, and its agent answers no token. Only a
//     removal takes a member out: a member record Redis lost without
//     a rotation (a rebuild from an older copy, an older snapshot) is
//     put back by any member that holds it, before it acts on the
//     membership, and a member that follows a rotation carries over the
//     members of the previous key that the rotation did not name
//     removed, so a rotation never leaves a member without the key. A
//     rotation names the node it removed, in an epoch record only a
//     holder of the previous key can make; a node takes itself for
//     removed only when that record names it. Before sealing anything
//     into a rebuilt Redis, a node waits for the other members to look
//     at it (a member that made or followed a newer rotation puts that
//     epoch back first), then follows what they named. Known limit: the
//     removed node holds the previous key too; if it keeps write access
//     to Redis, it can rewrite that record before a member that had not
//     followed the rotation does, until another member's next heartbeat
//     puts the real record back. Change the Redis credentials when you
//     remove a node (README).
//   - I6 one order per name at a time, through kill -9 of any process,
//     Redis restarts, pauses and failovers: the lease above.
//   - I7 no private key in clear in Redis (sealed with AES-256-GCM under
//     the data key), and every node's disk consistent after kill -9 at
//     any point (store's atomic versions and live pointer).
//   - One ACME account per CA fleet-wide, through any Redis loss: every
//     node keeps a copy of the fleet's accounts and publishes them into a
//     rebuilt Redis before anything is ordered; a renewal whose
//     "replaces" the CA refuses (the certificate was issued under another
//     account) is ordered again without it.
//
// # Staged rollouts
//
// A fleet may set waves ('fleet rollout set'): a new version then
// reaches the nodes one wave at a time (package fleet, rollout.go). I1
// holds for the version each node's wave lets it serve; these hold too,
// and the randomized fleet test checks R1 and R3 on what the load
// balancers serve, once a second under its faults and after quiet
// (internal/e2e, checkRolloutInvariants):
//
//   - R1 waves in order. No node of a later wave installs a version
//     before every earlier wave passed: each of its nodes deployed it,
//     its load balancer serves it (the agent's TLS check), the probe
//     through it passed, and the soak time went by with the version
//     checked; except by the expiry override (R3). The soak is checked:
//     while it lasts the wave's agents run the TLS check and the probe
//     again (every sixth of the soak, 1 s to 30 s), and any failure
//     holds the rollout as a failed check at the deploy does (R2). At
//     the soak's end the wave passes only if every node of it has a
//     passing check no older than two rounds and a little, and a live
//     heartbeat; otherwise the wave waits, and a node that served the
//     version but has no heartbeat and no check for three times that
//     (two minutes at least) holds the rollout, named ("no check from
//     lb1 ... (agent down?)"). A node removed from the fleet leaves its
//     wave: the wave is judged on the nodes left, and one with none left
//     passes when its soak time is over. With no soak the deploy's
//     check is the check: no wait for another, no heartbeat asked. Enforced by the one install step: engine.
//     Node.Gate (fleet's Node.Gate) says which version a node may serve,
//     asked afresh by every install and by the agent's plan, so the gate
//     decides what is installed, never how. The rollout starts in the
//     same Redis script that publishes the version (rdb's publish), so
//     no node sees the head without its rollout; the head before it is
//     kept as the previous bundle until the rollout ends.
//   - R2 a failed check holds the version everywhere it has not
//     reached: no node that does not serve it gets it, and the node
//     whose check failed goes back to the previous version (its deploy
//     rolls back, or the gate sends it back). Only 'fleet rollout
//     resume' or a new version moves on; 'abort' sends every node back.
//     Waves move only by compare-and-set on the record's version and
//     seq, so agents judging at once move a rollout once, and a wave
//     never goes back within a version's rollout.
//   - R3 expiry beats caution. No node serves an expired certificate
//     while a valid one exists: within the expiry margin of the previous
//     version's lifetime (15 % by default: 21.6 hours of a 6-day
//     certificate) the gate lets the new version through on every node,
//     held or not, and records when that began (status, reports, mail,
//     metrics).
//   - R4 rollout state survives Redis loss. Every node keeps a copy of
//     the waves and of each rollout on its way, the node that ordered a
//     held version keeps the version, and a rebuild publishes the
//     copies before the certificates (the newest copy wins), then the
//     version each rollout rolls out and the one it keeps.
//   - R5 a node's wave is resolved from the current members: a node
//     that joins mid-rollout gets the version its wave may serve, the
//     previous one from the fleet when its wave is not released.
package catalog

import (
	"context"
	"errors"
	"log/slog"
	"slices"
	"time"

	"github.com/lbcert/lbcert/internal/store"
)

// Catalog is the shared record of certificate lineages (see the package
// doc for its contract).
type Catalog interface {
	// Names lists the lineages that exist and are not deleted, in the
	// order people count (store.NaturalLess).
	Names(ctx context.Context) ([]string, error)
	// Head is the newest version's metadata, or ErrNotFound.
	Head(ctx context.Context, name string) (*store.Lineage, error)
	// Fetch is one version's metadata and files.
	Fetch(ctx context.Context, name string, version int) (*store.Lineage, store.Files, error)
	// Publish records a certificate obtained under lease as the newest
	// version of l.Name and returns its number.
	Publish(ctx context.Context, lease Lease, l *store.Lineage, files store.Files) (int, error)
	// SetMeta replaces the settings of version l.Version.
	SetMeta(ctx context.Context, l *store.Lineage) error
	// Delete removes name and leaves its tombstone.
	Delete(ctx context.Context, name string) error
	Status(ctx context.Context, name string) (store.Status, error)
	SetStatus(ctx context.Context, name string, st store.Status) error
	// Acquire takes the lease for name or fails at once with
	// ErrLeaseHeld; ttl bounds how long a stalled holder keeps it.
	Acquire(ctx context.Context, name string, ttl time.Duration) (Lease, error)
}

// Accounts holds ACME account keys and registrations: on one host in
// the state directory, in a fleet sealed in Redis with a copy on every
// node. WriteAccountKey happens before registration, so a registration
// the CA accepted is never lost to a crash.
type Accounts interface {
	ReadAccount(server, email string) (key, reg []byte, err error)
	HasAccount(server, email string) bool
	WriteAccountKey(server, email string, key []byte) error
	WriteAccount(server, email string, reg []byte) error
	RemoveAccount(server, email string) error
}

// Lease is one holder's claim on a lineage name.
type Lease interface {
	// Token is the fencing token: larger than every token handed out
	// for the same name before.
	Token() int64
	// Release gives the name up; releasing a lost lease is a no-op.
	Release()
}

// ErrNotFound is a lineage the catalog does not hold.
var ErrNotFound = store.ErrNotFound

// ErrLeaseHeld means another holder has the lease for a name.
var ErrLeaseHeld = errors.New("another run holds this lineage")

// ErrSuperseded is a version the catalog no longer holds: a newer one
// replaced it.
var ErrSuperseded = errors.New("a newer version replaced this one")

// ErrStale is a Publish refused by the fence (see Catalog.Publish).
type ErrStale struct {
	Name   string
	Reason string
}

func (e *ErrStale) Error() string {
	return "the catalog refused this certificate for " + e.Name + ": " + e.Reason
}

// NoBackoff: the name is fine; this run lost a race.
func (e *ErrStale) NoBackoff() bool { return true }

// HintText makes *ErrStale a hint.Hinter.
func (e *ErrStale) HintText() string {
	return "nothing to do: what the catalog holds stands (another node's newer certificate, or the delete)"
}

// NamesBeside is cat.Names, with other's list (the names never issued,
// which a renew pass retries and list shows) read at the same time: on
// a state directory of a million lineages each is a listing of a
// directory of a million entries, and one core would otherwise wait for
// the other. The caller can go on without other's list, so its error is
// a warning, unlisted, that says what the caller does without it.
//
// A name is in one list only. A name in both is a lineage when the
// catalog holds a version of it (a lineage whose link in live/ is
// missing, with failures on record), so that a pass runs it once and
// list shows it once; it stays a name never issued when the catalog
// holds none (an archive a killed or failed first save left empty), so
// that the next pass orders it again.
func NamesBeside(ctx context.Context, cat Catalog, other func() ([]string, error), unlisted string) (names, others []string, err error) {
	done := make(chan struct{})
	go func() {
		defer close(done)
		var oerr error
		if others, oerr = other(); oerr != nil {
			slog.Warn(unlisted, "err", oerr)
		}
	}()
	names, err = cat.Names(ctx)
	<-done
	if err != nil || len(others) == 0 {
		return names, others, err
	}
	return oneList(ctx, cat, names, others)
}

// oneList settles the names in both lists (NamesBeside). others is short
// (the names never issued) and names may hold a million, so names is
// walked once, not searched for each.
func oneList(ctx context.Context, cat Catalog, names, others []string) ([]string, []string, error) {
	both := make(map[string]bool, len(others)) // true: a lineage
	for _, n := range others {
		both[n] = false
	}
	found := false
	for _, n := range names {
		if _, ok := both[n]; ok {
			_, herr := cat.Head(ctx, n)
			both[n], found = !errors.Is(herr, store.ErrNotFound), true
		}
	}
	if !found {
		return names, others, nil
	}
	others = slices.DeleteFunc(others, func(n string) bool { return both[n] })
	names = slices.DeleteFunc(names, func(n string) bool { lineage, ok := both[n]; return ok && !lineage })
	return names, others, nil
}
