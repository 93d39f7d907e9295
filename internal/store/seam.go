package store

import (
	"context"
	"time"
)

// The storage seam. The run engine (internal/engine) and deploy see the
// state through these interfaces only, never through a directory path,
// so that a second implementation (fleet mode's shared half in Redis)
// can stand behind the same engine. *Store, the state directory, is the
// first implementation and implements all of them.
//
// The contract, which every implementation must keep and which callers
// may rely on:
//
//   - Lineages. Save is atomic: after it returns, LoadVersion(name, v)
//     gives the new metadata and every file of version v, complete and
//     consistent, whatever crash came before; a Save that fails leaves no
//     version behind that a reader could see. Save does not make the
//     version live: Activate does, atomically (a reader sees the old
//     version or the new one, never a mix). Rollback(name, 0) removes the
//     lineage from the live set and keeps its archive. Delete removes the
//     live pointer first, so the lineage disappears for every reader at
//     once. Load, ReadKey and ReadFullchain read the live version.
//     Versions are numbered from 1 and never reused for another
//     certificate.
//   - Statuses. WriteStatus replaces the status atomically; a status that
//     cannot be read counts as none (it only holds what can be learnt
//     again: ARI answers, backoff, a pending deploy is re-derived from
//     the archive only by an operator, so implementations must not lose
//     a written status silently).
//   - Leases. At most one holder per name at a time among all processes
//     that share the implementation. A lease may be lost (its holder
//     stalled past its TTL); Token is a fencing counter that only grows,
//     so a writer can tell a stale holder from a current one. Callers
//     must re-check whether their work is still needed after acquiring,
//     and must tolerate ErrLeaseHeld (defer the name, never wait long).
//   - Accounts. WriteAccountKey happens before registration, so a
//     registration the CA accepted is never lost to a crash.
//
// Callers hold the run's lock (Store.TryLock for a directory) around
// anything that writes; the engine takes a Lease per lineage on top of
// it, which on one host is a formality and in a fleet is the guarantee.

// Lineages holds certificate lineages and their versions.
type Lineages interface {
	Names() ([]string, error)
	Load(name string) (*Lineage, error)
	LoadVersion(name string, version int) (*Lineage, error)
	LiveVersion(name string) (int, error)
	SaveVersion(l *Lineage, files Files) (version int, err error)
	UpdateMeta(l *Lineage) error
	Activate(name string, version int) error
	Rollback(name string, previous int) error
	Delete(name string) error
	Prune(name string, keep int, protect ...int) (removed []int, err error)
	ReadKey(name string) ([]byte, error)
	ReadFullchain(name string) ([]byte, error)
	LivePaths(name string) Paths
	ArchiveDir(name string) string
}

// Statuses holds what renew learns about a lineage between runs.
type Statuses interface {
	ReadStatus(name string) (Status, error)
	WriteStatus(name string, st Status) error
	RemoveStatus(name string) error
}

// Accounts holds ACME account keys and registrations.
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

// Leases hands out per-name leases.
type Leases interface {
	// Acquire takes the lease for name or fails at once with
	// ErrLeaseHeld; ttl bounds how long a stalled holder keeps it.
	Acquire(ctx context.Context, name string, ttl time.Duration) (Lease, error)
}

// Backend is everything the engine needs from storage.
type Backend interface {
	Lineages
	Statuses
	Accounts
	Leases
}

var _ Backend = (*Store)(nil)
