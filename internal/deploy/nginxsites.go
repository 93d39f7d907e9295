package deploy

import (
	"bufio"
	"bytes"
	"cmp"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"

	"github.com/lbcert/lbcert/internal/names"
	"github.com/lbcert/lbcert/internal/store"
)

// Site is one lineage's server block in the nginx include file.
type Site struct {
	Name    string
	Version int // the live version its names were read from
	Domains []string
}

// siteHeader opens the include file; it names the body so that an
// operator reading the file knows where to edit.
const siteHeader = `# Written by lbcert: one server block per live lineage, with all its
# names and its certificate. Every deploy rewrites this file; the
# blocks' listen lines and locations are in the server body
#   %s
# The first block is the default server: clients that send no SNI get
# its certificate.
`

// A marker line heads each block and is all lbcert reads back: the
// lineage, the version its names come from, and the names:
// "# NAME (version V): NAME1 NAME2".
const markerVersion = " (version "

// NginxSites renders the include file: the server_names hash sized for
// these names, then one server block per site. nginx's master reads each
// block's literal certificate and key paths, as root, at reload; a path
// named by a variable would be opened by the unprivileged worker, which
// cannot read a 0600 key in a 0700 directory.
//
// Sites that name an IP address come first: a client connecting to an
// address sends no SNI, and gets the first block, the default server.
// A name two lineages share goes to the first of them only, as nginx
// would serve it, without nginx's "conflicting server name" warning.
func NginxSites(live func(name string) store.Paths, body string, sites []Site) []byte {
	sites = slices.Clone(sites)
	slices.SortStableFunc(sites, func(a, b Site) int {
		if ia, ib := hasAddress(a), hasAddress(b); ia != ib {
			if ia {
				return -1
			}
			return 1
		}
		if a.Name == b.Name {
			return 0
		}
		if store.NaturalLess(a.Name, b.Name) {
			return -1
		}
		return 1
	})
	var b bytes.Buffer
	b.Grow(len(sites) * (400 + 2*len(body)))
	fmt.Fprintf(&b, siteHeader, body)
	maxSize, bucket := namesHash(sites)
	fmt.Fprintf(&b, "server_names_hash_max_size %d;\nserver_names_hash_bucket_size %d;\n", maxSize, bucket)
	taken := map[string]bool{}
	for _, s := range sites {
		b.WriteString("\n# " + s.Name + markerVersion + strconv.Itoa(s.Version) + "):")
		var serve []string
		for _, d := range s.Domains {
			b.WriteString(" " + d)
			if !taken[d] {
				taken[d] = true
				serve = append(serve, serverName(d))
			}
		}
		b.WriteString("\n")
		if len(serve) == 0 {
			b.WriteString("#   not served here: a block above serves each of its names\n")
			continue
		}
		p := live(s.Name)
		for _, part := range []string{"server {\n    server_name ", strings.Join(serve, " "), ";\n    ssl_certificate     ", p.Fullchain,
			";\n    ssl_certificate_key ", p.Key, ";\n    include ", body, ";\n}\n"} {
			b.WriteString(part)
		}
	}
	return b.Bytes()
}

func hasAddress(s Site) bool {
	return slices.ContainsFunc(s.Domains, names.IsAddress)
}

// serverName is how nginx matches a name in the Host header: an IPv6
// address in brackets, as clients send it.
func serverName(d string) string {
	if strings.Contains(d, ":") {
		return "[" + d + "]"
	}
	return d
}

// namesHash sizes nginx's server_names hash so that it builds for these
// names without "could not build optimal server_names_hash" (or, for a
// long name, a failed test). nginx needs each bucket to hold its longest
// entry, align(8+len+2, 8) bytes plus a pointer; 256 holds several
// names, so a table of twice as many slots as names builds at once
// (with a max_size above 10,000 nginx tries only its last 1,000 sizes).
func namesHash(sites []Site) (maxSize, bucket int) {
	n, longest := 0, 0
	for _, s := range sites {
		for _, d := range s.Domains {
			n++
			longest = max(longest, len(serverName(d)))
		}
	}
	bucket = 256
	for (longest+10+7)/8*8+8 > bucket {
		bucket *= 2
	}
	maxSize = 1024
	for maxSize < 2*n {
		maxSize *= 2
	}
	return maxSize, bucket
}

// parseSites reads back the sites of an include file lbcert wrote.
func parseSites(data []byte) map[string]Site {
	out := map[string]Site{}
	sc := bufio.NewScanner(bytes.NewReader(data))
	sc.Buffer(make([]byte, 0, 64<<10), 1<<20)
	for sc.Scan() {
		line, ok := bytes.CutPrefix(sc.Bytes(), []byte("# "))
		if !ok {
			continue
		}
		name, rest, ok := bytes.Cut(line, []byte(markerVersion))
		if !ok {
			continue
		}
		v, list, ok := bytes.Cut(rest, []byte("):"))
		if !ok {
			continue
		}
		n, err := strconv.Atoi(string(v))
		if err != nil || names.Lineage(string(name)) != nil {
			continue
		}
		out[string(name)] = Site{Name: string(name), Version: n, Domains: strings.Fields(string(list))}
	}
	return out
}

