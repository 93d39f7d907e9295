package notify

import (
	"flag"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

var update = flag.Bool("update", false, "rewrite golden files")

var t0 = time.Date(2026, 11, 22, 2, 17, 0, 0, time.UTC)

func sample() *Report {
	return &Report{
		Host: "web1", Command: "renew", Time: t0,
		Items: []Item{
			{Name: "shop.example.net", Domains: []string{"shop.example.net", "www.shop.example.net"}, Outcome: "renewed",
				Serial: "4c0b0e7d4347ab85", OldNotAfter: t0.Add(20 * 24 * time.Hour), NewNotAfter: t0.Add(90 * 24 * time.Hour),
				Deploy: "ok", Verify: "ok", MailTo: []string{"shop-owner@example.net"}},
			{Name: "broken.example.org", Domains: []string{"broken.example.org"}, Outcome: "failed",
				OldNotAfter: t0.Add(9 * 24 * time.Hour), Error: "obtain broken.example.org: connection: dial tcp 192.0.2.7:80: connect: connection refused",
				Hint: "the CA could not connect on port 80: check DNS points at this host and the firewall allows port 80"},
			{Name: "blog.example.com", Domains: []string{"blog.example.com"}, Outcome: "renewed", Serial: "0a1b",
				OldNotAfter: t0.Add(25 * 24 * time.Hour), NewNotAfter: t0.Add(90 * 24 * time.Hour), Deploy: "ok",
				MailTo: []string{"blog@example.com"}, Relay: Relay{Host: "relay.example.com", Port: 2525, From: "lb1@example.com"}},
		},
		Warnings: []Item{{Name: "waiting.example.org", Domains: []string{"waiting.example.org"}, Outcome: "expiring",
			OldNotAfter: t0.Add(12 * 24 * time.Hour), Error: "obtain waiting.example.org: unauthorized: 404", MailTo: []string{"shop-owner@example.net"}}},
	}
}

func TestSubject(t *testing.T) {
	r := sample()
	if got, want := r.Subject(), "FAILED web1: lbcert renewed 2, failed 1, 1 expiring soon"; got != want {
		t.Fatalf("Subject = %q, want %q", got, want)
	}
	ok := &Report{Host: "web1", Items: []Item{{Outcome: "renewed"}, {Outcome: "renewed"}, {Outcome: "renewed"}}}
	if got := ok.Subject(); got != "web1: lbcert renewed 3" {
		t.Fatalf("Subject = %q", got)
	}
}

func TestBodyGolden(t *testing.T) {
	got := sample().Body()
	p := filepath.Join("testdata", "report.txt")
	if *update {
		os.WriteFile(p, []byte(got), 0o644)
	}
	want, err := os.ReadFile(p)
	if err != nil {
		t.Fatalf("%v (go test -update)", err)
	}
	if got != string(want) {
		t.Fatalf("body differs from %s (go test -update to accept):\n%s", p, got)
	}
	if strings.Index(got, "FAILED broken.example.org") > strings.Index(got, "RENEWED shop.example.net") {
		t.Fatal("failures must come first")
	}
}

func TestGroup(t *testing.T) {
	envs := Group(sample(), []string{"ops@example.com", "ops@example.com"}, Relay{Host: "smtp.example.com", Port: 25, From: "lbcert@web1"})
	if len(envs) != 3 {
		t.Fatalf("want 3 envelopes (ops, shop-owner, blog), got %d", len(envs))
	}
	byTo := map[string]Envelope{}
	for _, e := range envs {
		byTo[e.To] = e
	}
	if ops := byTo["ops@example.com"]; len(ops.Report.Items) != 3 || len(ops.Report.Warnings) != 1 || ops.Relay.Host != "smtp.example.com" {
		t.Fatalf("global recipient must get everything: %+v", ops.Report)
	}
	shop := byTo["shop-owner@example.net"]
	if len(shop.Report.Items) != 1 || shop.Report.Items[0].Name != "shop.example.net" || len(shop.Report.Warnings) != 1 {
		t.Fatalf("shop owner gets only theirs: %+v", shop.Report)
	}
	blog := byTo["blog@example.com"]
	if len(blog.Report.Items) != 1 || blog.Relay != (Relay{Host: "relay.example.com", Port: 2525, From: "lb1@example.com"}) {
		t.Fatalf("blog goes through its own relay: %+v %+v", blog.Relay, blog.Report.Items)
	}
	if strings.Contains(shop.Report.Body(), "broken.example.org") {
		t.Fatal("a lineage's recipient saw another lineage")
	}
	// A global recipient who is also a lineage recipient gets one mail.
	if n := len(Group(sample(), []string{"shop-owner@example.net"}, Relay{})); n != 2 {
		t.Fatalf("duplicate recipient: %d envelopes", n)
	}
}
