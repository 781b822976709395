#!/usr/bin/env bash
# Builds the project's Docker image and runs it on a CPU host (Debian bookworm, root), with podman:
#   bash deploy/container_check.sh        (CI runs it after the tests; about 5 minutes, 22 GB of disk at peak)
#
# 1. Installs podman, runc and debootstrap if missing (and purges them again at the end).
# 2. Builds a Debian bookworm base image with debootstrap (no registry is needed), then the Dockerfile on it with
#    --build-arg BASE_IMAGE=: the image's own install steps, with pip's settings of this host passed as build
#    secrets. The CUDA base image and the GPU are not exercised.
# 3. Runs the README's `docker run` line (minus --gpus, port on loopback) through the Docker CLI against podman's
#    Docker-compatible socket, or through podman with the same flags where no Docker CLI exists, and proves:
#    /readyz within READY_WITHIN_S, classify through the published port, /metrics, the HEALTHCHECK, every process
#    of the launcher/engine/worker layout running as uid 10001 with a 1 GB /dev/shm, a read-only prompt
#    directory from the host hot-swapped when a set is published into it, and `stop -t 30` draining to exit 0.
# 4. Prints the build time, the image size and what its layers cost; removes every container, image, storage
#    directory and package it created.
set -euo pipefail  # (so no `producer | grep -q`: an early exit of grep fails the producer, and the pipeline)

REPO=$(cd "$(dirname "$0")/.." && pwd)
PORT=${PORT:-18000}
READY_WITHIN_S=${READY_WITHIN_S:-180}
WORK=$(mktemp -d /tmp/mmap-container-check.XXXXXX)
IMAGE=localhost/mmap-serve:check
BASE=localhost/debian-base:bookworm
NAME=mmap-check-$$
UID_EXPECTED=10001

log() { printf '\n== %s\n' "$*"; }
fail() { printf '\nFAIL: %s\n' "$*" >&2; exit 1; }

PODMAN=(podman --root "$WORK/storage" --runroot "$WORK/run")
SERVICE_PID=
cleanup() {
  local rc=$?
  set +e
  log "cleaning up"
  if command -v podman >/dev/null; then
    "${PODMAN[@]}" rm -f -t 0 "$NAME" >/dev/null 2>&1
    [[ -n $SERVICE_PID ]] && kill "$SERVICE_PID" 2>/dev/null && wait "$SERVICE_PID" 2>/dev/null
    "${PODMAN[@]}" system reset -f >/dev/null 2>&1
  fi
  # The conmon of an exec session (docker exec, healthcheck run) outlives its container, and as it exits it runs
  # `podman container cleanup`, which mounts the storage again: end them, then unmount, until neither is left.
  for _ in 1 2 3 4 5; do
    pkill -f -- "$WORK/" 2>/dev/null
    sleep 1
    findmnt -rn -o TARGET | grep -F "$WORK/" | sort -r | xargs -r umount -l
    if ! pgrep -f -- "$WORK/" >/dev/null && [[ $(findmnt -rn -o TARGET) != *"$WORK/"* ]]; then
      break
    fi
  done
  if [[ -s $WORK/packages.added ]]; then
    DEBIAN_FRONTEND=noninteractive apt-get purge -y -qq $(cat "$WORK/packages.added") >/dev/null 2>&1
    echo "purged what this check installed: $(tr '\n' ' ' <"$WORK/packages.added")"
  fi
  rm -rf "$WORK"
  echo "disk free on /tmp: $(df -h --output=avail /tmp | tail -1 | tr -d ' ')"
  exit $rc
}
trap cleanup EXIT

# --- packages: install what is missing; exactly the packages that appear are purged at the end ------------
dpkg-query -W -f '${Package}\n' | sort >"$WORK/packages.before"
missing=()
for pkg in podman runc debootstrap; do
  [[ $(dpkg-query -W -f '${Status}' "$pkg" 2>/dev/null) == "install ok installed" ]] || missing+=("$pkg")
