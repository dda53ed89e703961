# tokend image: a static binary on distroless, running as uid 65532 (nonroot).
#
#   docker build -t tokend .
#
# TOKEND_ADDR is set to 0.0.0.0:8080, which is not loopback, so dev mode is off
# and tokend refuses to start until TOKEND_ISSUER, TOKEND_AUDIENCE,
# TOKEND_SERVICE_KEYS and TOKEND_ADMIN_KEYS are set (see docker-compose.yml).
# Health: distroless has no shell or curl, so the binary checks itself:
# `/tokend healthcheck` exits 0 when its own GET /readyz answers 200 (see
# docker-compose.yml); orchestrators can also probe /healthz and /readyz.

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
HEALTHCHECK --interval=5s --timeout=4s --start-period=10s CMD ["/tokend", "healthcheck"]
ENTRYPOINT ["/tokend"]
