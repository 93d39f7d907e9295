package engine

import (
	"fmt"
	"io"
	"maps"
	"slices"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/lbcert/lbcert/internal/renewal"
	"github.com/lbcert/lbcert/internal/store"
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

// notInstalled is an item's Deploy when its certificate was obtained
// and saved in the catalog, but this node's install of it failed (its
// write lock not had in time, its disk): obtained all the same.
const notInstalled = "not_installed"

// NotInstalled reports whether the item's certificate was obtained and
// saved but not installed on this node.
func (it *Item) NotInstalled() bool { return it.Deploy == notInstalled }

// NotInstalled counts the items obtained but not installed on this node:
// counted as obtained, yet not in place here (the run is partial).
func (res *Result) NotInstalled() int {
	n := 0
	for _, it := range res.Items {
		if it.NotInstalled() {
			n++
		}
	}
	return n
}

// notInstalledWords is what a summary adds for them.
func (res *Result) notInstalledWords() string {
	if n := res.NotInstalled(); n > 0 {
		return fmt.Sprintf(" (%d not installed on this node)", n)
	}
	return ""
}

// DeployWords says what the deploy step did: "none", "deployed,
// verified, hook ok", "rolled back: <reason>" or "held on this node:
// <why>" (a staged rollout).
func (it *Item) DeployWords() string {
	switch it.Deploy {
	case "none":
		return "none (no --deploy target)"
	case "rolled_back":
		why := it.Pending // a deploy still owed
		if why == "" {    // a settings change whose deploy was undone
			why = strings.TrimPrefix(it.Error, "deploy: ")
		}
		return "rolled back: " + why
	case "held":
		return "held on this node: " + it.Held
	case notInstalled:
		return "not installed on this node: " + it.Error + " (the certificate is saved where every run and the fleet's agent find it: the next one installs it)"
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
		return d + it.fromFallback()
	}
	return it.Error + it.NextAttemptWords()
}

// BatchTable writes batch's summary: a table of every row that needs
// attention or changed, then the counts. Rows already up to date are
// only counted: on a re-run of a 5,000-row file they are the noise.
func (res *Result) BatchTable(w io.Writer) {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "LINE\tNAME\tRESULT\tDETAIL")
	shown := 0
	for _, it := range res.Items {
		if it.Outcome == NotDue {
			continue
		}
		shown++
		name := it.Name
		if name == "" {
			name = "-"
		}
		fmt.Fprintf(tw, "%d\t%s\t%s\t%s\n", it.Line, name, it.Outcome.Words(), it.Detail())
	}
	if shown > 0 {
		tw.Flush()
	}
	var parts []string
	for _, s := range Outcomes {
		if n := res.Counts[s]; n > 0 {
			parts = append(parts, fmt.Sprintf("%d %s", n, s.Words()))
		}
	}
	rows := "rows"
	if len(res.Items) == 1 {
		rows = "row"
	}
	fmt.Fprintf(w, "lbcert batch %s: %d %s: %s%s\n", res.File, len(res.Items), rows, strings.Join(parts, ", "), res.notInstalledWords())
}

// RenewSummary writes renew's summary: nothing when nothing happened
// (silence, for cron), else the counts and a line per lineage renewed,
// deployed, failed, deferred or not started.
func (res *Result) RenewSummary(w io.Writer) {
	c := res.Counts
	changed := c[Renewed] + c[Issued] + c[Deployed]
	if changed+c[Failed]+c[Deferred]+c[Aborted]+c[NotStarted] == 0 {
		return // nothing due: silence, for cron
	}
	// A certificate obtained earlier and only deployed now is not a
	// renewal, nor is a name's first certificate (a retried first order).
	counts := fmt.Sprintf("%d renewed", c[Renewed])
	if res.DryRun {
		counts = fmt.Sprintf("%d would renew (dry run)", c[Renewed]+c[Issued])
	} else if c[Issued] > 0 {
		counts += fmt.Sprintf(", %d issued", c[Issued])
	}
	if c[Deployed] > 0 {
		counts += fmt.Sprintf(", %d deployed", c[Deployed])
	}
	counts += res.notInstalledWords()
	fmt.Fprintf(w, "lbcert renew: %s, %d not due, %d failed, %d deferred\n",
		counts, c[NotDue], c[Failed]+c[Aborted], c[Deferred])
	for _, it := range res.Items {
		switch it.Outcome {
		case Renewed:
			fmt.Fprintf(w, "  renewed   %-30s %s -> %s, expires %s, due: %s; deploy %s\n", it.Name, it.OldSerial, it.Serial, it.NotAfter.Format(time.DateOnly), renewal.Reason(it.Reason).Words(), it.DeployWords()+it.fromFallback())
		case Issued:
			fmt.Fprintf(w, "  issued    %-30s %s, expires %s, its first certificate; deploy %s\n", it.Name, it.Serial, it.NotAfter.Format(time.DateOnly), it.DeployWords()+it.fromFallback())
		case Deployed:
			fmt.Fprintf(w, "  deployed  %-30s %s, obtained earlier, expires %s; deploy %s\n", it.Name, it.Serial, it.NotAfter.Format(time.DateOnly), it.DeployWords())
		case Failed, Aborted:
			fmt.Fprintf(w, "  failed    %-30s %s\n", it.Name, it.Error)
		case Deferred:
			fmt.Fprintf(w, "  deferred  %-30s %s%s\n", it.Name, it.Error, it.NextAttemptWords())
		case NotStarted:
			fmt.Fprintf(w, "  not started %-28s %s\n", it.Name, it.Error)
		}
	}
}

