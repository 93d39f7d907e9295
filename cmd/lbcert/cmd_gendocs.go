package main

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/spf13/cobra"
	"github.com/spf13/cobra/doc"
	"github.com/spf13/pflag"
)

// docsDate is the date written into every man page. It is fixed so that
// regenerating the docs gives identical files (restic does the same);
// bump it when the commands change.
var docsDate = time.Date(2026, 11, 22, 0, 0, 0, 0, time.UTC)

// newGendocsCmd is "lbcert gendocs": what "make docs" runs to regenerate
// man/ and completions/. Hidden: it is for packagers, not operators.
func (a *app) newGendocsCmd() *cobra.Command {
	var manDir, compDir string
	cmd := &cobra.Command{
		Use:    "gendocs",
		Short:  "Write man pages and shell completion scripts",
		Hidden: true,
		Args:   cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			files, err := generateDocs(cmd.Root())
			if err != nil {
				return err
			}
			for name, data := range files {
				dir := manDir
				if filepath.Ext(name) != ".1" {
					dir = compDir
				}
				if err := os.MkdirAll(dir, 0o755); err != nil {
					return err
				}
				if err := os.WriteFile(filepath.Join(dir, name), data, 0o644); err != nil {
					return err
				}
			}
			return nil
		},
	}
	cmd.Flags().StringVar(&manDir, "man-dir", "man", "where man pages go")
	cmd.Flags().StringVar(&compDir, "completion-dir", "completions", "where completion scripts go")
	return cmd
}

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
