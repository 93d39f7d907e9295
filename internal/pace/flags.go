package pace

import "fmt"

// LimitFlags are the --rate-* flags as given: COUNT/PERIOD, or off.
type LimitFlags struct {
	Orders, Domain, ExactSet, FailedAuthz string
}

// Limits parses them.
func (p LimitFlags) Limits() (Limits, error) {
	var l Limits
	for _, x := range []struct {
		flag string
		val  string
		dst  *Limit
	}{{"--rate-orders", p.Orders, &l.Orders}, {"--rate-domain", p.Domain, &l.Domain}, {"--rate-names", p.ExactSet, &l.ExactSet},
		{"--rate-failed-authz", p.FailedAuthz, &l.FailedAuthz}} {
		v, err := ParseLimit(x.val)
		if err != nil {
			return l, fmt.Errorf("%s %w", x.flag, err)
		}
		*x.dst = v
	}
	return l, nil
}
