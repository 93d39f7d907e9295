package main

import (
	"bytes"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"github.com/lbcert/lbcert/internal/hint"
	"github.com/lbcert/lbcert/internal/secret"
)

// Every line the printer writes is one line, in lbcert's voice, with
// known secrets scrubbed: errors, hints, warnings and log records alike.
func TestPrinterOneLineScrubbed(t *testing.T) {
	secret.Add("pa55-w0rd-xyz")
	var b bytes.Buffer
	p := &printer{w: &b}
	p.errorWithHint(hint.Wrap(fmt.Errorf("dial smtp: auth failed for pa55-w0rd-xyz:\n  535 denied"), "check\n--smtp-user"))
	p.warningf("could not mail the report: %s", errors.New("x\ny"))
	h := &lineHandler{p: p, level: slog.LevelDebug}
	slog.New(h).Warn("deferred", "line", 3, "why", "rate\nlimited pa55-w0rd-xyz")
	p.at("rows.csv", 7, "domain %q: has a port", "a.example.com:443")
	want := []string{
		"lbcert: error: dial smtp: auth failed for [secret]: 535 denied",
		"lbcert: hint: check --smtp-user",
		"lbcert: warning: could not mail the report: x y",
		`lbcert: warning: deferred line=3 why="rate\nlimited [secret]"`,
		`rows.csv:7: domain "a.example.com:443": has a port`,
	}
	if got := strings.Split(strings.TrimSuffix(b.String(), "\n"), "\n"); strings.Join(got, "\n") != strings.Join(want, "\n") {
		t.Fatalf("printed:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
}

// No "lbcert: error/hint/warning" line is written by hand: the printer
// (voice.go) is the only place that spells one, in cmd and in every
// internal package.
func TestOneVoice(t *testing.T) {
	re := regexp.MustCompile(`"lbcert: (error|hint|warning)`)
	roots := []string{".", "../../internal"}
	for _, root := range roots {
		filepath.WalkDir(root, func(p string, d os.DirEntry, err error) error {
			if err != nil || d.IsDir() || !strings.HasSuffix(p, ".go") || strings.HasSuffix(p, "_test.go") ||
				p == "voice.go" || strings.Contains(p, "/testenv/") || strings.Contains(p, "/bench/") {
				return nil
			}
			data, err := os.ReadFile(p)
			if err != nil {
				t.Fatal(err)
			}
			for i, line := range strings.Split(string(data), "\n") {
				if re.MatchString(line) && !strings.HasPrefix(strings.TrimSpace(line), "//") {
					t.Errorf("%s:%d writes a message by hand: %s", p, i+1, strings.TrimSpace(line))
				}
			}
			return nil
		})
	}
}
