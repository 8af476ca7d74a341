"""Training for every d3s2 model family: ``d3s2 train FAMILY --config FILE``.

Modules: :mod:`.task` (the ``TrainTask`` interface and the task registry), :mod:`.trainer` (the loop),
:mod:`.distributed` (torchrun, DDP/FSDP, activation checkpointing), :mod:`.data` (token-budget batching),
:mod:`.checkpoint`, :mod:`.ema`, :mod:`.logger`, :mod:`.signals` (stopping on SIGINT / SIGTERM), :mod:`.toy`
(a complete example task), :mod:`.cli`.
Nothing is imported here so that ``d3s2 --help`` stays fast; see docs/training.md.
"""