// IssueText writes what issue says on stdout about its one certificate:
// issued (renewed, deployed) with its serial, expiry and files, valid
// and not due, or new settings saved; paths are its live files.
func (it *Item) IssueText(w io.Writer, paths store.Paths, now time.Time) {
	switch it.Outcome {
	case NotDue:
		at := ""
		if it.DueAt != nil {
			at = " and not due for renewal before " + it.DueAt.Format(time.DateOnly)
		}
		fmt.Fprintf(w, "%s: certificate for %s is valid until %s%s; nothing to do (use --force to issue anyway)\n",
			it.Name, strings.Join(it.Domains, ", "), it.OldNotAfter.Format(time.DateOnly), at)
		return
	case Reconfigured:
		fmt.Fprintf(w, "%s: certificate for %s is valid until %s and not due; saved the new settings without ordering\n",
			it.Name, strings.Join(it.Domains, ", "), it.NotAfter.Format(time.DateOnly))
		if it.Deploy == "" {
			// Only mail or challenge settings changed: the certificate
			// already where it was is not deployed again.
			fmt.Fprintf(w, "  deploy    unchanged (same deploy target; nothing deployed)\n")
		} else {
			fmt.Fprintf(w, "  deploy    %s\n", it.DeployWords())
		}
		return
	case Failed:
		if it.Reason == reasonSettingsChanged && it.NotAfter != nil {
			// Nothing was ordered: new settings were given back up, as
			// their deploy failed, or could not be saved at all.
			why, deploy := "could not be saved: "+it.Error, ""
			if it.Deploy != "" {
				why, deploy = "were not saved, since deploying with them failed", "\n  deploy    "+it.DeployWords()
			}
			fmt.Fprintf(w, "%s: certificate for %s is valid until %s and not due; the new settings %s%s\n",
				it.Name, strings.Join(it.Domains, ", "), it.NotAfter.Format(time.DateOnly), why, deploy)
			return
		}
		fallthrough
	case Issued, Renewed, Deployed:
		if it.Serial == "" {
			break
		}
		if it.unsaved {
			what := "a certificate"
			if it.OldSerial != "" {
				what = "a renewed certificate"
			}
			fmt.Fprintf(w, "%s: obtained %s for %s (serial %s) but could not save it: the live files and the load balancer are unchanged\n",
				it.Name, what, strings.Join(it.Domains, ", "), it.Serial)
			return
		}
		verb := "issued certificate"
		switch {
		case it.Outcome == Deployed:
			verb = "deployed the certificate obtained earlier"
		case it.Outcome == Failed && it.Reason == reasonPendingDeploy:
			verb = "could not deploy the certificate obtained earlier" // nothing ordered
		case it.Outcome == Renewed, it.Outcome == Failed && it.OldSerial != "" && it.OldSerial != it.Serial:
			verb = "renewed certificate" // --force, or due: the log says "renewed" too
		}
		fmt.Fprintf(w, "%s: %s for %s\n  serial    %s\n  expires   %s (%s)\n",
			it.Name, verb, strings.Join(it.Domains, ", "), it.Serial, it.NotAfter.Format(time.RFC3339), renewal.TimeLeft(it.NotAfter.Sub(now)))
		if it.Deploy == "rolled_back" && strings.HasSuffix(it.Pending, noPreviousNote) {
			// Its live paths do not exist until a deploy succeeds.
			fmt.Fprintf(w, "  fullchain (none yet: kept in the archive, live at %s once deployed)\n", paths.Fullchain)
		} else {
			fmt.Fprintf(w, "  fullchain %s\n  key       %s\n", paths.Fullchain, paths.Key)
		}
		fmt.Fprintf(w, "  deploy    %s\n", it.DeployWords())
		it.issuerText(w)
	}
}

// issuerText says which CA issued issue's certificate, when several
// are configured.
func (it *Item) issuerText(w io.Writer) {
	switch {
	case it.CA == "":
	case it.Fallback != "":
		fmt.Fprintf(w, "  issuer    %s (fallback: %s)\n", it.CA, it.Fallback)
	default:
		fmt.Fprintf(w, "  issuer    %s\n", it.CA)
	}
}

// fromFallback is the words for a certificate a fallback issued.
func (it *Item) fromFallback() string {
	if it.Fallback == "" {
		return ""
	}
	return fmt.Sprintf(", from fallback %s (%s)", it.CA, it.Fallback)
}

// FallbackWarnings are the run's warnings about its CAs: which
// certificates came from a fallback CA, and which CAs are passed over
// now. A primary that is down must not go unnoticed because everything
// still renews.
func (res *Result) FallbackWarnings() []string {
	byCA := map[string][]*Item{}
	for _, it := range res.Items {
		if it.Fallback != "" && (it.Outcome == Issued || it.Outcome == Renewed) {
			byCA[it.CA] = append(byCA[it.CA], it)
		}
	}
	var out []string
	for _, name := range slices.Sorted(maps.Keys(byCA)) {
		items := byCA[name]
		out = append(out, fmt.Sprintf("%d certificate(s) came from fallback %s: %s", len(items), name, items[0].Fallback))
	}
	for _, c := range res.CAs {
		if c.PassedOverUntil != nil {
			out = append(out, fmt.Sprintf("the CA %s (%s) is passed over until %s: %s", c.Name, c.Server, c.PassedOverUntil.Format(time.RFC3339), c.Reason))
		}
	}
	return out
}
