"""Speed of MACRL against ViTMAE, MoCo v3, timm and transformers ViTs: one table from one run.

What is measured, for every model size, with the same batch for every case of that size:

* pretraining step (forward, backward, AdamW step; for MACRL also the momentum EMA), in images/s:
  ``MACRLForPreTraining`` vs transformers' ``ViTMAEForPreTraining`` (same encoder and decoder, mask 0.75, SDPA),
  MACRL in MoCo v3 mode (``reconstruction_weight=0, mask_ratio=0, symmetric_loss=True``), MACRL in MAE mode
  (``contrastive_weight=0``), MACRL under bf16 autocast, and MACRL with only its momentum forward in bf16;
* pretraining step with ``torch.compile``: of the momentum forward only (no grad: the inference half of a step) and of
  the whole model (forward and backward), both under bf16 autocast, against MACRL bf16 autocast eager;
* feature extraction (``eval()``, ``torch.inference_mode()``), in images/s: ``MACRLModel`` vs timm's
  ``VisionTransformer(num_classes=0)`` vs transformers' ``ViTModel`` (SDPA) in fp32; MACRL and timm with the same
  treatments: bf16 autocast (float32 weights), bf16 weights (MACRL: ``prepare_for_inference(dtype="bf16")``, what
  ``macrl-extract --dtype bf16`` runs), ``torch.compile`` in fp32, and compiled with bf16 weights (``--dtype bf16
  --compile``); the compile time of each compiled case is printed under the table;
* peak memory of each pretraining step: on CPU the peak RSS of a fresh process that builds the case and runs two steps
  (above the RSS it had after the imports, file-backed library pages left out), on GPU
  ``torch.cuda.max_memory_allocated``;
* on a GPU also bf16-autocast and ``torch.compile`` columns (skipped on CPU).

Timings are medians over ``--repeats`` after ``--warmup`` steps. The cases of a size are timed round-robin (one step
of each case per repeat), so a change of machine load hits all of them alike and the ratios stay meaningful even when
the absolute numbers do not.

    python benchmarks/speed.py                       # both sizes, 5 repeats after 2 warm-up steps
    python benchmarks/speed.py --sizes vit-t4-32 --repeats 3
    python benchmarks/speed.py --quick               # tiny sizes, a smoke test of the whole script
    python benchmarks/speed.py --quick --no-compile  # the same without the torch.compile cases
    python benchmarks/speed.py --task extract        # the feature-extraction cases only
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

# --------------------------------------------------------------------------------------------------------- sizes


@dataclass(frozen=True)
class Size:
    """A model size: a `macrl.presets` preset with overrides, and the batch every case of this size uses."""

    preset: str
    overrides: dict
    batch: int
    label: str


SIZES: dict[str, Size] = {
    # the default: ViT-Tiny width at 32 px with 4-px patches (8x8 = 64 patches), MAE-style 4-layer decoder
    "vit-t4-32": Size(
        "fmnist",
        dict(image_size=32, patch_size=4, num_channels=3, num_hidden_layers=12, decoder_num_hidden_layers=4),
        batch=256,
        label="width 192 x 12 layers, 3 heads, patch 4 @ 32 px, decoder 128 x 4",
    ),
    # ViT-S/16 at 224 px with the preset's decoder (512 x 8) and MoCo v3's 4096-wide heads
    "vit-s16-224": Size(
        "vit-small-patch16-224",
        dict(),
        batch=32,
        label="ViT-S/16 @ 224 px (384 x 12, 6 heads), decoder 512 x 8",
    ),
    # the main job's model (`macrl-pretrain` with no flags): the fmnist preset as it is, 16 patches of 7 px at 28 px
    "fmnist": Size(
        "fmnist",
        dict(),
        batch=256,
        label="the main job's model: width 192 x 6 layers, 3 heads, patch 7 @ 28 px, decoder 128 x 2",
    ),
    # --quick: seconds, for a smoke test
    "quick": Size(
        "tiny",
        dict(image_size=32, num_channels=3),
        batch=8,
        label="tiny (32 x 2 layers, patch 4 @ 32 px, decoder 16 x 1)",
    ),
}

PRETRAIN_CASES = (
    "MACRL",
    "ViTMAEForPreTraining",
    "MACRL MoCo-v3 mode",
    "MACRL MAE mode",
    "MACRL bf16 autocast",
    "MACRL bf16 momentum fwd",
    "MACRL bf16 compiled momentum fwd",
    "MACRL bf16 compiled",
    "MACRL compiled",
)
EXTRACT_CASES = (
    "MACRLModel fp32",
    "timm ViT fp32",
    "transformers ViTModel fp32",
    "MACRLModel bf16 autocast",
    "timm ViT bf16 autocast",
    "MACRLModel bf16",
    "timm ViT bf16",
    "MACRLModel fp32 compiled",
    "timm ViT fp32 compiled",
    "MACRLModel bf16 compiled",
    "timm ViT bf16 compiled",
)
COMPILED_CASES = tuple(case for case in PRETRAIN_CASES + EXTRACT_CASES if "compiled" in case)


@dataclass(frozen=True)
class Check:
    """A ratio between two cases of one size, printed in the row of `row`, with an optional target."""

    row: str
    label: str
    numerator: str
    denominator: str
    metric: str  # "time": step-time ratio, "speed": throughput ratio, "memory": peak-memory ratio
    op: str | None = None  # "<=" or ">=", None: for information only
    target: float | dict[str, float] | None = None  # a dict: per CPU kind (`cpu_kind`), info on the kinds it lacks

    def target_on(self, kind: str) -> float | None:
        return self.target.get(kind) if isinstance(self.target, dict) else self.target


CHECKS = (
    Check("MACRL", "step time / ViTMAE", "MACRL", "ViTMAEForPreTraining", "time", "<=", 1.9),
    Check("MACRL", "step time / MoCo-v3 mode", "MACRL", "MACRL MoCo-v3 mode", "time", "<=", 0.30),
    Check("MACRL", "peak mem / ViTMAE", "MACRL", "ViTMAEForPreTraining", "memory", "<=", 1.25),
    Check("MACRL MAE mode", "step time / ViTMAE", "MACRL MAE mode", "ViTMAEForPreTraining", "time"),
    Check("MACRL bf16 autocast", "img/s / MACRL fp32", "MACRL bf16 autocast", "MACRL", "speed"),
    Check("MACRL bf16 momentum fwd", "img/s / MACRL fp32", "MACRL bf16 momentum fwd", "MACRL", "speed"),
    Check(
        "MACRL bf16 compiled momentum fwd", "img/s / MACRL bf16", "MACRL bf16 compiled momentum fwd",
        "MACRL bf16 autocast", "speed",
    ),
    Check("MACRL bf16 compiled", "img/s / MACRL bf16", "MACRL bf16 compiled", "MACRL bf16 autocast", "speed"),
    Check("MACRL compiled", "img/s / MACRL fp32", "MACRL compiled", "MACRL", "speed"),
    Check("MACRLModel fp32", "img/s / timm fp32", "MACRLModel fp32", "timm ViT fp32", "speed", ">=", 1.0),
    Check(
        "MACRLModel fp32",
        "img/s / transformers ViT",
        "MACRLModel fp32",
        "transformers ViTModel fp32",
        "speed",
        ">=",
        1.1,
    ),
    Check("MACRLModel bf16 autocast", "img/s / timm fp32", "MACRLModel bf16 autocast", "timm ViT fp32", "speed"),
    Check("timm ViT bf16 autocast", "img/s / timm fp32", "timm ViT bf16 autocast", "timm ViT fp32", "speed"),
    Check("MACRLModel bf16", "img/s / timm fp32", "MACRLModel bf16", "timm ViT fp32", "speed", ">=", {"amx": 3.0}),
    Check("MACRLModel bf16", "img/s / timm bf16", "MACRLModel bf16", "timm ViT bf16", "speed"),
    Check("timm ViT bf16", "img/s / timm fp32", "timm ViT bf16", "timm ViT fp32", "speed"),
    Check("MACRLModel fp32 compiled", "img/s / timm fp32", "MACRLModel fp32 compiled", "timm ViT fp32", "speed", ">=", 1.1),
    Check("MACRLModel fp32 compiled", "img/s / timm compiled", "MACRLModel fp32 compiled", "timm ViT fp32 compiled", "speed"),
    Check("timm ViT fp32 compiled", "img/s / timm fp32", "timm ViT fp32 compiled", "timm ViT fp32", "speed"),
    # the bf16 target of the CPU's kind: AMX tiles, or AVX512-BF16's dot products only (no target without either)
    Check(
        "MACRLModel bf16 compiled", "img/s / timm fp32", "MACRLModel bf16 compiled", "timm ViT fp32", "speed", ">=",
        {"amx": 4.0, "avx512_bf16": 1.4},
    ),
    Check("MACRLModel bf16 compiled", "img/s / timm bf16 comp.", "MACRLModel bf16 compiled", "timm ViT bf16 compiled", "speed"),
    Check("timm ViT bf16 compiled", "img/s / timm fp32", "timm ViT bf16 compiled", "timm ViT fp32", "speed"),
)

# ------------------------------------------------------------------------------------------------- model building


def macrl_config(size: Size, **overrides):
    from macrl.presets import load_config

    return load_config(size.preset, **{**size.overrides, **overrides})


def vitmae_model(config):
    """transformers' ViTMAEForPreTraining with the encoder and decoder of a MACRLConfig, mask 0.75, SDPA."""
    from transformers import ViTMAEConfig, ViTMAEForPreTraining

    mae_config = ViTMAEConfig(
        hidden_size=config.hidden_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        intermediate_size=config.intermediate_size,
        hidden_act=config.hidden_act,
        qkv_bias=config.qkv_bias,
        layer_norm_eps=config.layer_norm_eps,
        image_size=config.image_size,
        patch_size=config.patch_size,
        num_channels=config.num_channels,
        decoder_hidden_size=config.decoder_hidden_size,
        decoder_num_hidden_layers=config.decoder_num_hidden_layers,
        decoder_num_attention_heads=config.decoder_num_attention_heads,
        decoder_intermediate_size=config.decoder_intermediate_size,
        mask_ratio=0.75,
        norm_pix_loss=False,
    )
    return ViTMAEForPreTraining._from_config(mae_config, attn_implementation="sdpa")


