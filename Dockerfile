# Multi-stage build: compile in the Rust image, run from a slim Debian as a non-root user.
FROM rust:1-bookworm AS builder
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY conf ./conf
RUN cargo build --release --locked && strip target/release/sluice

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin sluice
COPY --from=builder /src/target/release/sluice /usr/local/bin/sluice
COPY --from=builder /src/conf /etc/sluice
USER sluice
# 443 is privileged: run with CAP_NET_BIND_SERVICE (Kubernetes: securityContext.capabilities
# add NET_BIND_SERVICE) or map a high port.
EXPOSE 443 9901
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/sluice"]
CMD ["run", "--config", "/etc/sluice/sluice.toml"]
