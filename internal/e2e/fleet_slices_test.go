package e2e

import (
	"fmt"
	"regexp"
	"slices"
	"testing"
	"time"
)

// A node joining a fleet that holds 250 lineages, with an HAProxy
// updated over its runtime API, installs them in slices (100, then the
// 150 left), one staged while the one before deploys, and serves every
// one with the fleet's serial, with no reload.
func TestFleetJoinInstallsInSlices(t *testing.T) {
	t.Parallel()
	f := newFleet(t, "lb1", "lb2")
	f.form()
	f.startAgent("lb1")
	f.validateVia("lb1")
	const n = 250
	csv := f.writeCSV("join.csv", 0, n)
	f.mustOn("lb1", "batch", csv, "--preflight=false", "--agree-tos", "--rate-orders", "1000/1h", "--rate-domain", "off")
	if got := len(f.fleetNames()); got != n {
		t.Fatalf("the fleet holds %d lineages, want %d", got, n)
	}
	lb2 := f.nodeHAProxy("lb2")
	f.startAgent("lb2", lb2.flags...)
	names := f.fleetNames()
	// Every name, not a sample: fleet status exits 0 while a node is
	// behind by less than --max-lag, and slices land one after another.
	wrong := ""
	if !poll(3*time.Minute, func() bool {
		for _, name := range names {
			if got, want := servesName(lb2.addr, name), f.fleetSerial(name); got != want {
				wrong = fmt.Sprintf("lb2 serves %q for %s, the fleet holds %s", got, name, want)
				return false
			}
		}
		return true
	}) {
		t.Fatalf("after 3 minutes %s:\n%s", wrong, f.nodes["lb2"].agentLog())
	}
	f.waitStatusOK(converge)
	log := f.nodes["lb2"].agentLog()
	var sizes []string
	for _, m := range regexp.MustCompile(`haproxy updated over its runtime API, no reload .*certificates=(\d+)`).FindAllStringSubmatch(log, -1) {
		sizes = append(sizes, m[1])
	}
	if !slices.Equal(sizes, []string{"100", "150"}) || regexp.MustCompile(`tested and reloaded|reloading instead`).MatchString(log) {
		t.Fatalf("lb2's runtime-API updates of %v certificates, want 100 then 150, and no reload:\n%s", sizes, log)
	}
}
