// Package catalogtest is the contract test of package catalog: one suite
// that every Catalog implementation passes (the state directory's Dir
// and the fleet's Redis catalog), so that the words of the contract are
// checked against each.
package catalogtest

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"testing"
	"time"

	"github.com/lbcert/lbcert/internal/catalog"
	"github.com/lbcert/lbcert/internal/store"
)

// Run checks the contract against the catalogs open makes, one fresh
// (empty) catalog per call.
func Run(t *testing.T, open func(t *testing.T) catalog.Catalog) {
	t.Run("versions", func(t *testing.T) { versions(t, open(t)) })
	t.Run("leases", func(t *testing.T) { leases(t, open(t)) })
	t.Run("delete", func(t *testing.T) { deletes(t, open(t)) })
	t.Run("status and settings", func(t *testing.T) { statusAndMeta(t, open(t)) })
}

var ctx = context.Background()

// Cert makes a certificate for name, issued at issued, as a CA would.
func Cert(t *testing.T, name string, issued time.Time) (*store.Lineage, store.Files) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	serial, _ := rand.Int(rand.Reader, big.NewInt(1<<62))
	tmpl := &x509.Certificate{SerialNumber: serial, Subject: pkix.Name{CommonName: name}, DNSNames: []string{name},
		NotBefore: issued, NotAfter: issued.Add(90 * 24 * time.Hour)}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	kder, _ := x509.MarshalECPrivateKey(key)
	cert := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
	l := &store.Lineage{Name: name, Domains: []string{name}, Server: "https://ca.test/dir", KeyType: "ec256",
		Cert: store.CertInfo{Serial: fmt.Sprintf("%x", serial), NotBefore: issued, NotAfter: tmpl.NotAfter}, IssuedAt: issued}
	return l, store.Files{Cert: cert, Chain: cert, Fullchain: append(append([]byte{}, cert...), cert...),
		Key: pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kder})}
}

func publish(t *testing.T, c catalog.Catalog, name string, issued time.Time) (int, *store.Lineage, store.Files) {
	t.Helper()
	lease, err := c.Acquire(ctx, name, time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	defer lease.Release()
	l, f := Cert(t, name, issued)
	v, err := c.Publish(ctx, lease, l, f)
	if err != nil {
		t.Fatalf("publish %s: %v", name, err)
	}
	return v, l, f
}

// Versions are numbered by the catalog from 1 and grow; Head is the
// newest; Fetch gives the files back; an old version is either still
// held (the same certificate) or ErrSuperseded, never another one.
func versions(t *testing.T, c catalog.Catalog) {
	if _, err := c.Head(ctx, "a.test"); !errors.Is(err, catalog.ErrNotFound) {
		t.Fatalf("head of nothing: %v", err)
	}
	now := time.Now().UTC().Truncate(time.Second)
	v1, l1, _ := publish(t, c, "a.test", now.Add(-time.Hour))
	v2, l2, f2 := publish(t, c, "a.test", now)
	if v1 < 1 || v2 <= v1 {
		t.Fatalf("versions %d then %d", v1, v2)
	}
	h, err := c.Head(ctx, "a.test")
	if err != nil || h.Version != v2 || h.Cert.Serial != l2.Cert.Serial {
		t.Fatalf("head %+v, %v; want version %d serial %s", h, err, v2, l2.Cert.Serial)
	}
	for _, v := range []int{0, v2} {
		fl, ff, err := c.Fetch(ctx, "a.test", v)
		if err != nil || fl.Version != v2 || string(ff.Key) != string(f2.Key) || string(ff.Fullchain) != string(f2.Fullchain) {
			t.Fatalf("fetch %d: version %v, %v", v, fl, err)
		}
	}
	if fl, _, err := c.Fetch(ctx, "a.test", v1); err == nil && fl.Cert.Serial != l1.Cert.Serial || err != nil && !errors.Is(err, catalog.ErrSuperseded) {
		t.Fatalf("fetch of the old version: %+v, %v", fl, err)
	}
	names, err := c.Names(ctx)
	if err != nil || len(names) != 1 || names[0] != "a.test" {
		t.Fatalf("names %v, %v", names, err)
	}
}

// At most one lease per name; a released name can be taken again, with
// a larger token.
func leases(t *testing.T, c catalog.Catalog) {
	l1, err := c.Acquire(ctx, "l.test", time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.Acquire(ctx, "l.test", time.Minute); !errors.Is(err, catalog.ErrLeaseHeld) {
		t.Fatalf("second lease: %v, want ErrLeaseHeld", err)
	}
	other, err := c.Acquire(ctx, "other.test", time.Minute)
	if err != nil {
		t.Fatalf("a lease on another name: %v", err)
	}
	other.Release()
	l1.Release()
	l2, err := c.Acquire(ctx, "l.test", time.Minute)
	if err != nil || l2.Token() <= l1.Token() {
		t.Fatalf("after release: %v, token %d after %d", err, l2.Token(), l1.Token())
	}
	l2.Release()
}

// A delete removes the name for every reader; a holder of a lease taken
// before it publishes nothing; a new lease after it issues the name again.
func deletes(t *testing.T, c catalog.Catalog) {
	now := time.Now().UTC().Truncate(time.Second)
	publish(t, c, "d.test", now.Add(-time.Hour))
	held, err := c.Acquire(ctx, "d.test", time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	time.Sleep(10 * time.Millisecond)
	if err := c.Delete(ctx, "d.test"); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Head(ctx, "d.test"); !errors.Is(err, catalog.ErrNotFound) {
		t.Fatalf("head after delete: %v", err)
	}
	if names, _ := c.Names(ctx); len(names) != 0 {
		t.Fatalf("names after delete: %v", names)
	}
	l, f := Cert(t, "d.test", now)
	var stale *catalog.ErrStale
	if _, err := c.Publish(ctx, held, l, f); !errors.As(err, &stale) {
		t.Fatalf("publish under a lease from before the delete: %v, want *ErrStale", err)
	}
	held.Release()
	time.Sleep(10 * time.Millisecond)
	l.IssuedAt = time.Now().UTC()
	v, _, _ := publish(t, c, "d.test", time.Now().UTC())
	if h, err := c.Head(ctx, "d.test"); err != nil || h.Version != v {
		t.Fatalf("issued again: head %+v, %v", h, err)
	}
}

// Status round-trips; SetMeta changes settings and keeps the certificate.
func statusAndMeta(t *testing.T, c catalog.Catalog) {
	v, l, _ := publish(t, c, "s.test", time.Now().UTC().Truncate(time.Second))
	st := store.Status{Failures: 2, LastError: "boom"}
	if err := c.SetStatus(ctx, "s.test", st); err != nil {
		t.Fatal(err)
	}
	if got, _ := c.Status(ctx, "s.test"); got.Failures != 2 || got.LastError != "boom" {
		t.Fatalf("status %+v", got)
	}
	h, _ := c.Head(ctx, "s.test")
	h.Mail.To = []string{"ops@example.com"}
	if err := c.SetMeta(ctx, h); err != nil {
		t.Fatal(err)
	}
	h2, err := c.Head(ctx, "s.test")
	if err != nil || h2.Version != v || h2.Cert.Serial != l.Cert.Serial || len(h2.Mail.To) != 1 {
		t.Fatalf("after SetMeta: %+v, %v", h2, err)
	}
}
