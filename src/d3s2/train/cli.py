"""``d3s2 train FAMILY --config FILE [--stage S] [--a.b=c ...] [--max-steps N] [--out DIR] [--resume [CKPT]]``.

FAMILY is the kind of model (``vae``, ``dit``, ``toy``) or an exact task name; the config's ``task.name``
must belong to it. ``--stage dense|sparse`` (family ``dit``) also requires the config's task to be that
stage's (``dit_dense`` / ``dit_sparse``).
Several GPUs: ``torchrun --standalone --nproc_per_node N -m d3s2.cli train ...``.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from pathlib import Path

log = logging.getLogger(__name__)
_OVERRIDE = re.compile(r"^--[A-Za-z_]\w*(\.[A-Za-z_]\w*)*=")

EPILOG = """examples:
  d3s2 train toy --config configs/debug/tiny_toy.yaml --out runs/toy --max-steps 20
  d3s2 train vae --config configs/demo/ss_vae_train.yaml --optim.lr=5e-5 --data.max_tokens=200000
  d3s2 train dit --stage sparse --config configs/demo/dit_sparse_train.yaml --train.max_minutes=6
  torchrun --standalone --nproc_per_node 2 -m d3s2.cli train vae --config configs/demo/ss_vae_train.yaml --out runs/v
  d3s2 train vae --config configs/demo/ss_vae_train.yaml --out runs/v --resume

any config value can be overridden with --section.key=value (YAML syntax, checked against the schema).
Ctrl-C or SIGTERM stops after the current step and saves a checkpoint (exit code 130 / 143); --resume continues.
Under torchrun the ranks stop together at the next log step (train.log_every). A step still running
train.stop_grace_s (10 s) after the signal is stuck (e.g. a peer rank died): it exits at once, without a checkpoint.
A signal ignored when the command starts (SIGINT for `d3s2 train ... &` in a script) stays ignored."""


class _TrainParser(argparse.ArgumentParser):
    """Takes ``--section.key=value`` config overrides out of the arguments before argparse parses the rest."""

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        args = list(sys.argv[1:] if args is None else args)
        own = set(self._option_string_actions)
        is_override = [bool(_OVERRIDE.match(a)) and a.split("=", 1)[0] not in own for a in args]
        ns, unknown = super().parse_known_args([a for a, o in zip(args, is_override) if not o], namespace)
        ns.overrides = [a for a, o in zip(args, is_override) if o]
        ns.train_argv = args
        return ns, unknown


def _run(args: argparse.Namespace) -> int:
    from ..config import ConfigError, Override
    from .task import get_task
    from .trainer import Trainer, load_train_config

    overrides: list[str | Override] = list(args.overrides)
    if args.max_steps is not None:
        given = [o for o in args.overrides if o.startswith("--train.max_steps=")]
        if given:
            raise ConfigError(f"--max-steps {args.max_steps} and {given[0]} both set train.max_steps; pass one")
        # Errors about it (--train={...} given too) name what was typed.
        overrides.append(Override("train.max_steps", str(args.max_steps), f"--max-steps {args.max_steps}"))
    cfg = load_train_config(args.config, overrides)
    family = get_task(cfg.task.name).family
    if args.family not in (family, cfg.task.name):
        raise ConfigError(f"{args.config}: task {cfg.task.name!r} is a {family!r} task; run `d3s2 train {family}`")
    if args.stage is not None and family != "dit":
        raise ConfigError(f"--stage applies to dit tasks only; {args.config} trains a {family!r} task")
    if args.stage is not None and cfg.task.name != f"dit_{args.stage}":
        raise ConfigError(f"{args.config}: task {cfg.task.name!r} is not the {args.stage} stage's "
                          f"(dit_{args.stage}); pick that stage's config")
    out = Path(args.out) if args.out else Path("runs") / f"{cfg.task.name}-{Path(args.config).stem}"
    # The d3s2 command as typed (also under torchrun, whose argv starts with the module path).
    command = ["d3s2", "train", *getattr(args, "train_argv", [])]
    trainer = Trainer(cfg, out, resume=args.resume, command=command, allow_config_change=args.allow_config_change)
    try:
        metrics = trainer.run()
    finally:
        trainer.close()
    if trainer.interrupted is not None:
        return 128 + trainer.interrupted  # as a shell reports a process ended by that signal
    if trainer.info.is_main:
        summary = ", ".join(f"{k}={v:.4g}" for k, v in metrics.items() if k in ("loss", "tokens_per_s"))
        log.info("trained %s to step %d in %s (%s)", cfg.task.name, trainer.step, out, summary)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a model (VAE, DiT, toy) from a YAML config",
                       description=__doc__, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("family", metavar="FAMILY", help="vae | dit | toy, or a task name (e.g. dense_vae, dit_sparse)")
    p.add_argument("--config", required=True, help="YAML run config (see d3s2.config.TrainConfig)")
    p.add_argument("--out", default=None, help="run directory (default runs/<task>-<config name>)")
    p.add_argument("--max-steps", type=int, default=None, help="shorthand for --train.max_steps=N")
    p.add_argument("--stage", choices=["dense", "sparse"], default=None,
                   help="dit only: the stage the config must train (a check against task.name)")
    p.add_argument("--resume", nargs="?", const="latest", default=None, metavar="CKPT",
                   help="continue from CKPT, or without a value from the newest checkpoint in --out (if any); the "
                        "config must match the checkpoint's, except how long to train and how often to log, "
                        "validate and save (d3s2.train.trainer.RESUMABLE_CHANGES, docs/training.md)")
    p.add_argument("--allow-config-change", action="store_true",
                   help="with --resume: continue with a config that differs from the checkpoint's in other keys too "
                        "(the differences are logged; the earlier config is kept as config.prev-<step>.yaml)")
    p.set_defaults(func=_run, overrides=[])
    # Lets arbitrary --section.key=value arguments through (argparse rejects unknown options otherwise).
    p.__class__ = _TrainParser
