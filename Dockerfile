# tokend image: a static binary on distroless, running as uid 65532 (nonroot).
#
#   docker build -t tokend .
#
# TOKEND_ADDR is set to 0.0.0.0:8080, which is not loopback, so dev mode is off
# and tokend refuses to start until TOKEND_ISSUER, TOKEND_AUDIENCE,
# TOKEND_SERVICE_KEYS and TOKEND_ADMIN_KEYS are set (see docker-compose.yml).
# There is no HEALTHCHECK: distroless has no shell or curl to run one; probe
# GET /healthz (alive) and GET /readyz (ready) from the orchestrator instead.

FROM golang:1.26-bookworm AS build
WORKDIR /src
# Modules first, so that code changes do not download them again.
COPY go.mod go.sum ./
RUN go mod download
COPY . .
RUN CGO_ENABLED=0 go build -trimpath -ldflags="-s -w" -o /out/tokend ./cmd/tokend

FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /out/tokend /tokend
USER nonroot:nonroot
ENV TOKEND_ADDR=0.0.0.0:8080
EXPOSE 8080
ENTRYPOINT ["/tokend"]
