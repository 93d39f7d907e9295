package e2e

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/lbcert/lbcert/internal/engine"
	"github.com/lbcert/lbcert/internal/fleet"
	"github.com/lbcert/lbcert/internal/inventory"
	"github.com/lbcert/lbcert/internal/renewal"
	"github.com/lbcert/lbcert/internal/store"
	"github.com/lbcert/lbcert/internal/testenv"
)

// The README's snippets besides nginx's and HAProxy's (TestREADMESnippets):
// every one is tagged with what it is, and each kind is checked against
// the built binary or the code that makes it, so the README cannot drift
// from what lbcert does.

// readREADME is the module's root and its README.
func readREADME(t *testing.T) (root string, readme []byte) {
	t.Helper()
	root, err := testenv.ModuleRoot()
	if err != nil {
		t.Fatal(err)
	}
	readme, err = os.ReadFile(filepath.Join(root, "README.md"))
	if err != nil {
		t.Fatal(err)
	}
	return root, readme
}

// readmeBlocks are the README's fenced blocks by language.
func readmeBlocks(t *testing.T) (root string, blocks map[string][]string) {
	t.Helper()
	root, readme := readREADME(t)
	blocks = map[string][]string{}
	fence := regexp.MustCompile("(?m)^```(.*)$")
	marks := fence.FindAllStringSubmatchIndex(string(readme), -1)
	if len(marks)%2 != 0 {
		t.Fatalf("README has an unclosed code fence")
	}
	for i := 0; i < len(marks); i += 2 {
		lang := string(readme[marks[i][2]:marks[i][3]])
		if lang == "" {
			t.Errorf("README block %d has no language: tag it (sh, console, csv, yaml, jsonc, text, nginx, haproxy) so a test checks it", i/2+1)
		}
		blocks[lang] = append(blocks[lang], string(readme[marks[i][1]+1:marks[i+1][0]]))
	}
	for lang := range blocks {
		switch lang {
		case "sh", "console", "csv", "yaml", "jsonc", "text", "nginx", "haproxy", "":
		default:
			t.Errorf("README block language %q: no test checks it", lang)
		}
	}
	return root, blocks
}

// commandRE finds an lbcert command line in a snippet line: after a
// prompt, a cron schedule or a label.
var commandRE = regexp.MustCompile(`(?:^|[\s$])lbcert( .*)$`)

// lbcertArgs is the lbcert command in line (continuations joined), or
// nil: the words after "lbcert", up to a comment, a redirection, a pipe
// or a note in parentheses.
func lbcertArgs(line string) []string {
	m := commandRE.FindStringSubmatch(line)
	if m == nil {
		return nil
	}
	rest := m[1]
	for _, cut := range []string{" #", " >", " |", "  (", " && "} {
		if i := strings.Index(rest, cut); i >= 0 {
			rest = rest[:i]
		}
	}
	var args []string
	for _, w := range regexp.MustCompile(`'[^']*'|\S+`).FindAllString(rest, -1) {
		args = append(args, strings.Trim(w, "'"))
	}
	return args
}

// TestREADMECommands: every lbcert command line in the README is one the
// binary takes (its command and every flag exist), and every make target
// it names is in the Makefile.
func TestREADMECommands(t *testing.T) {
	root, blocks := readmeBlocks(t)
	makefile, err := os.ReadFile(filepath.Join(root, "Makefile"))
	if err != nil {
		t.Fatal(err)
	}
	checked := 0
	for _, b := range append(blocks["sh"], blocks["console"]...) {
		for _, line := range strings.Split(strings.ReplaceAll(b, "\\\n", " "), "\n") {
			if target, ok := strings.CutPrefix(line, "make "); ok {
				target, _, _ = strings.Cut(target, " ")
				if !regexp.MustCompile(`(?m)^` + regexp.QuoteMeta(target) + `:`).Match(makefile) {
					t.Errorf("README runs make %s: no such target", target)
				}
				continue
			}
			args := lbcertArgs(line)
			if args == nil {
				continue
			}
			checked++
			cmd := exec.Command(lbcertBin, append(args, "--help")...)
			cmd.Env = append(os.Environ(), "LBCERT_CONFIG=", "LBCERT_DIR="+t.TempDir())
			if out, err := cmd.CombinedOutput(); err != nil {
				t.Errorf("README's %q: lbcert refuses it: %v\n%s", line, err, out)
			}
		}
	}
	if checked < 30 {
		t.Fatalf("only %d lbcert command lines found in the README", checked)
	}
}

