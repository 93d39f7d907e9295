package store

import (
	"encoding/json"
	"os"
	"path/filepath"
	"time"
)

// RunsFile records when renew ran, so that lbcert can tell whether the
// schedule it runs on fits the certificates it holds (a weekly cron over
// 6-day certificates). It is node-local: it says how this host's cron
// runs.
const RunsFile = "runs.json"

// keepRuns is how many renew runs are remembered: a week of a 6-hourly
// schedule is 28; eight is enough to see the gaps without a history.
const keepRuns = 8

type runsFile struct {
	Renew []time.Time `json:"renew"`
	// CadenceWarned is when renew last warned that the schedule is too
	// slow for a certificate: once a day is enough.
	CadenceWarned time.Time `json:"cadence_warned,omitzero"`
}

func (s *Store) readRuns() runsFile {
	data, err := os.ReadFile(filepath.Join(s.Dir, RunsFile))
	if err != nil {
		return runsFile{}
	}
	var rf runsFile
	if json.Unmarshal(data, &rf) != nil {
		return runsFile{}
	}
	return rf
}

func (s *Store) writeRuns(rf runsFile) error {
	data, err := json.MarshalIndent(rf, "", "  ")
	if err != nil {
		return err
	}
	return WriteFile(filepath.Join(s.Dir, RunsFile), append(data, '\n'), 0o600)
}

// CadenceWarnedAt is when the schedule warning was last given.
func (s *Store) CadenceWarnedAt() time.Time { return s.readRuns().CadenceWarned }

// MarkCadenceWarned records that the schedule warning was given at at.
func (s *Store) MarkCadenceWarned(at time.Time) error {
	rf := s.readRuns()
	rf.CadenceWarned = at.UTC()
	return s.writeRuns(rf)
}

// RecordRun adds a renew run started at at, keeping the last few.
// The caller holds the state directory's lock.
func (s *Store) RecordRun(at time.Time) error {
	rf := s.readRuns()
	rf.Renew = append(rf.Renew, at.UTC().Truncate(time.Second))
	if len(rf.Renew) > keepRuns {
		rf.Renew = rf.Renew[len(rf.Renew)-keepRuns:]
	}
	return s.writeRuns(rf)
}

// Runs returns the recorded renew runs, oldest first; none when the
// file is missing or unreadable (a fresh host knows no schedule yet).
func (s *Store) Runs() []time.Time { return s.readRuns().Renew }
