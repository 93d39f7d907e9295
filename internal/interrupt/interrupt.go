// Package interrupt is lbcert's answer to SIGINT and SIGTERM, in three
// contexts. The first signal ends Work: no new order starts, and what
// was obtained is deployed and reported. Hooks ends Grace after it, so a
// deploy hook still running is stopped instead of waited out. The second
// signal ends Hooks and Now (the report's mail step) at once.
//
// It promises nothing about the state on disk: that is the store's, which
// stays consistent whatever is cut short (a deploy stopped is kept owed,
// and the next run finishes it).
package interrupt

import (
	"context"
	"os"
	"os/signal"
	"syscall"
	"time"
)

// Signals are the three contexts.
type Signals struct {
	Work, Hooks, Now context.Context
}

// Trap starts listening; first is told of the first signal. release
// stops listening and ends every context.
func Trap(grace time.Duration, first func()) (s Signals, release func()) {
	var stopWork, stopHooks, stopNow context.CancelFunc
	s.Work, stopWork = context.WithCancel(context.Background())
	s.Hooks, stopHooks = context.WithCancel(context.Background())
	s.Now, stopNow = context.WithCancel(context.Background())
	sigs := make(chan os.Signal, 2)
	signal.Notify(sigs, os.Interrupt, syscall.SIGTERM)
	go func() {
		if _, ok := <-sigs; !ok {
			return
		}
		stopWork()
		first()
		timer := time.AfterFunc(grace, stopHooks)
		defer timer.Stop()
		if _, ok := <-sigs; ok {
			stopHooks()
			stopNow()
		}
	}()
	return s, func() {
		signal.Stop(sigs)
		close(sigs)
		stopWork()
		stopHooks()
		stopNow()
	}
}
