package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"sort"
	"strings"
	"time"

	goredis "github.com/redis/go-redis/v9"
)

// The invariants of issue 25, checked after quiet against what the load
// balancers really serve, what Redis holds, what the nodes' disks hold
// and what the CA saw.

// ledgerCap is lbcert's default --ledger-cap, which the schedule keeps.
const ledgerCap = 3

// catalogEntry is a live lineage as Redis holds it.
type catalogEntry struct {
	serial  string
	version int
	domains []string
}

// catalog reads the fleet's live lineages and their newest serials.
func (r *chaosRun) catalog() (map[string]catalogEntry, error) {
	c := r.redis.client()
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	names, err := c.SMembers(ctx, rkLineages).Result()
	if err != nil {
		return nil, err
	}
	bs, err := bundles(c)
	if err != nil {
		return nil, err
	}
	out := map[string]catalogEntry{}
	for _, name := range names {
		m := bs[name]
		serial, cert := serialOfPEM([]byte(m["cert"]))
		if cert == nil {
			out[name] = catalogEntry{}
			continue
		}
		var v int
		fmt.Sscan(m["version"], &v)
		out[name] = catalogEntry{serial: serial, version: v, domains: cert.DNSNames}
	}
	return out, nil
}

// versionOf names the version a serial is known as, for messages.
func (o *chaosObserver) versionOf(name, serial string) string {
	o.mu.Lock()
	defer o.mu.Unlock()
	var vs []string
	for v, serials := range o.versions[name] {
		if _, ok := serials[serial]; ok {
			vs = append(vs, fmt.Sprintf("v%d", v))
		}
	}
	sort.Strings(vs)
	if len(vs) == 0 {
		return "?"
	}
	return strings.Join(vs, "/")
}

// rollouts reads what the staged rollouts of cat's heads let each
// member serve.
func (r *chaosRun) rollouts(cat map[string]catalogEntry) (*rolloutState, error) {
	c := r.redis.client()
	defer c.Close()
	return readRolloutState(c, cat)
}

// lagging lists, per member, what its load balancer does not serve at
// the catalog's newest serial, or, for a name whose staged rollout is
// held or aborted, at the version the rollout keeps on that member.
func (r *chaosRun) lagging(cat map[string]catalogEntry, ro *rolloutState) map[string][]string {
	out := map[string][]string{}
	names := slices.Sorted(maps.Keys(cat))
	for _, n := range r.members() {
		for _, name := range names {
			e := cat[name]
			if e.serial == "" {
				out[n.name] = append(out[n.name], name+": in the lineages set without a readable bundle")
				continue
			}
			want, why := ro.want(n.name, name, e)
			for _, d := range e.domains {
				if got := n.served(d, r.def); !slices.Contains(want, got) {
					what := "nothing"
					if got != "" {
						what = got + " (" + r.obs.versionOf(name, got) + ")"
					}
					line := fmt.Sprintf("%s: serves %s for %s, the fleet's newest is %s (v%d)", name, what, d, e.serial, e.version)
					if why != "" {
						line += fmt.Sprintf("; %s (%s)", why, strings.Join(want, " or "))
					}
					out[n.name] = append(out[n.name], line)
				}
			}
		}
	}
	return out
}

