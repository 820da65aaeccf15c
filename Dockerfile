# syntax=docker/dockerfile:1
# Multi-stage build: compile in the Rust image, run from distroless as a numeric non-root user.
# The build context is the repository root; .dockerignore keeps target/ and .git out of it.
FROM rust:1-bookworm AS builder
# etcd-client's gRPC code is generated at build time by protoc. Not pinned: bookworm's
# security updates replace the version, and a pin would break the build when they do.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends protobuf-compiler \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# The whole workspace: cargo loads every member's manifest (crates/, bench/) before it builds one.
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY crates ./crates
COPY bench ./bench
COPY conf ./conf
# The registry and target/ are BuildKit cache mounts: a rebuild after a source change
# recompiles sluice, not its dependencies.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --package sluice --bin sluice \
 && strip -o /sluice target/release/sluice

# The runtime needs no shell and no package manager: glibc, libgcc and CA certificates only
# (distroless). The preStop wait of the manifests is `sluice sleep`, not /bin/sleep.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=builder /sluice /usr/local/bin/sluice
COPY --from=builder /src/conf /etc/sluice
# A numeric user (the image has no /etc/passwd entry for it, and needs none): the kubelet
# can only enforce runAsNonRoot on a numeric image user.
USER 10001:10001
# 443 is privileged: run with CAP_NET_BIND_SERVICE (Kubernetes: securityContext.capabilities
# add NET_BIND_SERVICE) or map a high port.
EXPOSE 443 9901
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/sluice"]
CMD ["run", "--config", "/etc/sluice/sluice.toml"]
