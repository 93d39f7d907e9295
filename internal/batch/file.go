package batch

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"sort"

	"github.com/lbcert/lbcert/internal/argfile"
	"github.com/lbcert/lbcert/internal/store"
)

// ReadFile opens and parses file; "-" is stdin. An error is about the
// file itself (missing, a directory); bad rows are Problems.
func ReadFile(file string, stdin io.Reader, d Defaults) (*Result, error) {
	if file == "-" {
		return Parse(stdin, d), nil
	}
	f, err := argfile.Open(file)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return nil, fmt.Errorf("%s: no such file", file)
	case errors.Is(err, argfile.ErrDirectory):
		return nil, fmt.Errorf("%s: is a directory, want a CSV file", file)
	case err != nil:
		return nil, fmt.Errorf("%s: %w", file, err)
	}
	defer f.Close()
	return Parse(f, d), nil
}

// Keep checks every good row once more with the command's own rule (the
// challenge and deploy target its mode allows), turns each row that
// check refuses, with the reason it gives, into a Problem, and leaves
// the problems in line order.
func (r *Result) Keep(check func(*Row) string) {
	kept := r.Rows[:0]
	for _, row := range r.Rows {
		if why := check(row); why != "" {
			r.Problems = append(r.Problems, Problem{Line: row.Line, Msg: why})
			continue
		}
		kept = append(kept, row)
	}
	r.Rows = kept
	sort.SliceStable(r.Problems, func(i, j int) bool { return r.Problems[i].Line < r.Problems[j].Line })
}

// Mail is what a row's lineage saves for its reports: the row's own
// sender, recipients and relay, over base (the command line's).
func (row *Row) Mail(base store.Mail) store.Mail {
	m := base
	if len(row.MailTo) > 0 {
		m.To = row.MailTo
	}
	if row.MailFrom != "" {
		m.From = row.MailFrom
	}
	if row.SMTPHost != "" {
		m.Host = row.SMTPHost
	}
	if row.SMTPPort != 0 {
		m.Port = row.SMTPPort
	}
	if row.SMTPHost != "" || row.SMTPPort != 0 {
		// A row's own relay is another server: the command line's login
		// (and so its password) is not for it.
		m.User = ""
	}
	return m
}
