#!/usr/bin/env bash
# Builds the local container images the container suite uses where no registry is reachable:
# a root filesystem holding a binary, the shared libraries `ldd` lists for it and a few
# files it needs, turned into an image with `docker import`.
#
#   testkit/images/build.sh mosquitto [TAG]   # from the Debian package's files (default tag mqtt-sink-test/mosquitto:local)
#   testkit/images/build.sh tansu [TAG]       # from a tansu binary on PATH or $TANSU_BIN (default tag mqtt-sink-test/tansu:local)
#   testkit/images/build.sh runtime-base BIN [TAG]
#       # a stand-in for gcr.io/distroless/cc-debian12:nonroot (the Dockerfile's RUNTIME_IMAGE):
#       # the shared libraries BIN needs, the CA bundle, users root and nonroot (65532), no
#       # shell (default tag mqtt-sink-test/runtime-base:local)
#   testkit/images/build.sh prebuilt BIN [TAG]
#       # BIN at /out/mqtt-sink and a shell, for the Dockerfile's BUILDER_IMAGE (its build
#       # step then compiles nothing; default tag mqtt-sink-test/prebuilt:local)
#   testkit/images/build.sh mqtt-sink BIN [TAG]
#       # the project's image from the root Dockerfile with those two bases (the legacy
#       # builder: this Docker has no buildx; default tag mqtt-sink-test/mqtt-sink:local)
#
# Prints the tag it built. Users with a registry do not need this: the suite's defaults are
# the public images (see README, "Container suite"), and the Dockerfile's defaults the
# public rust and distroless images.
set -euo pipefail

what=${1:?usage: build.sh mosquitto|tansu|runtime-base|prebuilt|mqtt-sink [BIN] [TAG]}
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT

copy_with_libs() { # binary path inside the image = same path as on the host
  local bin=$1
  mkdir -p "$root$(dirname "$bin")"
  cp -L "$bin" "$root$bin"
  ldd "$bin" | awk '/=> \//{print $3} /^[ \t]*\//{print $1}' | while read -r lib; do
    mkdir -p "$root$(dirname "$lib")"
    cp -L "$lib" "$root$lib"
  done
}

base_files() {
  mkdir -p "$root/etc" "$root/tmp" "$root/data"
  chmod 1777 "$root/tmp" "$root/data"
  printf 'root:x:0:0:root:/root:/bin/sh\nmosquitto:x:1883:1883::/data:/bin/false\nnobody:x:65534:65534::/:/bin/false\n' > "$root/etc/passwd"
  printf 'root:x:0:\nmosquitto:x:1883:\nnogroup:x:65534:\n' > "$root/etc/group"
  echo 'hosts: files dns' > "$root/etc/nsswitch.conf"
  printf '127.0.0.1 localhost\n' > "$root/etc/hosts"
}

case "$what" in
  mosquitto)
    tag=${2:-mqtt-sink-test/mosquitto:local}
    bin=$(command -v mosquitto || echo /usr/sbin/mosquitto)
    [ -x "$bin" ] || { echo "build.sh: mosquitto not installed (apt-get install mosquitto)" >&2; exit 2; }
    base_files
    copy_with_libs "$bin"
    mkdir -p "$root/mosquitto/config"
    # The public eclipse-mosquitto image reads /mosquitto/config/mosquitto.conf; so does this.
    printf 'listener 1883 0.0.0.0\nallow_anonymous true\nlog_dest stderr\nlog_type all\nmax_queued_messages 0\npersistence true\npersistence_location /data/\n' \
      > "$root/mosquitto/config/mosquitto.conf"
    tar -C "$root" -c . | docker import \
      -c "CMD [\"$bin\", \"-c\", \"/mosquitto/config/mosquitto.conf\"]" \
      -c 'EXPOSE 1883' - "$tag" >/dev/null
    ;;
  tansu)
    tag=${2:-mqtt-sink-test/tansu:local}
    bin=${TANSU_BIN:-$(command -v tansu || echo "$HOME/.cargo/bin/tansu")}
    [ -x "$bin" ] || { echo "build.sh: no tansu binary (cargo install tansu --version 0.6.0 --features libsql)" >&2; exit 2; }
    base_files
    mkdir -p "$root/usr/local/bin"
    cp -L "$bin" "$root/usr/local/bin/tansu"
    ldd "$bin" | awk '/=> \//{print $3} /^[ \t]*\//{print $1}' | while read -r lib; do
      mkdir -p "$root$(dirname "$lib")"; cp -L "$lib" "$root$lib"
    done
    mkdir -p "$root/etc/ssl/certs"
    tar -C "$root" -c . | docker import \
      -c 'ENTRYPOINT ["/usr/local/bin/tansu"]' -c 'EXPOSE 9092' - "$tag" >/dev/null
    ;;
  runtime-base)
    bin=${2:?usage: build.sh runtime-base BINARY [TAG]}
    tag=${3:-mqtt-sink-test/runtime-base:local}
    mkdir -p "$root/etc/ssl/certs" "$root/tmp" "$root/home/nonroot"
    chmod 1777 "$root/tmp"
    chown 65532:65532 "$root/home/nonroot"
    printf 'root:x:0:0:root:/root:/sbin/nologin\nnobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n' > "$root/etc/passwd"
    printf 'root:x:0:\nnobody:x:65534:\nnonroot:x:65532:\n' > "$root/etc/group"
    echo 'hosts: files dns' > "$root/etc/nsswitch.conf"
    cp -L /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/ca-certificates.crt"
    ldd "$bin" | awk '/=> \//{print $3} /^[ \t]*\//{print $1}' | while read -r lib; do
      mkdir -p "$root$(dirname "$lib")"; cp -L "$lib" "$root$lib"
    done
    # No USER here: the image under test must get its user from the Dockerfile.
    tar -C "$root" -c . | docker import - "$tag" >/dev/null
    ;;
  prebuilt)
    bin=${2:?usage: build.sh prebuilt BINARY [TAG]}
    tag=${3:-mqtt-sink-test/prebuilt:local}
    install -D -m 0755 "$bin" "$root/out/mqtt-sink"
    copy_with_libs "$(readlink -f /bin/sh)"
    mkdir -p "$root/bin" "$root/tmp"
    ln -sf "$(readlink -f /bin/sh)" "$root/bin/sh"
    tar -C "$root" -c . | docker import - "$tag" >/dev/null
    ;;
  mqtt-sink)
    bin=${2:?usage: build.sh mqtt-sink BINARY [TAG]}
    tag=${3:-mqtt-sink-test/mqtt-sink:local}
    here=$(cd "$(dirname "$0")" && pwd)
    base=$("$here/build.sh" runtime-base "$bin")
    prebuilt=$("$here/build.sh" prebuilt "$bin")
    DOCKER_BUILDKIT=0 docker build -q --build-arg BUILDER_IMAGE="$prebuilt" \
      --build-arg RUNTIME_IMAGE="$base" -t "$tag" "$here/../.." >/dev/null
    ;;
  *) echo "build.sh: unknown image '$what' (mosquitto, tansu, runtime-base, prebuilt or mqtt-sink)" >&2; exit 2 ;;
esac
echo "$tag"