// TestREADMEConfigAndCSV: every config file loads (strictly: each key a
// setting, each value valid), and every CSV example passes batch --check
// with every row good.
func TestREADMEConfigAndCSV(t *testing.T) {
	_, blocks := readmeBlocks(t)
	work := t.TempDir()
	www := filepath.Join(work, "www")
	os.MkdirAll(filepath.Join(www, "acme"), 0o755)
	run := func(args ...string) (string, error) {
		cmd := exec.Command(lbcertBin, append([]string{"--dir", filepath.Join(work, "state")}, args...)...)
		cmd.Env = append(os.Environ(), "LBCERT_CONFIG=")
		out, err := cmd.CombinedOutput()
		return string(out), err
	}
	for i, b := range blocks["yaml"] {
		f := filepath.Join(work, fmt.Sprintf("config-%d.yaml", i))
		os.WriteFile(f, []byte(b), 0o600)
		if out, err := run("--config", f, "list"); err != nil {
			t.Errorf("README config file %d does not load: %v\n%s\n--- snippet\n%s", i+1, err, out, b)
		}
	}
	nginxConf, haproxyConf := filepath.Join(work, "nginx.conf"), filepath.Join(work, "haproxy.cfg")
	os.WriteFile(nginxConf, []byte("events {}\n"), 0o644)
	os.WriteFile(haproxyConf, []byte("defaults\n"), 0o644)
	nginxBin, err := testenv.NginxBin()
	if err != nil {
		t.Fatal(err)
	}
	haproxyBin, err := testenv.HAProxyBin()
	if err != nil {
		t.Fatal(err)
	}
	for i, b := range blocks["csv"] {
		f := filepath.Join(work, fmt.Sprintf("rows-%d.csv", i))
		os.WriteFile(f, []byte(strings.ReplaceAll(b, "/var/www", www)), 0o644)
		out, err := run("batch", f, "--check", "--reload-cmd", "true", "--nginx-conf", nginxConf, "--nginx-bin", nginxBin,
			"--haproxy-conf", haproxyConf, "--haproxy-bin", haproxyBin)
		if err != nil || !strings.Contains(out, " 0 bad") {
			t.Errorf("README CSV example %d: batch --check: %v\n%s\n--- snippet\n%s", i+1, err, out, b)
		}
	}
	if len(blocks["yaml"]) < 3 || len(blocks["csv"]) < 2 {
		t.Fatalf("found %d config files and %d CSV examples", len(blocks["yaml"]), len(blocks["csv"]))
	}
}

// TestREADMEOutputs: what the README shows lbcert printing is what it
// prints: messages in its voice, list's and fleet status's headers, the
// schedule warning, the mail report, and the JSON report's keys.
func TestREADMEOutputs(t *testing.T) {
	root, blocks := readmeBlocks(t)
	var listHead, fleetHead bytes.Buffer
	inventory.Table(&listHead, nil, inventory.Clock{})
	(&fleet.Status{}).Table(&fleetHead, time.Now())
	headers := []string{strings.Split(listHead.String(), "\n")[0], strings.Split(fleetHead.String(), "\n")[1]}
	// The schedule warning the README shows, as renew computes it.
	nb := time.Date(2026, 11, 22, 0, 0, 0, 0, time.UTC)
	cert := store.CertInfo{NotBefore: nb, NotAfter: nb.Add(6 * 24 * time.Hour)}
	d := renewal.Decide(cert, store.Status{}, nb, renewal.Options{Name: "six.example.com"})
	warning := "lbcert: warning: six.example.com: " + renewal.CadenceWarning(cert, d.At, 7*24*time.Hour)
	seen := map[string]bool{}
	voice := regexp.MustCompile(`^lbcert: (error|hint|warning): \S`)
	for _, b := range blocks["console"] {
		for _, line := range strings.Split(b, "\n") {
			switch {
			case strings.HasPrefix(line, "lbcert: ") && !voice.MatchString(line):
				t.Errorf("README shows a message not in lbcert's voice: %s", line)
			case strings.HasPrefix(line, "lbcert: warning: six.example.com: renew runs"):
				seen["warning"] = true
				if line != warning {
					t.Errorf("README's schedule warning:\n%s\nrenew says:\n%s", line, warning)
				}
			case strings.HasPrefix(line, "NAME ") || strings.HasPrefix(line, "NODE "):
				seen[strings.Fields(line)[0]] = true
				if strings.Join(strings.Fields(line), " ") != strings.Join(strings.Fields(headers[0]), " ") &&
					strings.Join(strings.Fields(line), " ") != strings.Join(strings.Fields(headers[1]), " ") {
					t.Errorf("README's table header %q is not lbcert's (%q or %q)", line, headers[0], headers[1])
				}
			}
		}
	}
	checkTexts(t, root, blocks["text"], seen)
	checkJSONC(t, blocks["jsonc"])
	for _, want := range []string{"warning", "NAME", "NODE", "mail", "layout", "disk"} {
		if !seen[want] {
			t.Errorf("README: no %s snippet found to check", want)
		}
	}
}

