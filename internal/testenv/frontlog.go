package testenv

import (
	"encoding/json"
	"net/http"
	"slices"
	"strings"
	"time"
)

// FrontOrder is one order's life as a RateFront saw it: Pebble's log
// names no identifier, so a test that asks "were two orders for one name
// in flight at once?" reads it here.
type FrontOrder struct {
	ID      string
	Account string   // the JWS kid: the account's URL
	Names   []string // lower case, as ordered
	// Created is when the new-order request reached the front.
	Created time.Time
	// Last is the front's last answer about the order, one of its
	// authorizations or challenges, its finalization or its certificate:
	// a client killed mid-order leaves the order at Last.
	Last time.Time
	// Final is "valid", "invalid" or "deactivated" once an answer about
	// the order (or one of its authorizations, which ends it) said so,
	// at Ended; "" while it was still open.
	Final string
	Ended time.Time
	// Tokens are its HTTP-01 challenge tokens.
	Tokens []string
}

// Span is when the order was in flight: from Created to Ended, or to
// Last for an order its client stopped following.
func (o FrontOrder) Span() (time.Time, time.Time) {
	if !o.Ended.IsZero() {
		return o.Created, o.Ended
	}
	return o.Created, o.Last
}

// Orders returns every order the front has seen created, oldest first.
func (f *RateFront) Orders() []FrontOrder {
	f.mu.Lock()
	defer f.mu.Unlock()
	out := make([]FrontOrder, 0, len(f.life))
	for _, o := range f.life {
		c := *o
		c.Names, c.Tokens = slices.Clone(o.Names), slices.Clone(o.Tokens)
		out = append(out, c)
	}
	slices.SortFunc(out, func(a, b FrontOrder) int { return a.Created.Compare(b.Created) })
	return out
}

// track follows one answer of Pebble's into the orders' lives. arrived
// is when the request reached the front.
func (f *RateFront) track(path string, jws jwsRequest, arrived time.Time, rec *recorder) {
	var body struct {
		Status         string   `json:"status"`
		Authorizations []string `json:"authorizations"`
		Certificate    string   `json:"certificate"`
		Identifiers    []struct {
			Value string `json:"value"`
		} `json:"identifiers"`
		Challenges []struct {
			Type  string `json:"type"`
			URL   string `json:"url"`
			Token string `json:"token"`
		} `json:"challenges"`
	}
	json.Unmarshal(rec.body.Bytes(), &body)
	now := time.Now()
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.life == nil {
		f.life, f.owner = map[string]*FrontOrder{}, map[string]string{}
	}
	id := orderID(path)
	var o *FrontOrder
	switch {
	case path == "/order-plz":
		if rec.code() != http.StatusCreated {
			return
		}
		id = orderID(rec.header.Get("Location"))
		o = &FrontOrder{ID: id, Account: jws.kid, Created: arrived}
		for _, n := range body.Identifiers {
			o.Names = append(o.Names, strings.ToLower(n.Value))
		}
		f.life[id] = o
	case strings.HasPrefix(path, "/my-order/"), strings.HasPrefix(path, "/finalize-order/"):
		o = f.life[id]
	case strings.HasPrefix(path, "/authZ/"), strings.HasPrefix(path, "/chalZ/"), strings.HasPrefix(path, "/certZ/"):
		o = f.life[f.owner[id]]
	}
	if o == nil {
		return
	}
	o.Last = now
	for _, a := range body.Authorizations {
		f.owner[orderID(a)] = o.ID
	}
	if body.Certificate != "" {
		f.owner[orderID(body.Certificate)] = o.ID
	}
	for _, c := range body.Challenges {
		f.owner[orderID(c.URL)] = o.ID
		if c.Type == "http-01" && !slices.Contains(o.Tokens, c.Token) {
			o.Tokens = append(o.Tokens, c.Token)
		}
	}
	// An authorization that is invalid or deactivated ends its order
	// (RFC 8555 section 7.1.6) as surely as the order's own status.
	ends := body.Status == "valid" && !strings.HasPrefix(path, "/authZ/") && !strings.HasPrefix(path, "/chalZ/") ||
		body.Status == "invalid" || body.Status == "deactivated"
	if ends && o.Final == "" && rec.code() < 300 {
		o.Final, o.Ended = body.Status, now
	}
}
