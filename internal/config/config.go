// Package config resolves lbcert's settings with one precedence rule for
// all of them: command-line flag, then environment variable, then config
// file, then the flag's default.
//
// Every pflag flag is a setting unless excluded. Its environment variable is
// derived from the flag name by EnvName, and its config-file key is the
// flag name itself, so the three spellings never drift apart. The config
// file is YAML and is decoded strictly: a key that is not a setting is an
// error naming the key and its line, because a misspelt key that is
// silently ignored is how certificates quietly stop renewing.
package config

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"

	"github.com/spf13/pflag"
	"gopkg.in/yaml.v3"

	"github.com/lbcert/lbcert/internal/argfile"
	"github.com/lbcert/lbcert/internal/hint"
)

// maxValue bounds one setting's value: no path, address or name is
// longer, and a 20 MB "email:" must not become an account path.
const maxValue = 4096

// EnvPrefix starts every environment variable lbcert reads.
const EnvPrefix = "LBCERT_"

// notSetting excludes a flag from env and config; sourceAnnotation
// records which of them supplied a setting's value.
const (
	notSetting       = "lbcert/not-setting"
	sourceAnnotation = "lbcert/source"
)

// WantAnnotation on a duration flag is the range it takes, said when it
// is given below zero ("want 1s to 24h"), so that the first refusal
// already names what the command's own check would.
const WantAnnotation = "lbcert/want"

// EnvName derives the environment variable for a flag: "http-addr" becomes
// "LBCERT_HTTP_ADDR".
func EnvName(flag string) string {
	return EnvPrefix + strings.ToUpper(strings.ReplaceAll(flag, "-", "_"))
}

// Exclude makes the named flags of fs command-line only. Every other
// flag is a setting: a new flag gets its environment variable and config
// key without anyone having to remember to add them. It panics on an
// unknown name, which is a programming error caught by the tests.
func Exclude(fs *pflag.FlagSet, names ...string) {
	for _, n := range names {
		if err := fs.SetAnnotation(n, notSetting, []string{"true"}); err != nil {
			panic(err)
		}
	}
}

// IsSetting reports whether f takes a value from the environment and
// the config file: every flag but --help, --version, --config (which
// names the file; LBCERT_CONFIG is read by the root) and Exclude's.
func IsSetting(f *pflag.Flag) bool {
	switch f.Name {
	case "help", "version", "config":
		return false
	}
	_, no := f.Annotations[notSetting]
	return !no
}

// File is a decoded config file: each key with its values. A scalar value
// is a list of one; a YAML sequence fills a repeatable flag.
type File struct {
	Path   string
	Values map[string][]string
}

// Load reads and strictly decodes a config file. known reports whether a
// key is a setting of any command.
func Load(path string, known func(key string) bool) (*File, error) {
	data, err := argfile.Read(path, argfile.Bundle)
	if err != nil {
		return nil, fmt.Errorf("config %s: %w", path, err)
	}
	return Parse(path, data, known)
}