// checkConvergence is I1: within 30 s of quiet, every member serves the
// newest serial of every live lineage for each of its names (or the
// version a held or aborted staged rollout keeps on it); and no lineage
// issued successfully and never deleted is missing.
func (r *chaosRun) checkConvergence(quietAt time.Time) (map[string]catalogEntry, map[string][]string) {
	var cat map[string]catalogEntry
	var lag map[string][]string
	deadline := quietAt.Add(30 * time.Second)
	for {
		var err error
		var ro *rolloutState
		cat, err = r.catalog()
		if err == nil {
			ro, err = r.rollouts(cat)
		}
		if err == nil {
			lag = r.lagging(cat, ro)
			// A catalog Redis is still being rebuilt into (Redis came
			// back empty just before quiet, and an agent reconnects
			// within its 10 s backoff) is served everywhere, and
			// incomplete: the names it lacks are waited for too.
			if len(lag) == 0 && len(r.missingFrom(cat)) == 0 {
				r.logf("quiet: every member serves every lineage's newest serial (%d lineages), %s after quiet", len(cat), time.Since(quietAt).Round(100*time.Millisecond))
				break
			}
		}
		if time.Now().After(deadline) {
			if err != nil {
				r.violate("I1", "the catalog could not be read 30 s after quiet: %v", err)
				return nil, nil
			}
			for node, l := range lag {
				r.violate("I1", "%s, 30 s after quiet, is behind on %d: %s", node, len(l), strings.Join(capList(l, 8), "; "))
			}
			break
		}
		time.Sleep(time.Second)
	}
	for name, at := range r.missingFrom(cat) {
		r.violate("I1", "%s, issued at %s and never deleted, is not in the fleet's lineages", name, at)
	}
	return cat, lag
}

// missingFrom is what was issued successfully and never deleted that
// cat lacks, with when it was issued.
func (r *chaosRun) missingFrom(cat map[string]catalogEntry) map[string]string {
	out := map[string]string{}
	for name, at := range r.expectedLive() {
		if _, ok := cat[name]; !ok {
			out[name] = at
		}
	}
	return out
}

func capList(l []string, n int) []string {
	if len(l) <= n {
		return l
	}
	return append(l[:n:n], fmt.Sprintf("and %d more", len(l)-n))
}

// expectedLive are the names whose last issuing operation succeeded and
// that no delete was tried on since it started.
func (r *chaosRun) expectedLive() map[string]string {
	out := map[string]string{}
	for _, op := range r.ops {
		if (op.Kind != opIssue && op.Kind != opBatch) || op.Code != 0 || len(op.Cmds) == 0 {
			continue
		}
		for _, name := range op.Names {
			deleted := slices.ContainsFunc(r.ops, func(d *chaosOp) bool {
				return d.Kind == opDelete && d.Names[0] == name && d.End.After(op.Start)
			})
			if !deleted {
				out[name] = fmt.Sprintf("+%.1fs by op#%d", op.Start.Sub(r.start).Seconds(), op.ID)
			} else {
				delete(out, name)
			}
		}
	}
	return out
}

// checkStatus is I1's second half: 'fleet status' says a member is
// behind exactly when its load balancer is, and exits 0 exactly when no
// member is. A node reports what it serves a moment after it serves
// it, so the comparison is repeated for up to 10 s.
func (r *chaosRun) checkStatus(op *chaosOp) {
	var problems []string
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(time.Second) {
		problems = nil
		cat, err := r.catalog()
		if err != nil {
			problems = append(problems, "catalog: "+err.Error())
		}
		ro, err := r.rollouts(cat)
		if err != nil {
			problems = append(problems, "rollouts: "+err.Error())
			ro = &rolloutState{}
		}
		lag := r.lagging(cat, ro)
		members := r.members()
		c := r.lbcert(op, members[0], "fleet", "status", "--json", "--max-lag", "0s")
		var st fleetStatusJSON
		if err := json.Unmarshal([]byte(c.Stdout), &st); err != nil {
			problems = append(problems, fmt.Sprintf("fleet status --json on %s: exit %d, no JSON: %s", members[0].name, c.Code, firstLine(c.Stderr)))
		} else {
			problems = append(problems, compareStatus(st, c.Code, members, lag, ro.problem())...)
		}
		if len(problems) == 0 {
			return
		}
		if time.Now().After(deadline) {
			break
		}
	}
	for _, p := range problems {
		r.violate("I1", "fleet status: %s", p)
	}
}

