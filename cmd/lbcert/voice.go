package main

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"strings"
	"sync"

	"github.com/lbcert/lbcert/internal/hint"
	"github.com/lbcert/lbcert/internal/secret"
)

// printer is lbcert's one voice on stderr (age's cmd/age/tui.go): every
// "lbcert: error: ...", "lbcert: hint: ..." and "lbcert: warning: ..."
// line, and every log line, is written here, as one line, with every
// known secret scrubbed. Nothing else writes such a line.
type printer struct {
	mu sync.Mutex
	w  io.Writer
}

// to points the printer at w: stderr, or batch's progress bar, which
// draws the lines above itself.
func (p *printer) to(w io.Writer) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.w = w
}

// say writes "lbcert: KIND: text", or "lbcert: text" for an empty kind.
func (p *printer) say(kind, format string, args ...any) {
	if kind != "" {
		kind += ": "
	}
	p.line("lbcert: "+kind, format, args...)
}

func (p *printer) errorf(format string, args ...any)   { p.say("error", format, args...) }
func (p *printer) warningf(format string, args ...any) { p.say("warning", format, args...) }
func (p *printer) hintf(format string, args ...any)    { p.say("hint", format, args...) }

// at prints a problem at a line of a file the user gave, as compilers
// do: "FILE:LINE: reason" (a line of 0 is the whole file).
func (p *printer) at(file string, line int, format string, args ...any) {
	if line > 0 {
		file = fmt.Sprintf("%s:%d", file, line)
	}
	p.line(file+": ", format, args...)
}

// line is the one writer: prefix, then the text on one line, scrubbed.
func (p *printer) line(prefix, format string, args ...any) {
	text := secret.Scrub(strings.Join(strings.Fields(fmt.Sprintf(format, args...)), " "))
	p.mu.Lock()
	defer p.mu.Unlock()
	io.WriteString(p.w, prefix+text+"\n")
}

// errorWithHint prints err and, when it carries one, what to try next.
func (p *printer) errorWithHint(err error) {
	p.errorf("%s", err)
	if h := hint.Of(err); h != "" {
		p.hintf("%s", h)
	}
}

// lineHandler prints slog records through the printer, as "lbcert:
// warning: message key=value ...": a person reads them in cron mail.
type lineHandler struct {
	p     *printer
	level slog.Level
	attrs []slog.Attr
}

func (h *lineHandler) Enabled(_ context.Context, l slog.Level) bool { return l >= h.level }

func (h *lineHandler) Handle(_ context.Context, r slog.Record) error {
	var b strings.Builder
	b.WriteString(r.Message)
	write := func(a slog.Attr) bool {
		v := a.Value.String()
		if strings.ContainsAny(v, " \t\"") {
			v = fmt.Sprintf("%q", v)
		}
		fmt.Fprintf(&b, " %s=%s", a.Key, v)
		return true
	}
	for _, a := range h.attrs {
		write(a)
	}
	r.Attrs(write)
	kind := ""
	switch {
	case r.Level >= slog.LevelError:
		kind = "error"
	case r.Level >= slog.LevelWarn:
		kind = "warning"
	case r.Level < slog.LevelInfo:
		kind = "debug"
	}
	h.p.say(kind, "%s", b.String())
	return nil
}

func (h *lineHandler) WithAttrs(attrs []slog.Attr) slog.Handler {
	return &lineHandler{p: h.p, level: h.level, attrs: append(append([]slog.Attr{}, h.attrs...), attrs...)}
}

func (h *lineHandler) WithGroup(string) slog.Handler { return h }
