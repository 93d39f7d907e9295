package fleet

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"slices"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/lbcert/lbcert/internal/fleet/rdb"
)

// TokenTTL is how long a published HTTP-01 token lives in Redis (and in
// an agent's cache): longer than any validation, short enough that a
// crashed orderer leaves nothing behind for long.
const TokenTTL = 30 * time.Minute

// AgentInfo is what an agent's heartbeat says about it.
type AgentInfo struct {
	Node    string    `json:"node"`
	Addr    string    `json:"addr"` // where peers reach its HTTP-01 responder
	Version string    `json:"version"`
	PID     int       `json:"pid"`
	At      time.Time `json:"at"`
}

// LiveAgents are the agents of approved members that sent a heartbeat
// recently: a removed node's agent, or one planted in Redis, is not asked.
func (n *Node) LiveAgents(ctx context.Context) ([]AgentInfo, error) {
	raw, err := n.Shared.Agents(ctx)
	if err != nil {
		return nil, err
	}
	members := map[string]bool{}
	for _, m := range n.Members() {
		members[m.Node] = true
	}
	var out []AgentInfo
	for node, j := range raw {
		var a AgentInfo
		if json.Unmarshal(j, &a) != nil || !members[node] || a.Addr == "" {
			continue
		}
		a.Node = node
		out = append(out, a)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Node < out[j].Node })
	return out, nil
}

// Tokens is the HTTP-01 provider of a fleet run: it publishes each
// token to Redis and then fetches it through every live agent before
// the CA is told to validate. If any agent cannot answer it, the
// authorization is abandoned (lego deactivates it) before the CA looks,
// which costs no failed validation, and the error names the node.
type Tokens struct {
	N      *Node
	Client *http.Client

	mu       sync.Mutex
	agents   []AgentInfo // the last live agents found, for agentsFresh
	agentsAt time.Time
}

// agentsFresh is how long Present reuses the list of live agents: a
// batch presents many tokens a second, and the list (a SCAN and an MGET)
// changes at most with a heartbeat, every 3 s, so a second's copy is no
// staler than the heartbeats it is made from.
const agentsFresh = time.Second

// liveAgents is n.LiveAgents, reusing a non-empty answer for
// agentsFresh.
func (t *Tokens) liveAgents(ctx context.Context) ([]AgentInfo, error) {
	t.mu.Lock()
	if len(t.agents) > 0 && time.Since(t.agentsAt) < agentsFresh {
		defer t.mu.Unlock()
		return t.agents, nil
	}
	t.mu.Unlock()
	agents, err := t.N.LiveAgents(ctx)
	if err == nil && len(agents) > 0 {
		t.mu.Lock()
		t.agents, t.agentsAt = agents, time.Now()
		t.mu.Unlock()
	}
	return agents, err
}

// AgentCheckError is a token that an agent did not serve.
type AgentCheckError struct {
	Domain, Node, Addr string
	Err                error
}

func (e *AgentCheckError) Error() string {
	return fmt.Sprintf("node %s's agent at %s does not answer the HTTP-01 token for %s (%v); abandoned before the CA validated, so no failed validation was spent", e.Node, e.Addr, e.Domain, e.Err)
}

// HintText makes *AgentCheckError a hint.Hinter.
func (e *AgentCheckError) HintText() string {
	return "check that 'lbcert agent' runs on " + e.Node + " and reaches Redis, or take the node out of the pool the CA validates through"
}

// NoBackoff says the name is not at fault: the next run may try at once.
func (e *AgentCheckError) NoBackoff() bool { return true }

// NoAgentError is a fleet with no live agent at all.
type NoAgentError struct{}

func (NoAgentError) Error() string {
	return "no lbcert agent of the fleet has sent a heartbeat recently, so nothing answers HTTP-01 for the CA"
}
func (NoAgentError) HintText() string {
	return "start 'lbcert --redis URL agent --http-addr ADDR' on every node behind the address the CA validates (README \"A pool of load balancers\")"
}
func (NoAgentError) NoBackoff() bool { return true }

func hostOf(domain string) string { return strings.ToLower(strings.TrimSuffix(domain, ".")) }

