package store

import (
	"context"
	"errors"
	"sync"
	"time"
)

// ErrLeaseHeld means another holder has the lease for a name.
var ErrLeaseHeld = errors.New("another run holds this lineage")

// On one host the state-directory flock already excludes other
// processes, so a directory's leases only have to exclude the workers of
// this process from each other. The fencing counter is per process,
// which is enough: no other process can hold a lease meanwhile.
type dirLeases struct {
	mu    sync.Mutex
	held  map[string]bool
	token int64
}

var leasesOf sync.Map // *Store -> *dirLeases

func (s *Store) leases() *dirLeases {
	v, _ := leasesOf.LoadOrStore(s, &dirLeases{held: map[string]bool{}})
	return v.(*dirLeases)
}

type dirLease struct {
	l     *dirLeases
	name  string
	token int64
	once  sync.Once
}

func (d *dirLease) Token() int64 { return d.token }

func (d *dirLease) Release() {
	d.once.Do(func() {
		d.l.mu.Lock()
		delete(d.l.held, d.name)
		d.l.mu.Unlock()
	})
}

// Acquire takes the in-process lease for name; the TTL is moot on one
// host, where a stalled holder is this very process.
func (s *Store) Acquire(ctx context.Context, name string, ttl time.Duration) (Lease, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	l := s.leases()
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.held[name] {
		return nil, ErrLeaseHeld
	}
	l.held[name] = true
	l.token++
	return &dirLease{l: l, name: name, token: l.token}, nil
}