// Parse decodes config data; path is used only in messages.
func Parse(path string, data []byte, known func(key string) bool) (*File, error) {
	f := &File{Path: path, Values: map[string][]string{}}
	if len(bytes.TrimSpace(data)) == 0 {
		return f, nil
	}
	var doc yaml.Node
	dec := yaml.NewDecoder(bytes.NewReader(data))
	if err := dec.Decode(&doc); err != nil {
		return nil, fmt.Errorf("config %s: %s", path, strings.TrimPrefix(err.Error(), "yaml: "))
	}
	// A second document ("---") would be ignored by a plain decode, and
	// the settings in it with it: refuse it instead.
	var extra yaml.Node
	if err := dec.Decode(&extra); err == nil {
		return nil, fmt.Errorf("config %s: line %d: a second YAML document: put every setting in one (remove the ---)", path, extra.Line)
	} else if !errors.Is(err, io.EOF) {
		return nil, fmt.Errorf("config %s: %s", path, strings.TrimPrefix(err.Error(), "yaml: "))
	}
	if len(doc.Content) == 0 {
		return f, nil
	}
	root := doc.Content[0]
	if root.Kind != yaml.MappingNode {
		return nil, fmt.Errorf("config %s: line %d: want a mapping of setting: value", path, root.Line)
	}
	for i := 0; i+1 < len(root.Content); i += 2 {
		k, v := root.Content[i], root.Content[i+1]
		key := k.Value
		if k.Kind != yaml.ScalarNode || !known(key) {
			return nil, fmt.Errorf("config %s: line %d: unknown key %q", path, k.Line, key)
		}
		if _, dup := f.Values[key]; dup {
			return nil, fmt.Errorf("config %s: line %d: key %q given twice", path, k.Line, key)
		}
		for _, n := range append([]*yaml.Node{v}, v.Content...) {
			if n.Kind == yaml.ScalarNode && len(n.Value) > maxValue {
				return nil, fmt.Errorf("config %s: line %d: %q: a value of %d bytes; a setting is at most %d", path, n.Line, key, len(n.Value), maxValue)
			}
		}
		switch v.Kind {
		case yaml.ScalarNode:
			f.Values[key] = []string{v.Value}
		case yaml.SequenceNode:
			vals := make([]string, 0, len(v.Content))
			for _, item := range v.Content {
				if item.Kind != yaml.ScalarNode {
					return nil, fmt.Errorf("config %s: line %d: %q: list items must be plain values", path, item.Line, key)
				}
				vals = append(vals, item.Value)
			}
			f.Values[key] = vals
		default:
			return nil, fmt.Errorf("config %s: line %d: %q: want a value or a list of values", path, v.Line, key)
		}
	}
	return f, nil
}

// Apply fills each setting in fs that was not given on the command line,
// first from the environment, then from file (which may be nil). Values
// are set through the flag, so they get the same parsing and errors as
// typed flags.
func Apply(fs *pflag.FlagSet, file *File, getenv func(string) string) error {
	var errs []error
	fs.VisitAll(func(f *pflag.Flag) {
		if f.Changed || !IsSetting(f) {
			return
		}
		env := EnvName(f.Name)
		if v := getenv(env); v != "" {
			vals := []string{v}
			if isList(f) {
				vals = splitList(v)
			}
			if err := setAll(f, vals); err != nil {
				errs = append(errs, fmt.Errorf("environment %s=%q: %v", env, v, err))
			}
			setSource(f, "env "+env)
			return
		}
		if file == nil {
			return
		}
		if vals, ok := file.Values[f.Name]; ok {
			if err := setAll(f, vals); err != nil {
				errs = append(errs, fmt.Errorf("config %s: %q: %v", file.Path, f.Name, err))
			}
			setSource(f, "config "+file.Path)
		}
	})
	// No duration of lbcert's means anything below zero (a wait, an
	// age, a lag): say so, rather than take it as zero or as "always".
	fs.VisitAll(func(f *pflag.Flag) {
		if d, ok := f.Value.(interface{ Type() string }); ok && d.Type() == "duration" && strings.HasPrefix(f.Value.String(), "-") {
			want := "0 or more"
			if w := f.Annotations[WantAnnotation]; len(w) > 0 {
				want = w[0]
			}
			errs = append(errs, fmt.Errorf("--%s %s: want %s", f.Name, f.Value, want))
		}
	})
	return errors.Join(errs...)
}

func setSource(f *pflag.Flag, src string) {
	if f.Annotations == nil {
		f.Annotations = map[string][]string{}
	}
	f.Annotations[sourceAnnotation] = []string{src}
}

// Given reports whether the user gave flag name a value by any means:
// on the command line, in the environment or in the config file. Changed
// alone means the command line.
func Given(fs *pflag.FlagSet, name string) bool {
	f := fs.Lookup(name)
	if f == nil {
		return false
	}
	_, fromEnvOrFile := f.Annotations[sourceAnnotation]
	return f.Changed || fromEnvOrFile
}

