package testenv

import (
	"bytes"
	"os/exec"
	"strings"
	"testing"
)

// funcBody is the text of the Go function that starts with header.
func funcBody(src []byte, header string) string {
	i := bytes.Index(src, []byte(header))
	if i < 0 {
		return ""
	}
	rest := src[i+len(header):]
	if j := bytes.Index(rest, []byte("\nfunc ")); j >= 0 {
		rest = rest[:j]
	}
	return string(rest)
}

// The tests' Pebble is built from source with its lock cycles cut: the
// order handler no longer holds the order's read lock while it displays
// the order (which read-locks it again), and neither GetOrderByID nor
// FindValidAuthorization locks an order or authorization while holding
// the store's lock; an ARI CertID finds its certificate whatever its
// serial. The binary builds and runs.
func TestPebbleLockFixes(t *testing.T) {
	_, modDir, version, err := pebbleModule()
	if err != nil {
		t.Fatal(err)
	}
	files, _, err := fixedPebbleSource(modDir, version)
	if err != nil {
		t.Fatal(err)
	}
	order := funcBody(files["wfe/wfe.go"], "func (wfe *WebFrontEndImpl) Order(")
	lock, unlock, display := strings.Index(order, "order.RLock()"), strings.Index(order, "order.RUnlock()"), strings.Index(order, "orderForDisplay(")
	if lock < 0 || unlock < lock || display < unlock || strings.Contains(order, "defer order.RUnlock()") || strings.Contains(order, "order.Status ==") {
		t.Fatalf("the order handler still holds the order's lock while displaying it:\n%s", order)
	}
	get := funcBody(files["db/memorystore.go"], "func (m *MemoryStore) GetOrderByID(")
	if strings.Contains(get, "defer m.RUnlock()") || strings.Index(get, "m.RUnlock()") > strings.Index(get, "order.Lock()") {
		t.Fatalf("GetOrderByID still locks the order under the store's lock:\n%s", get)
	}
	if mk := funcBody(files["wfe/wfe.go"], "func (wfe *WebFrontEndImpl) makeAuthorizations("); !strings.Contains(mk, ">= wfe.authzReusePercent") {
		t.Fatalf("PEBBLE_AUTHZREUSE=0 still reuses authorizations once in a hundred:\n%s", mk)
	}
	find := funcBody(files["db/memorystore.go"], "func (m *MemoryStore) FindValidAuthorization(")
	if strings.Contains(find, "defer m.RUnlock()") || strings.Index(find, "m.RUnlock()") > strings.Index(find, "authz.RLock()") {
		t.Fatalf("FindValidAuthorization still locks authorizations under the store's lock:\n%s", find)
	}
	// A serial with its top bit set: DER puts a zero byte before it, the
	// number's hex (under which Pebble files the certificate) does not.
	if id := funcBody(files["core/types.go"], "func NewCertID("); !strings.Contains(id, "hex.EncodeToString(new(big.Int).SetBytes(serial).Bytes())") {
		t.Fatalf("Pebble still looks an ARI CertID up by its DER bytes, not its serial number:\n%s", id)
	}

	bin, err := PebbleBinary()
	if err != nil {
		t.Fatal(err)
	}
	v, err := exec.Command(bin, "-version").CombinedOutput()
	if err != nil || !strings.Contains(strings.ToLower(string(v)), "pebble") {
		t.Fatalf("%s -version: %v: %s", bin, err, v)
	}
}
