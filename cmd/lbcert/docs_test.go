package main

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/spf13/cobra"
	"github.com/spf13/cobra/doc"
	"github.com/spf13/pflag"

	"github.com/lbcert/lbcert/internal/config"
)

// TestDocsUpToDate fails when man/ or completions/ differ from what the
// commands generate: run "make docs" (this test with -update) and
// commit the result.
func TestDocsUpToDate(t *testing.T) {
	a := &app{out: &bytes.Buffer{}, err: &bytes.Buffer{}, getenv: func(string) string { return "" }, now: time.Now}
	files, err := generateDocs(a.newRootCmd())
	if err != nil {
		t.Fatal(err)
	}
	if *update {
		writeDocs(t, files)
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

// writeDocs replaces man/ and completions/ with files.
func writeDocs(t *testing.T, files map[string][]byte) {
	old, _ := filepath.Glob("../../man/*.1")
	for _, f := range append(old, "../../completions/lbcert.bash", "../../completions/_lbcert", "../../completions/lbcert.fish") {
		os.Remove(f)
	}
	for name, data := range files {
		dir := "../../completions"
		if filepath.Ext(name) == ".1" {
			dir = "../../man"
		}
		if err := os.WriteFile(filepath.Join(dir, name), data, 0o644); err != nil {
			t.Fatal(err)
		}
	}
}

// docsDate is the date written into every man page. It is fixed so that
// regenerating the docs gives identical files (restic does the same);
// bump it when the commands change.
var docsDate = time.Date(2026, 11, 22, 0, 0, 0, 0, time.UTC)

// generateDocs renders every man page and completion script in memory,
// keyed by file name, so a test can compare them with what is committed.
func generateDocs(root *cobra.Command) (map[string][]byte, error) {
	files := map[string][]byte{}
	tmp, err := os.MkdirTemp("", "lbcert-man-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(tmp)
	root.DisableAutoGenTag = true
	// Execute adds these lazily; docs generated without executing need
	// them added here, or man pages would depend on how they were made.
	root.InitDefaultHelpCmd()
	root.InitDefaultCompletionCmd()
	// The man generator reads help text as Markdown (markdown).
	escapeAngles(root)
	defer restoreAngles(root)
	hdr := &doc.GenManHeader{Title: "LBCERT", Section: "1", Source: "lbcert", Manual: "lbcert manual", Date: &docsDate}
	if err := doc.GenManTree(root, hdr, tmp); err != nil {
		return nil, err
	}
	entries, err := os.ReadDir(tmp)
	if err != nil {
		return nil, err
	}
	for _, e := range entries {
		data, err := os.ReadFile(filepath.Join(tmp, e.Name()))
		if err != nil {
			return nil, err
		}
		files[e.Name()] = data
	}
	var b bytes.Buffer
	if err := root.GenBashCompletionV2(&b, true); err != nil {
		return nil, err
	}
	files["lbcert.bash"] = bytes.Clone(b.Bytes())
	b.Reset()
	if err := root.GenZshCompletion(&b); err != nil {
		return nil, err
	}
	files["_lbcert"] = bytes.Clone(b.Bytes())
	b.Reset()
	if err := root.GenFishCompletion(&b, true); err != nil {
		return nil, err
	}
	files["lbcert.fish"] = bytes.Clone(b.Bytes())
	if len(files) < 4 {
		return nil, fmt.Errorf("generated only %d files", len(files))
	}
	return files, nil
}

// markdown makes help text read as the Markdown the man generator
// takes it for: "<hostname>" would be an HTML tag and vanish, "LBCERT_*
// and RENEWED_*" would turn italic; and lines indented by two spaces
// (a CSV header, an example) would run into the next line, so each run
// of them becomes a block of its own, kept as typed.
func markdown(text string) string {
	var out []string
	lines := strings.Split(text, "\n")
	for i := 0; i < len(lines); i++ {
		if !strings.HasPrefix(lines[i], "  ") || inList(lines, i) {
			out = append(out, mdEscape.Replace(lines[i]))
			continue
		}
		if len(out) > 0 && out[len(out)-1] != "" {
			out = append(out, "")
		}
		for ; i < len(lines) && strings.HasPrefix(lines[i], "  "); i++ {
			out = append(out, "    "+lines[i])
		}
		if i < len(lines) && lines[i] != "" {
			out = append(out, "")
		}
		i--
	}
	return strings.Join(out, "\n")
}

// inList says whether line i belongs to a "  - item" list, which
// Markdown lays out as one.
func inList(lines []string, i int) bool {
	for ; i >= 0 && strings.HasPrefix(lines[i], "  "); i-- {
		if strings.HasPrefix(lines[i], "  - ") {
			return true
		}
	}
	return false
}

var mdEscape = strings.NewReplacer("<", `\<`, ">", `\>`, "*", `\*`, "_", `\_`)

var savedUsage = map[*pflag.Flag]string{}
var savedLong = map[*cobra.Command]string{}

// escapeAngles puts the help text in Markdown (markdown), on copies
// restored by restoreAngles, so that --help keeps its own text.
func escapeAngles(c *cobra.Command) {
	savedLong[c] = c.Long
	c.Long = markdown(c.Long)
	escape := func(f *pflag.Flag) {
		if _, done := savedUsage[f]; !done {
			savedUsage[f] = f.Usage
			f.Usage = mdEscape.Replace(f.Usage)
		}
	}
	c.LocalFlags().VisitAll(escape)
	c.PersistentFlags().VisitAll(escape)
	c.InheritedFlags().VisitAll(escape)
	for _, sc := range c.Commands() {
		escapeAngles(sc)
	}
}

func restoreAngles(c *cobra.Command) {
	for cmd, long := range savedLong {
		cmd.Long = long
	}
	for f, u := range savedUsage {
		f.Usage = u
	}
	clear(savedLong)
	clear(savedUsage)
}