// Carried reports whether flag name was given on the command line or in
// the environment, not by the config file nor left at its default: what
// a cron line or a unit must repeat, since it runs with neither that
// command line nor that environment (the config file it names itself).
func Carried(fs *pflag.FlagSet, name string) bool {
	if fs == nil {
		return false
	}
	f := fs.Lookup(name)
	if f == nil {
		return false
	}
	src := f.Annotations[sourceAnnotation]
	return f.Changed || len(src) > 0 && strings.HasPrefix(src[0], "env ")
}

// CarriedArgs repeats, as flags, those of the settings names in fs that
// were given on the command line or in the environment (Carried), for a
// cron line or a unit: for renew, the CAs' settings (the primary's CA
// bundle, the fallbacks, their back-off) and the client budget's rates,
// which the lineages do not keep. One from the config file stays there,
// read again by the run (the line names the file), so that editing the
// file still counts. abs makes a file's path absolute (cron starts
// elsewhere): the settings whose names end in "-bundle" or "-file".
func CarriedArgs(fs *pflag.FlagSet, abs func(string) string, names ...string) []string {
	if fs == nil {
		return nil
	}
	var args []string
	for _, name := range names {
		f := fs.Lookup(name)
		if f == nil || !Carried(fs, name) {
			continue
		}
		if list, ok := f.Value.(pflag.SliceValue); ok {
			for _, one := range list.GetSlice() {
				args = append(args, "--"+name, one)
			}
			continue
		}
		val := f.Value.String()
		// An empty value switches off one from the config file: it stays
		// empty, not the current directory.
		if val != "" && (strings.HasSuffix(name, "-bundle") || strings.HasSuffix(name, "-file")) {
			val = abs(val)
		}
		if f.Value.Type() == "bool" {
			args = append(args, "--"+name+"="+val)
			continue
		}
		args = append(args, "--"+name, val)
	}
	return args
}

// envSecrets are the secrets a setting needs (needs: given, it needs
// the secret, always when required) that come from the environment
// variable env or from the file flag file.
var envSecrets = []struct {
	needs, env, file string
	required         bool
}{
	{"smtp-user", "LBCERT_SMTP_PASSWORD", "smtp-password-file", true},
	{"redis", "LBCERT_REDIS_PASSWORD", "redis-password-file", false},
}

// Schedulable refuses, for a cron line or a unit, a secret every
// scheduled run would lack: one only the environment holds (the line
// cannot carry it and cron passes no environment), a password file that
// is not there, or none at all where one is required.
func Schedulable(fs *pflag.FlagSet, getenv func(string) string) error {
	value := func(name string) string {
		if f := fs.Lookup(name); f != nil && f.Value.String() != "[]" {
			return f.Value.String()
		}
		return ""
	}
	for _, s := range envSecrets {
		if fs == nil || value(s.needs) == "" {
			continue
		}
		fix := fmt.Sprintf("put the secret alone in a file (mode 0600) and pass --%s FILE (or '%s:' in the config file), then run this again", s.file, s.file)
		switch file := value(s.file); {
		case file != "":
			fi, err := os.Stat(file)
			switch {
			case err != nil:
				return fmt.Errorf("--%s %s: %w", s.file, file, errors.Unwrap(err))
			case !fi.Mode().IsRegular():
				return fmt.Errorf("--%s %s is not a file: put the password alone in a file", s.file, file)
			case fi.Size() == 0:
				return fmt.Errorf("--%s %s is empty: put the password in it", s.file, file)
			}
		case getenv(s.env) != "":
			return hint.Errorf(fix, "--%s: its password comes from %s, which a scheduled run does not have", s.needs, s.env)
		case s.required:
			return hint.Errorf(fix, "--%s %s has no password: every scheduled run would fail to log in", s.needs, value(s.needs))
		}
	}
	return nil
}

// AbsPath is p made absolute, for the settings cron lines and units
// repeat: they start in another directory.
func AbsPath(p string) string {
	if abs, err := filepath.Abs(p); err == nil {
		return abs
	}
	return p
}

