package e2e

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"math/big"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	goredis "github.com/redis/go-redis/v9"

	"github.com/lbcert/lbcert/internal/fleet"
	"github.com/lbcert/lbcert/internal/testenv"
)

// servedCert is what one node's load balancer served for one name at a
// sample: the leaf's serial and expiry.
type servedCert struct {
	Serial   string
	NotAfter time.Time
}

// checkRolloutInvariants checks the staged rollout's invariants on one
// sample of what the nodes' load balancers serve (node -> name -> what,
// taken just before the call), against the fleet's Redis (key prefix
// prefix) read after it. It is written for the randomized fleet fault
// test too, which calls it on its own samples:
//
//   - R1: no node of a later wave serves a version whose rollout has not
//     released that node's wave, except by the expiry override (the
//     rollout's record says it began). Waves only move forward within a
//     version's rollout, so Redis read after the sample can only excuse
//     more, never accuse wrongly; but new waves set meanwhile can put a
//     node that served the version rightly in a wave not released, until
//     its agent takes it back. recent are waves set before the current
//     ones that the nodes may still be following (nil when they never
//     change): a node its wave under any of them releases is excused,
//     and under no staging (an empty config) every node is.
//   - R3: no node serves an expired certificate of a name while the
//     fleet holds a valid one (its head, or the version a rollout keeps).
//
// It returns one line per violation, and an error when Redis could not
// be read (no verdict: the caller samples again).
func checkRolloutInvariants(c goredis.UniversalClient, prefix string, serving map[string]map[string]servedCert, now time.Time, recent []fleet.RolloutConfig) ([]string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	var out []string
	var cfg fleet.RolloutConfig
	if raw, err := c.HGet(ctx, prefix+"rollout", "json").Result(); err == nil {
		json.Unmarshal([]byte(raw), &cfg)
	} else if err != goredis.Nil {
		return nil, err
	}
	members, err := c.HKeys(ctx, prefix+"members").Result()
	if err != nil {
		return nil, err
	}
	waves := cfg.Resolve(members)
	var older [][][]string
	for _, r := range recent {
		older = append(older, r.Resolve(members))
	}
	names, err := c.SMembers(ctx, prefix+"rollouts").Result()
	if err != nil {
		return nil, err
	}
	for _, name := range names {
		rec, err := c.HGetAll(ctx, prefix+"rollout:"+name).Result()
		if err != nil {
			return nil, err
		}
		if len(rec) == 0 || !cfg.Staged() {
			continue // finished since the read of the set, or staging off
		}
		wave, _ := strconv.Atoi(rec["wave"])
		rw := waves
		if js := rec["waves"]; js != "" {
			// Resolved when the rollout started; a node joined since is in
			// the last wave.
			var pinned [][]string
			if json.Unmarshal([]byte(js), &pinned) == nil && len(pinned) > 0 {
				rw = pinned
			}
		}
		override, _ := strconv.ParseInt(rec["override_at"], 10, 64)
		for node, m := range serving {
			w := waveIn(rw, node)
			if w < 0 && len(rw) > 0 && slices.Contains(members, node) {
				w = len(rw) - 1 // joined since the rollout started
			}
			if w < 0 || m[name].Serial != rec["serial"] || w <= wave || override > 0 {
				continue
			}
			if slices.ContainsFunc(older, func(ws [][]string) bool { return ws == nil || waveIn(ws, node) <= wave }) {
				continue // released under waves the nodes may still follow
			}
			out = append(out, fmt.Sprintf("R1: %s (wave %d) serves %s version %s (serial %s) while its rollout is %s at wave %d, with no expiry override",
				node, w+1, name, rec["version"], rec["serial"], rec["state"], wave+1))
		}
	}
	for node, m := range serving {
		for name, sc := range m {
			if now.Before(sc.NotAfter) {
				continue
			}
			for _, key := range []string{prefix + "bundle:" + name, prefix + "prev:" + name} {
				certPEM, err := c.HGet(ctx, key, "cert").Result()
				if err == goredis.Nil {
					continue
				}
				if err != nil {
					return nil, err
				}
				if na := pemNotAfter(certPEM); now.Before(na) {
					out = append(out, fmt.Sprintf("R3: %s serves %s's certificate %s, expired at %s, while the fleet holds one valid until %s (%s)",
						node, name, sc.Serial, sc.NotAfter.UTC().Format(time.RFC3339), na.UTC().Format(time.RFC3339), key))
					break
				}
			}
		}
	}
	return out, nil
}

