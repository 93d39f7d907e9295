package acme

import (
	"errors"
	"fmt"
	"io"
	"net"
	"strings"

	legoacme "github.com/go-acme/lego/v4/acme"
)

// CAFault reports whether err is the CA's own fault, never the names':
// the CA did not answer (connection refused or reset, closed, timed
// out), answered with a 5xx or serverInternal, or its directory could
// not be read. An order that failed so would go through at another CA,
// and a fallback may take it. It reports false for everything about the
// names or the request (a failed validation, CAA, rejectedIdentifier,
// a bad CSR, a refused profile), which would fail at any CA and spend
// its limits too, and for rateLimited, whose Retry-After the caller
// weighs. why is a short phrase for reports: "did not answer: ...".
func CAFault(err error) (why string, ok bool) {
	if err == nil || FailedValidation(err) || AccountGone(err) {
		return "", false
	}
	if _, limited := RateLimited(err); limited {
		return "", false
	}
	var pe *ProfileError
	if errors.As(err, &pe) {
		return "", false
	}
	msg := flatten(err.Error())
	switch {
	case serverFault(err):
		return "answered " + statusWords(err), true
	case errors.Is(err, ErrCADown):
		return "stopped answering mid-order", true
	case untrustedCA(err):
		// The CA, or something in front of it, shows a certificate this
		// host does not trust: nothing can be said to it safely, and
		// another CA is not affected.
		return "showed a certificate this host does not trust (" + clip(msg) + ")", true
	case Unreachable(err) || closedConnection(err):
		return "did not answer (" + unreachableWords(err, msg) + ")", true
	case strings.Contains(msg, "get directory at"), strings.Contains(msg, "could not read its directory"):
		return "did not serve its directory (" + clip(msg) + ")", true
	}
	return "", false
}

// statusWords says what a CA that failed itself answered: "HTTP 503",
// with the problem's type and detail when it sent one.
func statusWords(err error) string {
	var pd *legoacme.ProblemDetails
	if errors.As(err, &pd) {
		status := pd.HTTPStatus
		if status == 0 {
			status = 500
		}
		return clip(fmt.Sprintf("HTTP %d (%s: %s)", status, problemType(pd.Type), flatten(pd.Detail)))
	}
	if m := plain5xx.FindStringSubmatch(err.Error()); m != nil {
		return "HTTP " + m[2]
	}
	return "an internal error"
}

// unreachableWords is the gist of a CA that did not answer.
func unreachableWords(err error, msg string) string {
	for _, s := range []string{"connection refused", "connection reset", "no such host", "network is unreachable", "TLS handshake timeout",
		"broken pipe", "unexpected EOF", "EOF"} {
		if strings.Contains(msg, s) {
			return s
		}
	}
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() || strings.Contains(msg, "timeout") || strings.Contains(msg, "deadline exceeded") {
		return "timed out"
	}
	return clip(msg)
}

// ServerFault reports whether err is the CA's answer that it failed
// itself (a 5xx, serverInternal).
func ServerFault(err error) bool { return serverFault(err) }

// closedConnection reports whether the CA dropped a request mid-way: a
// CA killed while orders were in flight does this rather than refuse.
func closedConnection(err error) bool {
	if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
		return true
	}
	msg := err.Error()
	for _, s := range []string{": EOF", "unexpected EOF", "broken pipe", "server closed idle connection", "connection was forcibly closed"} {
		if strings.Contains(msg, s) {
			return true
		}
	}
	return false
}

// clip keeps a reason short enough for one report line.
func clip(s string) string {
	const max = 240
	if len(s) <= max {
		return s
	}
	return s[:max] + "..."
}
