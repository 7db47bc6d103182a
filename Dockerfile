# leasehold CPU image: a multi-stage build, a small non-root runtime.
#   docker build -t leasehold-cpu .
# Handlers (the user's programs) go into /opt/leasehold/handlers: either copy
# them into handlers/ before building, or build FROM this image:
#   FROM leasehold-cpu
#   COPY --chmod=0755 reduce.sh /opt/leasehold/handlers/reduce.sh

FROM rust:1.91-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY config config
COPY src src
COPY benches benches
RUN cargo build --release --locked --bin leasehold

FROM debian:bookworm-slim
# ca-certificates for TLS to pubsub.googleapis.com; the shell and coreutils
# are there for handler scripts.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates tini \
 && rm -rf /var/lib/apt/lists/* \
 && mkdir -p /opt/leasehold/handlers
COPY --from=build /src/target/release/leasehold /usr/local/bin/leasehold
COPY examples/handlers/ /opt/leasehold/handlers/
USER 65532:65532
EXPOSE 9090
# tini reaps orphaned grandchildren of handlers and forwards SIGTERM.
ENTRYPOINT ["/usr/bin/tini", "--", "/usr/local/bin/leasehold"]
CMD ["run", "--config=/etc/leasehold/leasehold.toml"]
