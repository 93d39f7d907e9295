package fleet

import (
	"context"
	"fmt"
	"path/filepath"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/lbcert/lbcert/internal/catalog/catalogtest"
	"github.com/lbcert/lbcert/internal/deploy"
	"github.com/lbcert/lbcert/internal/store"
)

// slicedDeployer stands in for the deploy step of an HAProxy updated
// over its runtime API. Each Run records its size, checks that no other
// Run is in progress, and waits until the next slice is being staged
// meanwhile (a lineage it does not deploy becomes live), which only
// happens when slices overlap. failAt: that Run (1-based) counts a
// runtime-API failure, as one that fell back to a reload would.
type slicedDeployer struct {
	st     *store.Store
	total  int
	failAt int

	mu       sync.Mutex
	sizes    []int
	deployed map[string]int
	overlaps int // Runs during which the next slice was staged
	inRun    atomic.Int32
	twoAtAll atomic.Bool // two Runs at once
	failures atomic.Int64
}

func (d *slicedDeployer) Test(context.Context, store.Deploy) string { return "" }

func (d *slicedDeployer) RuntimeAPIFailures() int64 { return d.failures.Load() }

func (d *slicedDeployer) Run(_ context.Context, changes []deploy.Change) []deploy.Result {
	if d.inRun.Add(1) > 1 {
		d.twoAtAll.Store(true)
	}
	defer d.inRun.Add(-1)
	d.mu.Lock()
	done := 0
	for _, n := range d.deployed {
		done += n
	}
	d.sizes = append(d.sizes, len(changes))
	n := len(d.sizes)
	d.mu.Unlock()
	if done+len(changes) < d.total {
		// Others are left: the next slice is staged while this deploys.
		for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(5 * time.Millisecond) {
			if d.live() > done+len(changes) {
				d.mu.Lock()
				d.overlaps++
				d.mu.Unlock()
				break
			}
		}
	}
	if n == d.failAt {
		d.failures.Add(1)
	}
	out := make([]deploy.Result, len(changes))
	d.mu.Lock()
	defer d.mu.Unlock()
	for i, c := range changes {
		d.deployed[c.Name]++
		out[i] = deploy.Result{Name: c.Name, Deployed: true}
	}
	return out
}

func (d *slicedDeployer) live() int {
	names, _ := d.st.Names()
	live := 0
	for _, n := range names {
		if _, err := d.st.LiveVersion(n); err == nil {
			live++
		}
	}
	return live
}

// A node joining a fleet installs many lineages for an HAProxy updated
// over its runtime API in slices, two engine runs at a time: the next
// slice is staged while one deploys, deploys go one at a time, slices
// grow from the first to the largest, and every lineage is installed
// and deployed once, names given twice included. After a runtime-API
// failure the names left go in one run (a reload is once per run).
func TestLargeInstallGoesInSlices(t *testing.T) {
	saved := []int{sliceFrom, firstSlice, maxSlice}
	sliceFrom, firstSlice, maxSlice = 10, 5, 20
	t.Cleanup(func() { sliceFrom, firstSlice, maxSlice = saved[0], saved[1], saved[2] })
	_, sh := startRedis(t)
	ctx := context.Background()
	dir := t.TempDir()
	lb1, err := Init(ctx, sh, store.New(filepath.Join(dir, "lb1")), "lb1")
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for i := range 60 {
		l, files := catalogtest.Cert(t, fmt.Sprintf("s%02d.example", i), time.Now().UTC().Truncate(time.Second))
		publishAs(t, NewCatalog(lb1), l, files)
		names = append(names, l.Name)
	}
	for _, tc := range []struct {
		node   string
		failAt int
		sizes  []int
	}{
		{"lb2", 0, []int{5, 10, 20, 20, 5}},
		// Run 2 fails; run 3 was staging meanwhile, and the slice
		// after it takes the 25 names left.
		{"lb3", 2, []int{5, 10, 20, 25}},
	} {
		t.Run(tc.node, func(t *testing.T) {
			st := store.New(filepath.Join(dir, tc.node))
			fp, _, err := Join(ctx, sh, st, tc.node)
			if err != nil {
				t.Fatal(err)
			}
			if err := lb1.Approve(ctx, tc.node, fp); err != nil {
				t.Fatal(err)
			}
			n, err := Open(ctx, sh, st)
			if err != nil {
				t.Fatal(err)
			}
			d := &slicedDeployer{st: st, total: len(names), failAt: tc.failAt, deployed: map[string]int{}}
			s := &Syncer{N: n, Local: st, Runner: d, Deploy: store.Deploy{Target: "haproxy", HAProxySocket: "/run/haproxy/admin.sock", HAProxyCerts: "/etc/haproxy/certs"}}
			var given []string // each twice, so that without care one would be in two slices at once
			for _, name := range names {
				given = append(given, name, name)
			}
			if err := s.sync(ctx, given); err != nil {
				t.Fatal(err)
			}
			d.mu.Lock()
			defer d.mu.Unlock()
			if !slices.Equal(d.sizes, tc.sizes) || d.twoAtAll.Load() {
				t.Fatalf("deploys of %v (want %v), two at once: %v", d.sizes, tc.sizes, d.twoAtAll.Load())
			}
			if d.overlaps != len(tc.sizes)-1 {
				t.Fatalf("the next slice was staged during %d of the %d deploys before the last", d.overlaps, len(tc.sizes)-1)
			}
			for _, name := range names {
				v, err := st.LiveVersion(name)
				if d.deployed[name] != 1 || err != nil || v != 1 {
					t.Fatalf("%s: deployed %d times, live version %d (%v)", name, d.deployed[name], v, err)
				}
			}
		})
	}
}