// compareStatus: a node a staged rollout keeps on an older version
// serves it as WAITING, not behind; fleet status exits non-zero while
// a member is behind or a rollout needs an operator (held, aborted, or
// overridden near expiry: rolloutProblem).
func compareStatus(st fleetStatusJSON, code int, members []*chaosNode, lag map[string][]string, rolloutProblem string) []string {
	var out []string
	behindAny := false
	for _, m := range members {
		truth := len(lag[m.name]) > 0
		behindAny = behindAny || truth
		i := slices.IndexFunc(st.Nodes, func(n statusNode) bool { return n.Node == m.name })
		if i < 0 {
			out = append(out, fmt.Sprintf("member %s is not listed", m.name))
			continue
		}
		ns := st.Nodes[i]
		says := ns.Behind+ns.Failed > 0 || ns.Newest+ns.Waiting < st.Lineages
		switch {
		case says && !truth:
			out = append(out, fmt.Sprintf("says %s is behind (newest %d, waiting %d, of %d, behind %v, %d failed) but its load balancer serves every serial it should", m.name, ns.Newest, ns.Waiting, st.Lineages, ns.BehindNames, ns.Failed))
		case !says && truth:
			out = append(out, fmt.Sprintf("says %s is up to date (newest %d, waiting %d, of %d) but its load balancer is behind: %s", m.name, ns.Newest, ns.Waiting, st.Lineages, strings.Join(capList(lag[m.name], 4), "; ")))
		}
	}
	if notFine := behindAny || rolloutProblem != ""; (code == 0) == notFine {
		out = append(out, fmt.Sprintf("exit %d while a member is behind: %v, and a rollout needs an operator: %q", code, behindAny, rolloutProblem))
	}
	return out
}

// checkVersions is I2: every (name, version) seen in Redis or on any
// node's disk, at any time of the run, is one serial.
func (r *chaosRun) checkVersions() {
	o := r.obs
	o.mu.Lock()
	defer o.mu.Unlock()
	for _, name := range slices.Sorted(maps.Keys(o.versions)) {
		for v, serials := range o.versions[name] {
			if len(serials) < 2 {
				continue
			}
			var parts []string
			for s, where := range serials {
				parts = append(parts, s+" ("+where+")")
			}
			sort.Strings(parts)
			msg := fmt.Sprintf("%s version %d names %d certificates: %s", name, v, len(serials), strings.Join(parts, ", "))
			o.mu.Unlock()
			r.violate("I2", "%s", msg)
			o.mu.Lock()
		}
	}
}

// checkDeletes is I3: a name whose delete returned 0, with no issue or
// batch of it running at or after the delete, is in no lineage set, no
// member's list and no member's load balancer.
func (r *chaosRun) checkDeletes(op *chaosOp, cat map[string]catalogEntry) {
	gone := r.deleted()
	if len(gone) == 0 {
		return
	}
	lists := map[string][]string{}
	for _, m := range r.members() {
		c := r.lbcert(op, m, "list", "--json")
		var l struct {
			Lineages []struct {
				Name string `json:"name"`
			} `json:"lineages"`
		}
		if err := json.Unmarshal([]byte(c.Stdout), &l); err != nil || c.Code != 0 {
			r.violate("I3", "list --json on %s: exit %d: %s (the deletes cannot be checked there)", m.name, c.Code, firstLine(c.Stderr))
			continue
		}
		for _, e := range l.Lineages {
			lists[m.name] = append(lists[m.name], e.Name)
		}
	}
	for _, name := range slices.Sorted(maps.Keys(gone)) {
		d := gone[name]
		when := fmt.Sprintf("deleted by op#%d on %s at +%.1fs", d.ID, d.Node, d.End.Sub(r.start).Seconds())
		if _, ok := cat[name]; ok {
			r.violate("I3", "%s, %s, is back in the fleet's lineages", name, when)
		}
		for node, names := range lists {
			if slices.Contains(names, name) {
				r.violate("I3", "%s, %s, is in 'list' on %s", name, when, node)
			}
		}
		spec := r.spec(name)
		for _, m := range r.members() {
			for _, dom := range spec.Domains {
				if s := m.served(dom, r.def); s != "" {
					r.violate("I3", "%s, %s, is served by %s's %s for %s: %s (%s)", name, when, m.name, m.lb, dom, s, r.obs.versionOf(name, s))
				}
			}
		}
	}
}

