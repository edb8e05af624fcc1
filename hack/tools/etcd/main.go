// Command etcd is etcd's own server main, built from a pinned module version so
// the local control plane does not depend on whatever etcd a distribution ships.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
