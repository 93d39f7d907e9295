package main

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"

	"github.com/lbcert/lbcert/internal/config"
)

// TestDocsUpToDate fails when man/ or completions/ differ from what the
// commands generate: run "make docs" and commit the result.
func TestDocsUpToDate(t *testing.T) {
	a := &app{out: &bytes.Buffer{}, err: &bytes.Buffer{}, getenv: func(string) string { return "" }, now: time.Now}
	files, err := generateDocs(a.newRootCmd())
	if err != nil {
		t.Fatal(err)
	}
	var stale []string
	for name, want := range files {
		dir := "../../completions"
		if filepath.Ext(name) == ".1" {
			dir = "../../man"
		}
		got, err := os.ReadFile(filepath.Join(dir, name))
		if err != nil || !bytes.Equal(got, want) {
			stale = append(stale, filepath.Join(filepath.Base(dir), name))
		}
	}
	// A committed page for a command that no longer exists is stale too.
	for _, dir := range []string{"../../man", "../../completions"} {
		entries, _ := os.ReadDir(dir)
		for _, e := range entries {
			if _, ok := files[e.Name()]; !ok && e.Name() != ".keep" {
				stale = append(stale, filepath.Join(filepath.Base(dir), e.Name())+" (no longer generated)")
			}
		}
	}
	sort.Strings(stale)
	if len(stale) > 0 {
		t.Fatalf("generated docs are stale; run 'make docs' and commit:\n%v", stale)
	}
	if _, ok := files["lbcert-renew.1"]; !ok {
		t.Fatal("no man page for lbcert renew")
	}
}

// Every flag of every command is a setting: it has an environment
// variable and a config key, so "lbcert issue -d foo.com" can take its
// webroot from /etc/lbcert/config.yaml. Only the flags listed here are
// command-line only, each for a reason.
func TestEveryFlagIsASetting(t *testing.T) {
	commandLineOnly := map[string]string{
		"help":    "cobra's",
		"version": "cobra's",
		"config":  "names the file itself; LBCERT_CONFIG is read by the root",
		"yes":     "a standing yes would let delete remove lineages without ever asking",
	}
	a := &app{out: &bytes.Buffer{}, err: &bytes.Buffer{}, getenv: func(string) string { return "" }, now: time.Now}
	root := a.newRootCmd()
	root.InitDefaultHelpFlag()
	root.InitDefaultVersionFlag()
	known := a.knownKey(root)
	var walk func(c *cobra.Command)
	n := 0
	walk = func(c *cobra.Command) {
		c.InitDefaultHelpFlag()
		check := func(f *pflag.Flag) {
			n++
			if why, ok := commandLineOnly[f.Name]; ok {
				if config.IsSetting(f) && f.Name != "help" && f.Name != "version" {
					t.Errorf("%s --%s is listed as command-line only (%s) but is a setting", c.CommandPath(), f.Name, why)
				}
				return
			}
			if !config.IsSetting(f) {
				t.Errorf("%s --%s has no environment variable (%s) or config key", c.CommandPath(), f.Name, config.EnvName(f.Name))
			}
			if !known(f.Name) {
				t.Errorf("%s --%s: config key %q is refused by the config loader", c.CommandPath(), f.Name, f.Name)
			}
		}
		c.LocalFlags().VisitAll(check)
		c.PersistentFlags().VisitAll(check)
		for _, sc := range c.Commands() {
			walk(sc)
		}
	}
	walk(root)
	if n < 50 {
		t.Fatalf("walked only %d flags", n)
	}
}

// The top level is the design's: cmd, internal, testdata, man,
// completions, go.mod, go.sum, Makefile, README.md, .gitignore and .ci.
// The benchmark page lives at internal/bench/README.md.
func TestTopLevelLayout(t *testing.T) {
	out, err := exec.Command("git", "-C", "../..", "ls-files").Output()
	if err != nil {
		t.Fatalf("git ls-files: %v", err)
	}
	allowed := map[string]bool{"cmd": true, "internal": true, "testdata": true, "man": true, "completions": true,
		"go.mod": true, "go.sum": true, "Makefile": true, "README.md": true, ".gitignore": true, ".ci": true}
	seen := map[string]bool{}
	for _, f := range strings.Split(strings.TrimSpace(string(out)), "\n") {
		top := strings.SplitN(f, "/", 2)[0]
		if !allowed[top] && !seen[top] {
			t.Errorf("top-level %q is outside the layout", top)
		}
		seen[top] = true
	}
	if _, err := os.Stat("../../internal/bench/README.md"); err != nil {
		t.Errorf("the benchmark page: %v", err)
	}
}