// redisWait is how long Present waits for a Redis that stopped
// answering (a restart, a Sentinel failover) before it gives the
// authorization up: the order is already placed, and a few seconds'
// wait saves ordering again.
var redisWait = 30 * time.Second // a variable for the tests

// agentWait is how long Present waits for a live agent when none has a
// heartbeat: agents beat every 3 s, and every 10 s at most while they
// reconnect after Redis was away (or was restarted or emptied, which
// drops every heartbeat at once). The order is already placed.
const agentWait = 12 * time.Second

// attemptTimeout bounds one attempt of withRedis: a Redis that does not
// answer within it is taken for away.
const attemptTimeout = 5 * time.Second

// withRedis runs f, retrying while Redis is unreachable, up to redisWait;
// before says what the wait spares (for the one warning it gives).
func withRedis(ctx context.Context, before string, f func(context.Context) error) error {
	deadline := time.Now().Add(redisWait)
	wait := 250 * time.Millisecond
	for {
		cctx, cancel := context.WithTimeout(ctx, attemptTimeout)
		err := f(cctx)
		cancel()
		if err == nil || !errors.As(err, new(*rdb.Unavailable)) || time.Now().Add(wait).After(deadline) {
			return err
		}
		if wait == 250*time.Millisecond {
			slog.Warn("the fleet's Redis is not answering; waiting for it before "+before, "for", redisWait, "err", err)
		}
		select {
		case <-ctx.Done():
			return err
		case <-time.After(wait):
		}
		wait = min(wait*2, 2*time.Second)
	}
}

// Present publishes the token and checks it through every live agent.
//
// An agent that cannot reach Redis for a token says so (503 with
// RedisAwayHeader). When Redis is away for this node too (restarted,
// failing over) the order is already placed, so Present waits for it,
// publishing the token again and checking again, up to redisWait,
// rather than give up an order that a few seconds' wait completes (and
// the next run orders again). When Redis answers this node, the agent
// is cut off from it alone: after agentGrace (its client reconnecting)
// the authorization is abandoned as for any agent that does not answer.
// Every agent checked once is checked again on every try, live
// heartbeat or not: one cut off from Redis loses its heartbeat, not its
// place in the pool the CA validates through.
func (t *Tokens) Present(domain, token, keyAuth string) error {
	ctx, cancel := context.WithTimeout(context.Background(), 2*redisWait+20*time.Second)
	defer cancel()
	host := hostOf(domain)
	deadline := time.Now().Add(redisWait)
	var checked []AgentInfo
	var redisSeen time.Time // when this node last reached Redis after an agent's 503
	for {
		var err error
		checked, err = t.presentOnce(ctx, host, token, keyAuth, checked)
		var ace *AgentCheckError
		if !errors.As(err, &ace) || !errors.Is(ace.Err, errAgentRedisAway) || time.Now().After(deadline) {
			if ace != nil {
				ace.Domain = domain
				t.N.Shared.DelToken(ctx, host, token)
			}
			return err
		}
		pctx, pcancel := context.WithTimeout(ctx, 2*time.Second)
		reached := t.N.Shared.Ping(pctx) == nil
		pcancel()
		switch {
		case !reached:
			redisSeen = time.Time{}
		case redisSeen.IsZero():
			redisSeen = time.Now()
		case time.Since(redisSeen) > agentGrace:
			t.N.Shared.DelToken(ctx, host, token)
			ace.Domain = domain
			return ace
		}
		slog.Warn("an agent cannot reach the fleet's Redis for the HTTP-01 token; publishing it again", "node", ace.Node, "name", host)
		select {
		case <-ctx.Done():
			return err
		case <-time.After(time.Second):
		}
	}
}

// agentGrace is how long Present waits for an agent that answers "Redis
// away" while Redis answers this node: go-redis reconnects within a
// second or two of Redis coming back.
const agentGrace = 4 * time.Second

