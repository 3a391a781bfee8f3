# A dynakv node, built from source (docs/DEPLOYMENT.md).
#   docker build -t dynakv .
#   docker run -p 8098:8098 -p 9098:9098 -p 8087:8087 -v dynakv-data:/var/lib/dynakv dynakv \
#       server --name n1 --http 0.0.0.0:8098 --peer 0.0.0.0:9098 --pb 0.0.0.0:8087 \
#       --data-dir /var/lib/dynakv
# A client port on 0.0.0.0 needs the cluster's security enabled (or --insecure, for a trial).
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p dynakv \
    && install -m 0755 target/release/dynakv /usr/local/bin/dynakv

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --home-dir /var/lib/dynakv --create-home dynakv \
    && chmod 0700 /var/lib/dynakv
COPY --from=build /usr/local/bin/dynakv /usr/local/bin/dynakv
USER dynakv
VOLUME /var/lib/dynakv
# Client HTTP, peer transport, Riak PB.
EXPOSE 8098 9098 8087
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/dynakv", "--log-format", "json"]
CMD ["server", "--name", "n1", "--http", "127.0.0.1:8098", "--peer", "127.0.0.1:9098", "--data-dir", "/var/lib/dynakv"]
