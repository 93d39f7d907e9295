// Command lbcert obtains and renews ACME certificates for hosts that
// terminate TLS on nginx or HAProxy. See README.md.
package main

import "os"

// atExit runs before the process exits: a build with -tags profile
// stops its CPU profile there (profile.go).
var atExit = func() {}

func main() {
	code := Main()
	atExit()
	os.Exit(code)
}
