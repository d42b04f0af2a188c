"""What the batch job identity costs: BLAKE2b seconds per GB of input, and `model_digest` on a model folder,
cold (every file hashed) and warm (cached by path, size and mtime_ns). Not a test.

    .venv/bin/python scripts/bench_fingerprint.py [MODEL_FOLDER]
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

from llmops.fingerprint import file_digest, model_digest, model_files


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "input.bin"
        with open(data, "wb") as f:
            for _ in range(512):
                f.write(os.urandom(1 << 20))
        file_digest(data)  # page cache warm: measure the hash, not the disk
        t0 = time.perf_counter()
        file_digest(data)
        per_gb = (time.perf_counter() - t0) / 0.5
        print(f"input hash (BLAKE2b-128, page cache warm): {per_gb:.2f} s/GB ({1 / per_gb:.2f} GB/s)")
        try:
            import xxhash

            h = xxhash.xxh3_128()
            t0 = time.perf_counter()
            with open(data, "rb") as f:
                while chunk := f.read(1 << 20):
                    h.update(chunk)
            print(f"xxh3-128 for comparison: {(time.perf_counter() - t0) / 0.5:.2f} s/GB")
        except ImportError:
            print("xxhash is not installed (stdlib BLAKE2b is used)")
    if len(sys.argv) > 1:
        folder = Path(sys.argv[1])
        size = sum(p.stat().st_size for p in model_files(folder)) / 1e9
        with tempfile.TemporaryDirectory() as home:
            os.environ["LLMOPS_HOME"] = home  # an empty digest cache: the cold cost
            t0 = time.perf_counter()
            model_digest(folder)
            cold = time.perf_counter() - t0
            t0 = time.perf_counter()
            model_digest(folder)
            warm = time.perf_counter() - t0
        print(f"model_digest({folder}): {size:.2f} GB, cold {cold:.2f} s ({cold / size:.2f} s/GB), "
              f"warm (cached) {warm * 1000:.1f} ms; a 15 GB 7B folder: about {15 * cold / size:.0f} s cold")


if __name__ == "__main__":
    main()