def timm_model(config):
    from timm.models.vision_transformer import VisionTransformer

    from macrl.timm_layout import timm_vit_kwargs

    return VisionTransformer(**timm_vit_kwargs(config))


def hf_vit_model(config):
    from transformers import ViTConfig, ViTModel

    vit_config = ViTConfig(
        hidden_size=config.hidden_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        intermediate_size=config.intermediate_size,
        hidden_act=config.hidden_act,
        qkv_bias=config.qkv_bias,
        layer_norm_eps=config.layer_norm_eps,
        image_size=config.image_size,
        patch_size=config.patch_size,
        num_channels=config.num_channels,
    )
    return ViTModel._from_config(vit_config, attn_implementation="sdpa", add_pooling_layer=False)


def autocast(device: torch.device, enabled: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16) if enabled else contextlib.nullcontext()


def pretraining_step(model, forward, optimizer, x, x2, *, amp: bool, is_macrl: bool, device: torch.device):
    """One optimiser step of a pre-training model (`forward`: the model or its compiled form): MACRL on both views
    with its EMA update, ViTMAE on the first."""

    def step() -> None:
        with autocast(device, amp):
            loss = forward(x, momentum_pixel_values=x2).loss if is_macrl else forward(pixel_values=x).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if is_macrl:
            model.update_momentum_branch(0.5)

    return step


