# Multi-stage build: compile against Debian's libav, run on a slim image with only the
# runtime libraries, as a non-root user.
FROM rust:1-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends \
      pkg-config clang libclang-dev libavcodec-dev libavformat-dev libavutil-dev \
      libswscale-dev libswresample-dev libavfilter-dev libavdevice-dev libturbojpeg0-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin free-roam && cp target/release/free-roam /free-roam

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends \
      ca-certificates curl libavcodec59 libavformat59 libavutil57 libswscale6 \
      libswresample4 libavfilter8 libavdevice59 libturbojpeg0 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --create-home --home-dir /app free-roam
COPY --from=build /free-roam /usr/local/bin/free-roam
USER free-roam
WORKDIR /app
ENV HOST=0.0.0.0 PORT=8000 LOG_FORMAT=json DATABASE_URL=sqlite:///app/data/free-roam.db?mode=rwc
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
  CMD curl -fsS http://127.0.0.1:8000/health/live || exit 1
ENTRYPOINT ["free-roam"]
CMD ["serve"]
