// Package progress is batch's progress bar on a terminal: rows counted
// out of the total as their certificates are obtained, ok and failed, an
// ETA, then the phase that follows (the deploy), redrawn in place. Log
// lines written through it are drawn above it, never mixed with it.
package progress

import (
	"fmt"
	"io"
	"strings"
	"sync"
	"time"
)

// Bar is batch's progress bar on a terminal: rows done out of total,
// ok, failed and an ETA, redrawn in place on stderr. Log lines written
// through it erase the bar, print, and redraw it, so the two never mix.
type Bar struct {
	mu                   sync.Mutex
	w                    io.Writer
	total, done, ok, bad int
	start                time.Time
	now                  func() time.Time
	width                int
	drawn                bool
	// label names the phase after the orders: the deploy, which runs
	// once for every certificate at the end.
	label string
}

// New draws a bar for total rows on w.
func New(w io.Writer, total int, now func() time.Time) *Bar {
	return &Bar{w: w, total: total, start: now(), now: now, width: 30}
}

// Step counts one finished row.
func (p *Bar) Step(ok bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.done++
	if ok {
		p.ok++
	} else {
		p.bad++
	}
	p.draw()
}

// Phase shows what the run does now that every row is counted.
func (p *Bar) Phase(label string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.label = label
	p.draw()
}

// Write prints a log line above the bar.
func (p *Bar) Write(b []byte) (int, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.drawn {
		io.WriteString(p.w, "\r\033[K")
	}
	n, err := p.w.Write(b)
	p.draw()
	return n, err
}

// Finish leaves the last state of the bar on its own line.
func (p *Bar) Finish() {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.drawn {
		io.WriteString(p.w, "\n")
		p.drawn = false
	}
}

func (p *Bar) draw() {
	io.WriteString(p.w, "\r\033[K"+p.line())
	p.drawn = true
}

// line renders the bar: [=========>          ] 120/200  ok 118  failed 2  ETA 42s,
// or the phase's label in place of the ETA.
func (p *Bar) line() string {
	filled := 0
	if p.total > 0 {
		filled = p.width * p.done / p.total
	}
	bar := strings.Repeat("=", filled)
	if filled < p.width {
		bar += ">" + strings.Repeat(" ", p.width-filled-1)
	}
	eta := "ETA --"
	if p.done > 0 && p.done < p.total {
		per := p.now().Sub(p.start) / time.Duration(p.done)
		eta = "ETA " + (per * time.Duration(p.total-p.done)).Round(time.Second).String()
	} else if p.done == p.total {
		eta = "ETA done"
	}
	if p.label != "" {
		eta = p.label
	}
	return fmt.Sprintf("[%s] %d/%d  ok %d  failed %d  %s", bar, p.done, p.total, p.ok, p.bad, eta)
}