def bf16_momentum_forward(model, device: torch.device) -> None:
    """Run only `model.forward_momentum` (no gradient) under bf16 autocast; the key is returned in float32."""
    full_precision = model.forward_momentum

    def forward_momentum(*args, **kwargs):
        with torch.autocast(device.type, dtype=torch.bfloat16):
            return full_precision(*args, **kwargs).float()

    model.forward_momentum = forward_momentum


def compiled_momentum_forward(model) -> None:
    """`torch.compile` only `model.forward_momentum`, the no-grad inference half of a step (momentum encoder and
    projector); it runs under the step's autocast."""
    model.forward_momentum = torch.compile(model.forward_momentum)


def build_case(
    size: Size, case: str, batch: int, device: torch.device, amp: bool = False, compiled: bool = False, cache=None
) -> Callable[[], None]:
    """Build one case (model, optimizer, inputs) and return a function that runs one step of it.

    `amp` (bf16 autocast) and `compiled` (torch.compile) are the GPU-only columns. `cache` shares the plain MACRL
    model and optimizer between the MACRL rows that differ only in how the step runs.
    """
    from macrl import MACRLForPreTraining, MACRLModel

    cache = {} if cache is None else cache
    generator = torch.Generator().manual_seed(0)
    config = macrl_config(size)
    shape = (batch, config.num_channels, config.image_size, config.image_size)
    x = torch.randn(shape, generator=generator).to(device)
    x2 = torch.randn(shape, generator=generator).to(device)  # the second view
    torch.manual_seed(0)

    if case in PRETRAIN_CASES:
        is_macrl = case != "ViTMAEForPreTraining"
        amp = amp or case in ("MACRL bf16 autocast", "MACRL bf16 compiled momentum fwd", "MACRL bf16 compiled")
        compiled = compiled or case in ("MACRL bf16 compiled", "MACRL compiled")
        if case in ("MACRL", "MACRL bf16 autocast") and not compiled:
            if "macrl" not in cache:  # the same model and optimizer for fp32 and bf16 autocast
                model = MACRLForPreTraining(config).to(device).train()
                cache["macrl"] = model, torch.optim.AdamW(
                    [p for p in model.parameters() if p.requires_grad], lr=1.5e-4, weight_decay=0.05
                )
            model, optimizer = cache["macrl"]
        else:
            if case == "ViTMAEForPreTraining":
                model = vitmae_model(config)
            elif case == "MACRL MoCo-v3 mode":
                model = MACRLForPreTraining(
                    macrl_config(size, reconstruction_weight=0.0, mask_ratio=0.0, symmetric_loss=True)
                )
            elif case == "MACRL MAE mode":
                model = MACRLForPreTraining(macrl_config(size, contrastive_weight=0.0))
            else:
                model = MACRLForPreTraining(config)
            model = model.to(device).train()
            if case == "MACRL bf16 momentum fwd":
                bf16_momentum_forward(model, device)
            if case == "MACRL bf16 compiled momentum fwd":
                compiled_momentum_forward(model)
            optimizer = torch.optim.AdamW(
                [p for p in model.parameters() if p.requires_grad], lr=1.5e-4, weight_decay=0.05
            )
        forward = torch.compile(model) if compiled else model
        return pretraining_step(model, forward, optimizer, x, x2, amp=amp, is_macrl=is_macrl, device=device)

    if case in EXTRACT_CASES:
        from macrl.feature_extraction import inference_precision, prepare_for_inference

        amp = amp or case.endswith("bf16 autocast")
        bf16_weights = case.endswith(("bf16", "bf16 compiled"))
        compiled = compiled or case.endswith("compiled")
        precision = inference_precision(device, "bf16" if bf16_weights else "fp32")
        inputs = x.to(precision.weights)
        if case.startswith("MACRLModel"):
            # the package's own path: what `macrl-extract --dtype ... [--compile]` runs
            model = prepare_for_inference(
                MACRLModel(config), device, "bf16" if bf16_weights else "fp32", compile=compiled
            )
            forward = model
            run = lambda m: m(inputs).pooler_output  # noqa: E731
        else:
            if case.startswith("timm"):
                model = timm_model(config)
                run = lambda m: m(inputs)  # noqa: E731
            else:
                model = hf_vit_model(config)
                run = lambda m: m(pixel_values=inputs).last_hidden_state[:, 0]  # noqa: E731
            model = model.to(device, dtype=precision.weights).eval()  # timm: the same treatment as MACRL's
            forward = torch.compile(model) if compiled else model
        amp = amp or precision.autocast is not None

        def step() -> None:
            with torch.inference_mode(), autocast(device, amp):
                run(forward)

        return step

    raise ValueError(f"unknown case {case!r}")


