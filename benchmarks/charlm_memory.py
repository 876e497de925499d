"""Peak memory of reading a large text for the char-LM, as a multiple of the file's size.

Writes a random text of ``--mb`` megabytes (printable ASCII and newlines, or any code point below
U+0800 with ``--unicode``), then, each in a fresh process so that one cannot inherit the other's peak:

* ``read``: ``prepare_corpus`` (read, split, build the vocabulary, encode); the figure is the peak
  resident set size above the process's size after its imports (torch and rnnkit).
* ``train``: ``rnnkit charlm train --steps 1`` with a tiny model (reading plus the trainer's stream
  layout); the figure is the whole process's peak, imports included.

    python benchmarks/charlm_memory.py --mb 50            # the measurement quoted in docs/results.md
    python benchmarks/charlm_memory.py --mb 2 --json      # a quick check

A memory measure only (no timings), so a busy machine does not distort it.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

READ = """
import resource, sys
import torch  # noqa: F401
from rnnkit.tasks.charlm import CharDataConfig, prepare_corpus
from rnnkit.train import TrainerConfig
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
corpus = prepare_corpus(CharDataConfig(text=sys.argv[1]), TrainerConfig(steps=1))
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(base, peak, corpus.train_ids.dtype)
"""


def write_text(path: Path, mb: float, unicode: bool, seed: int = 0) -> int:
    """A random text of about ``mb`` megabytes (UTF-8); returns its size in bytes."""
    rng = random.Random(seed)
    alphabet = [chr(c) for c in range(32, 127)] + ["\n"]
    if unicode:
        alphabet += [chr(c) for c in range(0xA0, 0x800)]
    target = int(mb * 1e6)
    with path.open("w", encoding="utf-8") as f:
        written = 0
        while written < target:
            chunk = "".join(rng.choices(alphabet, k=min(1 << 20, target - written)))
            f.write(chunk)
            written += len(chunk.encode("utf-8"))
    return path.stat().st_size


def measure(text: Path) -> dict:
    size = text.stat().st_size
    out = subprocess.run([sys.executable, "-c", READ, str(text)], capture_output=True, text=True, check=True)
    base_kb, peak_kb, dtype = out.stdout.split()
    read_bytes = (int(peak_kb) - int(base_kb)) * 1024
    with tempfile.TemporaryDirectory() as run_dir:
        before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        subprocess.run([sys.executable, "-m", "rnnkit.cli.main", "charlm", "train", "--text", str(text), "--out",
                        run_dir, "--steps", "1", "--hidden-size", "8", "--layers", "1", "--embedding-size", "4",
                        "--quiet", "--set", "trainer.tensorboard=false", "--set", "trainer.eval_every=0",
                        "--set", "data.eval_chars=1000"], check=True, capture_output=True)
        train_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return {"file_mb": round(size / 1e6, 2), "ids_dtype": dtype,
            "read_peak_above_imports_mb": round(read_bytes / 1e6, 1), "read_ratio": round(read_bytes / size, 2),
            "train_process_peak_mb": round(train_kb * 1024 / 1e6, 1),
            "train_peak_was_this_run": train_kb > before}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mb", type=float, default=50.0, help="size of the random text in megabytes")
    p.add_argument("--unicode", action="store_true", help="code points up to U+07FF, not only ASCII")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        text = Path(tmp) / "random.txt"
        write_text(text, args.mb, args.unicode)
        result = measure(text)
    if args.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k:<28} {v}")


if __name__ == "__main__":
    main()
