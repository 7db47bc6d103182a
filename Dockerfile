# syntax=docker/dockerfile:1
# leasehold CPU image: built and run on Debian bookworm (the build's glibc
# is the runtime's), a small non-root runtime.
#   docker build --platform linux/amd64 -t leasehold-cpu .
# Handlers (the user's programs) go into /opt/leasehold/handlers: either copy
# them into examples/handlers/ before building, or build FROM this image:
#   FROM leasehold-cpu
#   COPY --chmod=0755 reduce.sh /opt/leasehold/handlers/reduce.sh

FROM rust:1.91-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY config config
COPY src src
COPY benches benches
# BuildKit cache mounts keep the crate registry and compiled dependencies
# between builds: a change to src/ recompiles leasehold alone.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin leasehold \
 && cp target/release/leasehold /usr/local/bin/leasehold
# The newest glibc symbol version the binary needs, checked in the runtime stage.
RUN objdump -T /usr/local/bin/leasehold | grep -o 'GLIBC_[0-9.]*' | sort -Vu | tail -n 1 > /glibc-needed

FROM debian:bookworm-slim
# ca-certificates for TLS to pubsub.googleapis.com; the shell and coreutils
# are there for handler scripts.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates tini \
 && rm -rf /var/lib/apt/lists/* \
 && mkdir -p /opt/leasehold/handlers
COPY --from=build /usr/local/bin/leasehold /usr/local/bin/leasehold
COPY --from=build /glibc-needed /usr/share/leasehold/glibc-needed
# Fail the build, not the pod, if the runtime's glibc is older than the
# binary needs; and the binary must start here.
RUN need=$(sed 's/GLIBC_//' /usr/share/leasehold/glibc-needed) \
 && have=$(ldd --version | head -n 1 | grep -o '[0-9.]*$') \
 && echo "glibc: binary needs $need, image has $have" \
 && [ "$(printf '%s\n%s\n' "$need" "$have" | sort -V | tail -n 1)" = "$have" ] \
 && /usr/local/bin/leasehold --version
COPY examples/handlers/ /opt/leasehold/handlers/
# The default command's configuration (the CPU pool's); on GKE the
# Deployment mounts its ConfigMaps over these two directories.
COPY manifests/base/leasehold.toml /etc/leasehold/base/leasehold.toml
COPY manifests/pools/cpu/pool.toml /etc/leasehold/pool/pool.toml
USER 65532:65532
ENV HOME=/tmp
EXPOSE 9090
# tini reaps orphaned grandchildren of handlers and forwards SIGTERM.
ENTRYPOINT ["/usr/bin/tini", "--", "/usr/local/bin/leasehold"]
CMD ["run", "--config=/etc/leasehold/base/leasehold.toml", "--config=/etc/leasehold/pool/pool.toml"]
