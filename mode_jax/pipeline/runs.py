"""One run directory per run: everything a run produces, in one place.

    <run>/config.toml       the resolved config (every key, defaults included)
    <run>/run.json          what ran: command line, kind, software versions, backbone fingerprint
    <run>/metrics.jsonl     one JSON object per logged training step (and eval lines)
    <run>/checkpoints/      training state every N steps (checkpoint.py)
    <run>/result.json       final evaluation and parameter counts, written last: its presence
                            means the run finished
    <run>/expert-*.safetensors, model.safetensors   the trained artifacts

A run directory is only created once every input has been checked, so bad input
leaves nothing behind. `--resume` reopens one and refuses a config that differs.
Every JSON file here is strict JSON (integrity.strict_json): a non-finite number is
written as null, never as the NaN/Infinity literals that parsers refuse.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

from mode_jax.atomic import write_text_atomic
from mode_jax.errors import UserError
from mode_jax.integrity import strict_json
from mode_jax.pipeline import presets

CONFIG, RUN, METRICS, RESULT = "config.toml", "run.json", "metrics.jsonl", "result.json"
# Keys a resumed run may change: the optimizer's settings and how often to log and
# checkpoint. The training state (weights, optimizer moments) has the same shape under
# any of them; every other key would make the checkpoint another run's.
RESUMABLE_CHANGES = ("lr.mode", "lr.full", "lr.lora", "train.warmup_steps", "train.min_lr_ratio",
                     "train.weight_decay", "train.clip_norm", "train.checkpoint_every", "train.log_every")


class RunDir:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    # ------------------------------------------------------------------ creation
    @classmethod
    def create(cls, path, cfg: presets.PipelineConfig, *, kind: str, info: dict[str, Any] | None = None,
               resume: bool = False) -> "RunDir":
        """A fresh run directory (or, with resume, the existing one, whose config must equal `cfg`)."""
        run = cls(path)
        if resume:
            if not (run.path / CONFIG).is_file():
                raise UserError(f"--resume: {run.path} is not a run directory (no {CONFIG})")
            stored = presets.load_config(config=str(run.path / CONFIG))
            changed = _changed_keys(stored, cfg)
            fixed = [k for k in changed if k not in RESUMABLE_CHANGES]
            if fixed:
                raise UserError(f"--resume: the config differs from the one {run.path} was started with "
                                f"({fixed[0]}: {changed[fixed[0]][0]!r} vs {changed[fixed[0]][1]!r}); resume with "
                                f"the same config "
                                f"(only {', '.join(RESUMABLE_CHANGES)} may change)")
            if changed and run.writer:
                # E.g. a lower learning rate after a run stopped at a non-finite loss: the state
                # in the checkpoint does not depend on these keys, the steps from now on do.
                print(f"--resume: going on with changed {', '.join(changed)}", file=sys.stderr)
                write_text_atomic(run.path / CONFIG, presets.to_toml(cfg))
            return run
        if not run.writer:
            return run      # process 0 checks and creates it
        if run.path.exists() and not run.path.is_dir():
            raise UserError(f"run directory {run.path} exists and is not a directory: choose another --out")
        if run.path.exists() and any(run.path.iterdir()):
            raise UserError(f"run directory {run.path} already exists and is not empty: pass --resume to "
                            f"continue it, or choose another --out")
        run.path.mkdir(parents=True, exist_ok=True)
        write_text_atomic(run.path / CONFIG, presets.to_toml(cfg))
        write_text_atomic(run.path / RUN, strict_json({
            "kind": kind, "argv": sys.argv, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "software": software_versions(), **(info or {})}, indent=2, sort_keys=True) + "\n")
        return run

    @property
    def writer(self) -> bool:
        """Whether this process writes the run's files: process 0 of a multi-process run.
        Every process computes the same values; checkpoints are written by all of them
        (each its own shards, mode_jax/pipeline/checkpoint.py)."""
        import jax
        return jax.process_index() == 0

    # ------------------------------------------------------------------ contents
    def config(self) -> presets.PipelineConfig:
        return presets.load_config(config=str(self.path / CONFIG))

    def info(self) -> dict[str, Any]:
        return json.loads((self.path / RUN).read_text())

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    def is_done(self) -> bool:
        return (self.path / RESULT).is_file()

    def result(self) -> dict[str, Any]:
        return json.loads((self.path / RESULT).read_text())

    def write_result(self, result: dict[str, Any]) -> None:
        if self.writer:
            write_text_atomic(self.path / RESULT, strict_json(result, indent=2, sort_keys=True) + "\n")

    # ------------------------------------------------------------------ metrics
    def log(self, record: dict[str, Any]) -> None:
        """Append one JSON line to metrics.jsonl (flushed, so a killed run keeps what it logged)."""
        if not self.writer:
            return
        with open(self.path / METRICS, "a", encoding="utf-8") as f:
            f.write(strict_json(record, sort_keys=True) + "\n")
            f.flush()

    def metrics(self) -> list[dict[str, Any]]:
        path = self.path / METRICS
        if not path.is_file():
            return []
        out = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:      # a line cut by a kill mid-write
                continue
        return out

    def truncate_metrics(self, phase: str, step: int) -> None:
        """Drop `phase` training lines after `step` (logged by a run killed after its last
        checkpoint), so a resumed run's curve has each step exactly once."""
        if not self.writer:
            return
        kept = [m for m in self.metrics() if not (m.get("phase") == phase and m.get("step", -1) > step)]
        write_text_atomic(self.path / METRICS, "".join(strict_json(m, sort_keys=True) + "\n" for m in kept))


def _changed_keys(a: presets.PipelineConfig, b: presets.PipelineConfig) -> dict[str, tuple]:
    """'section.key' -> (value in a, value in b) for every key that differs."""
    da, db = a.to_dict(), b.to_dict()
    return {f"{name}.{key}": (da[name][key], db[name][key]) for name in da for key in da[name]
            if da[name][key] != db[name][key]}


def software_versions() -> dict[str, str]:
    from importlib import metadata
    versions = {"python": platform.python_version()}
    for dist in ("mode-jax", "jax", "jaxlib", "numpy", "optax"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    try:
        import jax
        versions["device"] = str(jax.devices()[0].device_kind)
    except Exception:  # noqa: BLE001 - informational only
        pass
    return versions


def default_out(kind: str, label: str = "") -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{kind}{'-' + label if label else ''}-{stamp}"
