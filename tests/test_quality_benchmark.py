"""`benchmarks/quality.py`: a pretraining run cut short continues from its checkpoint instead of starting over;
`benchmarks/step_cost.py` prints the step cost of each variant."""

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

from macrl.pretrain import main as pretrain

REPO = Path(__file__).resolve().parents[1]
# the tiny preset on a few dozen Fashion-MNIST images: seconds per run
FAST = ["--config", "tiny", "--batch-size", "16", "--num-workers", "0", "--logging-steps", "1", "--limit-images", "48"]


def _load_quality_benchmark():
    spec = importlib.util.spec_from_file_location("quality_benchmark", REPO / "benchmarks" / "quality.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_run_cut_short_continues_from_its_checkpoint(tmp_path):
    quality = _load_quality_benchmark()
    run_dir = tmp_path / "macrl-0.1min-seed0"
    # the run the benchmark started, killed after its step-3 checkpoint: 6 steps = 0.1 min / 1 s a step
    flags = [*FAST, "--max-steps", "6", "--save-steps", "3", "--no-knn", "--seed", "0"]
    assert pretrain([*flags, "--output-dir", str(run_dir)]) == 0
    for finished in ("results.json", "model.safetensors", "encoder", "logs", "checkpoints/checkpoint-6"):
        path = run_dir / finished
        shutil.rmtree(path) if path.is_dir() else path.unlink()

    results = quality.run_pretraining("macrl", 0, 0.1, run_dir, [*FAST, "--save-steps", "3"], step_seconds=1.0)

    assert (run_dir / "encoder" / "model.safetensors").is_file()
    trained = [json.loads(line) for line in (run_dir / "logs" / "train_log.jsonl").read_text().splitlines()]
    # only the steps after the checkpoint were trained again
    assert [record["step"] for record in trained if "loss" in record] == [4, 5, 6]
    assert results == json.loads((run_dir / "results.json").read_text())
    # a finished run is not trained again
    stamp = (run_dir / "results.json").stat().st_mtime_ns
    quality.run_pretraining("macrl", 0, 0.1, run_dir, [*FAST], step_seconds=1.0)
    assert (run_dir / "results.json").stat().st_mtime_ns == stamp


def test_step_cost_prints_each_variant_against_the_preset():
    """`benchmarks/step_cost.py` (a screen's step time): one row per variant after the preset's, the preset at 1.00x,
    and a variant that does twice the work (symmetric_loss: both views through both branches) costs more."""
    script = REPO / "benchmarks" / "step_cost.py"
    done = subprocess.run(
        [sys.executable, str(script), "--config", "tiny", "--batch-size", "16", "--rounds", "5", "--warmup", "1",
         "--variant", 'symmetric={"symmetric_loss": true}'],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line.split("|")[1:-1] for line in done.stdout.splitlines() if line.startswith("| ") and "x |" in line]
    assert [row[0].strip() for row in rows] == ["preset", "symmetric"]
    assert rows[0][2].strip() == "1.00x" and float(rows[1][2].strip()[:-1]) > 1.0
