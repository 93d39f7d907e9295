//go:build profile

package main

import (
	"os"
	"runtime/pprof"
)

// A build with -tags profile writes a CPU profile of the whole run to
// $LBCERT_CPUPROFILE and a heap profile at exit to $LBCERT_MEMPROFILE:
// how the benchmark page's large passes are profiled
// (go build -tags profile ./cmd/lbcert). Release builds have neither.
func init() {
	if p := os.Getenv("LBCERT_CPUPROFILE"); p != "" {
		if f, err := os.Create(p); err == nil && pprof.StartCPUProfile(f) == nil {
			prev := atExit
			atExit = func() { pprof.StopCPUProfile(); f.Close(); prev() }
		}
	}
	if p := os.Getenv("LBCERT_MEMPROFILE"); p != "" {
		prev := atExit
		atExit = func() {
			prev()
			if f, err := os.Create(p); err == nil {
				pprof.WriteHeapProfile(f)
				f.Close()
			}
		}
	}
}
