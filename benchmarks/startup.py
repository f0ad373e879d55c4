"""Start-up time of the command lines against `python -c "import torch"` (issue 23: at most 1.5x).

    OMP_NUM_THREADS=1 python benchmarks/startup.py [--repeats 5]

Each command runs `--repeats` times in a fresh interpreter, interleaved; the table gives the median wall time and
its ratio to the median of `import torch`. The finished run is a tiny configs/gmm.yaml run trained once first.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _seconds(cmd: list[str]) -> float:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "disabled"}
    start = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    repeats = parser.parse_args().repeats
    py, train, sample = sys.executable, str(ROOT / "train.py"), str(ROOT / "sample.py")
    with tempfile.TemporaryDirectory() as tmp:
        run = [f"run.dir={tmp}/run", "logger.kind=none", "trainer.progress_bar=false", "evaluation.enabled=false",
               "train.total_images=128", "data.batch_size=64", "data.num_train=256", "data.dim=4"]
        subprocess.run([py, train, "--config", "configs/gmm.yaml", *run], cwd=ROOT, check=True,
                       stdout=subprocess.DEVNULL, env={**os.environ, "WANDB_MODE": "disabled"})
        commands = {
            'python -c "import torch"': [py, "-c", "import torch"],
            "train.py --help": [py, train, "--help"],
            "train.py --print-config": [py, train, "--print-config"],
            "train.py (finished run)": [py, train, "--config", "configs/gmm.yaml", *run],
            "sample.py --help": [py, sample, "--help"],
        }
        times: dict[str, list[float]] = {name: [] for name in commands}
        for _ in range(repeats):
            for name, cmd in commands.items():
                times[name].append(_seconds(cmd))
    base = statistics.median(times['python -c "import torch"'])
    print(f"| command | median s ({repeats} runs) | ratio to import torch |\n|---|---|---|")
    for name, values in times.items():
        print(f"| {name} | {statistics.median(values):.2f} | {statistics.median(values) / base:.2f} |")


if __name__ == "__main__":
    main()
