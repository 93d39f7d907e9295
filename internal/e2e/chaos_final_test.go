package e2e

import (
	"crypto"
	"crypto/x509"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"
)

// keyMatches checks that keyPEM is the private key of cert.
func keyMatches(cert *x509.Certificate, keyPEM []byte) error {
	b, _ := pem.Decode(keyPEM)
	if b == nil {
		return fmt.Errorf("privkey.pem is not PEM")
	}
	k, err := parsePrivateKey(b.Bytes)
	if err != nil {
		return fmt.Errorf("privkey.pem does not parse: %v", err)
	}
	signer, ok := k.(crypto.Signer)
	if !ok {
		return fmt.Errorf("privkey.pem is no signing key")
	}
	pub, ok := signer.Public().(interface{ Equal(crypto.PublicKey) bool })
	if !ok || !pub.Equal(cert.PublicKey) {
		return fmt.Errorf("privkey.pem does not match cert.pem")
	}
	return nil
}

// secretForms are the ways a private key could sit in a Redis value in
// clear: its DER, its secret scalar raw and in hex, and the scalar in
// base64 (standard and URL alphabets) at each of the three byte
// alignments, trimmed to the characters every encoding of it shares.
func secretForms(k keyMaterial) [][]byte {
	out := [][]byte{k.der}
	if len(k.scalar) == 0 {
		return out
	}
	out = append(out, k.scalar, []byte(hex.EncodeToString(k.scalar)), []byte(strings.ToUpper(hex.EncodeToString(k.scalar))))
	for shift := range 3 {
		for _, enc := range []*base64.Encoding{base64.StdEncoding, base64.RawURLEncoding} {
			s := enc.EncodeToString(k.scalar[shift:])
			if len(s) > 8 {
				out = append(out, []byte(s[:len(s)-4]))
			}
		}
	}
	return out
}

// checkAccounts: one ACME account per CA fleet-wide. Every member's
// copy and Redis's name the same account URL, and every order of the
// run was placed under one account.
func (r *chaosRun) checkAccounts() {
	urls := map[string][]string{}
	for _, m := range r.members() {
		paths, _ := filepath.Glob(filepath.Join(m.dir, "accounts", "*", "*", "account.json"))
		for _, p := range paths {
			if u := accountURI(readOrEmpty(p)); u != "" {
				urls[u] = append(urls[u], m.name)
			}
		}
	}
	c := r.redis.client()
	defer c.Close()
	vals, err := dumpRedis(c)
	if err != nil {
		r.violate("ACCT", "scan Redis: %v", err)
	}
	for k, v := range vals {
		if strings.HasPrefix(k, rkAccount) && strings.HasSuffix(k, " reg") {
			if u := accountURI(v); u != "" {
				urls[u] = append(urls[u], "redis")
			}
		}
	}
	if len(urls) > 1 {
		var parts []string
		for u, who := range urls {
			parts = append(parts, fmt.Sprintf("%s (%s)", u, strings.Join(who, ", ")))
		}
		slices.Sort(parts)
		r.violate("ACCT", "%d ACME accounts for one CA: %s", len(urls), strings.Join(parts, "; "))
	}
	used := map[string]int{}
	for _, o := range r.front.Orders() {
		used[o.Account]++
	}
	if len(used) > 1 {
		r.violate("ACCT", "the run's orders were placed under %d accounts: %v", len(used), used)
	}
}

func readOrEmpty(path string) []byte {
	b, _ := os.ReadFile(path)
	return b
}

func accountURI(reg []byte) string {
	var v struct {
		URI string `json:"uri"`
	}
	json.Unmarshal(reg, &v)
	return v.URI
}

// finalRenew: after all the faults, renew --force of one lineage
// succeeds and every member serves the new certificate within 30 s. The
// lineage is one the ledger still has room for and no killed command
// touched (whose lease is its TTL's, by design); without one, a new
// name is issued first.
func (r *chaosRun) finalRenew(op *chaosOp, cat map[string]catalogEntry) {
	per, _ := r.issuedPerSet()
	touched := map[string]bool{}
	for _, o := range r.ops {
		for _, c := range o.Cmds {
			if c.Killed {
				for _, n := range o.Names {
					touched[n] = true
				}
			}
		}
	}
	name := ""
	gone := r.deleted()
	for _, n := range slices.Sorted(maps.Keys(cat)) {
		if gone[n] != nil {
			continue // back after its delete: I3's, not a lineage to renew
		}
		set := slices.Clone(r.spec(n).Domains)
		slices.Sort(set)
		if len(per[strings.Join(set, ",")]) < ledgerCap && !touched[n] && cat[n].serial != "" {
			name = n
			break
		}
	}
	members := r.members()
	on := members[int(r.plan.Seed)%len(members)]
	if name == "" {
		name = r.finalName()
		c := r.lbcert(op, on, append([]string{"issue", "-d", name}, orderFlags...)...)
		if c.Code != 0 {
			r.violate("RENEW", "issue %s on %s after the faults: exit %d\n%s%s", name, on.name, c.Code, tailOf(c.Stdout, 2000), tailOf(c.Stderr, 3000))
			return
		}
	}
	before := r.catalogSerial(name)
	c := r.lbcert(op, on, append([]string{"renew", "--force", "--name", name, "--no-random-sleep"}, orderFlags...)...)
	r.logf("final: renew --force --name %s on %s: exit %d in %s", name, on.name, c.Code, c.End.Sub(c.Start).Round(time.Millisecond))
	if c.Code != 0 {
		r.violate("RENEW", "renew --force --name %s on %s after the faults: exit %d\n%s%s", name, on.name, c.Code, tailOf(c.Stdout, 2000), tailOf(c.Stderr, 3000))
		return
	}
	after := r.catalogSerial(name)
	if after == "" || after == before {
		r.violate("RENEW", "renew --force --name %s exited 0, but the fleet's serial is %q (was %q)", name, after, before)
		return
	}
	deadline := time.Now().Add(30 * time.Second)
	for {
		var behind []string
		for _, m := range r.members() {
			for _, d := range r.spec(name).Domains {
				if s := m.served(d, r.def); s != after {
					behind = append(behind, fmt.Sprintf("%s serves %q for %s", m.name, s, d))
				}
			}
		}
		if len(behind) == 0 {
			return
		}
		if time.Now().After(deadline) {
			r.violate("RENEW", "30 s after renew --force --name %s, not every member serves %s: %s", name, after, strings.Join(behind, "; "))
			return
		}
		time.Sleep(500 * time.Millisecond)
	}
}

func (r *chaosRun) catalogSerial(name string) string {
	cat, err := r.catalog()
	if err != nil {
		return ""
	}
	return cat[name].serial
}
