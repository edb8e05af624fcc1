# One Dockerfile for Capstan's three binaries:
#   docker build --build-arg CMD=router/cmd/capstan-router -t ghcr.io/capstan-dev/capstan-router:v0.1.0 .
# (make images builds all three). The result is a static binary on distroless,
# running as the non-root user 65532.

FROM golang:1.26 AS build
WORKDIR /src
# Dependencies first, so source edits do not re-download modules.
COPY go.mod go.sum ./
RUN go mod download
COPY . .
ARG CMD
ARG VERSION=dev
RUN test -n "${CMD}" || (echo "set --build-arg CMD=<component>/cmd/<binary>" >&2; exit 1)
RUN CGO_ENABLED=0 go build -trimpath \
      -ldflags="-s -w -X k8s.io/component-base/version.gitVersion=${VERSION}" \
      -o /out/app "./${CMD}"

FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /out/app /capstan
USER 65532:65532
ENTRYPOINT ["/capstan"]
