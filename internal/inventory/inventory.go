// Package inventory describes what a host holds, one lineage at a time,
// as list and show present it: its names and expiry, when renew will
// renew it and by which rule, its saved settings (challenge, deploy,
// mail), what this node still owes of it, its failures; and the names
// whose first order failed, which have no lineage yet but must not
// vanish from sight.
//
// It only reads: the catalog's head and status, this node's journal and
// live pointer. It never asks the CA and never reads a secret.
package inventory

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"github.com/lbcert/lbcert/internal/ca"
	"github.com/lbcert/lbcert/internal/catalog"
	"github.com/lbcert/lbcert/internal/engine"
	"github.com/lbcert/lbcert/internal/renewal"
	"github.com/lbcert/lbcert/internal/store"
)

// Entry is one lineage as list and show present it; --json prints it.
type Entry struct {
	Name        string      `json:"name"`
	Domains     []string    `json:"domains"`
	Serial      string      `json:"serial"`
	NotBefore   time.Time   `json:"not_before"`
	NotAfter    time.Time   `json:"not_after"`
	DaysLeft    int         `json:"days_left"`
	RenewAt     time.Time   `json:"renew_at"`
	RenewReason string      `json:"renew_reason"`
	Challenge   string      `json:"challenge"`
	Webroot     string      `json:"webroot,omitempty"`
	HTTPAddr    string      `json:"http_addr,omitempty"`
	Deploy      string      `json:"deploy"`
	VerifyAddr  string      `json:"verify_addr,omitempty"`
	KeyType     string      `json:"key_type"`
	Profile     string      `json:"profile,omitempty"`
	Server      string      `json:"server"`
	Email       string      `json:"email,omitempty"`
	Version     int         `json:"cert_version"`      // the archive version live/ points at
	Pending     string      `json:"pending,omitempty"` // "pending deploy: <reason>"
	Failures    int         `json:"failures,omitempty"`
	LastError   string      `json:"last_error,omitempty"`
	BackoffTill *time.Time  `json:"backoff_until,omitempty"`
	Cadence     string      `json:"cadence_warning,omitempty"` // renew runs too seldom for this certificate
	Mail        *store.Mail `json:"mail,omitempty"`            // the lineage's own report settings
	Paths       store.Paths `json:"paths"`
	// NeverIssued marks a name whose first order failed: no certificate,
	// only its failures and when it is tried again.
	NeverIssued bool `json:"never_issued,omitempty"`
	// Nodes is what each node of a fleet reports serving.
	Nodes []Serves `json:"nodes,omitempty"`
	// CA names the CA that issued the certificate, when fallbacks are
	// configured or a fallback issued it; Fallback says that one did.
	CA       string    `json:"ca,omitempty"`
	Fallback *Fallback `json:"fallback,omitempty"`
	// Rollout is a fleet's staged rollout of it on its way.
	Rollout string `json:"rollout,omitempty"`
	Error   string `json:"error,omitempty"` // the lineage could not be read
}

// Fallback is a certificate from a fallback CA.
type Fallback struct {
	Primary string `json:"primary"` // where renewals go first
	Reason  string `json:"reason"`  // why the CAs before it were passed over
}

// Serves is what one node serves of a lineage (list and show in a fleet).
type Serves struct {
	Node    string `json:"node"`
	Version int    `json:"version"`
	Serial  string `json:"serial,omitempty"`
	OK      bool   `json:"ok"`
	Error   string `json:"error,omitempty"`
	// Held is why the node serves an older version: a staged rollout.
	Held string `json:"held,omitempty"`
}

// List is list --json: the same schema rules as the run report (a
// "version", lowercase keys without spaces).
type List struct {
	Version  int     `json:"version"`
	Lineages []Entry `json:"lineages"`
}

// Source is where entries are read from.
type Source struct {
	Catalog catalog.Catalog
	Local   *store.Store // this node: journal, live pointer, paths
	Now     time.Time
	// Runs are renew's recorded runs here, for the cadence warning.
	Runs []time.Time
	// CAs are the configured fallbacks, which name the CAs; nil without.
	CAs *ca.Set
	// Notes are a fleet's staged rollouts on their way (engine.Node's);
	// nil on one host.
	Notes func(ctx context.Context, now time.Time) ([]engine.Note, error)

	notesOnce sync.Once
	rollouts  map[string]string // name -> what its rollout says
}

// ErrNoLineage is a name that has neither a lineage nor failures.
var ErrNoLineage = errors.New("no such lineage")