// Users have no seeds and no issue numbers: help, man pages, completions
// and the README never mention them.
func TestNoInternalWords(t *testing.T) {
	files, _ := filepath.Glob("../../man/*.1")
	files = append(files, "../../README.md", "../../completions/lbcert.bash",
		// The pages the README links to are read by users too.
		"../../testdata/batch/README.md", "../../internal/bench/README.md")
	re := regexp.MustCompile(`(?i)\bseeds?\b|\bseed-?\d|\bissue #\d|\(#\d+`)
	for _, f := range files {
		data, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		for i, line := range strings.Split(string(data), "\n") {
			if re.MatchString(line) {
				t.Errorf("%s:%d: %s", f, i+1, line)
			}
		}
	}
}

// Every <placeholder> in help text survives into the man pages (the
// generator reads Markdown, where "<hostname>" would be an HTML tag).
func TestManKeepsPlaceholders(t *testing.T) {
	a := &app{out: &bytes.Buffer{}, err: &bytes.Buffer{}, getenv: func(string) string { return "" }, now: time.Now}
	root := a.newRootCmd()
	files, err := generateDocs(root)
	if err != nil {
		t.Fatal(err)
	}
	ph := regexp.MustCompile(`<[a-z-]+>`)
	checked := 0
	var walk func(c *cobra.Command)
	walk = func(c *cobra.Command) {
		page := string(files[strings.ReplaceAll(c.CommandPath(), " ", "-")+".1"])
		texts := []string{c.Long}
		c.LocalFlags().VisitAll(func(f *pflag.Flag) { texts = append(texts, f.Usage) })
		for _, text := range texts {
			for _, p := range ph.FindAllString(text, -1) {
				checked++
				if !strings.Contains(page, p) {
					t.Errorf("%s: man page lost %q", c.CommandPath(), p)
				}
			}
		}
		for _, sc := range c.Commands() {
			walk(sc)
		}
	}
	walk(root)
	if checked < 3 {
		t.Fatalf("only %d placeholders checked", checked)
	}
	if !strings.Contains(root.PersistentFlags().Lookup("mail-from").Usage, "<hostname>") {
		t.Fatal("generating the man pages changed the help text itself")
	}
}

// Man pages keep the help text's shape (issue #26 item 21): no stray
// italics from an underscore or a star ("LBCERT_* and RENEWED_*"), and
// every indented line (a CSV header, an exit-code table) stays a line of
// its own in a block, instead of running into the next paragraph.
func TestManFormatting(t *testing.T) {
	a := &app{out: &bytes.Buffer{}, err: &bytes.Buffer{}, getenv: func(string) string { return "" }, now: time.Now}
	root := a.newRootCmd()
	files, err := generateDocs(root)
	if err != nil {
		t.Fatal(err)
	}
	for name, data := range files {
		if strings.HasSuffix(name, ".1") && bytes.Contains(data, []byte(`\fI`)) {
			t.Errorf("%s: stray italics: %s", name, data[bytes.Index(data, []byte(`\fI`))-20:][:60])
		}
	}
	checked := 0
	var walk func(c *cobra.Command)
	walk = func(c *cobra.Command) {
		page := string(files[strings.ReplaceAll(c.CommandPath(), " ", "-")+".1"])
		blocks := regexp.MustCompile(`(?s)\n\.EX\n(.*?)\n\.EE\n`).FindAllStringSubmatch(page, -1)
		lines := strings.Split(c.Long, "\n")
		for i, line := range lines {
			if !strings.HasPrefix(line, "  ") || inList(lines, i) || c.Hidden {
				continue // a "  - item" list is Markdown's own
			}
			found := false
			for _, b := range blocks {
				found = found || strings.Contains(b[1]+"\n", line+"\n")
			}
			if !found {
				t.Errorf("%s: indented line %q is not a block of its own in the man page", c.CommandPath(), line)
			}
			checked++
		}
		for _, sc := range c.Commands() {
			walk(sc)
		}
	}
	walk(root)
	if checked < 10 || !strings.Contains(string(files["lbcert-batch.1"]), "LBCERT_* and RENEWED_*") {
		t.Fatalf("checked %d indented lines; batch page: %v", checked, strings.Contains(string(files["lbcert-batch.1"]), "RENEWED"))
	}
}
