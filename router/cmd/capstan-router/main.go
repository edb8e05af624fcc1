// Command capstan-router routes OpenAI-style requests to the Ready endpoints
// of the model they name, and serves Gateway API HTTPRoutes. See
// docs/router.md and docs/gateway.md.
package main

import (
	"fmt"
	"os"

	"github.com/spf13/cobra"
	"k8s.io/component-base/cli"
	logsapi "k8s.io/component-base/logs/api/v1"
	_ "k8s.io/component-base/logs/json/register" // --logging-format=json
	"sigs.k8s.io/controller-runtime/pkg/manager/signals"

	"github.com/capstan-dev/capstan/router/app"
)

func main() {
	os.Exit(cli.Run(newCommand()))
}

func newCommand() *cobra.Command {
	opts := app.NewOptions()
	logging := logsapi.NewLoggingConfiguration()
	cmd := &cobra.Command{
		Use:          "capstan-router",
		Short:        "An OpenAI-compatible router over the Ready EndpointSlice endpoints of labelled model Services, and a Gateway API implementation",
		SilenceUsage: true,
		Args: func(cmd *cobra.Command, args []string) error {
			if len(args) > 0 {
				return fmt.Errorf("%q does not take arguments, got %q", cmd.CommandPath(), args)
			}
			return nil
		},
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := logsapi.ValidateAndApply(logging, nil); err != nil {
				return err
			}
			if err := opts.Validate(); err != nil {
				return err
			}
			// The first SIGINT or SIGTERM starts a graceful shutdown; a
			// second exits at once.
			ctx := signals.SetupSignalHandler()
			r, err := app.New(ctx, opts)
			if err != nil {
				return err
			}
			return r.Run(ctx)
		},
	}
	opts.AddFlags(cmd.Flags())
	logsapi.AddFlags(logging, cmd.Flags())
	return cmd
}
