# One image for every part: `characterbot api`, `characterbot worker persona|chat`, or
# `characterbot serve` (everything in one process on the embedded backend, data in /data).
#
#   docker build -t characterbot .
#   docker run -p 8080:8080 -v characterbot-data:/data characterbot        # embedded, no cloud
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin characterbot \
    && cp target/release/characterbot /usr/local/bin/characterbot

FROM debian:bookworm-slim
# The AWS SDK and the OpenAI client verify TLS against the system's trust store.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home-dir /data characterbot \
    && mkdir /data && chown characterbot /data
COPY --from=build /usr/local/bin/characterbot /usr/local/bin/characterbot
USER 10001
ENV CHARACTERBOT_LISTEN=0.0.0.0:8080 \
    CHARACTERBOT_LOG_FORMAT=json \
    CHARACTERBOT_DATA_DIR=/data
EXPOSE 8080
VOLUME /data
ENTRYPOINT ["characterbot"]
CMD ["serve"]
