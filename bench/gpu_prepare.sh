#!/usr/bin/env bash
# Prepares .gpu/ (git-ignored) for `bench/gpu_check.sh` on a GPU host that reaches no package registry,
# such as the lent H200 (Python 3.12 with torch, torchvision, numpy, pillow, httpx, pytest, uvloop and
# prometheus-client already installed): run it here, once, then carry .gpu to that host.
#
#   bash bench/gpu_prepare.sh          # then, there: bash bench/gpu_check.sh
#
# - .gpu/wheels: cp312 manylinux wheels of the service's dependencies that such an image lacks, at the
#   versions installed in this checkout's .venv (what CI tests); gpu_check.sh installs them into
#   /tmp/site when `import fastapi` fails there.
# - .gpu/bin/wrk and .gpu/lib/libluajit-5.1.so.2: Debian's wrk (apt-get install wrk) and its LuaJIT.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
PYTHON_VERSION=${GPU_PYTHON_VERSION:-3.12}
NAMES=(open_clip_torch ftfy wcwidth fastapi starlette annotated-doc uvicorn httptools pyzmq msgspec pydantic
       pydantic_core pydantic-settings python-dotenv annotated-types typing-inspection typing_extensions
       python-multipart fastapi_offline opentelemetry-api)

rm -rf .gpu/wheels && mkdir -p .gpu/wheels .gpu/bin .gpu/lib
pins=()
for name in "${NAMES[@]}"; do
  version=$("$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name")
  pins+=("$name==$version")
done
platforms=()
for n in 17 24 27 28 31 34 35; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYTHON_VERSION" --implementation cp \
  "${platforms[@]}" --platform manylinux2014_x86_64 -d .gpu/wheels "${pins[@]}"
cp "$(command -v wrk)" .gpu/bin/wrk
cp "$(ldconfig -p | awk '/libluajit-5.1.so.2 / {print $NF; exit}')" .gpu/lib/
du -sh .gpu
ls .gpu/wheels
