package deploy

import (
	"errors"
	"strings"
	"testing"
)

// A failed config test's error keeps the lines the load balancer marked
// as errors, the file, line and keyword among them, and drops the
// version banner and the closing summary; output with no such mark is
// kept whole.
func TestCmdErrorKeepsTheMarkedLines(t *testing.T) {
	haproxy := `[NOTICE]   (23116) : haproxy version is 2.6.12-1+deb12u4
[NOTICE]   (23116) : path to executable is /usr/sbin/haproxy
[ALERT]    (23116) : config : parsing [/etc/haproxy/haproxy.cfg:12] : unknown keyword 'this_is_not_a_directive;' in 'frontend' section
[ALERT]    (23116) : config : Error(s) found in configuration file : /etc/haproxy/haproxy.cfg
[ALERT]    (23116) : config : Fatal errors found in configuration.
`
	nginx := `nginx: [emerg] unknown directive "this_is_not_a_directive" in /etc/nginx/conf.d/x.conf:3
nginx: configuration file /etc/nginx/nginx.conf test failed
`
	cases := []struct{ out, want, not string }{
		{haproxy, "failed: exit status 1: [ALERT] (23116) : config : parsing [/etc/haproxy/haproxy.cfg:12] : unknown keyword 'this_is_not_a_directive;' in 'frontend' section", "NOTICE"},
		{nginx, `failed: exit status 1: nginx: [emerg] unknown directive "this_is_not_a_directive" in /etc/nginx/conf.d/x.conf:3`, "test failed"},
		{"something odd\nhappened\n", "failed: exit status 1: something odd happened", "\n"},
	}
	for _, c := range cases {
		got := cmdError("check failed", errors.New("exit status 1"), c.out).Error()
		if !strings.HasPrefix(got, "check "+c.want) || strings.Contains(got, c.not) || strings.HasSuffix(got, "Fatal errors found in configuration.") {
			t.Errorf("got  %q\nwant %q, without %q", got, "check "+c.want, c.not)
		}
	}
}
