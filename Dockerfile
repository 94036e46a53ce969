# syntax=docker/dockerfile:1
# The carerecord broker as a container: built from source, run as a non-root user from a small
# Debian image. The product binary only: no mock region, no load generator.
#
#   docker build -t carerecord:0.1.0 .
#   docker run --rm -p 50051:50051 -p 9090:9090 \
#     -v $PWD/broker.toml:/etc/carerecord/broker.toml:ro \
#     -v carerecord-audit:/var/lib/carerecord/audit carerecord:0.1.0
#
# Kubernetes manifests using this image: deploy/kubernetes/ (see OPERATIONS.md).

# The toolchain CI builds with (rust-toolchain: stable 1.95).
FROM rust:1.95-bookworm AS build
WORKDIR /src
# No system protoc is needed: the .proto files are compiled in-process (protox).
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p carerecord-broker --bin carerecord \
    && install -D -m 0755 target/release/carerecord /out/carerecord

FROM debian:bookworm-slim
# CA roots for sources on public PKI; tini reaps and forwards SIGTERM so the broker drains.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates tini \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 carerecord \
    && useradd --system --uid 10001 --gid carerecord --home-dir /nonexistent --shell /usr/sbin/nologin carerecord \
    && install -d -o carerecord -g carerecord -m 0750 /var/lib/carerecord/audit \
    && install -d -m 0755 /etc/carerecord
COPY --from=build /out/carerecord /usr/local/bin/carerecord
USER 10001:10001
# The configuration (read-only) and the audit trail (must persist, one trail per instance).
VOLUME ["/etc/carerecord", "/var/lib/carerecord/audit"]
# gRPC, the ops listener (probes and metrics), the FHIR face.
EXPOSE 50051 9090 8443
ENTRYPOINT ["/usr/bin/tini", "--", "/usr/local/bin/carerecord"]
CMD ["serve", "--config", "/etc/carerecord/broker.toml", "--log-format", "json"]
