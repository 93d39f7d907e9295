package engine

import (
	"fmt"
	"strings"
	"time"
)

// The words commands print for a run's items.

// words is how the summary names an outcome.
var words = map[Outcome]string{
	Issued: "issued", Renewed: "renewed", Deployed: "deployed", NotDue: "up to date",
	Reconfigured: "reconfigured",
	Deferred:     "deferred", Failed: "failed", Invalid: "invalid",
	NotStarted: "not started", Aborted: "interrupted",
}

// Words is how a summary names an outcome.
func (o Outcome) Words() string { return words[o] }

// DeployWords says what the deploy step did: "none", "deployed,
// verified, hook ok" or "rolled back: <reason>".
func (it *Item) DeployWords() string {
	switch it.Deploy {
	case "none":
		return "none (no --deploy target)"
	case "rolled_back":
		return "rolled back: " + it.Pending
	case "":
		if it.Outcome != Failed {
			return "none (dry run: nothing saved or deployed)" // the only run that obtains and deploys nothing
		}
	}
	if it.Outcome == Failed {
		return "failed: " + it.Error
	}
	parts := []string{"deployed"}
	if it.Verify == "ok" {
		parts = append(parts, "verified")
	}
	if it.Hook == "ok" {
		parts = append(parts, "hook ok")
	}
	return strings.Join(parts, ", ")
}

// NextAttemptWords is "; next attempt TIME", or "" when there is none.
func (it *Item) NextAttemptWords() string {
	if it.NextAttempt == nil {
		return ""
	}
	return "; next attempt " + it.NextAttempt.Format(time.RFC3339)
}

// Detail is a batch row's DETAIL column.
func (it *Item) Detail() string {
	switch it.Outcome {
	case Issued, Renewed, Deployed, Reconfigured:
		d := fmt.Sprintf("serial %s, expires %s", it.Serial, it.NotAfter.Format(time.DateOnly))
		if it.Deploy != "" && it.Deploy != "none" {
			d += ", deploy " + it.Deploy
		}
		if it.Verify != "" {
			d += ", verify " + it.Verify
		}
		return d
	}
	return it.Error + it.NextAttemptWords()
}
