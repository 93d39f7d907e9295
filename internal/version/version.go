// Package version says what a build of lbcert is, for --version and
// the User-Agent the CA sees: the version the Makefile stamps, else the
// module version (go install ...@v1.2.3), else the VCS revision Go
// stamped into the build.
package version

import "runtime/debug"

// Of says what this binary is: the -ldflags version (stamped, "dev"
// when none), else the module version, else "dev-" and the VCS revision,
// with "-dirty" for uncommitted changes.
func Of(stamped string, info *debug.BuildInfo, ok bool) string {
	if stamped != "dev" || !ok {
		return stamped
	}
	if v := info.Main.Version; v != "" && v != "(devel)" {
		return v
	}
	var rev, dirty string
	for _, s := range info.Settings {
		switch s.Key {
		case "vcs.revision":
			rev = s.Value
		case "vcs.modified":
			if s.Value == "true" {
				dirty = "-dirty"
			}
		}
	}
	if rev == "" {
		return stamped
	}
	return "dev-" + rev[:min(12, len(rev))] + dirty
}
