"""Get SmolLM2-135M-Instruct onto the lent GPU machine, whose working-tree transfer is capped at 64 MiB.

The GGUF file is 94 MiB (Q4_1 blocks plus a Q8_0 embedding), so it travels in two calls of the
device tool while the machine stays warm (it keeps files between calls, ~30 s idle):

    python benchmarks/seesaw/gpu_transport.py split          # here: two parts + manifest + gguf wheel
    run(carry=[".../transport/part-0"], command="bash benchmarks/seesaw/gpu_run.sh stash")
    run(carry=[".../transport/part-1", ".../transport/manifest.json", ".../transport/wheels"],
        command="bash benchmarks/seesaw/gpu_run.sh run")     # joins, checks sha256, runs --scale gpu

(".../transport" is benchmarks/seesaw/work/transport, gitignored.) ``join`` runs there and refuses a
file whose sha256 differs from the manifest's.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
TRANSPORT = HERE / "work" / "transport"
PART = 48 * 2**20  # two parts, each well under the 64 MiB cap with the repository beside it


def split() -> None:
    sys.path.insert(0, str(HERE))
    import smollm2

    src = smollm2.gguf_file()
    if src is None:
        raise SystemExit(smollm2.missing())
    TRANSPORT.mkdir(parents=True, exist_ok=True)
    data = src.read_bytes()
    parts = [data[i:i + PART] for i in range(0, len(data), PART)]
    if len(parts) != 2:
        raise SystemExit(f"{src}: expected two parts of ≤ {PART >> 20} MiB, got {len(parts)}")
    for i, part in enumerate(parts):
        (TRANSPORT / f"part-{i}").write_bytes(part)
    (TRANSPORT / "manifest.json").write_text(json.dumps(
        {"name": src.name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(), "parts": len(parts)}) + "\n")
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d",
                    str(TRANSPORT / "wheels"), "gguf"], check=True)
    print(f"{TRANSPORT}: part-0, part-1 ({len(data) / 2**20:.1f} MiB), manifest.json, wheels/")


def join(stash: Path, out_dir: Path) -> Path:
    manifest = json.loads((TRANSPORT / "manifest.json").read_text())
    data = (stash / "part-0").read_bytes() + (TRANSPORT / "part-1").read_bytes()
    if hashlib.sha256(data).hexdigest() != manifest["sha256"]:
        raise SystemExit(f"{stash}/part-0 + {TRANSPORT}/part-1: sha256 differs from manifest.json (resend both)")
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f".{manifest['name']}.tmp"
    tmp.write_bytes(data)
    os.replace(tmp, out_dir / manifest["name"])
    return out_dir / manifest["name"]


if __name__ == "__main__":
    if sys.argv[1:] == ["split"]:
        split()
    elif len(sys.argv) == 4 and sys.argv[1] == "join":
        print(join(Path(sys.argv[2]), Path(sys.argv[3])))
    else:
        raise SystemExit("usage: gpu_transport.py split | join STASH_DIR OUT_DIR")
