"""The tests of macrl (`python -m pytest`; `-m slow` for the long end-to-end runs), against real parts: Fashion-MNIST
images, Hub servers on loopback, subprocesses for several processes and for `kill -9`.

Where to look:

| what | tests |
|---|---|
| the models, config, image processor | `test_modeling.py` (maths, EMA, MAE / MoCo v3 reductions), `test_model_common.py` (transformers' common model checks), `test_configuration.py`, `test_image_processing.py`, `test_backbone.py`, `test_export.py` |
| saving, loading, the Hub | `test_save_and_auto.py`, `test_hub_push.py`, `test_hub_roundtrip.py`, `test_hub_faults.py`, `test_model_card.py` |
| data | `test_data.py`, `test_batch_augmentations.py`, `test_shards.py` (shards, streams, several processes) |
| pre-training (`macrl-pretrain`) | `test_pretrain.py` (end to end), `test_training_loop.py` (budget, clock, log, monitor, progress bar), `test_training_parts.py` (the budget's parts, the log's resume trim, the encoder release), `test_eval_data.py`, `test_crash_safety.py` (kill -9, damaged checkpoints), `test_stop_signals.py` (SIGTERM and the like: a checkpoint of the step, one or several processes, the SLURM recipe), `test_write_failures.py` (a full disk), `test_online_probe.py` (`--online-probe`) |
| evaluation, extraction, conversion | `test_evaluation.py`, `test_probes.py` (label fractions, DINOv2's protocol), `test_evaluate.py`, `test_lora.py` (LoRA, peft), `test_gradient_checkpointing.py` (fine-tuning and pre-training), `test_extract.py`, `test_conversion.py` |
| what holds for the whole code | `test_architecture.py` (layers, no private imports), `test_security.py`, `test_fuzz_inputs.py`, `test_precision.py`, `test_fair_share.py` (OpenMP threads that wait), `test_gpu_path.py`, `test_docs.py` (the docs build, their snippets run) |

The helpers the tests share are modules of this package (`from tests.X import ...`; pyproject's pytest `pythonpath`
puts the checkout first): `tiny_models` (the tiny preset, a saved tiny encoder), `image_folders`, `saved_datasets`,
`shard_files` (real images as a user's folders, `datasets` and shards), `pretrain_runs` (runs in subprocesses, to
kill, stop and resume), `hub_server` and `olah_mirror` (Hub servers on loopback), `batch_norm_worker`. The fixtures
every test may ask for are in `conftest.py`: `tiny_config`, `tiny_encoder_folder`, `fashion_images`, `hub_server`,
`uninterrupted_run` (a `pretrain_runs` run never interrupted, which killed and stopped runs must end like).
"""
