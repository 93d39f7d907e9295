package acme

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"errors"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/go-acme/lego/v4/acme/api"
)

// A profile is checked against the directory's meta.profiles before any
// order; an address gets "shortlived" when the CA offers it and nobody
// chose; the directory is read once, when the client is made.
func TestPickProfile(t *testing.T) {
	var reads atomic.Int32
	dir := `{"newAccount":"x","newOrder":"x","meta":{"profiles":{"classic":"90 days","shortlived":"6 days","tlsserver":"45 days"}}}`
	srv := httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		reads.Add(1)
		w.Write([]byte(dir))
	}))
	defer srv.Close()
	client := func() *Client {
		key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		core, err := api.New(srv.Client(), "", srv.URL, "", key)
		if err != nil {
			t.Fatal(err)
		}
		return &Client{opts: Options{Server: srv.URL}, core: core}
	}
	c := client()
	for _, tc := range []struct {
		domains       []string
		profile, want string
		err           string
	}{
		{[]string{"example.com"}, "", "", ""},
		{[]string{"127.0.0.1"}, "", "shortlived", ""},
		{[]string{"lb.example.com", "2001:db8::1"}, "", "shortlived", ""},
		{[]string{"127.0.0.1"}, "classic", "classic", ""},
		{[]string{"example.com"}, "tlsserver", "tlsserver", ""},
		{[]string{"example.com"}, "tlsservr", "", `--profile "tlsservr": ` + srv.URL + ` offers classic, shortlived, tlsserver; nothing was ordered`},
	} {
		got, err := c.pickProfile(Request{Domains: tc.domains, Profile: tc.profile})
		if got != tc.want || (err == nil) != (tc.err == "") || (err != nil && err.Error() != tc.err) {
			t.Errorf("%v %q: got %q, %v; want %q, %q", tc.domains, tc.profile, got, err, tc.want, tc.err)
		}
	}
	if reads.Load() != 1 {
		t.Fatalf("directory read %d times, want once", reads.Load())
	}
	// A CA without profiles: an address gets none, a profile is refused.
	dir = `{"newAccount":"x","newOrder":"x"}`
	c = client()
	if got, err := c.pickProfile(Request{Domains: []string{"127.0.0.1"}}); got != "" || err != nil {
		t.Fatalf("no profiles, address: %q %v", got, err)
	}
	_, err := c.pickProfile(Request{Domains: []string{"a.example"}, Profile: "shortlived"})
	var nb interface{ NoBackoff() bool }
	if err == nil || !strings.Contains(err.Error(), "offers no profiles") || !errors.As(err, &nb) || !nb.NoBackoff() {
		t.Fatalf("no profiles, one asked: %v (a refused profile must start no backoff)", err)
	}
}
