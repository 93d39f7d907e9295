package config

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/spf13/pflag"
)

func TestEnvName(t *testing.T) {
	for in, want := range map[string]string{
		"dir": "LBCERT_DIR", "http-addr": "LBCERT_HTTP_ADDR", "eab-hmac-key-file": "LBCERT_EAB_HMAC_KEY_FILE",
	} {
		if got := EnvName(in); got != want {
			t.Errorf("EnvName(%q) = %q, want %q", in, got, want)
		}
	}
}

func known(k string) bool { return k == "dir" || k == "server" || k == "mail-to" }

func TestParseStrict(t *testing.T) {
	f, err := Parse("c.yaml", []byte("dir: /srv/lbcert\nmail-to: [a@x.test, b@x.test]\n"), known)
	if err != nil {
		t.Fatal(err)
	}
	if f.Values["dir"][0] != "/srv/lbcert" || len(f.Values["mail-to"]) != 2 {
		t.Fatalf("got %v", f.Values)
	}
	bad := map[string]string{
		"dri: /x\n":             `line 1: unknown key "dri"`,
		"dir: /x\ndir: /y\n":    `line 2: key "dir" given twice`,
		"- a\n- b\n":            "want a mapping",
		"dir: {a: b}\n":         "want a value or a list",
		"dir: [a, [b]]\n":       "list items must be plain values",
		"dir: \"unterminated\n": "c.yaml",
	}
	for in, want := range bad {
		if _, err := Parse("c.yaml", []byte(in), known); err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("Parse(%q) = %v, want error containing %q", in, err, want)
		}
	}
	if f, err := Parse("c.yaml", []byte("  \n"), known); err != nil || len(f.Values) != 0 {
		t.Errorf("empty file: %v %v", f, err)
	}
}

// TestPrecedence: flag beats env beats file beats default.
func TestPrecedence(t *testing.T) {
	newFS := func() (*pflag.FlagSet, *string, *string, *string, *[]string) {
		fs := pflag.NewFlagSet("t", pflag.ContinueOnError)
		a := fs.String("dir", "default-dir", "")
		b := fs.String("server", "default-server", "")
		c := fs.String("unmarked", "u", "")
		d := fs.StringArray("mail-to", nil, "")
		Exclude(fs, "unmarked")
		return fs, a, b, c, d
	}
	file := &File{Path: "c.yaml", Values: map[string][]string{
		"dir": {"file-dir"}, "server": {"file-server"}, "mail-to": {"f1", "f2"},
	}}
	env := map[string]string{"LBCERT_DIR": "env-dir", "LBCERT_UNMARKED": "env-u", "LBCERT_MAIL_TO": "e1, e2"}

	fs, dir, server, unmarked, mailTo := newFS()
	if err := fs.Parse([]string{"--dir", "flag-dir"}); err != nil {
		t.Fatal(err)
	}
	if err := Apply(fs, file, func(k string) string { return env[k] }); err != nil {
		t.Fatal(err)
	}
	if *dir != "flag-dir" || *server != "file-server" || *unmarked != "u" || strings.Join(*mailTo, ",") != "e1,e2" {
		t.Fatalf("dir=%q server=%q unmarked=%q mail-to=%q", *dir, *server, *unmarked, *mailTo)
	}

	fs, dir, server, _, mailTo = newFS()
	fs.Parse(nil)
	Apply(fs, file, func(k string) string { return env[k] })
	if *dir != "env-dir" || strings.Join(*mailTo, ",") != "e1,e2" {
		t.Fatalf("env should beat file: dir=%q mail-to=%v", *dir, *mailTo)
	}
	fs, dir, server, _, mailTo = newFS()
	fs.Parse(nil)
	Apply(fs, file, func(string) string { return "" })
	if *dir != "file-dir" || strings.Join(*mailTo, ",") != "f1,f2" {
		t.Fatalf("file should beat default: dir=%q mail-to=%v", *dir, *mailTo)
	}
	fs, dir, server, _, _ = newFS()
	fs.Parse(nil)
	Apply(fs, nil, func(string) string { return "" })
	if *dir != "default-dir" || *server != "default-server" {
		t.Fatalf("default: dir=%q server=%q", *dir, *server)
	}
}

