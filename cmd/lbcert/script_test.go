package main

import (
	"net"
	"os"
	"strconv"
	"syscall"
	"testing"
	"time"

	"github.com/rogpeppe/go-internal/testscript"

	"github.com/lbcert/lbcert/internal/store"
	"github.com/lbcert/lbcert/internal/testenv"
)

func TestMain(m *testing.M) {
	testscript.Main(m, map[string]func(){
		"lbcert": func() { os.Exit(Main()) },
	})
}

// TestScript runs testdata/script/*.txtar: the command line as a user
// types it, with no network beyond a closed loopback port. The ACME
// server in these scripts is https://127.0.0.1:9/dir, where nothing
// listens, so any case that wrongly got as far as the CA fails with a
// connection error instead of the expected one-line refusal.
func TestScript(t *testing.T) {
	testscript.Run(t, testscript.Params{
		Dir: "testdata/script",
		Setup: func(env *testscript.Env) error {
			env.Setenv("LBCERT_DIR", env.WorkDir+"/state")
			env.Setenv("LBCERT_SERVER", "https://127.0.0.1:9/dir")
			env.Setenv("HOME", env.WorkDir)
			return nil
		},
		Cmds: map[string]func(ts *testscript.TestScript, neg bool, args []string){
			// holdlock DIR: take lbcert's lock on DIR in the test process
			// until the script ends, as a concurrent run would.
			"holdlock": func(ts *testscript.TestScript, neg bool, args []string) {
				l, err := store.New(ts.MkAbs(args[0])).TryLock()
				ts.Check(err)
				ts.Defer(l.Unlock)
			},
			// mklineage DIR NAME...: write lineages as issue would, with
			// placeholder certificates, for commands that only read them.
			"mklineage": func(ts *testscript.TestScript, neg bool, args []string) {
				st := store.New(ts.MkAbs(args[0]))
				for _, n := range args[1:] {
					now := time.Now()
					_, _, err := st.Save(&store.Lineage{Name: n, Domains: []string{n}, KeyType: "ec256",
						Challenge: store.Challenge{Mode: "webroot", Webroot: "/var/www"},
						Cert:      store.CertInfo{Serial: "01", NotBefore: now, NotAfter: now.Add(90 * 24 * time.Hour)},
					}, store.Files{Cert: []byte("c"), Chain: []byte("c"), Fullchain: []byte("cc"), Key: []byte("k")})
					ts.Check(err)
				}
			},
			// smtpnotls VAR: start a relay that offers no STARTTLS and
			// put its port in $VAR.
			"smtpnotls": func(ts *testscript.TestScript, neg bool, args []string) {
				relay, err := testenv.StartSMTPWithoutTLS(ts.MkAbs("."))
				ts.Check(err)
				ts.Defer(relay.Stop)
				ts.Setenv(args[0], strconv.Itoa(relay.Port))
			},
			// busyport VAR: listen on a loopback port and put its address
			// in $VAR, to test "address already in use".
			"busyport": func(ts *testscript.TestScript, neg bool, args []string) {
				ln, err := net.Listen("tcp", "127.0.0.1:0")
				ts.Check(err)
				ts.Defer(func() { ln.Close() })
				ts.Setenv(args[0], ln.Addr().String())
			},
			// mkfifo PATH: make a FIFO no one writes to, as an operator
			// might name in a flag that wants a file.
			"mkfifo": func(ts *testscript.TestScript, neg bool, args []string) {
				ts.Check(syscall.Mkfifo(ts.MkAbs(args[0]), 0o600))
			},
			// freeport VAR: put a loopback address with a port free now
			// in $VAR (port 0 is refused as --http-addr).
			"freeport": func(ts *testscript.TestScript, neg bool, args []string) {
				ln, err := net.Listen("tcp", "127.0.0.1:0")
				ts.Check(err)
				ts.Setenv(args[0], ln.Addr().String())
				ln.Close()
			},
		},
	})
}
