package cluster

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"time"
)

// authority is a self-signed CA that issues the local cluster's certificates.
type authority struct {
	cert    *x509.Certificate
	key     crypto.Signer
	certPEM []byte
}

func newAuthority(commonName string) (*authority, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	tmpl := &x509.Certificate{
		SerialNumber:          serial(),
		Subject:               pkix.Name{CommonName: commonName},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(365 * 24 * time.Hour),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature | x509.KeyUsageCRLSign,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		return nil, err
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, err
	}
	return &authority{cert: cert, key: key, certPEM: pemBlock("CERTIFICATE", der)}, nil
}

// keyPair is a PEM-encoded certificate and its private key.
type keyPair struct {
	CertPEM, KeyPEM []byte
}

// issue signs a leaf certificate. Server certificates name their hosts and IPs;
// client certificates carry the user in CN and groups in O.
func (a *authority) issue(subject pkix.Name, usage x509.ExtKeyUsage, hosts ...string) (keyPair, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return keyPair{}, err
	}
	tmpl := &x509.Certificate{
		SerialNumber: serial(),
		Subject:      subject,
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(365 * 24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment,
		ExtKeyUsage:  []x509.ExtKeyUsage{usage},
	}
	for _, h := range hosts {
		if ip := net.ParseIP(h); ip != nil {
			tmpl.IPAddresses = append(tmpl.IPAddresses, ip)
		} else {
			tmpl.DNSNames = append(tmpl.DNSNames, h)
		}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, a.cert, key.Public(), a.key)
	if err != nil {
		return keyPair{}, err
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return keyPair{}, err
	}
	return keyPair{CertPEM: pemBlock("CERTIFICATE", der), KeyPEM: pemBlock("PRIVATE KEY", keyDER)}, nil
}

// pki holds the paths of every credential the control plane is started with.
type pki struct {
	dir string

	ca, frontProxyCA *authority

	CAFile, CAKeyFile                         string
	APIServerCert, APIServerKey               string
	AdminCert, AdminKey                       string
	FrontProxyCAFile                          string
	FrontProxyClientCert, FrontProxyClientKey string
	ServiceAccountKey, ServiceAccountPub      string
}

// newPKI writes a fresh CA, front-proxy CA, serving and client certificates
// and a service-account key pair into dir. apiserverHosts are the names and
// IPs the API server's certificate is valid for.
func newPKI(dir string, apiserverHosts []string) (*pki, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	p := &pki{dir: dir}
	var err error
	if p.ca, err = newAuthority("capstan-local-ca"); err != nil {
		return nil, err
	}
	if p.frontProxyCA, err = newAuthority("capstan-local-front-proxy-ca"); err != nil {
		return nil, err
	}
	caKey, err := x509.MarshalPKCS8PrivateKey(p.ca.key)
	if err != nil {
		return nil, err
	}
	p.CAFile, err = p.write("ca.crt", p.ca.certPEM)
	if err != nil {
		return nil, err
	}
	if p.CAKeyFile, err = p.write("ca.key", pemBlock("PRIVATE KEY", caKey)); err != nil {
		return nil, err
	}
	if p.FrontProxyCAFile, err = p.write("front-proxy-ca.crt", p.frontProxyCA.certPEM); err != nil {
		return nil, err
	}

	hosts := append([]string{"127.0.0.1", "localhost", "kubernetes", "kubernetes.default",
		"kubernetes.default.svc", "kubernetes.default.svc.cluster.local"}, apiserverHosts...)
	if p.APIServerCert, p.APIServerKey, err = p.issueTo("apiserver", p.ca,
		pkix.Name{CommonName: "kube-apiserver"}, x509.ExtKeyUsageServerAuth, hosts...); err != nil {
		return nil, err
	}
	if p.AdminCert, p.AdminKey, err = p.issueTo("admin", p.ca,
		pkix.Name{CommonName: "admin", Organization: []string{"system:masters"}}, x509.ExtKeyUsageClientAuth); err != nil {
		return nil, err
	}
	if p.FrontProxyClientCert, p.FrontProxyClientKey, err = p.issueTo("front-proxy-client", p.frontProxyCA,
		pkix.Name{CommonName: "front-proxy-client"}, x509.ExtKeyUsageClientAuth); err != nil {
		return nil, err
	}

	saKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	saPriv, err := x509.MarshalPKCS8PrivateKey(saKey)
	if err != nil {
		return nil, err
	}
	saPub, err := x509.MarshalPKIXPublicKey(saKey.Public())
	if err != nil {
		return nil, err
	}
	if p.ServiceAccountKey, err = p.write("sa.key", pemBlock("PRIVATE KEY", saPriv)); err != nil {
		return nil, err
	}
	if p.ServiceAccountPub, err = p.write("sa.pub", pemBlock("PUBLIC KEY", saPub)); err != nil {
		return nil, err
	}
	return p, nil
}

func (p *pki) issueTo(name string, ca *authority, subject pkix.Name, usage x509.ExtKeyUsage, hosts ...string) (certFile, keyFile string, err error) {
	kp, err := ca.issue(subject, usage, hosts...)
	if err != nil {
		return "", "", fmt.Errorf("issuing %s certificate: %w", name, err)
	}
	if certFile, err = p.write(name+".crt", kp.CertPEM); err != nil {
		return "", "", err
	}
	keyFile, err = p.write(name+".key", kp.KeyPEM)
	return certFile, keyFile, err
}

func (p *pki) write(name string, data []byte) (string, error) {
	path := filepath.Join(p.dir, name)
	return path, os.WriteFile(path, data, 0o600)
}

func pemBlock(kind string, der []byte) []byte {
	return pem.EncodeToMemory(&pem.Block{Type: kind, Bytes: der})
}

func serial() *big.Int {
	n, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 62))
	if err != nil {
		panic(err) // crypto/rand never fails on Linux
	}
	return n
}