# ------------------------------------------------------------------------------------------------------ measuring


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def current_rss() -> int:
    """Resident set size of this process in bytes."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        import psutil

        return psutil.Process().memory_info().rss


def peak_rss() -> int:
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


def memory_worker(size_name: str, case: str, batch: int, steps: int) -> None:
    """Run in a fresh process: build the case, run `steps` steps, print the peak RSS above the post-import RSS."""
    _import_everything()  # the imports are the baseline, not part of the case
    print(json.dumps({"peak_mb": _case_peak_mb(size_name, case, batch, steps)}))


# what the forkserver imports once, so that each case's fresh process starts with them loaded
_PRELOAD = (
    "torch",
    "timm.models.vision_transformer",
    "transformers",
    "transformers.models.vit.modeling_vit",
    "transformers.models.vit_mae.modeling_vit_mae",
    "macrl",
    "macrl.modeling_macrl",
    "macrl.presets",
)


def _import_everything() -> None:
    import importlib

    for name in _PRELOAD:
        importlib.import_module(name)


def _proc_status() -> dict[str, int] | None:
    """Memory fields of /proc/self/status in bytes (Linux), else None."""
    try:
        with open("/proc/self/status") as status:
            fields = dict(line.split(":", 1) for line in status if line.startswith(("Vm", "Rss")))
    except OSError:
        return None
    return {key: int(value.split()[0]) * 1024 for key, value in fields.items()}


def _case_peak_mb(size_name: str, case: str, batch: int, steps: int) -> float:
    """Peak memory of building the case and running `steps` steps, above the memory the process had before."""

    def work() -> None:
        step = build_case(SIZES[size_name], case, batch, torch.device("cpu"))
        for _ in range(steps):
            step()

    return peak_mb(work)


def peak_mb(work: Callable[[], object]) -> float:
    """Peak memory of running `work()` in this process (a fresh one: the peak is the process's), in MiB above the
    memory it had before.

    On Linux: the peak RSS (VmHWM) minus the RSS before, minus what file-backed pages (library code the step runs
    for the first time) added, so that what is left is the anonymous memory: weights, optimizer state, activations.
    """
    before = _proc_status()
    baseline = current_rss()
    work()
    after = _proc_status()
    if before is None or after is None or "VmHWM" not in after:
        return (peak_rss() - baseline) / 2**20
    file_pages = sum(after.get(key, 0) - before.get(key, 0) for key in ("RssFile", "RssShmem"))
    return (after["VmHWM"] - before["VmRSS"] - file_pages) / 2**20


def _memory_child(size_name: str, case: str, batch: int, steps: int, threads: int, connection) -> None:
    torch.set_num_threads(threads)
    try:
        connection.send(_case_peak_mb(size_name, case, batch, steps))
    except Exception as error:
        connection.send(f"error: {type(error).__name__}: {error}"[:60])


_FORKSERVER = None


def _forkserver():
    """A forkserver that has done the imports and never runs a tensor op: a process forked from it is fresh (its peak
    RSS starts at its current RSS; OpenMP is safe to use) and starts in milliseconds instead of re-importing."""
    global _FORKSERVER
    if _FORKSERVER is None:
        import multiprocessing

        try:
            context = multiprocessing.get_context("forkserver")
        except ValueError:  # no forkserver on this platform
            _FORKSERVER = False
            return None
        context.set_forkserver_preload(list(_PRELOAD))
        _FORKSERVER = context
    return _FORKSERVER or None


def measure_memory_cpu(size_name: str, case: str, batch: int, steps: int) -> float | str:
    context = _forkserver()
    if context is not None:
        receiver, sender = context.Pipe(duplex=False)
        process = context.Process(
            target=_memory_child, args=(size_name, case, batch, steps, torch.get_num_threads(), sender)
        )
        process.start()
        sender.close()
        try:
            result = receiver.recv()
        except EOFError:  # the process died (e.g. out of memory)
            result = f"error: exit code {process.join() or process.exitcode}"
        process.join()
        return result
    command = [sys.executable, os.path.abspath(__file__), "--memory-worker", size_name, case, str(batch), str(steps)]
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()))
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        return "error: " + (result.stderr.strip().splitlines() or ["?"])[-1][:60]
    return json.loads(result.stdout.strip().splitlines()[-1])["peak_mb"]


def measure_memory_gpu(step: Callable[[], None], device: torch.device) -> float:
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    synchronize(device)
    return torch.cuda.max_memory_allocated(device) / 2**20


@dataclass
class Result:
    size: str
    case: str
    batch: int
    times: list[float] = field(default_factory=list)
    peak_mb: float | str | None = None
    extra: dict[str, float | str] = field(default_factory=dict)  # GPU columns: images/s
    error: str | None = None
    compile_seconds: float | None = None  # the first call of a compiled case

    @property
    def seconds(self) -> float | None:
        return statistics.median(self.times) if self.times else None


# wall time; `--clock cpu` switches to this process's CPU time, which a single-threaded run (`--threads 1`) can use on a
# loaded machine: CPU time does not count the time other processes hold the core (it does count OpenMP spin-waits,
# so it is no measure for several threads)
CLOCK = time.perf_counter


def time_round_robin(
    steps: dict[str, Callable[[], None]], warmup: int, repeats: int, device: torch.device, results: dict
) -> None:
    """Warm every case up, then time one step of each case per repeat, starting the round at a different case."""
    names = list(steps)
    if not names:  # every case failed to build: their rows carry the errors
        return
    for _ in range(warmup):
        for name in names:
            _run_guarded(name, steps, results, device, record=False)
    for repeat in range(repeats):
        for name in names[repeat % len(names) :] + names[: repeat % len(names)]:
            _run_guarded(name, steps, results, device, record=True)


def _run_guarded(name: str, steps: dict, results: dict, device: torch.device, record: bool) -> None:
    if name not in steps:
        return
    synchronize(device)
    start = CLOCK()
    try:
        steps[name]()
    except Exception as error:  # a failing case becomes an "error" row, the others go on
        results[name].error = f"{type(error).__name__}: {error}"[:80]
        del steps[name]
        return
    synchronize(device)
    if record:
        results[name].times.append(CLOCK() - start)


def benchmark_size(size_name: str, args: argparse.Namespace, device: torch.device) -> list[Result]:
    size = SIZES[size_name]
    batch = args.batch_size or size.batch
    cases = {"all": PRETRAIN_CASES + EXTRACT_CASES, "pretrain": PRETRAIN_CASES, "extract": EXTRACT_CASES}[args.task]
    cases = tuple(case for case in cases if not (args.no_compile and case in COMPILED_CASES))
    if args.cases:
        cases = tuple(case for case in cases if case in args.cases)
    results = {case: Result(size_name, case, batch) for case in cases}
    log = (lambda message: print(f"[{size_name}] {message}", file=sys.stderr, flush=True)) if args.verbose else None

    # peak memory first, each pretraining case in a fresh process (CPU), before this process holds any model
    if not args.no_memory:
        for case in PRETRAIN_CASES if args.task != "extract" else ():
            if device.type == "cpu" and case not in COMPILED_CASES:  # a fresh process would compile again
                log and log(f"peak memory of {case}")
                results[case].peak_mb = measure_memory_cpu(size_name, case, batch, steps=2)

    cache: dict = {}
    steps: dict[str, Callable[[], None]] = {}
    for case in cases:
        try:
            steps[case] = build_case(size, case, batch, device, cache=cache)
            if case in COMPILED_CASES:  # the first call compiles: timed apart, not a warm-up step like the others
                log and log(f"compiling {case}")
                synchronize(device)
                started = time.perf_counter()
                steps[case]()
                synchronize(device)
                results[case].compile_seconds = time.perf_counter() - started
        except Exception as error:
            results[case].error = f"{type(error).__name__}: {error}"[:80]
            steps.pop(case, None)
    if device.type == "cuda" and not args.no_memory:
        for case in PRETRAIN_CASES:
            if case in steps:
                steps[case]()  # the first step allocates the optimizer state
                results[case].peak_mb = measure_memory_gpu(steps[case], device)
    log and log(f"timing {len(steps)} cases: {args.warmup} warm-up + {args.repeats} timed steps each")
    time_round_robin(steps, args.warmup, args.repeats, device, results)
    del steps, cache

    if device.type == "cuda":  # bf16-autocast and torch.compile columns, timed round-robin too
        for column, amp, compiled in (("bf16 img/s", True, False), ("compile img/s", False, True)):
            extra_steps, extra_results = {}, {}
            for case in cases:
                if "bf16" in case or case in COMPILED_CASES:
                    continue
                try:
                    extra_steps[case] = build_case(size, case, batch, device, amp=amp, compiled=compiled)
                    extra_results[case] = Result(size_name, case, batch)
                except Exception as error:
                    results[case].extra[column] = f"error: {type(error).__name__}"
            time_round_robin(extra_steps, args.warmup, args.repeats, device, extra_results)
            for case, result in extra_results.items():
                results[case].extra[column] = (
                    batch / result.seconds if result.seconds else f"error: {result.error or '?'}"[:30]
                )
            del extra_steps
    return [results[case] for case in cases]


# -------------------------------------------------------------------------------------------------------- report


def cpu_name_and_flags() -> tuple[str, set[str]]:
    cpu = platform.processor() or platform.machine()
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name") and cpu in (platform.processor(), platform.machine()):
                    cpu = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return cpu, flags


CPU_KINDS = {"amx": "AMX", "avx512_bf16": "AVX512-BF16 (no AMX)", "none": "neither AMX nor AVX512-BF16"}


def cpu_kind(device: torch.device) -> str:
    """`amx`, `avx512_bf16` or `none`: which bf16 units the CPU has, what the bf16 targets depend on; `gpu` on a
    GPU, where no CPU target applies."""
    if device.type != "cpu":
        return "gpu"
    flags = cpu_name_and_flags()[1]
    return "amx" if "amx_bf16" in flags else "avx512_bf16" if "avx512_bf16" in flags else "none"


def machine_lines(device: torch.device) -> list[str]:
    cpu, flags = cpu_name_and_flags()
    bf16_units = [flag for flag in ("amx_bf16", "amx_tile", "avx512_bf16") if flag in flags] or ["none"]
    import timm
    import transformers

    lines = [
        f"machine: {cpu}, {os.cpu_count()} logical cores, torch threads {torch.get_num_threads()}, "
        f"bf16 CPU units: {', '.join(bf16_units)} ({CPU_KINDS[cpu_kind(torch.device('cpu'))]}), "
        f"torch CPU capability {torch.backends.cpu.get_cpu_capability()}",
        f"software: python {platform.python_version()}, torch {torch.__version__}, timm {timm.__version__}, "
        f"transformers {transformers.__version__}",
    ]
    if device.type == "cuda":
        lines.append(f"device: {torch.cuda.get_device_name(device)}")
    else:
        lines.append("device: cpu")
    return lines


def _ratio(results: dict[str, Result], check: Check) -> float | None:
    numerator, denominator = results.get(check.numerator), results.get(check.denominator)
    if numerator is None or denominator is None:
        return None
    if check.metric == "memory":
        a, b = numerator.peak_mb, denominator.peak_mb
        return a / b if isinstance(a, float) and isinstance(b, float) and b > 0 else None
    a, b = numerator.seconds, denominator.seconds
    if a is None or b is None:
        return None
    return a / b if check.metric == "time" else b / a


def build_table(all_results: list[Result], device: torch.device) -> list[list[str]]:
    gpu_columns = ["bf16 img/s", "compile img/s"]
    header = ["size", "task", "case", "batch", "ms/step", "img/s", "peak MB", "check", "ratio", "target", "result"]
    header += gpu_columns
    rows = [header]
    kind = cpu_kind(device)
    by_size: dict[str, dict[str, Result]] = {}
    for result in all_results:
        by_size.setdefault(result.size, {})[result.case] = result
    for result in all_results:
        task = "pretrain" if result.case in PRETRAIN_CASES else "extract"
        seconds = result.seconds
        if result.error:
            timing = [f"error: {result.error}", "", ""]
        elif seconds is None:
            timing = ["-", "-", ""]
        else:
            timing = [f"{seconds * 1000:.1f}", f"{result.batch / seconds:.1f}", ""]
        if isinstance(result.peak_mb, float):
            timing[2] = f"{result.peak_mb:.0f}"
        elif isinstance(result.peak_mb, str):
            timing[2] = result.peak_mb
        elif task == "pretrain":
            timing[2] = "-"
        extra = []
        for column in gpu_columns:
            value = result.extra.get(column)
            if device.type != "cuda" or "bf16" in result.case:
                extra.append("-")
            else:
                extra.append(f"{value:.1f}" if isinstance(value, float) else str(value or "-"))
        checks = [check for check in CHECKS if check.row == result.case] or [None]
        for index, check in enumerate(checks):
            prefix = [result.size, task, result.case, str(result.batch)] + timing if index == 0 else [""] * 7
            if check is None:
                cells = ["", "", "", ""]
            else:
                ratio = _ratio(by_size[result.size], check)
                goal = check.target_on(kind)
                target = f"{check.op}{goal:.2f}x" if check.op and goal is not None else "(info)"
                if ratio is None:
                    verdict = "n/a"
                elif check.op is None or goal is None:
                    verdict = ""
                else:
                    ok = ratio <= goal if check.op == "<=" else ratio >= goal
                    verdict = "PASS" if ok else "FAIL"
                cells = [check.label, "-" if ratio is None else f"{ratio:.2f}x", target, verdict]
            rows.append(prefix + cells + (extra if index == 0 else [""] * len(extra)))
    return rows


def format_table(rows: list[list[str]]) -> str:
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    numeric = {"batch", "ms/step", "img/s", "peak MB", "ratio", "bf16 img/s", "compile img/s"}
    lines = []
    for number, row in enumerate(rows):
        cells = [
            cell.rjust(width) if rows[0][column] in numeric else cell.ljust(width)
            for column, (cell, width) in enumerate(zip(row, widths))
        ]
        lines.append("  ".join(cells).rstrip())
        if number == 0:
            lines.append("  ".join("-" * width for width in widths))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--sizes",
        default=None,
        help=f"comma-separated sizes out of {', '.join(SIZES)} (default: vit-t4-32,vit-s16-224; quick with --quick)",
    )
    parser.add_argument("--repeats", type=int, default=None, help="timed steps per case (default 5, 2 with --quick)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps per case first (default 2, 1 quick)")
    parser.add_argument("--batch-size", type=int, default=None, help="override the batch of every size")
    parser.add_argument("--quick", action="store_true", help="tiny sizes and few repeats: a smoke test")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurements")
    parser.add_argument("--no-compile", action="store_true", help="leave out the torch.compile cases (minutes of compiling)")
    parser.add_argument(
        "--task", choices=("all", "pretrain", "extract"), default="all", help="which cases to run (default: all)"
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch intra-op threads (default: torch's, usually one per core)"
    )
    parser.add_argument(
        "--cases",
        type=lambda text: [case.strip() for case in text.split(",")],
        default=None,
        help="comma-separated case names to keep (default: every case of --task), e.g. 'MACRL bf16 autocast,MACRL bf16 "
        "compiled'",
    )
    parser.add_argument("--device", default="auto", help="auto (cuda if present), cpu or cuda")
    parser.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="wall time (default), or process CPU time: for --threads 1 on a machine busy with other work",
    )
    parser.add_argument("--verbose", action="store_true", help="progress on stderr")
    parser.add_argument("--memory-worker", nargs=4, metavar=("SIZE", "CASE", "BATCH", "STEPS"), help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    if args.clock == "cpu" and torch.get_num_threads() > 1:
        print("warning: --clock cpu sums the CPU time of all threads; use it with --threads 1", file=sys.stderr)
    if args.memory_worker:
        size_name, case, batch, steps = args.memory_worker
        memory_worker(size_name, case, int(batch), int(steps))
        return 0
    if args.sizes is None:
        args.sizes = "quick" if args.quick else "vit-t4-32,vit-s16-224"
    if args.repeats is None:
        args.repeats = 2 if args.quick else 5
    if args.warmup is None:
        args.warmup = 1 if args.quick else 2
    sizes = [name.strip() for name in args.sizes.split(",") if name.strip()]
    unknown = [name for name in sizes if name not in SIZES]
    if unknown:
        raise SystemExit(f"unknown size(s) {', '.join(unknown)}; choose from {', '.join(SIZES)}")
    unknown_cases = [case for case in args.cases or () if case not in PRETRAIN_CASES + EXTRACT_CASES]
    if unknown_cases:
        raise SystemExit(f"unknown case(s) {', '.join(unknown_cases)}; choose from {', '.join(PRETRAIN_CASES + EXTRACT_CASES)}")
    if args.repeats < 1 or args.warmup < 0:
        raise SystemExit("--repeats must be >= 1 and --warmup >= 0")
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)

    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    started = time.perf_counter()
    results: list[Result] = []
    for size_name in sizes:
        results += benchmark_size(size_name, args, device)
        if args.verbose:  # a long run shows each size's rows as soon as they are measured
            print(format_table(build_table(results, device)), file=sys.stderr, flush=True)
    elapsed = time.perf_counter() - started
    load_after = os.getloadavg() if hasattr(os, "getloadavg") else None

    for line in machine_lines(device):
        print(line)
    for size_name in sizes:
        size = SIZES[size_name]
        print(f"size {size_name}: {size.label}, batch {args.batch_size or size.batch}")
    print(
        f"medians of {args.repeats} timed steps after {args.warmup} warm-up steps per case, cases interleaved, "
        f"{'process CPU' if args.clock == 'cpu' else 'wall'} time; "
        f"run took {elapsed:.0f} s"
        + (
            f"; load average {load_before[0]:.2f} before, {load_after[0]:.2f} after"
            if load_before and load_after
            else ""
        )
    )
    print()
    print(format_table(build_table(results, device)))
    print()
    print(
        "notes: img/s counts images (MACRL's two views of an image count once). Step = forward, backward, AdamW "
        "step (+ momentum EMA for MACRL).\n"
        "       ratios: step time a / b for 'step time', throughput a / b for 'img/s', peak a / b for 'peak mem'.\n"
        "       'MACRL bf16 momentum fwd' is a benchmark-only variant: fp32 step with the no-grad momentum forward "
        "under bf16 autocast;\n"
        "       'MACRL bf16 compiled momentum fwd' / 'MACRL bf16 compiled': the bf16-autocast step with torch.compile of "
        "the momentum forward only / of the whole model; 'MACRL compiled': the fp32 step, whole model compiled.\n"
        "       extraction: 'bf16 autocast' keeps float32 weights; 'bf16' casts weights and inputs (MACRL: "
        "prepare_for_inference, as --dtype bf16; on a CPU without bf16 kernels that falls back to autocast);\n"
        "       'compiled': torch.compile (MACRL: in place, as --compile). bf16 targets depend on the CPU kind: "
        "AMX >=4x (compiled), AVX512-BF16 >=1.4x, none elsewhere."
    )
    if device.type == "cuda":
        print("       peak MB: torch.cuda.max_memory_allocated during one step.")
    else:
        print(
            "       peak MB: peak RSS of a fresh process (forked from an import-only forkserver) building the case and "
            "running 2 steps,\n                above its RSS after the imports, library pages left out: weights, "
            "optimizer state, activations."
        )
        print(
            "       bf16 img/s and compile img/s (bf16 autocast and torch.compile of every fp32 case) need a GPU: "
            "skipped on CPU; CPU bf16 and torch.compile have their own rows."
        )
    verdicts = [row[10] for row in build_table(results, device)[1:]]
    compiled = [result for result in results if result.compile_seconds is not None]
    if compiled:
        print("compile time (first call of each compiled case, not in its ms/step):")
        for result in compiled:
            print(f"       {result.size}  {result.case}: {result.compile_seconds:.1f} s")
    print(f"targets: {verdicts.count('PASS')} PASS, {verdicts.count('FAIL')} FAIL")
    return 0


if __name__ == "__main__":
    sys.exit(main())
