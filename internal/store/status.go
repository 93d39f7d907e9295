package store

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"time"

	"github.com/lbcert/lbcert/internal/names"
)

// Status is what renew learns between runs about a lineage: the ARI
// window and the moment picked in it, and the failure backoff. It lives
// in <dir>/renewal/<name>.json, apart from the versioned lineage, because
// it changes without a new certificate. Losing it loses nothing that
// matters: renew asks ARI again and starts the backoff afresh.
type Status struct {
	// ARI (RFC 9773) for the certificate with serial ARISerial.
	ARISerial      string    `json:"ari_serial,omitempty"`
	ARIWindowStart time.Time `json:"ari_window_start,omitzero"`
	ARIWindowEnd   time.Time `json:"ari_window_end,omitzero"`
	ARIRenewAt     time.Time `json:"ari_renew_at,omitzero"`    // random moment in the window, picked once
	ARINextCheck   time.Time `json:"ari_next_check,omitzero"`  // now + the CA's Retry-After
	ARIUnsupported time.Time `json:"ari_unsupported,omitzero"` // the CA had no ARI; ask again after this

	// Backoff after failed attempts: 1h, 2h, 4h, ... up to 24h.
	Failures    int       `json:"failures,omitempty"`
	LastError   string    `json:"last_error,omitempty"`
	LastAttempt time.Time `json:"last_attempt,omitzero"`
	NextAttempt time.Time `json:"next_attempt,omitzero"`

	// Pending is a version that was obtained and saved but is not known
	// to be deployed: written before live/ is switched to it, cleared
	// once the load balancer serves it. A run that finds one deploys it
	// instead of ordering again (a failed deploy must not burn the CA's
	// five-per-week limit on the same names).
	Pending *Pending `json:"pending,omitempty"`

	// WarnedAt is when a report last warned that this certificate is
	// heading for expiry unrenewed: at most one such warning a day.
	WarnedAt time.Time `json:"warned_at,omitzero"`
}

// Pending is a deploy still owed.
type Pending struct {
	Version  int       `json:"version"`
	Previous int       `json:"previous"` // live before it; 0 for a new lineage
	Since    time.Time `json:"since"`
	Error    string    `json:"error,omitempty"` // why the last deploy failed
	// By is who owes the deploy: "agent" when the fleet agent wrote it
	// (it finishes its own from disk when it restarts, Redis or not);
	// empty for a run, whose next run finishes it.
	By string `json:"by,omitempty"`
}

func (s *Store) statusPath(name string) string {
	return filepath.Join(s.Dir, "renewal", name+".json")
}

// ReadStatus returns the status of lineage name, or a zero Status when
// there is none yet. A corrupt file counts as none, for the reason above.
func (s *Store) ReadStatus(name string) (Status, error) {
	var st Status
	if err := names.Lineage(name); err != nil {
		return st, err
	}
	data, err := os.ReadFile(s.statusPath(name))
	if errors.Is(err, fs.ErrNotExist) {
		return st, nil
	}
	if err != nil {
		return st, err
	}
	if json.Unmarshal(data, &st) != nil {
		return Status{}, nil
	}
	return st, nil
}

// WriteStatus saves the status of lineage name atomically.
func (s *Store) WriteStatus(name string, st Status) error {
	if err := names.Lineage(name); err != nil {
		return err
	}
	dir := filepath.Join(s.Dir, "renewal")
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	data, err := json.MarshalIndent(st, "", "  ")
	if err != nil {
		return err
	}
	if err := WriteFile(s.statusPath(name), append(data, '\n'), 0o600); err != nil {
		return fmt.Errorf("status of %s: %w", name, err)
	}
	return nil
}

// RemoveStatus deletes the status of lineage name, if any.
func (s *Store) RemoveStatus(name string) error {
	err := os.Remove(s.statusPath(name))
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	return err
}