// Entry describes lineage name, or a name whose first order failed.
func (s *Source) Entry(ctx context.Context, name string) (*Entry, error) {
	l, err := s.Catalog.Head(ctx, name)
	if errors.Is(err, store.ErrNotFound) {
		return s.neverIssued(ctx, name)
	}
	if err != nil {
		return nil, err
	}
	status, _ := s.Catalog.Status(ctx, name)
	now := s.Now
	d := renewal.Decide(l.Cert, status, now, renewal.Options{ARIOffered: !now.Before(status.ARIUnsupported), Name: l.Name})
	e := &Entry{
		Name: l.Name, Domains: l.Domains, Serial: l.Cert.Serial, NotBefore: l.Cert.NotBefore, NotAfter: l.Cert.NotAfter,
		DaysLeft: int(l.Cert.NotAfter.Sub(now).Hours() / 24), RenewAt: d.At.UTC(), RenewReason: renewal.Rule(d, l.Cert, status, now),
		Challenge: l.Challenge.Mode, Webroot: l.Challenge.Webroot, HTTPAddr: l.Challenge.HTTPAddr,
		Deploy: l.Deploy.Target, VerifyAddr: l.Deploy.VerifyAddr, KeyType: l.KeyType, Profile: l.Profile,
		Server: l.Server, Email: l.Email, Version: l.Version, Paths: s.livePaths(name),
		Pending: s.pending(l), Mail: mailOf(l.Mail),
	}
	if e.Deploy == "" {
		e.Deploy = "none"
	}
	e.failures(status, now)
	e.issuedBy(l, s.CAs)
	e.rollout(s.rollout(ctx, name))
	// The schedule as renew has really run here, up to now: a cron that
	// stopped a week ago shows as a week's gap.
	if len(s.Runs) > 0 {
		e.Cadence = renewal.CadenceWarning(l.Cert, d.At, renewal.RunGap(s.Runs, now))
	}
	return e, nil
}

// livePaths are name's live files, or none (empty) while nothing of it
// is live on this host: a first certificate whose deploy failed and was
// taken out again, or one a fleet node has not installed yet.
func (s *Source) livePaths(name string) store.Paths {
	if _, err := s.Local.LiveVersion(name); err != nil {
		return store.Paths{}
	}
	return s.Local.LivePaths(name)
}

// issuedBy names the CA that issued l's certificate: the fallback that
// did and why, or, with fallbacks configured, the primary.
func (e *Entry) issuedBy(l *store.Lineage, cas *ca.Set) {
	switch {
	case l.Fallback.Primary != "":
		e.CA, e.Fallback = l.Fallback.CA, &Fallback{Primary: l.Fallback.Primary, Reason: l.Fallback.Reason}
	case cas != nil:
		e.CA = cas.Label(l.Server)
	}
}

// neverIssued is the entry of a name whose first order failed.
func (s *Source) neverIssued(ctx context.Context, name string) (*Entry, error) {
	status, err := s.Catalog.Status(ctx, name)
	if err != nil || status.Failures == 0 {
		return nil, fmt.Errorf("%w: %s", ErrNoLineage, name)
	}
	e := &Entry{Name: name, Domains: []string{}, NeverIssued: true, Deploy: "none"}
	e.failures(status, s.Now)
	return e, nil
}

func (e *Entry) failures(status store.Status, now time.Time) {
	e.Failures, e.LastError = status.Failures, status.LastError
	if renewal.InBackoff(status, now) {
		next := status.NextAttempt.UTC()
		e.BackoffTill = &next
	}
}

// pending says what this node still owes of the lineage: a deploy that
// failed (and why), or a version it does not serve yet.
func (s *Source) pending(l *store.Lineage) string {
	j, _ := s.Local.Journal(l.Name)
	live, _ := s.Local.LiveVersion(l.Name)
	switch {
	case j.Pending != nil && j.Pending.Error != "":
		return "pending deploy: " + j.Pending.Error
	case j.Pending != nil || live != l.Version:
		return fmt.Sprintf("pending deploy of version %d", l.Version)
	}
	return ""
}

// rollout is what the fleet's staged rollout of name says, read once
// for all names; a fleet that cannot say is a warning, not a failed
// list.
func (s *Source) rollout(ctx context.Context, name string) string {
	s.notesOnce.Do(func() {
		if s.Notes == nil {
			return
		}
		notes, err := s.Notes(ctx, s.Now)
		if err != nil {
			slog.Warn("could not read the fleet's staged rollouts", "err", err)
		}
		s.rollouts = map[string]string{}
		for _, n := range notes {
			s.rollouts[n.Name] = n.Text
		}
	})
	return s.rollouts[name]
}

// rollout notes a staged rollout on its way: a version this node does
// not serve because its wave waits is not a pending deploy, and the
// rollout says why.
func (e *Entry) rollout(text string) {
	e.Rollout = text
	if text != "" && e.Pending == fmt.Sprintf("pending deploy of version %d", e.Version) {
		e.Pending = ""
	}
}

// mailOf keeps a lineage's own mail settings, if it has any.
func mailOf(m store.Mail) *store.Mail {
	if m.Host == "" && m.From == "" && len(m.To) == 0 && m.Port == 0 {
		return nil
	}
	return &m
}
