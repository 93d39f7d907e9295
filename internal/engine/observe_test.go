package engine

import (
	"context"
	"sync"
	"testing"
)

// A progress bar counts a row when its certificate is obtained, not when
// the run's one deploy at the end is done (issue #26 item 9: the bar
// stayed at 0, then jumped to the end): every item is observed before
// the deploy runs.
func TestObservedWhenObtained(t *testing.T) {
	f := newFixture(t)
	var mu sync.Mutex
	deploysSeen := map[string]int{}
	observe := func(it *Item) {
		mu.Lock()
		defer mu.Unlock()
		f.dep.mu.Lock()
		deploysSeen[it.Name] = len(f.dep.runs)
		f.dep.mu.Unlock()
	}
	res := f.run(context.Background(), Options{Command: "batch", Observe: observe}, job("o1.test"), job("o2.test"), job("o3.test"))
	if res.Counts[Issued] != 3 || len(f.dep.runs) != 1 {
		t.Fatalf("counts %v, deploy runs %v", res.Counts, f.dep.runs)
	}
	if len(deploysSeen) != 3 {
		t.Fatalf("observed %v, want each of the 3 once", deploysSeen)
	}
	for name, n := range deploysSeen {
		if n != 0 {
			t.Errorf("%s observed after the deploy, not when obtained", name)
		}
	}
}
