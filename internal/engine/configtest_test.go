package engine

import (
	"context"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/lbcert/lbcert/internal/deploy"
	"github.com/lbcert/lbcert/internal/store"
)

// slowTester is a Deployer whose config test takes a while and counts
// how often it ran.
type slowTester struct{ tests atomic.Int32 }

func (s *slowTester) Run(context.Context, []deploy.Change) []deploy.Result { return nil }
func (s *slowTester) Test(context.Context, store.Deploy) string {
	s.tests.Add(1)
	time.Sleep(100 * time.Millisecond)
	return "broken"
}

// TestOneConfigTestForManyOwedDeploys: the lineages that owe a deploy to
// one load balancer ask for its config test together; it runs once, not
// once each (helper-52 saw seven tests of a 10,400-block nginx config
// at once, 64 s on 2 cores). Another load balancer gets its own test.
func TestOneConfigTestForManyOwedDeploys(t *testing.T) {
	tester := &slowTester{}
	n := &Node{Deploy: tester}
	a := store.Deploy{Target: "nginx", NginxConf: "/etc/nginx/a.conf"}
	b := store.Deploy{Target: "nginx", NginxConf: "/etc/nginx/b.conf"}
	var wg sync.WaitGroup
	for i := range 16 {
		wg.Go(func() {
			d := a
			if i%2 == 1 {
				d = b
			}
			if c := n.configTest(context.Background(), d); c.check != "broken" {
				t.Errorf("check %q", c.check)
			}
		})
	}
	wg.Wait()
	if got := tester.tests.Load(); got != 2 {
		t.Fatalf("%d config tests for two load balancers", got)
	}
}