// deleted are the names whose delete returned 0 and that no issue or
// batch ran on at or after the delete's start, with their delete.
func (r *chaosRun) deleted() map[string]*chaosOp {
	gone := map[string]*chaosOp{}
	for _, d := range r.ops {
		if d.Kind != opDelete || d.Code != 0 || len(d.Cmds) == 0 {
			continue
		}
		name := d.Names[0]
		again := slices.ContainsFunc(r.ops, func(o *chaosOp) bool {
			return (o.Kind == opIssue || o.Kind == opBatch) && slices.Contains(o.Names, name) && o.End.After(d.Start)
		})
		if again {
			delete(gone, name)
		} else {
			gone[name] = d
		}
	}
	return gone
}

func (r *chaosRun) spec(name string) lineageSpec {
	for _, s := range r.plan.Pool {
		if s.Name == name {
			return s
		}
	}
	return lineageSpec{Name: name, Domains: []string{name}}
}

var issuedRe = regexp.MustCompile(`Issued certificate serial ([0-9a-f]+) for order (\S+)`)

// issuedPerSet counts the certificates Pebble issued during the run per
// exact set of names, from Pebble's log (serial and order) and the
// front's record of each order's names.
func (r *chaosRun) issuedPerSet() (map[string][]string, map[string]bool) {
	names := map[string][]string{}
	for _, o := range r.front.Orders() {
		names[o.ID] = o.Names
	}
	per := map[string][]string{}
	serials := map[string]bool{}
	for _, m := range issuedRe.FindAllStringSubmatch(r.f.pebble.FullLog(), -1) {
		serial := strings.TrimLeft(m[1], "0")
		serials[serial] = true
		set := slices.Clone(names[m[2]])
		slices.Sort(set)
		key := strings.Join(set, ",")
		if key == "" {
			key = "(order " + m[2] + " not seen by the front)"
		}
		per[key] = append(per[key], serial)
	}
	return per, serials
}

// checkLedger is I4: per exact set, at most the ledger's cap plus one
// certificate in the run (all within 7 days), never more than 5.
func (r *chaosRun) checkLedger() int {
	per, issued := r.issuedPerSet()
	most := 0
	for set, serials := range per {
		most = max(most, len(serials))
		if len(serials) > ledgerCap+1 || len(serials) > 5 {
			r.violate("I4", "%d certificates for the exact set {%s} in %s (ledger cap %d): %v", len(serials), set, time.Since(r.start).Round(time.Second), ledgerCap, serials)
		}
	}
	o := r.obs
	o.mu.Lock()
	var unknown []string
	for s := range o.issuedBy {
		if !issued[s] {
			unknown = append(unknown, s)
		}
	}
	o.mu.Unlock()
	if len(unknown) > 0 {
		r.violate("HARNESS", "serials seen in Redis or on disk that Pebble's log does not show issued: %v", unknown)
	}
	return most
}