done
if ((${#missing[@]})); then
  log "installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
dpkg-query -W -f '${Package}\n' | sort | comm -13 "$WORK/packages.before" - >"$WORK/packages.added"

# runc and explicit ulimits: crun cannot set them on this kind of host. Podman's storage lives under $WORK.
cat >"$WORK/containers.conf" <<'EOF'
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=30000:30000"]
[engine]
runtime = "runc"
EOF
export CONTAINERS_CONF=$WORK/containers.conf

# --- base image -------------------------------------------------------------------------------------------
mirror=$(awk '/^URIs:/ && /debian\/?$/ {print $2; exit}' /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
mirror=${mirror:-http://deb.debian.org/debian}
log "base image: debootstrap bookworm from $mirror"
t0=$SECONDS
debootstrap --variant=minbase bookworm "$WORK/rootfs" "$mirror" >"$WORK/debootstrap.log" 2>&1 ||
  { tail -20 "$WORK/debootstrap.log"; fail "debootstrap"; }
tar -C "$WORK/rootfs" -c . | "${PODMAN[@]}" import -q - "$BASE" >/dev/null
rm -rf "$WORK/rootfs"
BASE_S=$((SECONDS - t0))
echo "base image in ${BASE_S} s"

# --- the project image ------------------------------------------------------------------------------------
# pip inside the build sees what pip on this host sees: the CA of the registries' TLS proxy, and the local
# package mirror (/opt/pypi*, mounted read-only at /mnt, which the base image has empty) that holds torch.
{
  echo "[global]"
  echo "cert = /run/secrets/pipcert"
  indexes=$(for d in /opt/pypi /opt/pypi-more; do [[ -d $d/simple ]] && printf 'file:///mnt/%s/simple ' "${d#/opt/}"; done)
  [[ -n $indexes ]] && echo "extra-index-url = $indexes"
} >"$WORK/pip.conf"
log "building $IMAGE"
t0=$SECONDS
"${PODMAN[@]}" build --format docker --build-arg BASE_IMAGE="$BASE" \
  --secret id=pipconf,src="$WORK/pip.conf" --secret id=pipcert,src=/etc/ssl/certs/ca-certificates.crt \
  -v /opt:/mnt:ro -t "$IMAGE" "$REPO" >"$WORK/build.log" 2>&1 || { tail -40 "$WORK/build.log"; fail "build"; }
BUILD_S=$((SECONDS - t0))
SIZE=$("${PODMAN[@]}" image inspect --format '{{.Size}}' "$IMAGE")
echo "build time: ${BUILD_S} s; image size: $((SIZE / 1000000)) MB"
echo "layers over 1 MB (MB, created by):"
"${PODMAN[@]}" history --format json "$IMAGE" >"$WORK/history.json"
python3 -c '
import json, re, sys
for layer in reversed(json.load(open(sys.argv[1]))):
    if layer["size"] > 1e6:
        step = re.sub(r"^\|\d+ (\S+=\S+ )*|/bin/sh -c |--mount=\S+ ", "", layer["CreatedBy"])
        print("  %6.0f  %s" % (layer["size"] / 1e6, step[:100]))' "$WORK/history.json"
echo "the largest parts of /opt/venv (MB):"
"${PODMAN[@]}" run --rm --no-healthcheck --entrypoint sh "$IMAGE" -c \
  'cd /opt/venv/lib/python3.11/site-packages && du -sm nvidia torch triton onnxruntime cv2 2>/dev/null | sort -n -r' |
  tee "$WORK/venv.txt"

# --- run it the README's way ------------------------------------------------------------------------------
if command -v docker >/dev/null; then
  "${PODMAN[@]}" system service --time=0 "unix://$WORK/podman.sock" >"$WORK/service.log" 2>&1 &
  SERVICE_PID=$!
  export DOCKER_HOST=unix://$WORK/podman.sock
  for _ in $(seq 50); do docker version >/dev/null 2>&1 && break; sleep 0.2; done
  DOCKER=(docker)
  echo "Docker CLI $(docker version --format '{{.Client.Version}}') against podman $(podman --version | awk '{print $3}')"
else
  DOCKER=("${PODMAN[@]}")
  echo "no Docker CLI: podman with the same flags"
fi

PROMPTS=$WORK/prompts
EMBEDDED=$REPO/mmap_model/weights/mmap-tiny/promptsets
mkdir -p "$PROMPTS"
cp -r "$EMBEDDED/clipart-painting-photo-product-sketch" "$PROMPTS/"
chmod -R a+rX "$PROMPTS"
URL=http://127.0.0.1:$PORT

log "docker run (2 HTTP workers, prompts from the host, read-only)"
"${DOCKER[@]}" run -d --name "$NAME" --shm-size 1g -p "127.0.0.1:$PORT:8000" -v "$PROMPTS:/prompts:ro" \
  -e MMAP_WORKERS=2 "$IMAGE" >/dev/null
t0=$SECONDS
until [[ $(curl -s -m 10 -o /dev/null -w '%{http_code}' "$URL/readyz") == 200 ]]; do
  ((SECONDS - t0 < READY_WITHIN_S)) || { "${DOCKER[@]}" logs "$NAME" | tail -30; fail "/readyz not 200 within ${READY_WITHIN_S} s"; }
  sleep 0.5
done
READY_S=$((SECONDS - t0))
echo "ok  /readyz 200 after ${READY_S} s (limit ${READY_WITHIN_S} s)"

classify() {  # task sample -> prints the label the service gave
  curl -sf -m 10 "$URL/samples/$1/$2" -o "$WORK/sample.png" || fail "GET /samples/$1/$2"
  curl -sf -m 10 -F "file=@$WORK/sample.png" "$URL/classify?task=$1" |
    python3 -c 'import json, sys; top = json.load(sys.stdin)["predictions"][0]; print(top["label"], round(top["score"], 2))'
}
label=$(classify clipart apple.png) || fail "classify clipart"
echo "ok  classify?task=clipart through the published port: apple.png -> $label"

[[ $(curl -sf -m 10 "$URL/metrics") == *$'\nmmap_requests_total{'* ]] || fail "/metrics has no mmap_requests_total"
echo "ok  /metrics answers"

"${PODMAN[@]}" healthcheck run "$NAME" >/dev/null || fail "HEALTHCHECK command failed"
health=$("${DOCKER[@]}" inspect --format '{{.State.Health.Status}}' "$NAME")
[[ $health == healthy ]] || fail "health status: $health"
echo "ok  HEALTHCHECK: $health"

"${PODMAN[@]}" top "$NAME" huser args | tee "$WORK/top.txt" | sed 's/^/    /'
for role in "service *$" "service.engine.loop" "service.http.worker"; do
  grep -Eq -- "-m $role" "$WORK/top.txt" || fail "no process runs python -m ${role% *$}"
done
(($(grep -c -- '-m service.http.worker' "$WORK/top.txt") == 2)) || fail "expected 2 HTTP workers"
awk 'NR > 1 && $1 != '"$UID_EXPECTED"' {bad = 1} END {exit bad}' "$WORK/top.txt" || fail "a process is not uid $UID_EXPECTED"
shm=$("${DOCKER[@]}" exec "$NAME" df -B1M --output=size /dev/shm | tail -1 | tr -d ' ')
((shm >= 1024)) || fail "/dev/shm is ${shm} MB"
echo "ok  launcher, engine and 2 workers run as uid $UID_EXPECTED; /dev/shm ${shm} MB"

"${DOCKER[@]}" exec "$NAME" sh -c 'touch /prompts/x' 2>/dev/null && fail "/prompts is writable"
[[ $(curl -s -m 10 -o /dev/null -w '%{http_code}' -F "file=@$WORK/sample.png" "$URL/classify?task=quickdraw") == 404 ]] ||
  fail "quickdraw served before it was published"
# Published the way PromptSet.publish does it: written to a hidden sibling, then renamed into place.
cp -r "$EMBEDDED/infograph-quickdraw" "$PROMPTS/.infograph-quickdraw.tmp"
chmod -R a+rX "$PROMPTS/.infograph-quickdraw.tmp"
mv "$PROMPTS/.infograph-quickdraw.tmp" "$PROMPTS/infograph-quickdraw"
t0=$SECONDS
until [[ $(curl -sf -m 10 "$URL/tasks") == *'"task":"quickdraw"'* ]]; do
  ((SECONDS - t0 < 30)) || fail "the published set was not loaded within 30 s"
  sleep 0.5
done
label=$(classify quickdraw apple.png) || fail "classify quickdraw"
SWAP_S=$((SECONDS - t0))
echo "ok  a set published on the host is served after ${SWAP_S} s, no restart: quickdraw apple.png -> $label"

log "stop -t 30 under load"
load() {  # until the port refuses: "<end time> <HTTP status> <curl exit code>" per request
  local out
  while out=$(curl -s -m 10 -o /dev/null -w '%{http_code} %{exitcode}' -F "file=@$WORK/sample.png" "$URL/classify?task=clipart"); do
    echo "$(date +%s.%N) $out"
  done
  echo "$(date +%s.%N) $out"
}
loads=()
for i in 1 2 3 4; do
  load >"$WORK/load.$i" &
  loads+=($!)
done
sleep 1
stopped_at=$(date +%s.%N)
"${DOCKER[@]}" stop -t 30 "$NAME" >/dev/null
wait "${loads[@]}"  # not a bare `wait`: podman's API service runs in the background too
code=$("${DOCKER[@]}" inspect --format '{{.State.ExitCode}}' "$NAME")
cat "$WORK"/load.* | awk -v t="$stopped_at" '{n[$2 " " $3 ($1 > t ? " after stop" : "")]++} END {for (k in n) printf "    %5d x %s\n", n[k], k}'
((code == 0)) || { "${DOCKER[@]}" logs "$NAME" | tail -20; fail "exit code $code after stop -t 30"; }
# Answered requests are all 200 (a 503 would mean the engine went before the workers drained); the rest never
# got a response because the listener was closed: refused (curl 7), or, for a connection still in the kernel's
# accept queue when the last worker closed the socket, reset (52/56, or 55 while its body was being sent).
awk '$2 != 200 && !($2 == "000" && ($3 == 7 || $3 == 52 || $3 == 55 || $3 == 56)) {bad = 1} END {exit bad}' \
  "$WORK"/load.* ||
  fail "a request got an error or hung during the stop"
awk -v t="$stopped_at" '$1 > t && $2 == 200 {late = 1} END {exit !late}' "$WORK"/load.* ||
  fail "no request completed during the stop"
STOP_S=$(awk -v a="$stopped_at" -v b="$(date +%s.%N)" 'BEGIN {printf "%.1f", b - a}')
echo "ok  stop -t 30: exit code 0 after ${STOP_S} s; requests in flight completed"
"${DOCKER[@]}" logs "$NAME" 2>&1 | tail -4 | sed 's/^/    /'

log "container check passed: build ${BUILD_S} s, image $((SIZE / 1000000)) MB"
if [[ -n ${RESULT_JSON:-} ]]; then  # the numbers, for docs/results/
  python3 - "$WORK" "$BASE_S" "$BUILD_S" "$SIZE" "$READY_S" "$SWAP_S" "$STOP_S" >"$RESULT_JSON" <<'PY'
import json, re, sys
work, base_s, build_s, size, ready_s, swap_s, stop_s = sys.argv[1:]
layers = [{"mb": round(l["size"] / 1e6), "step": re.sub(r"\s+", " ", l["CreatedBy"])[:200]}
          for l in reversed(json.load(open(f"{work}/history.json"))) if l["size"] > 1e6]
venv = {name: int(mb) for mb, name in (line.split() for line in open(f"{work}/venv.txt"))}
print(json.dumps({"base_image_s": int(base_s), "build_s": int(build_s), "image_mb": round(int(size) / 1e6),
                  "layers": layers, "site_packages_mb": venv, "ready_s": int(ready_s), "hot_swap_s": int(swap_s),
                  "stop_s": float(stop_s)}, indent=2))
PY
fi
