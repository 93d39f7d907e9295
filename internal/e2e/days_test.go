package e2e

import (
	"fmt"
	"testing"

	"github.com/lbcert/lbcert/internal/testenv"
)

// TestDaysInEveryCommand: --days is the same override of the due rule in
// issue and batch as in renew. Without it a 90-day certificate is not
// due and is left alone; with --days 100 it is renewed, by each command.
func TestDaysInEveryCommand(t *testing.T) {
	t.Parallel()
	e := newEnv(t, testenv.PebbleOptions{})
	http := fmt.Sprintf("127.0.0.1:%d", e.pebble.HTTPPort)
	issue := []string{"issue", "-d", "days.example.com", "--standalone", "--http-addr", http, "--agree-tos"}
	e.mustRun(issue...)
	first := e.serial("days.example.com")

	orders := e.pebble.Orders()
	e.mustRun(issue...)
	if e.serial("days.example.com") != first || e.pebble.Orders() != orders {
		t.Fatal("issue renewed a certificate that is not due")
	}
	e.mustRun(append(issue, "--days", "100")...)
	second := e.serial("days.example.com")
	if second == first {
		t.Fatal("issue --days 100 did not renew a 90-day certificate")
	}

	csv := writeCSV(t, e.work, "days.csv", seedRows(e, "days.example.com"))
	orders = e.pebble.Orders()
	e.mustRun(e.batchArgs(csv)...)
	if e.serial("days.example.com") != second || e.pebble.Orders() != orders {
		t.Fatal("batch renewed a certificate that is not due")
	}
	e.mustRun(e.batchArgs(csv, "--days", "100")...)
	if e.serial("days.example.com") == second {
		t.Fatal("batch --days 100 did not renew a 90-day certificate")
	}
}