// checkCustody is I5 at the end: no bundle or account key in Redis
// opens with a removed node's keys, and no removed node is a member.
func (r *chaosRun) checkCustody() {
	c := r.redis.client()
	defer c.Close()
	removed := r.obs.removedKeys(c)
	if len(removed) == 0 {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	bs, err := bundles(c)
	if err != nil {
		r.violate("I5", "read the bundles: %v", err)
		return
	}
	accts := map[string]map[string]string{}
	iter := c.Scan(ctx, 0, rkAccount+"*", 100).Iterator()
	for iter.Next(ctx) {
		accts[iter.Val()] = c.HGetAll(ctx, iter.Val()).Val()
	}
	for _, rk := range removed {
		if ok, _ := c.HExists(ctx, rkMembers, rk.node).Result(); ok {
			r.violate("I5", "%s, removed at +%.1fs, is a member of the fleet again", rk.node, rk.at.Sub(r.start).Seconds())
		}
		for name, m := range bs {
			var v int
			fmt.Sscan(m["version"], &v)
			if e, ok := rk.opener(bundleAD(rk.fleet, name, v), []byte(m["key"])); ok {
				r.violate("I5", "after quiet, %s version %d (epoch %s, published by %s) opens with removed %s's %s", name, v, m["epoch"], m["node"], rk.node, e)
			}
		}
		for key, m := range accts {
			if e, ok := rk.opener(accountAD(rk.fleet, m["server"], m["email"]), []byte(m["key"])); ok {
				r.violate("I5", "after quiet, the account key %s opens with removed %s's %s", key, rk.node, e)
			}
		}
	}
}

// checkOrders is I6: no two orders for one identifier in flight at the
// same time, as the front in front of Pebble saw them (Pebble's own
// log names no identifier). An order is in flight from its new-order
// request to the answer that made it valid or invalid, or, when its
// client stopped following it (killed, or it abandoned the order), to
// the last request about it. The lease lives in Redis only: when
// Redis's data went between the first order's lease and the second
// order, the second is the "extra order" the README allows for a lost
// lease (the ledger, I4, bounds the certificates), logged, not a
// violation.
func (r *chaosRun) checkOrders() {
	byName := map[string][]int{}
	orders := r.front.Orders()
	for i, o := range orders {
		for _, n := range o.Names {
			byName[n] = append(byName[n], i)
		}
	}
	for _, name := range slices.Sorted(maps.Keys(byName)) {
		idx := byName[name]
		for a := 0; a < len(idx); a++ {
			for b := a + 1; b < len(idx); b++ {
				oa, ob := orders[idx[a]], orders[idx[b]]
				_, endA := oa.Span()
				if !ob.Created.Before(endA) {
					continue
				}
				if f := r.dataLoss(oa.Created.Add(-leaseLead), ob.Created); f != "" {
					r.logf("I6: two orders for %s at once, %s (created %s) and %s (created %s): allowed, the lease went with Redis's data (%s)", name, oa.ID, r.rel(oa.Created), ob.ID, r.rel(ob.Created), f)
				} else {
					r.violate("I6", "two orders for %s at once: %s (created %s, %s) and %s (created %s, %s)", name,
						oa.ID, r.rel(oa.Created), r.ending(oa), ob.ID, r.rel(ob.Created), r.ending(ob))
				}
			}
		}
	}
}

// leaseLead bounds how long before its new-order request a run took
// the name's lease.
const leaseLead = 5 * time.Second

// dataLoss names a fault that took Redis's data at some time in
// [from, to], or "".
func (r *chaosRun) dataLoss(from, to time.Time) string {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, f := range r.faults {
		if f.LostData && !f.Start.After(to) && (f.End.IsZero() || !f.End.Before(from)) {
			return fmt.Sprintf("%s at %s", f.Kind, r.rel(f.Start))
		}
	}
	return ""
}

func (r *chaosRun) rel(t time.Time) string { return fmt.Sprintf("+%.3fs", t.Sub(r.start).Seconds()) }

func (r *chaosRun) ending(o interface {
	Span() (time.Time, time.Time)
}) string {
	_, end := o.Span()
	return "in flight until " + r.rel(end)
}

// checkRedisKeys is I7's Redis half: no key or value of any type holds
// a PEM private key, or the DER, the secret scalar (raw, hex or base64)
// of any private key seen on any node during the run.
func (r *chaosRun) checkRedisKeys() {
	c := r.redis.client()
	defer c.Close()
	vals, err := dumpRedis(c)
	if err != nil {
		r.violate("I7", "scan Redis: %v", err)
		return
	}
	r.obs.mu.Lock()
	keys := slices.Collect(maps.Values(r.obs.keys))
	r.obs.mu.Unlock()
	var needles []struct {
		b     []byte
		where string
	}
	for _, k := range keys {
		for _, n := range secretForms(k) {
			if len(n) >= 16 {
				needles = append(needles, struct {
					b     []byte
					where string
				}{n, k.where})
			}
		}
	}
	for where, v := range vals {
		if bytes.Contains(v, []byte("PRIVATE KEY")) {
			r.violate("I7", "Redis %s holds a PEM private key", where)
		}
		for _, n := range needles {
			if bytes.Contains(v, n.b) {
				r.violate("I7", "Redis %s holds the private key of %s in clear", where, n.where)
				break
			}
		}
	}
	r.logf("I7: %d Redis values searched for %d private keys", len(vals), len(keys))
}

// dumpRedis reads every key of every type: key (and field) -> value.
func dumpRedis(c goredis.UniversalClient) (map[string][]byte, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	out := map[string][]byte{}
	iter := c.Scan(ctx, 0, "*", 1000).Iterator()
	for iter.Next(ctx) {
		k := iter.Val()
		out["key "+k] = []byte(k)
		switch c.Type(ctx, k).Val() {
		case "string":
			out[k] = []byte(c.Get(ctx, k).Val())
		case "hash":
			for f, v := range c.HGetAll(ctx, k).Val() {
				out[k+" "+f] = []byte(v)
			}
		case "set":
			out[k] = []byte(strings.Join(c.SMembers(ctx, k).Val(), "\n"))
		case "zset":
			out[k] = []byte(strings.Join(c.ZRange(ctx, k, 0, -1).Val(), "\n"))
		case "list":
			out[k] = []byte(strings.Join(c.LRange(ctx, k, 0, -1).Val(), "\n"))
		case "stream":
			for _, m := range c.XRange(ctx, k, "-", "+").Val() {
				out[k+" "+m.ID] = []byte(fmt.Sprint(m.Values))
			}
		}
	}
	return out, iter.Err()
}

// checkDisks is I7's disk half: on every node, removed ones included,
// live/<name> names a complete archived version whose key matches its
// certificate, whose fullchain is cert plus chain, and whose
// lineage.json says that name, version and serial.
func (r *chaosRun) checkDisks() {
	r.mu.Lock()
	nodes := append([]*chaosNode(nil), r.nodes...)
	r.mu.Unlock()
	for _, n := range nodes {
		lives, _ := filepath.Glob(filepath.Join(n.dir, "live", "*"))
		for _, live := range lives {
			if err := checkLive(n.dir, live); err != nil {
				r.violate("I7", "%s: %s: %v", n.name, strings.TrimPrefix(live, n.dir+"/"), err)
			}
		}
	}
}

func checkLive(dir, live string) error {
	name := filepath.Base(live)
	target, err := filepath.EvalSymlinks(live)
	if err != nil {
		return fmt.Errorf("dangling: %v", err)
	}
	if filepath.Dir(target) != filepath.Join(dir, "archive", name) {
		return fmt.Errorf("points at %s, not a version of archive/%s", target, name)
	}
	read := func(f string) ([]byte, error) { return os.ReadFile(filepath.Join(target, f)) }
	certPEM, err1 := read("cert.pem")
	chain, err2 := read("chain.pem")
	full, err3 := read("fullchain.pem")
	keyPEM, err4 := read("privkey.pem")
	meta, err5 := read("lineage.json")
	if err := firstErr(err1, err2, err3, err4, err5); err != nil {
		return fmt.Errorf("incomplete version %s: %v", filepath.Base(target), err)
	}
	if !bytes.Equal(full, append(append([]byte{}, certPEM...), chain...)) {
		return fmt.Errorf("fullchain.pem is not cert.pem + chain.pem")
	}
	serial, cert := serialOfPEM(certPEM)
	if cert == nil {
		return fmt.Errorf("cert.pem does not parse")
	}
	if err := keyMatches(cert, keyPEM); err != nil {
		return err
	}
	var l struct {
		Name    string `json:"name"`
		Version int    `json:"version"`
		Cert    struct {
			Serial string `json:"serial"`
		} `json:"cert"`
	}
	if err := json.Unmarshal(meta, &l); err != nil {
		return fmt.Errorf("lineage.json: %v", err)
	}
	if l.Name != name || fmt.Sprint(l.Version) != filepath.Base(target) || !strings.EqualFold(strings.TrimLeft(l.Cert.Serial, "0"), serial) {
		return fmt.Errorf("lineage.json says %s v%d serial %s; the directory is %s v%s serial %s", l.Name, l.Version, l.Cert.Serial, name, filepath.Base(target), serial)
	}
	return nil
}

func firstErr(errs ...error) error {
	for _, e := range errs {
		if e != nil {
			return e
		}
	}
	return nil
}
