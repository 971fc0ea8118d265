#!/usr/bin/env bash
# Runs the at-least-once process suite (cli/tests/faults.rs) on chosen backends.
#
#   testkit/run-suite.sh                 # MockCluster + a Mosquitto process (as `cargo test` does)
#   testkit/run-suite.sh --tansu         # Kafka: a Tansu 0.6 process (sqlite storage)
#   testkit/run-suite.sh --containers    # Kafka and MQTT in containers (testcontainers),
#                                        # public images: eclipse-mosquitto, apache/kafka
#   testkit/run-suite.sh --containers --local-images
#                                        # the same with images built here by
#                                        # testkit/images/build.sh (no registry needed)
#   testkit/run-suite.sh --long ...      # 1,000,000 records per scenario (release build)
#
# Backends can also be named directly (see testkit/src/backend.rs):
#   TESTKIT_MQTT=external TESTKIT_MQTT_ADDR=host:1883 \
#   TESTKIT_KAFKA=external TESTKIT_KAFKA_BOOTSTRAP=host:9092 testkit/run-suite.sh
# Extra arguments after `--` go to the test binary (e.g. a test name filter).
set -euo pipefail
cd "$(dirname "$0")/.."

profile=()
local_images=0
while [ $# -gt 0 ]; do
  case "$1" in
    --tansu) export TESTKIT_KAFKA=tansu ;;
    --containers)
      export TESTKIT_MQTT=container TESTKIT_KAFKA=container ;;
    --local-images) local_images=1 ;;
    --long)
      export TESTKIT_RECORDS=${TESTKIT_RECORDS:-1000000}
      profile=(--release) ;;
    --) shift; break ;;
    *) echo "run-suite.sh: unknown option $1" >&2; exit 2 ;;
  esac
  shift
done

if [ "$local_images" = 1 ]; then
  if docker info >/dev/null 2>&1; then
    export TESTKIT_MOSQUITTO_IMAGE=${TESTKIT_MOSQUITTO_IMAGE:-$(testkit/images/build.sh mosquitto)}
    export TESTKIT_KAFKA_IMAGE=${TESTKIT_KAFKA_IMAGE:-$(testkit/images/build.sh tansu)}
  else
    echo "run-suite.sh: no Docker engine answers; the container tests will say they skipped" >&2
  fi
fi

echo "suite: kafka=${TESTKIT_KAFKA:-mock} mqtt=${TESTKIT_MQTT:-mosquitto}" \
  "records=${TESTKIT_RECORDS:-default}" \
  "images=${TESTKIT_MOSQUITTO_IMAGE:-default},${TESTKIT_KAFKA_IMAGE:-default}"
cargo test "${profile[@]}" -p mqtt-sink-cli --test faults -- --nocapture "$@"