// checkTexts checks the README's plain texts: the mail report is the
// report lbcert renders (notify's golden file), every package of the
// code layout exists and every one is listed, and every file of the
// on-disk layout is one the code names.
func checkTexts(t *testing.T, root string, texts []string, seen map[string]bool) {
	t.Helper()
	source := goSource(t, filepath.Join(root, "internal"))
	for _, b := range texts {
		switch {
		case strings.HasPrefix(b, "lbcert renew on web1"):
			seen["mail"] = true
			golden, err := os.ReadFile(filepath.Join(root, "internal", "notify", "testdata", "report.txt"))
			if err != nil || !strings.HasPrefix(string(golden), b) {
				t.Errorf("README's sample report is not the report lbcert renders (internal/notify/testdata/report.txt)")
			}
		case strings.HasPrefix(b, "cmd/lbcert/"):
			seen["layout"] = true
			listed := map[string]bool{}
			for _, line := range strings.Split(b, "\n") {
				if f := strings.Fields(line); len(f) > 0 && strings.Contains(f[0], "/") {
					listed[f[0]] = true
					if _, err := os.Stat(filepath.Join(root, f[0])); err != nil {
						t.Errorf("README's code layout lists %s, which does not exist", f[0])
					}
				}
			}
			dirs, _ := filepath.Glob(filepath.Join(root, "internal", "*"))
			for _, d := range dirs {
				if fi, err := os.Stat(d); err == nil && fi.IsDir() && !listed["internal/"+filepath.Base(d)] {
					t.Errorf("README's code layout does not list internal/%s", filepath.Base(d))
				}
			}
		case strings.HasPrefix(b, "/etc/lbcert/"):
			seen["disk"] = true
			for _, f := range regexp.MustCompile(`[a-z]+\.(?:lock|key|json|pem)`).FindAllString(b, -1) {
				if !strings.Contains(source, `"`+f+`"`) && !strings.Contains(source, `.`+strings.SplitN(f, ".", 2)[1]+`"`) {
					t.Errorf("README's on-disk layout names %s, which no code writes", f)
				}
			}
		default:
			t.Errorf("README text snippet with no check: %.60q", b)
		}
	}
}

// checkJSONC checks that the JSON report the README shows (with //
// notes) parses and has only keys of the run report's schema: the JSON
// names of engine.Result's and engine.Item's fields, and the outcomes
// that key its counts.
func checkJSONC(t *testing.T, blocks []string) {
	t.Helper()
	schema := map[string]bool{}
	for _, typ := range []reflect.Type{reflect.TypeFor[engine.Result](), reflect.TypeFor[engine.Item]()} {
		for f := range typ.Fields() {
			if name, _, _ := strings.Cut(f.Tag.Get("json"), ","); name != "" && name != "-" {
				schema[name] = true
			}
		}
	}
	for _, o := range engine.Outcomes { // the keys of "counts"
		schema[string(o)] = true
	}
	for _, b := range blocks {
		text := regexp.MustCompile(`(?m)\s*//.*$`).ReplaceAllString(b, "")
		text = strings.ReplaceAll(text, `"..."`, `"x"`)
		for k := range keysOf(t, []byte(text)) {
			if !schema[k] {
				t.Errorf("README's JSON report has key %q, which the run report does not", k)
			}
		}
	}
	if len(blocks) == 0 {
		t.Error("README: no JSON report to check")
	}
}

// keysOf is every object key in a JSON document.
func keysOf(t *testing.T, data []byte) map[string]bool {
	t.Helper()
	var v any
	if err := json.Unmarshal(data, &v); err != nil {
		t.Fatalf("JSON does not parse: %v\n%s", err, data)
	}
	keys := map[string]bool{}
	var walk func(v any)
	walk = func(v any) {
		switch x := v.(type) {
		case map[string]any:
			for k, e := range x {
				keys[k] = true
				walk(e)
			}
		case []any:
			for _, e := range x {
				walk(e)
			}
		}
	}
	walk(v)
	return keys
}

// goSource is the Go source under dir, tests left out.
func goSource(t *testing.T, dir string) string {
	t.Helper()
	var b strings.Builder
	filepath.Walk(dir, func(p string, fi os.FileInfo, err error) error {
		if err == nil && strings.HasSuffix(p, ".go") && !strings.HasSuffix(p, "_test.go") {
			data, _ := os.ReadFile(p)
			b.Write(data)
		}
		return nil
	})
	return b.String()
}