// sites lists every live lineage of the store but those skip names. A
// lineage whose live version is the one old's block was written from
// keeps that block's names: versions never change, so only the lineages
// a run changed are read from disk, not 100,000 of them. A first write
// (a node joining a fleet) reads them all, siteWorkers at a time.
func (r *Runner) sites(old []byte, skip func(string) bool) ([]Site, error) {
	all, err := r.Store.Names()
	if err != nil {
		return nil, err
	}
	prev := parseSites(old)
	type found struct {
		site Site
		ok   bool
		err  error
	}
	got := make([]found, len(all))
	look := func(i int) {
		n := all[i]
		if skip(n) {
			return
		}
		v, err := r.Store.LiveVersion(n)
		if err != nil {
			return // live/<name> is not a version: nothing to serve
		}
		if p, ok := prev[n]; ok && p.Version == v {
			got[i] = found{site: p, ok: true}
			return
		}
		l, err := r.Store.Load(n)
		if err == nil && l.Version == v && len(l.Domains) > 0 {
			got[i] = found{site: Site{Name: n, Version: v, Domains: l.Domains}, ok: true}
			return
		}
		got[i] = found{err: cmp.Or(err, errors.New("its record has no names for the live version"))}
	}
	next := make(chan int, siteWorkers)
	var wg sync.WaitGroup
	for range min(siteWorkers, len(all)) {
		wg.Go(func() {
			for i := range next {
				look(i)
			}
		})
	}
	for i := range all {
		next <- i
	}
	close(next)
	wg.Wait()
	out := make([]Site, 0, len(all))
	for i, f := range got {
		n := all[i]
		switch {
		case f.ok:
			out = append(out, f.site)
		case f.err == nil: // skipped, or not live
		case prev[n].Name != "":
			slog.Warn("nginx include: lineage unreadable, its block kept as it was", "name", n, "err", f.err)
			out = append(out, prev[n])
		default:
			slog.Warn("nginx include: lineage unreadable, left out", "name", n, "err", f.err)
		}
	}
	return out, nil
}

// siteWorkers is how many lineages sites reads at once: a node joining
// a fleet of 100,000 lineages spent ten seconds reading them one by one.
const siteWorkers = 8

// writeSites rewrites d's include file with every live lineage but those
// skip names, atomically, and returns how to put the previous content
// back byte for byte (or remove the file when there was none). An
// unchanged file is not written.
func (r *Runner) writeSites(d store.Deploy, skip func(string) bool) (undo func() error, err error) {
	path := d.NginxInclude
	old, err := os.ReadFile(path)
	existed := err == nil
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return nil, err
	}
	perm := os.FileMode(0o644)
	if fi, err := os.Stat(path); err == nil {
		perm = fi.Mode().Perm()
	}
	sites, err := r.sites(old, skip)
	if err != nil {
		return nil, err
	}
	cwd, err := os.Getwd()
	if err != nil {
		return nil, err
	}
	live := func(name string) store.Paths {
		// nginx reads a relative path from its prefix, not from here.
		p := r.Store.LivePaths(name)
		if !filepath.IsAbs(p.Fullchain) {
			p.Fullchain, p.Key = filepath.Join(cwd, p.Fullchain), filepath.Join(cwd, p.Key)
		}
		return p
	}
	data := NginxSites(live, d.NginxServerBody, sites)
	undo = func() error { return nil }
	if existed && bytes.Equal(data, old) {
		return undo, nil
	}
	if err := writeInclude(path, data, perm); err != nil {
		return nil, err
	}
	slog.Info("nginx include rewritten", "file", path, "lineages", len(sites))
	return func() error {
		if !existed {
			err := os.Remove(path)
			if errors.Is(err, fs.ErrNotExist) {
				return nil
			}
			return err
		}
		return writeInclude(path, old, perm)
	}, nil
}

// writeInclude writes the include file; tests replace it to fail on cue.
var writeInclude = store.WriteFile

// NginxPathOK refuses a path nginx would read differently from the file
// system: nginx splits arguments at whitespace, ends them at ";", and
// expands "$" in certificate paths as a variable.
func NginxPathOK(path string) error {
	for _, c := range path {
		if c <= ' ' || c == 0x7f || strings.ContainsRune(`;{}"'$\#`, c) {
			return fmt.Errorf("%q: character %q would be read differently by nginx; use a path without it", path, c)
		}
	}
	return nil
}