func FuzzParse(f *testing.F) {
	f.Add("dir: /x\n")
	f.Add("mail-to: [a, b]\n")
	f.Add("- x")
	f.Fuzz(func(t *testing.T, in string) {
		fl, err := Parse("c.yaml", []byte(in), known)
		if err == nil {
			for k := range fl.Values {
				if !known(k) {
					t.Fatalf("unknown key %q accepted", k)
				}
			}
		}
	})
}

// A boolean in the environment accepts yes/no too, and a bad one names
// the variable and the accepted values instead of strconv's words.
func TestBoolSettings(t *testing.T) {
	for _, c := range []struct {
		val  string
		want bool
		ok   bool
	}{{"yes", true, true}, {"NO", false, true}, {"on", true, true}, {"0", false, true}, {"true", true, true}, {"maybe", false, false}} {
		fs := pflag.NewFlagSet("t", pflag.ContinueOnError)
		v := fs.Bool("agree-tos", !c.want, "")
		err := Apply(fs, nil, func(k string) string {
			if k == "LBCERT_AGREE_TOS" {
				return c.val
			}
			return ""
		})
		switch {
		case c.ok && (err != nil || *v != c.want):
			t.Errorf("%q: %v, err %v", c.val, *v, err)
		case !c.ok && (err == nil || !strings.Contains(err.Error(), `LBCERT_AGREE_TOS="maybe": want true or false (or yes/no, on/off, 1/0)`) || strings.Contains(err.Error(), "strconv")):
			t.Errorf("%q: error %v", c.val, err)
		}
	}
}

// A second YAML document is refused with its line, not ignored with
// every setting in it.
func TestSecondDocumentRefused(t *testing.T) {
	known := func(string) bool { return true }
	_, err := Parse("c.yaml", []byte("email: a@example.com\n---\nagree-tos: true\n"), known)
	if err == nil || !strings.Contains(err.Error(), "config c.yaml: line 2: a second YAML document") {
		t.Fatalf("got %v", err)
	}
	if _, err := Parse("c.yaml", []byte("---\nemail: a@example.com\n"), known); err != nil {
		t.Fatalf("one document with a leading ---: %v", err)
	}
}

func TestHugeValueRefused(t *testing.T) {
	data := "email: " + strings.Repeat("a", 20<<20) + "@example.com\n"
	_, err := Parse("c.yaml", []byte(data), func(string) bool { return true })
	if err == nil || !strings.Contains(err.Error(), `line 1: "email": a value of`) || len(err.Error()) > 200 {
		t.Fatalf("got %.300v", err)
	}
}

// Origin names where a value came from, so that a conflict can say which
// file (or variable) to change.
func TestOrigin(t *testing.T) {
	fs := pflag.NewFlagSet("t", pflag.ContinueOnError)
	fs.String("webroot", "", "")
	fs.Bool("standalone", false, "")
	fs.String("email", "", "")
	fs.String("dir", "", "")
	fs.Parse([]string{"--standalone"})
	file := &File{Path: "/etc/lbcert/config.yaml", Values: map[string][]string{"webroot": {"/var/www"}, "standalone": {"false"}}}
	Apply(fs, file, func(k string) string { return map[string]string{"LBCERT_EMAIL": "ops@example.com"}[k] })
	for name, want := range map[string]string{
		"webroot":    "'webroot:' in /etc/lbcert/config.yaml",
		"email":      "LBCERT_EMAIL",
		"standalone": "", // the command line beat the file
		"dir":        "", // the default
	} {
		if got := Origin(fs, name); got != want {
			t.Errorf("Origin(%s) = %q, want %q", name, got, want)
		}
	}
}

