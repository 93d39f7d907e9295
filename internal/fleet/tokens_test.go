package fleet

import (
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/lbcert/lbcert/internal/fleet/rdb"
	"github.com/lbcert/lbcert/internal/store"
)

// cutProxy forwards TCP connections to a Redis and can be cut (its
// listener closed and every forwarded connection dropped) and mended
// (listening again on the same address): one node losing Redis while
// the others keep it.
type cutProxy struct {
	addr, target string
	mu           sync.Mutex
	ln           net.Listener
	conns        []net.Conn
}

func startCutProxy(t *testing.T, target string) *cutProxy {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &cutProxy{addr: ln.Addr().String(), target: target}
	p.serve(ln)
	t.Cleanup(p.cut)
	return p
}

func (p *cutProxy) serve(ln net.Listener) {
	p.mu.Lock()
	p.ln = ln
	p.mu.Unlock()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			up, err := net.Dial("tcp", p.target)
			if err != nil {
				c.Close()
				continue
			}
			p.mu.Lock()
			p.conns = append(p.conns, c, up)
			p.mu.Unlock()
			go func() { io.Copy(up, c); up.Close() }()
			go func() { io.Copy(c, up); c.Close() }()
		}
	}()
}

func (p *cutProxy) cut() {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.ln != nil {
		p.ln.Close()
		p.ln = nil
	}
	for _, c := range p.conns {
		c.Close()
	}
	p.conns = nil
}

func (p *cutProxy) mend(t *testing.T) {
	ln, err := net.Listen("tcp", p.addr)
	if err != nil {
		t.Errorf("listen again on %s: %v", p.addr, err)
		return
	}
	p.serve(ln)
}

// An order placed just before Redis went away (e2e
// TestFleetRedisKilledMidBatch, in full test runs): the orderer
// published the token, then Redis stopped answering, and the agent could
// not read it. The agent says so (503 with RedisAwayHeader, not 404),
// and the orderer waits for Redis, publishing the token again, instead
// of giving up an order the CA already has. An agent cut off from a
// Redis that answers the orderer (a partition), or a plain 503 from a
// proxy in front of a dead agent, is abandoned within agentGrace and a
// few tries, before the CA looks, as before (hostile review: waiting
// until the cut-off agent's heartbeat ran out let the CA validate
// through it and fail).
func TestPresentWaitsForRedisNotForACutOffAgent(t *testing.T) {
	r, sh := startRedis(t)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	dir := t.TempDir()
	if _, err := Init(ctx, sh, store.New(filepath.Join(dir, "lb1")), "lb1"); err != nil {
		t.Fatal(err)
	}
	redisAddr := strings.TrimPrefix(strings.TrimSuffix(r.URL(), "/0"), "redis://")
	// The agent and the orderer each reach Redis through a proxy the
	// test cuts.
	open := func(p *cutProxy) *Node {
		s, err := rdb.Dial(ctx, rdb.Options{URL: "redis://" + p.addr + "/0", Password: "pw-for-tests"})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { s.Close() })
		n, err := Open(ctx, s, store.New(filepath.Join(dir, "lb1")))
		if err != nil {
			t.Fatal(err)
		}
		return n
	}
	agentProxy, ordererProxy := startCutProxy(t, redisAddr), startCutProxy(t, redisAddr)
	agentNode, orderer := open(agentProxy), open(ordererProxy)

	// The agent is reached through a front that, on the first request
	// once armed, cuts Redis for both (Redis killed mid-order) and
	// mends it after outage.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	a := &Agent{Connect: func(context.Context) (*Node, error) { return agentNode, nil }, Listener: ln, Advertise: "placeholder"}
	const outage = 8 * time.Second
	var armed, plain503 atomic.Bool
	front := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		if plain503.Load() {
			http.Error(w, "no server available", http.StatusServiceUnavailable)
			return
		}
		if armed.CompareAndSwap(true, false) {
			agentProxy.cut()
			ordererProxy.cut()
			go func() {
				time.Sleep(outage)
				agentProxy.mend(t)
				ordererProxy.mend(t)
			}()
		}
		a.ServeHTTP(w, req)
	}))
	defer front.Close()
	a.Advertise = strings.TrimPrefix(front.URL, "http://")
	go a.Run(ctx)
	// A heartbeat lives 5 beats (15 s): the agent stays live through
	// each cut, so what Present meets is its 503, not an empty fleet.
	waitFor(t, func() bool { ag, _ := orderer.LiveAgents(ctx); return len(ag) == 1 })

	// Redis away for everyone: Present waits it out.
	armed.Store(true)
	start := time.Now()
	err = (&Tokens{N: orderer}).Present("foo.com", "tok1", "tok1.thumb")
	if took := time.Since(start); err != nil || took < outage {
		t.Fatalf("Present across an %v Redis outage: %v after %v, want success after the outage", outage, err, took)
	}

	// Only the agent cut off: abandoned, quickly, named as Redis away.
	agentProxy.cut()
	start = time.Now()
	err = (&Tokens{N: orderer}).Present("foo.com", "tok2", "tok2.thumb")
	took := time.Since(start)
	var ace *AgentCheckError
	if !errors.As(err, &ace) || !errors.Is(ace.Err, errAgentRedisAway) || took > 15*time.Second {
		t.Errorf("Present with only the agent cut off from Redis: %v after %v, want the agent named within 15 s", err, took)
	}
	if v, _, _, _ := sh.Token(ctx, "foo.com", "tok2"); v != "" {
		t.Error("the abandoned token stayed in Redis")
	}
	agentProxy.mend(t)
	waitFor(t, func() bool { ag, _ := orderer.LiveAgents(ctx); return len(ag) == 1 })

	// A plain 503 (a proxy in front of a dead agent) is not waited for.
	plain503.Store(true)
	start = time.Now()
	err = (&Tokens{N: orderer}).Present("foo.com", "tok3", "tok3.thumb")
	if !errors.As(err, &ace) || errors.Is(ace.Err, errAgentRedisAway) || time.Since(start) > 5*time.Second {
		t.Errorf("Present through a front answering a plain 503: %v after %v, want an agent check error at once", err, time.Since(start))
	}
}
