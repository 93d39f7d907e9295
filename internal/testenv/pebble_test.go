package testenv

import (
	"os"
	"testing"
)

// A real dump of Pebble 2.10.1 hung under concurrent orders (an order's
// lock never released) is recognised as Pebble's, not lbcert's.
func TestPebbleLockWaits(t *testing.T) {
	data, err := os.ReadFile("testdata/pebble-hang.txt")
	if err != nil {
		t.Fatal(err)
	}
	if n := pebbleLockWaits(string(data)); n != 2 {
		t.Fatalf("pebbleLockWaits = %d, want 2", n)
	}
	if n := pebbleLockWaits("goroutine 1 gp=0x1 m=nil [IO wait, 2 minutes]:\nmain.main()\n"); n != 0 {
		t.Fatalf("an idle goroutine counted as stuck: %d", n)
	}
}