// presentOnce publishes the token and fetches it through every live
// agent and every agent in before, once; it returns the agents it
// checked.
func (t *Tokens) presentOnce(ctx context.Context, host, token, keyAuth string, before []AgentInfo) ([]AgentInfo, error) {
	if err := withRedis(ctx, "giving the authorization up", func(ctx context.Context) error {
		return t.N.Shared.PutToken(ctx, host, token, keyAuth, TokenTTL)
	}); err != nil {
		return before, err
	}
	var agents []AgentInfo
	deadline, warned := time.Now().Add(agentWait), false
	for {
		if err := withRedis(ctx, "giving the authorization up", func(ctx context.Context) (err error) {
			agents, err = t.liveAgents(ctx)
			return err
		}); err != nil {
			return before, err
		}
		agents = withAgents(agents, before, t.N.Members())
		if len(agents) > 0 || time.Now().After(deadline) {
			break
		}
		if !warned {
			warned = true
			slog.Warn("no agent of the fleet has a live heartbeat; waiting for one before giving the authorization up", "for", agentWait)
		}
		select {
		case <-ctx.Done():
			return before, ctx.Err()
		case <-time.After(500 * time.Millisecond):
		}
	}
	if len(agents) == 0 {
		t.N.Shared.DelToken(ctx, host, token)
		return nil, NoAgentError{}
	}
	var wg sync.WaitGroup
	errs := make([]error, len(agents))
	for i, a := range agents {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs[i] = t.check(ctx, a.Addr, host, token, keyAuth)
		}()
	}
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			return agents, &AgentCheckError{Domain: host, Node: agents[i].Node, Addr: agents[i].Addr, Err: err}
		}
	}
	return agents, nil
}

// withAgents is live with every agent of before that it lacks and that
// is still a member.
func withAgents(live, before []AgentInfo, members []Member) []AgentInfo {
	out := slices.Clone(live)
	for _, b := range before {
		member := slices.ContainsFunc(members, func(m Member) bool { return m.Node == b.Node })
		if member && !slices.ContainsFunc(out, func(a AgentInfo) bool { return a.Node == b.Node }) {
			out = append(out, b)
		}
	}
	return out
}

// RedisAwayHeader marks an agent's 503 for a token it has no copy of
// and cannot reach Redis for; a 503 without it (a proxy in front of a
// dead agent, say) is an agent that does not answer.
const RedisAwayHeader = "Lbcert-Redis-Away"

// errAgentRedisAway is an agent's 503 with RedisAwayHeader.
var errAgentRedisAway = errors.New("HTTP 503: the agent cannot reach the fleet's Redis")

// check fetches the token from one agent, as the CA would (Host header
// the name), retrying briefly.
func (t *Tokens) check(ctx context.Context, addr, host, token, keyAuth string) error {
	client := t.Client
	if client == nil {
		client = &http.Client{Timeout: 3 * time.Second}
	}
	hostHeader := host
	if strings.Contains(host, ":") {
		hostHeader = "[" + host + "]"
	}
	var last error
	for attempt := range 4 {
		if attempt > 0 {
			select {
			case <-ctx.Done():
				return ctx.Err()
			case <-time.After(time.Duration(attempt) * 250 * time.Millisecond):
			}
		}
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+addr+"/.well-known/acme-challenge/"+token, nil)
		req.Host = hostHeader
		req.Header.Set("User-Agent", CheckAgent)
		resp, err := client.Do(req)
		if err != nil {
			last = err
			continue
		}
		body, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
		resp.Body.Close()
		switch {
		case resp.StatusCode == http.StatusServiceUnavailable && resp.Header.Get(RedisAwayHeader) != "":
			last = errAgentRedisAway
		case resp.StatusCode != http.StatusOK:
			last = fmt.Errorf("HTTP %d", resp.StatusCode)
		case !bytes.Equal(bytes.TrimSpace(body), []byte(keyAuth)):
			last = fmt.Errorf("it answered something else")
		default:
			return nil
		}
	}
	return last
}

// CheckAgent is the User-Agent of the orderer's check, which tells it
// apart from the CA's request in an agent's log.
const CheckAgent = "lbcert-fleet-check"

// CleanUp removes the token from Redis (agents' caches let it expire).
func (t *Tokens) CleanUp(domain, token, keyAuth string) error {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	return t.N.Shared.DelToken(ctx, hostOf(domain), token)
}

// splitHost strips the port from a Host header.
func splitHost(h string) string {
	if host, _, err := net.SplitHostPort(h); err == nil {
		return hostOf(host)
	}
	return hostOf(strings.Trim(h, "[]"))
}
