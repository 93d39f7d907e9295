package acme

import (
	"errors"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
)

// A profile is checked against the directory's meta.profiles before any
// order; an address gets "shortlived" when the CA offers it and nobody
// chose; the directory is read once, and only when needed.
func TestPickProfile(t *testing.T) {
	var reads atomic.Int32
	dir := `{"newOrder":"x","meta":{"profiles":{"classic":"90 days","shortlived":"6 days","tlsserver":"45 days"}}}`
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		reads.Add(1)
		w.Write([]byte(dir))
	}))
	defer srv.Close()
	c := &Client{opts: Options{Server: srv.URL}, hc: srv.Client()}
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
	dir = `{"newOrder":"x"}`
	c = &Client{opts: Options{Server: srv.URL}, hc: srv.Client()}
	if got, err := c.pickProfile(Request{Domains: []string{"127.0.0.1"}}); got != "" || err != nil {
		t.Fatalf("no profiles, address: %q %v", got, err)
	}
	_, err := c.pickProfile(Request{Domains: []string{"a.example"}, Profile: "shortlived"})
	var nb interface{ NoBackoff() bool }
	if err == nil || !strings.Contains(err.Error(), "offers no profiles") || !errors.As(err, &nb) || !nb.NoBackoff() {
		t.Fatalf("no profiles, one asked: %v (a refused profile must start no backoff)", err)
	}
}
