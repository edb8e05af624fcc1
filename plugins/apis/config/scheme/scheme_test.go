package scheme

import (
	"bytes"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
	"k8s.io/apimachinery/pkg/runtime"
	schedconfig "k8s.io/kubernetes/pkg/scheduler/apis/config"
	schedv1 "k8s.io/kubernetes/pkg/scheduler/apis/config/v1"

	"github.com/capstan-dev/capstan/plugins/apis/config"
)

const header = `apiVersion: kubescheduler.config.k8s.io/v1
kind: KubeSchedulerConfiguration
profiles:
- schedulerName: capstan-scheduler
  plugins:
    multiPoint:
      enabled:
      - name: ModelSlots
`

// Real KubeSchedulerConfiguration files decode into defaulted internal args,
// through kube-scheduler's own decoder.
func TestDecodeModelSlotsArgs(t *testing.T) {
	defaults := &config.ModelSlotsArgs{NodeSlotsLabel: "capstan.dev/model-slots", ScoringStrategy: config.Pack}
	tests := []struct {
		name    string
		yaml    string
		want    *config.ModelSlotsArgs
		wantErr string
	}{
		{
			name: "plugin enabled without pluginConfig gets defaults",
			yaml: header,
			want: defaults,
		},
		{
			name: "empty args get defaults",
			yaml: header + `  pluginConfig:
  - name: ModelSlots
    args: {}
`,
			want: defaults,
		},
		{
			name: "every field",
			yaml: header + `  pluginConfig:
  - name: ModelSlots
    args:
      defaultNodeSlots: 1
      maxReplicasPerNode: 2
      scoringStrategy: Spread
      slotResource:
        name: nvidia.com/gpu
        perSlot: 2
`,
			want: &config.ModelSlotsArgs{NodeSlotsLabel: "capstan.dev/model-slots", DefaultNodeSlots: 1, MaxReplicasPerNode: 2, ScoringStrategy: config.Spread,
				SlotResource: &config.SlotResource{Name: "nvidia.com/gpu", PerSlot: 2}},
		},
		{
			name: "slot resource gets one unit per slot",
			yaml: header + `  pluginConfig:
  - name: ModelSlots
    args:
      slotResource: {name: nvidia.com/gpu}
`,
			want: &config.ModelSlotsArgs{NodeSlotsLabel: "capstan.dev/model-slots", ScoringStrategy: config.Pack, SlotResource: &config.SlotResource{Name: "nvidia.com/gpu", PerSlot: 1}},
		},
		{
			name: "explicit zero and invalid values are kept for validation",
			yaml: header + `  pluginConfig:
  - name: ModelSlots
    args:
      defaultNodeSlots: -4
      scoringStrategy: ""
`,
			want: &config.ModelSlotsArgs{NodeSlotsLabel: "capstan.dev/model-slots", DefaultNodeSlots: -4, ScoringStrategy: ""},
		},
		{
			name: "apiVersion and kind may be given",
			yaml: header + `  pluginConfig:
  - name: ModelSlots
    args:
      apiVersion: kubescheduler.config.k8s.io/v1
      kind: ModelSlotsArgs
      maxReplicasPerNode: 1
`,
			want: &config.ModelSlotsArgs{NodeSlotsLabel: "capstan.dev/model-slots", MaxReplicasPerNode: 1, ScoringStrategy: config.Pack},
		},
		{
			name: "unknown field is an error",
			yaml: header + `  pluginConfig:
  - name: ModelSlots
    args:
      defaultNodeSlot: 1
`,
			wantErr: `decoding args for plugin ModelSlots: strict decoding error: unknown field "defaultNodeSlot"`,
		},
		{
			name: "wrong type is an error",
			yaml: header + `  pluginConfig:
  - name: ModelSlots
    args:
      defaultNodeSlots: two
`,
			wantErr: "decoding args for plugin ModelSlots",
		},
		{
			name: "args of another kind are an error",
			yaml: header + `  pluginConfig:
  - name: ModelSlots
    args:
      apiVersion: kubescheduler.config.k8s.io/v1
      kind: NodeResourcesFitArgs
`,
			wantErr: "args for plugin ModelSlots were not of type ModelSlotsArgs.kubescheduler.config.k8s.io, got NodeResourcesFitArgs.kubescheduler.config.k8s.io",
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			obj, _, err := Codecs.UniversalDecoder().Decode([]byte(tc.yaml), nil, nil)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("decoding: got error %v, want one containing %q", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			cfg, ok := obj.(*schedconfig.KubeSchedulerConfiguration)
			if !ok {
				t.Fatalf("decoded a %T", obj)
			}
			if diff := cmp.Diff(tc.want, modelSlotsArgs(t, cfg)); diff != "" {
				t.Errorf("ModelSlots args (-want +got):\n%s", diff)
			}
		})
	}
}

// kube-scheduler prints its effective configuration (--write-config-to, and
// in its logs) by encoding back to v1: the args must survive the round trip.
func TestEncodeModelSlotsArgs(t *testing.T) {
	obj, _, err := Codecs.UniversalDecoder().Decode([]byte(header+`  pluginConfig:
  - name: ModelSlots
    args:
      scoringStrategy: Spread
      slotResource: {name: nvidia.com/gpu, perSlot: 4}
`), nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	info, ok := runtime.SerializerInfoForMediaType(Codecs.SupportedMediaTypes(), runtime.ContentTypeYAML)
	if !ok {
		t.Fatal("no YAML serializer")
	}
	var buf bytes.Buffer
	if err := Codecs.EncoderForVersion(info.Serializer, schedv1.SchemeGroupVersion).Encode(obj, &buf); err != nil {
		t.Fatal(err)
	}
	want := `  - args:
      apiVersion: kubescheduler.config.k8s.io/v1
      defaultNodeSlots: 0
      kind: ModelSlotsArgs
      maxReplicasPerNode: 0
      nodeSlotsLabel: capstan.dev/model-slots
      scoringStrategy: Spread
      slotResource:
        name: nvidia.com/gpu
        perSlot: 4
    name: ModelSlots
`
	if !strings.Contains(buf.String(), want) {
		t.Errorf("encoded configuration lacks\n%s\ngot:\n%s", want, buf.String())
	}
	// And the encoded form decodes to the same args.
	again, _, err := Codecs.UniversalDecoder().Decode(buf.Bytes(), nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(modelSlotsArgs(t, obj.(*schedconfig.KubeSchedulerConfiguration)),
		modelSlotsArgs(t, again.(*schedconfig.KubeSchedulerConfiguration))); diff != "" {
		t.Errorf("args after a round trip (-before +after):\n%s", diff)
	}
}

func modelSlotsArgs(t *testing.T, cfg *schedconfig.KubeSchedulerConfiguration) *config.ModelSlotsArgs {
	t.Helper()
	for _, p := range cfg.Profiles[0].PluginConfig {
		if p.Name == "ModelSlots" {
			args, ok := p.Args.(*config.ModelSlotsArgs)
			if !ok {
				t.Fatalf("ModelSlots args are a %T", p.Args)
			}
			return args
		}
	}
	t.Fatal("no ModelSlots pluginConfig")
	return nil
}
