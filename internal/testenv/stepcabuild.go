package testenv

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
)

// StepCAVersion is the step-ca the tests run, pinned by
// internal/testenv/stepca/go.mod (a module of its own, so that lbcert's
// go.mod does not depend on step-ca's hundred-odd modules).
const StepCAVersion = "v0.30.2"

var stepCAOnce struct {
	sync.Once
	bins StepCABinaries
	err  error
}

// StepCABinaries are step-ca and the tests' database writer (stepca/dbinit).
type StepCABinaries struct {
	StepCA, DBInit string
}

// BuildStepCA builds step-ca and dbinit from the Go module proxy, once
// per machine and version of the stepca module into the user's cache
// directory, as PebbleBinary does for Pebble. CGO is off: step-ca's
// YubiKey support otherwise links libpcsclite, which the tests do not
// need. The first build takes a minute or two on two cores.
func BuildStepCA() (StepCABinaries, error) {
	stepCAOnce.Do(func() { stepCAOnce.bins, stepCAOnce.err = buildStepCA() })
	return stepCAOnce.bins, stepCAOnce.err
}

func buildStepCA() (StepCABinaries, error) {
	root, err := ModuleRoot()
	if err != nil {
		return StepCABinaries{}, err
	}
	mod := filepath.Join(root, "internal", "testenv", "stepca")
	id, err := stepCAModuleID(mod)
	if err != nil {
		return StepCABinaries{}, err
	}
	cache, err := os.UserCacheDir()
	if err != nil {
		cache = os.TempDir()
	}
	dir := filepath.Join(cache, "lbcert-test", "step-ca-"+StepCAVersion+"-"+id)
	bins := StepCABinaries{StepCA: filepath.Join(dir, "step-ca"), DBInit: filepath.Join(dir, "dbinit")}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return StepCABinaries{}, err
	}
	// Test binaries of several packages may start at once: the first
	// builds while the others wait for it (two builds of step-ca at once
	// would take twice the CPU for nothing), then find the binaries.
	lock, err := os.OpenFile(filepath.Join(dir, ".lock"), os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		return StepCABinaries{}, err
	}
	defer lock.Close()
	if err := syscall.Flock(int(lock.Fd()), syscall.LOCK_EX); err != nil {
		return StepCABinaries{}, err
	}
	if _, err := os.Stat(bins.StepCA); err == nil {
		if _, err := os.Stat(bins.DBInit); err == nil {
			return bins, nil
		}
	}
	work, err := os.MkdirTemp(dir, "build-")
	if err != nil {
		return StepCABinaries{}, err
	}
	defer os.RemoveAll(work)
	build := exec.Command("go", "build", "-trimpath", "-o", work+string(filepath.Separator),
		"github.com/smallstep/certificates/cmd/step-ca", "./dbinit")
	build.Dir = mod
	build.Env = append(os.Environ(), "CGO_ENABLED=0", "GOWORK=off", "GOFLAGS=-mod=readonly")
	if out, err := build.CombinedOutput(); err != nil {
		return StepCABinaries{}, fmt.Errorf("build step-ca %s (internal/testenv/stepca): %v: %s", StepCAVersion, err, bytes.TrimSpace(out))
	}
	if err := os.Rename(filepath.Join(work, "dbinit"), bins.DBInit); err != nil {
		return StepCABinaries{}, err
	}
	if err := os.Rename(filepath.Join(work, "step-ca"), bins.StepCA); err != nil {
		return StepCABinaries{}, err
	}
	return bins, nil
}

// stepCAModuleID names a build of the stepca module: its go.mod, go.sum
// and dbinit source, so an edit to any of them builds anew.
func stepCAModuleID(mod string) (string, error) {
	sum := sha256.New()
	for _, f := range []string{"go.mod", "go.sum", filepath.Join("dbinit", "main.go")} {
		data, err := os.ReadFile(filepath.Join(mod, f))
		if err != nil {
			return "", fmt.Errorf("step-ca module: %v", err)
		}
		fmt.Fprintf(sum, "%s\x00%d\x00", f, len(data))
		sum.Write(data)
	}
	if data, err := os.ReadFile(filepath.Join(mod, "go.mod")); err == nil && !strings.Contains(string(data), "github.com/smallstep/certificates "+StepCAVersion) {
		return "", fmt.Errorf("internal/testenv/stepca/go.mod does not require step-ca %s; update StepCAVersion with it", StepCAVersion)
	}
	return hex.EncodeToString(sum.Sum(nil))[:16], nil
}