// A negative duration, on the command line or from the environment, is
// refused by name (a negative --wait-lock or --max-lag meant nothing).
func TestNegativeDurationRefused(t *testing.T) {
	for _, tc := range []struct{ arg, env string }{{arg: "--wait-lock=-1s"}, {env: "-2m"}} {
		fs := pflag.NewFlagSet("x", pflag.ContinueOnError)
		fs.Duration("wait-lock", 0, "")
		fs.Duration("max-lag", 0, "")
		args := []string{}
		if tc.arg != "" {
			args = append(args, tc.arg)
		}
		if err := fs.Parse(args); err != nil {
			t.Fatal(err)
		}
		err := Apply(fs, nil, func(k string) string {
			if k == EnvName("wait-lock") {
				return tc.env
			}
			return ""
		})
		if err == nil || !strings.Contains(err.Error(), "--wait-lock") || !strings.Contains(err.Error(), "want 0 or more") {
			t.Errorf("%+v: %v, want --wait-lock refused as negative", tc, err)
		}
	}
	fs := pflag.NewFlagSet("x", pflag.ContinueOnError)
	fs.Duration("wait-lock", 0, "")
	fs.Parse([]string{"--wait-lock=3s"})
	if err := Apply(fs, nil, func(string) string { return "" }); err != nil {
		t.Errorf("a positive duration: %v", err)
	}
}

// A secret only the environment holds is refused for a scheduled run,
// for each setting that needs one; a password file, or no such setting,
// is fine.
func TestSchedulableSecrets(t *testing.T) {
	pwFile := filepath.Join(t.TempDir(), "pw")
	emptyFile := filepath.Join(t.TempDir(), "empty")
	if err := errors.Join(os.WriteFile(pwFile, []byte("x\n"), 0o600), os.WriteFile(emptyFile, nil, 0o600)); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		args []string
		env  string
		bad  bool
	}{
		{[]string{"--redis", "redis://r:6379/0"}, "LBCERT_REDIS_PASSWORD", true},
		{[]string{"--redis", "redis://r:6379/0", "--redis-password-file", pwFile}, "LBCERT_REDIS_PASSWORD", false},
		{[]string{"--redis", "redis://r:6379/0"}, "", false},
		{[]string{"--smtp-user", "u"}, "LBCERT_SMTP_PASSWORD", true},
		{[]string{"--smtp-user", "u", "--smtp-password-file", pwFile}, "LBCERT_SMTP_PASSWORD", false},
		{nil, "LBCERT_SMTP_PASSWORD", false},
		// helper-32 finding E: what every scheduled run would fail on.
		{[]string{"--smtp-user", "u"}, "", true},
		{[]string{"--smtp-user", "u", "--smtp-password-file", pwFile + ".missing"}, "", true},
		{[]string{"--redis", "redis://r:6379/0", "--redis-password-file", pwFile + ".missing"}, "", true},
		// helper-33 finding 2: a directory, an empty file.
		{[]string{"--smtp-user", "u", "--smtp-password-file", filepath.Dir(pwFile)}, "", true},
		{[]string{"--redis", "redis://r:6379/0", "--redis-password-file", emptyFile}, "", true},
	} {
		fs := pflag.NewFlagSet("t", pflag.ContinueOnError)
		for _, n := range []string{"redis", "redis-password-file", "smtp-user", "smtp-password-file"} {
			fs.String(n, "", "")
		}
		if err := fs.Parse(tc.args); err != nil {
			t.Fatal(err)
		}
		err := Schedulable(fs, func(k string) string { return map[bool]string{true: "s3cret"}[k == tc.env] })
		if (err != nil) != tc.bad || err != nil && strings.Contains(err.Error(), "s3cret") {
			t.Errorf("%v with %s set: %v, want refused %v", tc.args, tc.env, err, tc.bad)
		}
	}
}
