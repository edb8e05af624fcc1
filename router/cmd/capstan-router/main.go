// Command capstan-router routes OpenAI-style requests to Ready model-server endpoints.
package main

import (
	_ "github.com/prometheus/client_golang/prometheus"
	_ "sigs.k8s.io/gateway-api/pkg/client/clientset/versioned"
)

func main() {}
