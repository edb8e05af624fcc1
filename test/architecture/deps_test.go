// Package architecture checks the import rules of DESIGN.md that the compiler
// does not: nothing under metricsadapter/ or plugins/ depends on router/,
// directly or through another package, in its code or its tests. Shared
// things live in the model-server library under metricsadapter/ and the
// router imports them, never the other way round.
package architecture

import (
	"bytes"
	"os/exec"
	"sort"
	"strings"
	"testing"
)

const (
	module = "github.com/capstan-dev/capstan"
	router = module + "/router"
)

func TestNoRouterDependencies(t *testing.T) {
	for _, tree := range []string{"metricsadapter", "plugins"} {
		t.Run(tree, func(t *testing.T) {
			t.Parallel()
			g := listDeps(t, module+"/"+tree+"/...")
			if len(g.roots) == 0 {
				t.Fatalf("go list matched no package under %s/", tree)
			}
			if chains := g.chainsTo(isRouter); len(chains) > 0 {
				t.Errorf("%s/ must not depend on router/ (DESIGN.md, Layout), but %d router package(s) are among the dependencies of %s/...; each with one import chain that reaches it:\n  %s",
					tree, len(chains), tree, strings.Join(chains, "\n  "))
			}
		})
	}
}

// isRouter reports whether a go list import path (possibly a test variant,
// "p [q.test]") is a package under router/.
func isRouter(path string) bool {
	p := plain(path)
	return p == router || strings.HasPrefix(p, router+"/")
}

// plain strips the test-variant suffix go list -test adds: "p [q.test]" is p.
func plain(path string) string {
	p, _, _ := strings.Cut(path, " ")
	return p
}

// graph is the package import graph go list printed.
type graph struct {
	roots   []string            // the packages the pattern matched, with their test variants
	imports map[string][]string // import path -> the import paths it imports
}

// listDeps runs go list -deps -test on pattern: every package the matched
// packages and their tests need, each with its direct imports.
func listDeps(t *testing.T, pattern string) graph {
	t.Helper()
	// go test puts its own GOROOT/bin first on the PATH of the tests it runs.
	goCmd, err := exec.LookPath("go")
	if err != nil {
		t.Skipf("no go command on PATH: %v", err)
	}
	// -e: a package that fails to load (a missing import, a syntax error) is
	// still listed with the imports it names, which are what this checks.
	cmd := exec.Command(goCmd, "list", "-e", "-deps", "-test",
		"-f", `{{.ImportPath}}{{"\t"}}{{.DepOnly}}{{"\t"}}{{join .Imports ","}}{{"\t"}}{{with .Error}}{{.Err}}{{end}}`,
		pattern)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("%s: %v\n%s", strings.Join(cmd.Args, " "), err, stderr.String())
	}
	g := graph{imports: map[string][]string{}}
	for line := range strings.SplitSeq(strings.TrimRight(string(out), "\n"), "\n") {
		f := strings.SplitN(line, "\t", 4)
		if len(f) != 4 {
			t.Fatalf("unexpected go list line %q", line)
		}
		path, depOnly, imports, loadErr := f[0], f[1] == "true", f[2], f[3]
		if imports != "" {
			g.imports[path] = strings.Split(imports, ",")
		}
		if !depOnly && !strings.HasSuffix(path, ".test") {
			g.roots = append(g.roots, path)
		}
		if loadErr != "" && !depOnly {
			t.Logf("go list: %s: %s", path, loadErr)
		}
	}
	sort.Strings(g.roots)
	return g
}

// chainsTo returns, for every package that bad accepts and the roots reach,
// the shortest import chain from a root to it, "a -> b -> c". It does not look
// inside a bad package: what matters is the edge that crosses into it.
func (g graph) chainsTo(bad func(string) bool) []string {
	parent := map[string]string{}
	seen := map[string]bool{}
	var queue, found []string
	for _, r := range g.roots {
		seen[r] = true
		queue = append(queue, r)
	}
	for len(queue) > 0 {
		p := queue[0]
		queue = queue[1:]
		if bad(p) {
			found = append(found, p)
			continue
		}
		for _, q := range g.imports[p] {
			if !seen[q] {
				seen[q] = true
				parent[q] = p
				queue = append(queue, q)
			}
		}
	}
	var chains []string
	done := map[string]bool{}
	for _, p := range found {
		var chain []string
		for q := p; q != ""; q = parent[q] {
			chain = append([]string{strings.ReplaceAll(q, module+"/", "")}, chain...)
		}
		c := strings.Join(chain, " -> ")
		if !done[c] {
			done[c] = true
			chains = append(chains, c)
		}
	}
	sort.Strings(chains)
	return chains
}
