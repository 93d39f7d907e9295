package e2e

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"encoding/pem"
	"fmt"
	"io"
	"maps"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	goredis "github.com/redis/go-redis/v9"
)

// chaosObserver watches the fleet while the schedule runs, since some
// of what the invariants forbid can be transient: every (name, version)
// and its serial seen in Redis or on a node's disk (I2), every private
// key seen on a disk (for I7's search of Redis), bundles published
// after a removal that the removed node can open (I5), and tokens a
// removed node's agent answers (I5).
type chaosObserver struct {
	r *chaosRun

	mu       sync.Mutex
	versions map[string]map[int]map[string]string // name -> version -> serial -> where first seen
	keys     map[string]keyMaterial               // sha256 of the DER -> the key
	files    map[string]bool                      // path and mtime already read
	sealed   map[string]bool                      // seal violations already reported
	tokens   map[string]bool                      // tokens already tried on removed agents
	issuedBy map[string]bool                      // serials seen anywhere
	// servingSamples counts the samples of what the load balancers
	// serve that the rollout invariants were checked on, and
	// rolloutSamples those taken with a rollout on its way.
	servingSamples, rolloutSamples int

	stop chan struct{}
	done chan struct{}
}

type keyMaterial struct {
	der, scalar []byte
	where       string
}

func newObserver(r *chaosRun) *chaosObserver {
	return &chaosObserver{r: r, versions: map[string]map[int]map[string]string{}, keys: map[string]keyMaterial{},
		files: map[string]bool{}, sealed: map[string]bool{}, tokens: map[string]bool{}, issuedBy: map[string]bool{},
		stop: make(chan struct{}), done: make(chan struct{})}
}

// run samples until stopped: Redis and the disks every second, tokens
// every quarter second, and what the load balancers serve every second
// (sampleServing, for the rollout invariants).
func (o *chaosObserver) run() {
	defer close(o.done)
	var wg sync.WaitGroup
	wg.Add(1)
	go func() { defer wg.Done(); o.sampleServing() }()
	defer wg.Wait()
	c := o.r.redis.client()
	defer c.Close()
	tick := time.NewTicker(250 * time.Millisecond)
	defer tick.Stop()
	for i := 0; ; i++ {
		select {
		case <-o.stop:
			return
		case <-tick.C:
		}
		o.watchTokens(c)
		if i%4 == 0 {
			o.sampleRedis(c)
			o.sampleDisks()
		}
	}
}

func (o *chaosObserver) finish() {
	close(o.stop)
	<-o.done
	c := o.r.redis.client()
	defer c.Close()
	o.sampleRedis(c)
	o.sampleDisks()
	o.checkServing(c)
}

// record notes that where holds serial as name's version v.
func (o *chaosObserver) record(name string, v int, serial, where string) {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.issuedBy[serial] = true
	if o.versions[name] == nil {
		o.versions[name] = map[int]map[string]string{}
	}
	if o.versions[name][v] == nil {
		o.versions[name][v] = map[string]string{}
	}
	if _, ok := o.versions[name][v][serial]; !ok {
		o.versions[name][v][serial] = where + " at " + o.r.since()
	}
}

func serialOfPEM(data []byte) (string, *x509.Certificate) {
	b, _ := pem.Decode(data)
	if b == nil {
		return "", nil
	}
	c, err := x509.ParseCertificate(b.Bytes)
	if err != nil {
		return "", nil
	}
	return fmt.Sprintf("%x", c.SerialNumber), c
}

// bundles reads every bundle in Redis: name -> fields.
func bundles(c goredis.UniversalClient) (map[string]map[string]string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	out := map[string]map[string]string{}
	iter := c.Scan(ctx, 0, rkBundle+"*", 1000).Iterator()
	for iter.Next(ctx) {
		m, err := c.HGetAll(ctx, iter.Val()).Result()
		if err != nil {
			return nil, err
		}
		out[strings.TrimPrefix(iter.Val(), rkBundle)] = m
	}
	return out, iter.Err()
}

