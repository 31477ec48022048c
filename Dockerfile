# nixcached container image.
#
#   docker build -t nixcached .
#   docker run --rm -p 38380:38380 -v /srv/cache:/cache:ro nixcached serve --host 0.0.0.0 file:///cache
#
# Without arguments the container runs `nixcached serve --host 0.0.0.0`, which serves an
# (empty) cache folder under /var/lib/nixcached; name a store to serve something useful.
# scripts/docker-check builds the runtime stage with a binary built outside and serves a
# cache from it, on machines that cannot pull base images.

# --- build: the release binary, with the official Rust image --------------------------------
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
# --locked: the image gets exactly the dependency versions the repository was tested with.
RUN cargo build --release --locked --bin nixcached \
 && install -D -m 0755 target/release/nixcached /out/nixcached

# --- runtime: Debian slim, the binary, and what the stores need at run time ------------------
FROM debian:bookworm-slim AS runtime
# ca-certificates: TLS to S3, GCS and upstream caches. openssh-client: ssh:// stores run the
# system ssh. The image is otherwise bare: nixcached serialises NARs in-process.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates openssh-client \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 nixcached \
 && useradd --system --uid 10001 --gid 10001 --create-home \
        --home-dir /var/lib/nixcached --shell /usr/sbin/nologin nixcached \
 && chmod 1777 /tmp
# HOME holds the default cache folder (~/.cache) and upload's queue (~/.local/state); mount a
# volume there, or pass --state-dir and a store URL, to keep them.
ENV HOME=/var/lib/nixcached
WORKDIR /var/lib/nixcached
COPY --from=build /out/nixcached /usr/local/bin/nixcached
# Numeric, so that runtimes can tell it is not root (Kubernetes runAsNonRoot).
USER 10001:10001
EXPOSE 38380
ENTRYPOINT ["nixcached"]
CMD ["serve", "--host", "0.0.0.0"]