// Origin says where flag name's value came from, for a message about a
// conflict: "" for the command line or the default, "LBCERT_WEBROOT"
// for the environment, "'webroot:' in /etc/lbcert/config.yaml" for the
// config file.
func Origin(fs *pflag.FlagSet, name string) string {
	f := fs.Lookup(name)
	if f == nil || f.Changed {
		return ""
	}
	src := f.Annotations[sourceAnnotation]
	if len(src) == 0 {
		return ""
	}
	if env, ok := strings.CutPrefix(src[0], "env "); ok {
		return env
	}
	if path, ok := strings.CutPrefix(src[0], "config "); ok {
		return fmt.Sprintf("'%s:' in %s", name, path)
	}
	return ""
}

// Conflict is the error for two settings that exclude each other, x and
// y, both given. One that came from the config file or the environment
// is named with where it came from, and the hint says how to clear it.
func Conflict(fs *pflag.FlagSet, x, y, why string) error {
	origin := func(n string) string {
		if fs == nil {
			return ""
		}
		return Origin(fs, n)
	}
	said := func(n string) string {
		if o := origin(n); o != "" {
			return fmt.Sprintf("--%s (%s)", n, o)
		}
		return "--" + n
	}
	err := fmt.Errorf("%s and %s both given: %s", said(x), said(y), why)
	for _, n := range []string{x, y} {
		if o := origin(n); o != "" {
			override := "--" + n + " ''"
			if fs.Lookup(n).Value.Type() == "bool" {
				override = "--" + n + "=false"
			}
			return hint.Wrap(err, "%s sets --%s for every command: remove it there, or override it here with %s", o, n, override)
		}
	}
	return err
}

// isList reports whether f is repeatable, so that a comma-separated
// environment value means several values.
func isList(f *pflag.Flag) bool {
	return strings.HasSuffix(f.Value.Type(), "Slice") || strings.HasSuffix(f.Value.Type(), "Array")
}

func splitList(v string) []string {
	var out []string
	for _, p := range strings.Split(v, ",") {
		if p = strings.TrimSpace(p); p != "" {
			out = append(out, p)
		}
	}
	return out
}

func setAll(f *pflag.Flag, vals []string) error {
	if !isList(f) && len(vals) != 1 {
		return fmt.Errorf("takes one value, got %d", len(vals))
	}
	for _, v := range vals {
		if f.Value.Type() == "bool" {
			b, ok := parseBool(v)
			if !ok {
				return fmt.Errorf("want true or false (or yes/no, on/off, 1/0)")
			}
			v = strconv.FormatBool(b)
		}
		if err := f.Value.Set(v); err != nil {
			return err
		}
	}
	return nil
}

// parseBool reads a boolean the ways people write one in an environment
// file or YAML: true/false, yes/no, on/off, 1/0, any case.
func parseBool(s string) (bool, bool) {
	switch strings.ToLower(strings.TrimSpace(s)) {
	case "true", "yes", "y", "on", "1":
		return true, true
	case "false", "no", "n", "off", "0":
		return false, true
	}
	return false, false
}

// Known is the strict decoder's known-key check for the settings of
// every flag set: one config file serves every command.
func Known(sets ...*pflag.FlagSet) func(key string) bool {
	keys := map[string]bool{}
	for _, k := range Keys(sets...) {
		keys[k] = true
	}
	return func(k string) bool { return keys[k] }
}

// Find loads the config file at path, or at def when path is "" and def
// exists; no file is nil.
func Find(path, def string, known func(key string) bool) (*File, error) {
	if path == "" {
		if _, err := os.Stat(def); err != nil {
			return nil, nil
		}
		path = def
	}
	return Load(path, known)
}

// Keys lists every setting name in the flag sets, sorted, for docs and for
// the strict decoder's known-key check.
func Keys(sets ...*pflag.FlagSet) []string {
	seen := map[string]bool{}
	for _, fs := range sets {
		fs.VisitAll(func(f *pflag.Flag) {
			if IsSetting(f) {
				seen[f.Name] = true
			}
		})
	}
	keys := make([]string, 0, len(seen))
	for k := range seen {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}
