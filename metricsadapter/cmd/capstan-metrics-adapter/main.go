// Command capstan-metrics-adapter serves custom.metrics.k8s.io for inference servers.
package main

import (
	basecmd "sigs.k8s.io/custom-metrics-apiserver/pkg/cmd"
)

func main() {
	a := &basecmd.AdapterBase{Name: "capstan-metrics-adapter"}
	_ = a
}
