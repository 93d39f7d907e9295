package progress

import (
	"bytes"
	"strings"
	"testing"
	"time"
)

// TestProgress: the bar counts rows, ok and failed, estimates the rest
// from the pace so far, and log lines written through it erase and
// redraw it instead of mixing with it.
func TestProgress(t *testing.T) {
	now := time.Date(2026, 11, 22, 10, 0, 0, 0, time.UTC)
	clock := func() time.Time { return now }
	var out bytes.Buffer
	p := New(&out, 10, clock)
	p.width = 10
	now = now.Add(4 * time.Second)
	p.Step(true)
	p.Step(false)
	if got, want := p.line(), "[==>       ] 2/10  ok 1  failed 1  ETA 16s"; got != want {
		t.Fatalf("line %q, want %q", got, want)
	}
	p.Write([]byte("lbcert: issued name=a\n"))
	if !strings.HasSuffix(out.String(), "\r\033[Klbcert: issued name=a\n\r\033[K"+p.line()) {
		t.Fatalf("log line not drawn above the bar: %q", out.String())
	}
	for range 8 {
		p.Step(true)
	}
	if got, want := p.line(), "[==========] 10/10  ok 9  failed 1  ETA done"; got != want {
		t.Fatalf("line %q, want %q", got, want)
	}
	// Every row counted when its certificate was obtained; the deploy
	// is a phase of its own.
	p.Phase("deploying 9 certificates")
	p.Finish()
	if !strings.HasSuffix(out.String(), "[==========] 10/10  ok 9  failed 1  deploying 9 certificates\n") {
		t.Fatalf("final bar: %q", out.String())
	}
}