func (o *chaosObserver) sampleRedis(c goredis.UniversalClient) {
	bs, err := bundles(c)
	if err != nil {
		return // Redis away: a fault; the next sample reads it
	}
	removed := o.removedKeys(c)
	for name, m := range bs {
		v, _ := strconv.Atoi(m["version"])
		if serial, _ := serialOfPEM([]byte(m["cert"])); serial != "" {
			o.record(name, v, serial, "redis")
		}
		for field, val := range m {
			if strings.Contains(val, "PRIVATE KEY") {
				o.once("pem "+name+" "+field, func() {
					o.r.violate("I7", "Redis %s%s field %s holds a PEM private key", rkBundle, name, field)
				})
			}
		}
		published, _ := strconv.ParseInt(m["published_at"], 10, 64)
		for _, rk := range removed {
			if published <= rk.at.UnixMilli() || m["node"] == rk.node && rk.holds(name, v, m["cert"]) {
				continue
			}
			if e, ok := rk.opener(bundleAD(rk.fleet, name, v), []byte(m["key"])); ok {
				o.once("seal "+rk.node+" "+name+" "+m["version"]+" "+m["epoch"], func() {
					o.r.violate("I5", "%s version %d, published %s after 'fleet remove %s' returned (by %s, epoch %s), opens with %s's %s",
						name, v, time.UnixMilli(published).Sub(rk.at).Round(time.Millisecond), rk.node, m["node"], m["epoch"], rk.node, e)
				})
			}
		}
	}
}

func (o *chaosObserver) once(key string, fn func()) {
	o.mu.Lock()
	done := o.sealed[key]
	o.sealed[key] = true
	o.mu.Unlock()
	if !done {
		fn()
	}
}

// removedNodeKeys are the data keys a removed node can open: its own
// files, and whatever Redis still wraps for it.
type removedNodeKeys struct {
	node, fleet, dir string
	at               time.Time
	keys             map[int][]byte
}

// holds says whether the removed node's own archive holds name's
// version v with the certificate certPEM, and so its private key. A
// removed node that has not learnt it was removed yet rebuilds a Redis
// that lost everything with its older key (the members then put the
// newer membership back): what it publishes then is what it held,
// which tells it nothing new, and is no breach of custody.
func (rk removedNodeKeys) holds(name string, v int, certPEM string) bool {
	disk, err := os.ReadFile(filepath.Join(rk.dir, "archive", name, strconv.Itoa(v), "cert.pem"))
	if err != nil {
		return false
	}
	a, _ := serialOfPEM(disk)
	b, _ := serialOfPEM([]byte(certPEM))
	return a != "" && a == b
}

// opener names the first of the removed node's keys that opens sealed
// under ad.
func (rk removedNodeKeys) opener(ad, sealed []byte) (string, bool) {
	for _, e := range slices.Sorted(maps.Keys(rk.keys)) {
		if opens(rk.keys[e], ad, sealed) {
			if e < 0 {
				return fmt.Sprintf("data key of epoch %d, still wrapped for it in Redis", -e), true
			}
			return fmt.Sprintf("data key of epoch %d from its own datakey-%d.age", e, e), true
		}
	}
	return "", false
}

func (o *chaosObserver) removedKeys(c goredis.UniversalClient) []removedNodeKeys {
	var out []removedNodeKeys
	o.r.mu.Lock()
	var nodes []*chaosNode
	for _, n := range o.r.nodes {
		if !n.removedAt.IsZero() {
			nodes = append(nodes, n)
		}
	}
	o.r.mu.Unlock()
	for _, n := range nodes {
		id, fleetID, err := nodeIdentity(n.dir)
		if err != nil {
			continue
		}
		rk := removedNodeKeys{node: n.name, fleet: fleetID, dir: n.dir, at: n.removedAt, keys: diskDataKeys(n.dir, id)}
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
		iter := c.Scan(ctx, 0, rkWrapped+"*", 100).Iterator()
		for iter.Next(ctx) {
			e, _ := strconv.Atoi(strings.TrimPrefix(iter.Val(), rkWrapped))
			if w, err := c.HGet(ctx, iter.Val(), n.name).Result(); err == nil {
				if k := unwrapKey([]byte(w), id); k != nil {
					rk.keys[-e] = k // negative: from Redis, not its disk
				}
			}
		}
		cancel()
		out = append(out, rk)
	}
	return out
}

// sampleDisks reads every node's archive (versions and keys) and
// account keys; each file once.
func (o *chaosObserver) sampleDisks() {
	o.r.mu.Lock()
	nodes := append([]*chaosNode(nil), o.r.nodes...)
	o.r.mu.Unlock()
	for _, n := range nodes {
		certs, _ := filepath.Glob(filepath.Join(n.dir, "archive", "*", "*", "cert.pem"))
		for _, p := range certs {
			if !o.fresh(p) {
				continue
			}
			data, err := os.ReadFile(p)
			v, verr := strconv.Atoi(filepath.Base(filepath.Dir(p)))
			if err != nil || verr != nil {
				continue
			}
			if serial, _ := serialOfPEM(data); serial != "" {
				o.record(filepath.Base(filepath.Dir(filepath.Dir(p))), v, serial, n.name+"'s archive")
			}
		}
		keys, _ := filepath.Glob(filepath.Join(n.dir, "archive", "*", "*", "privkey.pem"))
		accts, _ := filepath.Glob(filepath.Join(n.dir, "accounts", "*", "*", "account.key"))
		for _, p := range append(keys, accts...) {
			if o.fresh(p) {
				o.addKey(p, n.name)
			}
		}
	}
}

