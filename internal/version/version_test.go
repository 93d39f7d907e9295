package version

import (
	"runtime/debug"
	"testing"
)

// --version says what a binary built without the Makefile is: the
// module version, or the VCS revision and whether the tree was dirty.
func TestBuildVersion(t *testing.T) {
	info := func(v string, settings ...debug.BuildSetting) *debug.BuildInfo {
		return &debug.BuildInfo{Main: debug.Module{Version: v}, Settings: settings}
	}
	rev := debug.BuildSetting{Key: "vcs.revision", Value: "0123456789abcdef0123"}
	dirty := debug.BuildSetting{Key: "vcs.modified", Value: "true"}
	cases := []struct {
		info *debug.BuildInfo
		want string
	}{
		{info("v1.4.0"), "v1.4.0"},
		{info("(devel)", rev), "dev-0123456789ab"},
		{info("(devel)", rev, dirty), "dev-0123456789ab-dirty"},
		{info("(devel)"), "dev"},
	}
	for _, c := range cases {
		if got := Of("dev", c.info, true); got != c.want {
			t.Errorf("buildVersion = %q, want %q", got, c.want)
		}
	}
	if got := Of("v9.9.9-from-ldflags", info("v1.4.0"), true); got != "v9.9.9-from-ldflags" {
		t.Errorf("-ldflags version lost: %q", got)
	}
}
