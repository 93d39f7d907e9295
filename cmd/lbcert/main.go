// Command lbcert obtains and renews ACME certificates for hosts that
// terminate TLS on nginx or HAProxy. See README.md.
package main

import "os"

func main() {
	os.Exit(Main())
}