// fresh says whether path changed since it was last read.
func (o *chaosObserver) fresh(path string) bool {
	st, err := os.Stat(path)
	if err != nil {
		return false
	}
	k := fmt.Sprintf("%s|%d|%d", path, st.ModTime().UnixNano(), st.Size())
	o.mu.Lock()
	defer o.mu.Unlock()
	if o.files[k] {
		return false
	}
	o.files[k] = true
	return true
}

func (o *chaosObserver) addKey(path, node string) {
	data, err := os.ReadFile(path)
	if err != nil {
		return
	}
	b, _ := pem.Decode(data)
	if b == nil {
		return
	}
	scalar := privateScalar(b.Bytes)
	sum := sha256.Sum256(b.Bytes)
	o.mu.Lock()
	o.keys[hex.EncodeToString(sum[:])] = keyMaterial{der: b.Bytes, scalar: scalar, where: node + ":" + path}
	o.mu.Unlock()
}

// privateScalar is the secret part of a DER private key: an ECDSA key's
// D, an RSA key's D, an Ed25519 key's seed.
func privateScalar(der []byte) []byte {
	k, err := parsePrivateKey(der)
	if err != nil {
		return nil
	}
	switch k := k.(type) {
	case *ecdsa.PrivateKey:
		b, _ := k.Bytes()
		return b
	case *rsa.PrivateKey:
		return k.D.Bytes()
	case ed25519.PrivateKey:
		return k.Seed()
	}
	return nil
}

// watchTokens tries every new HTTP-01 token in Redis on the agents of
// removed nodes that still run: none may answer it.
func (o *chaosObserver) watchTokens(c goredis.UniversalClient) {
	type gone struct {
		name string
		port int
		at   time.Time
	}
	o.r.mu.Lock()
	var removed []gone
	for _, n := range o.r.nodes {
		if !n.removedAt.IsZero() {
			removed = append(removed, gone{n.name, n.port, n.removedAt})
		}
	}
	o.r.mu.Unlock()
	if len(removed) == 0 {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	var created map[string]time.Time // token -> its order's creation
	iter := c.Scan(ctx, 0, rkToken+"*", 1000).Iterator()
	for iter.Next(ctx) {
		k := iter.Val()
		o.mu.Lock()
		seen := o.tokens[k]
		o.mu.Unlock()
		host, token, ok := strings.Cut(strings.TrimPrefix(k, rkToken), ":")
		if seen || !ok {
			continue
		}
		if created == nil {
			created = map[string]time.Time{}
			for _, fo := range o.r.front.Orders() {
				for _, t := range fo.Tokens {
					created[t] = fo.Created
				}
			}
		}
		at, known := created[token]
		keyAuth, err := c.Get(ctx, k).Result()
		if !known || err != nil {
			continue // tried again at the next tick
		}
		o.mu.Lock()
		o.tokens[k] = true
		o.mu.Unlock()
		for _, n := range removed {
			// Only a token of an order placed after the removal is new.
			if at.After(n.at) && answered(n.port, host, token, keyAuth) {
				o.r.violate("I5", "%s's agent, removed %s before the order, answered its token for %s", n.name, at.Sub(n.at).Round(time.Millisecond), host)
			}
		}
	}
}

func answered(port int, host, token, keyAuth string) bool {
	req, _ := http.NewRequest(http.MethodGet, fmt.Sprintf("http://127.0.0.1:%d/.well-known/acme-challenge/%s", port, token), nil)
	req.Host = host
	resp, err := (&http.Client{Timeout: time.Second}).Do(req)
	if err != nil {
		return false
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
	return resp.StatusCode == http.StatusOK && bytes.Contains(body, []byte(keyAuth))
}

// parsePrivateKey reads a DER private key in any form lbcert writes.
func parsePrivateKey(der []byte) (any, error) {
	if k, err := x509.ParsePKCS8PrivateKey(der); err == nil {
		return k, nil
	}
	if k, err := x509.ParseECPrivateKey(der); err == nil {
		return k, nil
	}
	return x509.ParsePKCS1PrivateKey(der)
}
