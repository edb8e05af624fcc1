package cluster

import (
	"context"
	"fmt"
	"path/filepath"

	authenticationv1 "k8s.io/api/authentication/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"
)

// ServiceAccountKubeconfig writes a kubeconfig that authenticates as the
// ServiceAccount (with a token from the TokenRequest API), so a component
// under test runs with exactly the permissions its RBAC manifests grant.
func (c *Cluster) ServiceAccountKubeconfig(ctx context.Context, namespace, name string) (string, error) {
	expiry := int64(24 * 3600)
	tr, err := c.Client.CoreV1().ServiceAccounts(namespace).CreateToken(ctx, name,
		&authenticationv1.TokenRequest{Spec: authenticationv1.TokenRequestSpec{ExpirationSeconds: &expiry}}, metav1.CreateOptions{})
	if err != nil {
		return "", fmt.Errorf("requesting a token for ServiceAccount %s/%s: %w", namespace, name, err)
	}
	kc := clientcmdapi.NewConfig()
	kc.Clusters["capstan"] = &clientcmdapi.Cluster{Server: c.APIServerURL, CertificateAuthority: c.CAFile}
	kc.AuthInfos[name] = &clientcmdapi.AuthInfo{Token: tr.Status.Token}
	kc.Contexts["capstan"] = &clientcmdapi.Context{Cluster: "capstan", AuthInfo: name, Namespace: namespace}
	kc.CurrentContext = "capstan"
	path := filepath.Join(c.Dir, fmt.Sprintf("kubeconfig-%s-%s", namespace, name))
	return path, clientcmd.WriteToFile(*kc, path)
}

// writeKubeconfig writes the admin kubeconfig and makes the admin clients from it.
func (c *Cluster) writeKubeconfig() error {
	p := c.pki
	kc := clientcmdapi.NewConfig()
	kc.Clusters["capstan"] = &clientcmdapi.Cluster{Server: c.APIServerURL, CertificateAuthority: p.CAFile}
	kc.AuthInfos["admin"] = &clientcmdapi.AuthInfo{ClientCertificate: p.AdminCert, ClientKey: p.AdminKey}
	kc.Contexts["capstan"] = &clientcmdapi.Context{Cluster: "capstan", AuthInfo: "admin"}
	kc.CurrentContext = "capstan"
	c.Kubeconfig = filepath.Join(c.Dir, "kubeconfig")
	if err := clientcmd.WriteToFile(*kc, c.Kubeconfig); err != nil {
		return err
	}
	cfg, err := clientcmd.BuildConfigFromFlags("", c.Kubeconfig)
	if err != nil {
		return err
	}
	// Tests create hundreds of objects at once; the client default (5 QPS)
	// would make them measure client-side throttling.
	cfg.QPS, cfg.Burst = 500, 1000
	c.RESTConfig = cfg
	c.Client, err = kubernetes.NewForConfig(cfg)
	return err
}
