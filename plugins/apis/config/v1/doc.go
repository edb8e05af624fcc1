// +k8s:deepcopy-gen=package
// +k8s:conversion-gen=github.com/capstan-dev/capstan/plugins/apis/config
// +k8s:defaulter-gen=TypeMeta
// +groupName=kubescheduler.config.k8s.io

// Package v1 is the versioned form of the arguments of Capstan's scheduler
// plugins, as written in a KubeSchedulerConfiguration:
//
//	pluginConfig:
//	- name: ModelSlots
//	  args:
//	    defaultNodeSlots: 0
//	    scoringStrategy: Pack
//
// Every field is a pointer so that "unset" (defaulted) differs from an
// explicit zero. The types join kube-scheduler's kubescheduler.config.k8s.io/v1
// group, so the args need no apiVersion or kind of their own.
package v1

//go:generate go run k8s.io/code-generator/cmd/deepcopy-gen@v0.37.1 --output-file zz_generated.deepcopy.go --go-header-file ../../boilerplate.go.txt .
//go:generate go run k8s.io/code-generator/cmd/defaulter-gen@v0.37.1 --output-file zz_generated.defaults.go --go-header-file ../../boilerplate.go.txt .
//go:generate go run k8s.io/code-generator/cmd/conversion-gen@v0.37.1 --output-file zz_generated.conversion.go --go-header-file ../../boilerplate.go.txt .
