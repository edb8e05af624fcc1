// +k8s:deepcopy-gen=package
// +groupName=kubescheduler.config.k8s.io

// Package config holds the internal form of the arguments of Capstan's
// scheduler plugins: plain values, already defaulted, as a plugin's New
// receives them. Users write the versioned form in package v1 inside a
// KubeSchedulerConfiguration's pluginConfig.
//
// The generated files are refreshed with `go generate ./plugins/apis/...`.
package config

//go:generate go run k8s.io/code-generator/cmd/deepcopy-gen@v0.37.1 --output-file zz_generated.deepcopy.go --go-header-file ../boilerplate.go.txt .