// waveIn is node's wave in resolved waves, -1 when none has it.
func waveIn(waves [][]string, node string) int {
	return slices.IndexFunc(waves, func(nodes []string) bool { return slices.Contains(nodes, node) })
}

func pemNotAfter(s string) time.Time {
	b, _ := pem.Decode([]byte(s))
	if b == nil {
		return time.Time{}
	}
	c, err := x509.ParseCertificate(b.Bytes)
	if err != nil {
		return time.Time{}
	}
	return c.NotAfter
}

// The invariant check can fail, and only for what it names: a node of
// an unreleased wave serving the new version, unless the expiry
// override began or waves set just before released it; an expired
// certificate while a valid one is held.
func TestRolloutCheckerCatches(t *testing.T) {
	r, err := testenv.StartRedis(t.TempDir(), fleetPassword, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(r.Stop)
	c := goredis.NewClient(&goredis.Options{Addr: r.Addr(), Password: fleetPassword})
	defer c.Close()
	ctx := context.Background()
	now := time.Now()
	c.HSet(ctx, "lbcert:rollout", "json", `{"waves":["lb1","rest"]}`, "waves", 2, "seq", 1)
	c.HSet(ctx, "lbcert:members", "lb1", "{}", "lb2", "{}", "lb3", "{}")
	c.SAdd(ctx, "lbcert:rollouts", "a.example")
	c.HSet(ctx, "lbcert:rollout:a.example", "version", 2, "serial", "new", "wave", 0, "state", "held", "override_at", 0)
	valid := servedCert{Serial: "old", NotAfter: now.Add(time.Hour)}
	lb3New := map[string]map[string]servedCert{"lb3": {"a.example": {Serial: "new", NotAfter: now.Add(time.Hour)}}}
	for _, tc := range []struct {
		name    string
		serving map[string]map[string]servedCert
		setup   func()
		want    string
		recent  []fleet.RolloutConfig
	}{
		{"canary serves it", map[string]map[string]servedCert{"lb1": {"a.example": {Serial: "new", NotAfter: now.Add(time.Hour)}}, "lb2": {"a.example": valid}}, nil, "", nil},
		{"a later wave serves it", lb3New, nil, "R1: lb3 (wave 2) serves a.example version 2", nil},
		{"released under the waves before", lb3New, nil, "", []fleet.RolloutConfig{{Waves: []string{"lb1,lb3", "rest"}}}},
		{"staging was off just before", lb3New, nil, "", []fleet.RolloutConfig{{}}},
		{"not released under the waves before either", lb3New, nil, "R1: lb3 (wave 2)", []fleet.RolloutConfig{{Waves: []string{"lb1", "lb2", "rest"}}}},
		{"the override excuses it", lb3New, func() { c.HSet(ctx, "lbcert:rollout:a.example", "override_at", now.UnixMilli()) }, "", nil},
		{"expired, nothing better", map[string]map[string]servedCert{"lb2": {"b.example": {Serial: "x", NotAfter: now.Add(-time.Minute)}}}, nil, "", nil},
		{"expired while a valid one is held", map[string]map[string]servedCert{"lb2": {"b.example": {Serial: "x", NotAfter: now.Add(-time.Minute)}}},
			func() { c.HSet(ctx, "lbcert:bundle:b.example", "cert", string(selfSignedPEM(t, now.Add(time.Hour)))) }, "R3: lb2 serves b.example's certificate x", nil},
	} {
		if tc.setup != nil {
			tc.setup()
		}
		got, err := checkRolloutInvariants(c, "lbcert:", tc.serving, now, tc.recent)
		if err != nil {
			t.Fatal(err)
		}
		if joined := strings.Join(got, "\n"); tc.want == "" && joined != "" || tc.want != "" && !strings.Contains(joined, tc.want) {
			t.Errorf("%s: %q, want %q", tc.name, joined, tc.want)
		}
	}
}

// selfSignedPEM is a certificate valid until notAfter.
func selfSignedPEM(t *testing.T, notAfter time.Time) []byte {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(7), NotBefore: notAfter.Add(-48 * time.Hour), NotAfter: notAfter}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
}
