# The mqtt-sink daemon as a container image.
#
#   docker build -t mqtt-sink .
#   docker run --rm -v "$PWD/sink.toml:/etc/mqtt-sink/sink.toml:ro" -p 9464:9464 mqtt-sink
#
# Runs as a non-root user (65532), `mqtt-sink run` with the config at $MQTT_SINK_CONFIG
# (/etc/mqtt-sink/sink.toml; any key can also be set by MQTT_SINK_<SECTION>_<KEY>), the
# metrics and health endpoints on 0.0.0.0:9464, and a HEALTHCHECK on /healthz
# (`mqtt-sink health`: the runtime image has no shell and no curl).
#
# The base images are build arguments. BUILDER_IMAGE may instead be an image that already
# holds the binary at /out/mqtt-sink (and a POSIX shell): then nothing is compiled. CI does
# this where no registry is reachable (testkit/images/build.sh mqtt-sink; README,
# "Container image"), so that it builds and runs this same file.
ARG BUILDER_IMAGE=docker.io/library/rust:1.95-bookworm
ARG RUNTIME_IMAGE=gcr.io/distroless/cc-debian12:nonroot

FROM ${BUILDER_IMAGE} AS build
WORKDIR /src
COPY . .
# librdkafka is built from source (rdkafka-sys): the rust image has gcc, make, perl,
# pkg-config and the OpenSSL headers; zlib is linked statically.
RUN if [ -x /out/mqtt-sink ]; then echo "prebuilt /out/mqtt-sink: nothing to compile"; \
    else cargo build --release --locked -p mqtt-sink-cli --bin mqtt-sink \
      && install -D -m 0755 target/release/mqtt-sink /out/mqtt-sink; fi

FROM ${RUNTIME_IMAGE}
COPY --from=build /out/mqtt-sink /usr/local/bin/mqtt-sink
# distroless "nonroot"; numeric, so that Kubernetes' runAsNonRoot can check it.
USER 65532:65532
ENV MQTT_SINK_CONFIG=/etc/mqtt-sink/sink.toml \
    MQTT_SINK_HTTP_LISTEN=0.0.0.0:9464
EXPOSE 9464
HEALTHCHECK --interval=10s --timeout=5s --start-period=20s --retries=3 \
    CMD ["/usr/local/bin/mqtt-sink", "health"]
ENTRYPOINT ["/usr/local/bin/mqtt-sink"]
CMD ["run"]
