// Command demo is "make demo": it starts a local Pebble CA and
// pebble-challtestsrv on loopback, issues a real certificate with
// "lbcert issue --standalone", shows where it is and when it expires, and
// stops what it started. The state directory is kept for a look around.
package main

import (
	"flag"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"

	"github.com/lbcert/lbcert/internal/testenv"
)

func main() {
	bin := flag.String("lbcert", "bin/lbcert", "lbcert binary to run")
	dir := flag.String("dir", ".demo", "where to keep the demo's state and logs")
	flag.Parse()
	if err := run(*bin, *dir); err != nil {
		fmt.Fprintln(os.Stderr, "demo:", err)
		os.Exit(1)
	}
}

func run(bin, dir string) error {
	bin, _ = filepath.Abs(bin)
	dir, _ = filepath.Abs(dir)
	os.RemoveAll(dir)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	fmt.Println("demo: starting Pebble (local ACME CA) and pebble-challtestsrv (DNS: every name is 127.0.0.1)")
	p, err := testenv.StartPebble(testenv.PebbleOptions{Dir: dir})
	if err != nil {
		return err
	}
	defer func() {
		p.Stop()
		fmt.Println("demo: stopped Pebble and pebble-challtestsrv")
	}()
	state := filepath.Join(dir, "state")
	args := []string{
		"issue", "-d", "demo.lbcert.test", "-d", "www.demo.lbcert.test",
		"--standalone", "--http-addr", fmt.Sprintf("127.0.0.1:%d", p.HTTPPort),
		"--server", p.DirectoryURL, "--ca-bundle", p.CABundle,
		"--dir", state, "--agree-tos",
	}
	fmt.Printf("demo: $ lbcert %s\n", strings.Join(args, " "))
	cmd := exec.Command(bin, args...)
	cmd.Stdout, cmd.Stderr = os.Stdout, os.Stderr
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("lbcert issue failed: %v (Pebble's log is %s)", err, filepath.Join(dir, "pebble.log"))
	}
	live := filepath.Join(state, "live", "demo.lbcert.test")
	fmt.Printf("demo: the certificate is in %s/ (cert.pem, chain.pem, fullchain.pem, privkey.pem)\n", live)
	out, err := exec.Command("openssl", "x509", "-in", filepath.Join(live, "cert.pem"), "-noout", "-subject", "-issuer", "-enddate", "-ext", "subjectAltName").CombinedOutput()
	if err == nil {
		fmt.Printf("demo: openssl says:\n%s", out)
	}
	return nil
}
