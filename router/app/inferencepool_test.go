package app

import (
	"errors"
	"testing"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	fakediscovery "k8s.io/client-go/discovery/fake"
	"k8s.io/client-go/kubernetes/fake"
	clienttesting "k8s.io/client-go/testing"
)

// The router follows InferencePools only when discovery serves them; a
// cluster without the CRD is not an error, a failing discovery is.
func TestInferencePoolsServed(t *testing.T) {
	for name, tc := range map[string]struct {
		resources []*metav1.APIResourceList
		fail      bool
		want      bool
		wantErr   bool
	}{
		"served": {resources: []*metav1.APIResourceList{{GroupVersion: "inference.networking.k8s.io/v1",
			APIResources: []metav1.APIResource{{Name: "inferencepools"}, {Name: "inferencepools/status"}}}}, want: true},
		"no CRD":                  {resources: []*metav1.APIResourceList{{GroupVersion: "v1", APIResources: []metav1.APIResource{{Name: "pods"}}}}},
		"the group without pools": {resources: []*metav1.APIResourceList{{GroupVersion: "inference.networking.k8s.io/v1"}}},
		"discovery fails":         {fail: true, wantErr: true},
	} {
		t.Run(name, func(t *testing.T) {
			client := fake.NewClientset()
			d := client.Discovery().(*fakediscovery.FakeDiscovery)
			d.Resources = tc.resources
			if tc.fail {
				d.PrependReactor("get", "resource", func(clienttesting.Action) (bool, runtime.Object, error) {
					return true, nil, errors.New("connection refused")
				})
			}
			got, err := inferencePoolsServed(client)
			if got != tc.want || (err != nil) != tc.wantErr {
				t.Errorf("inferencePoolsServed = %v, %v; want %v, error %v", got, err, tc.want, tc.wantErr)
			}
		})
	}
}
