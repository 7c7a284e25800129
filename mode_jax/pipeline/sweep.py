"""`mode-jax sweep GRID.toml`: a grid of runs (methods x settings x seeds) in one process.

A grid file (docs/sweep.md) names a base config, the seeds, and cells:

    [sweep]
    base = "gpu"                       # a preset (configs/NAME.toml) or a TOML config file
    seeds = [0, 1, 2]                  # every cell runs once per seed (train.seed)
    baseline = "full"                  # the cell(s) the report compares the others with (paired)
    set = { "train.steps" = 2000 }     # overrides for every cell (optional)
    gate_analysis = 50                 # optional: MoDE runs' gate statistics (0), + stage-2 trace every N steps
                                       # (a cell's own gate_analysis = N overrides it for that cell)

    [[sweep.cell]]
    method = "full"                    # backbone, expert, full, lora, uninit, mode, mode-frozen, lora-moe, ...
    lr = [1e-3, 5e-5]                  # a list is an axis; `lr` = this method's lr key
    "train.steps" = 400                # any config key, "section.key"

Each (cell, axis values, seed) is one run with a resolved config; its identity is a hash
of its method and resolved config. A finished run is appended, as one strict-JSON line
with its config and its per-row / per-document results, to `<out>/results.jsonl`
(rewritten whole under a temporary name, so a kill never leaves half a line); on
the next call with the same --out, runs already there are skipped and an interrupted
one continues from its last checkpoint. Everything is checked before anything runs.

Compiled steps are reused across runs whose shapes and static configs match (jit's
own cache: the step functions take hashable configs), and, across processes, through
JAX's persistent compilation cache, which the command turns on.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
from pathlib import Path
from typing import Any

from mode_jax.atomic import write_text_atomic
from mode_jax.errors import UserError
from mode_jax.integrity import strict_json
from mode_jax.pipeline import presets

METHODS = ("backbone", "expert", "full", "lora", "uninit", "mode", "mode-frozen", "lora-moe", "lora-moe-frozen",
           "btx", "block_expansion")
LR_KEY = {"full": "lr.full", "lora": "lr.lora", "uninit": "lr.mode", "expert": "lr.mode", "mode": "lr.mode",
          "mode-frozen": "lr.mode", "lora-moe": "lr.lora", "lora-moe-frozen": "lr.lora",
          "btx": "lr.full", "block_expansion": "lr.expansion"}
SWEEP_KEYS = {"base", "seeds", "baseline", "set", "cell", "gate_analysis"}
RESULTS = "results.jsonl"
# Keys added after the first sweeps ran: at these defaults they leave a run's identity (and
# its stage-1 experts' key) unchanged, so results recorded before them still count as done.
LATER_DEFAULTS = {"data.eval_split": "test", "data.train_examples": 0, "data.stage1_examples": 0,
                  "mode.uninit_experts": "random", "mode.gate_top_k": 0, "mode.n_experts": 0,
                  "lr.expansion": 1e-3, "expansion.every": 5}
# Keys that say how a run is watched, not what it computes (batches and random draws are
# step-indexed and a resumed run continues exactly): never part of a run's identity.
NOT_RESULTS = ("train.checkpoint_every", "train.log_every")


# A cell key its method never reads is refused rather than silently ignored (sweep.set may
# still set it for every cell: it is then read by the methods that do).
UNREAD = {"data.train_examples": ("backbone", "expert"), "data.stage1_examples": ("backbone", "full", "lora", "uninit")}
UNREAD_HINT = {"data.train_examples": "it limits the mixture phases; a stage-1 expert's rows are data.stage1_examples",
               "data.stage1_examples": "it limits stage-1 experts; the mixture's rows are data.train_examples"}
# The methods whose model has a MoDE gate: top-k gating is read where N experts are mixed, and a
# sweep's gate analysis (sweep_gates.py) looks at them; mode.n_experts only uninit reads (the
# capacity control).
GATED = ("mode", "mode-frozen", "uninit")
UNREAD["mode.gate_top_k"] = tuple(m for m in METHODS if m not in GATED)
UNREAD["mode.n_experts"] = tuple(m for m in METHODS if m != "uninit")
UNREAD_HINT["mode.gate_top_k"] = "it is MoDE's top-k gate in stage 2 (mode, mode-frozen) and uninit"
UNREAD_HINT["mode.n_experts"] = "it sets uninit's expert count; mode composes one stage-1 expert per domain"


def identity(cfg: presets.PipelineConfig) -> dict:
    """The config as a run's identity sees it: without data.dir (where the data lies is not
    part of what was run: a sweep carried to another machine still skips its finished runs),
    without NOT_RESULTS keys and without LATER_DEFAULTS keys left at their defaults."""
    return config_identity(cfg.to_dict())


def config_identity(config: dict) -> dict:
    """identity() of a config as a dict (as results.jsonl stores it)."""
    config = {section: dict(values) if isinstance(values, dict) else values for section, values in config.items()}
    config["data"] = {k: v for k, v in config.get("data", {}).items() if k != "dir"}
    for key in NOT_RESULTS:
        section, name = key.split(".")
        config.get(section, {}).pop(name, None)
    for key, default in LATER_DEFAULTS.items():
        section, name = key.split(".")
        if section in config and config[section].get(name) == default:
            del config[section][name]
            if not config[section]:         # a section added later, all at its defaults
                del config[section]
    return config


def run_id(method: str, config: dict) -> str:
    blob = json.dumps({"method": method, "config": config_identity(config)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def recorded_ids(record: dict) -> set[str]:
    """The ids a recorded run answers to: the one it was stored under and the one its stored
    config has today (a run recorded before a key left the identity is still the same run)."""
    ids = {record.get("cell")}
    if isinstance(record.get("config"), dict) and "method" in record:
        ids.add(run_id(record["method"], record["config"]))
    return ids - {None}


@dataclasses.dataclass(frozen=True)
class Cell:
    name: str                      # the cell's group in the report: method + its axis values
    method: str
    seed: int
    settings: tuple                # ((key, value), ...) that vary within the grid cell, seed excluded
    cfg: presets.PipelineConfig
    # its gate analysis (the cell's own `gate_analysis`, else sweep.gate_analysis's); not in the id
    gate_analysis: int | None = dataclasses.field(default=None, compare=False)

    @property
    def id(self) -> str:
        return run_id(self.method, self.cfg.to_dict())


@dataclasses.dataclass(frozen=True)
class Grid:
    cells: tuple[Cell, ...]
    baseline: str | list | None      # the report's paired comparisons are against it (or each of them)
    path: Path
    # sweep.gate_analysis: None = off, 0 = each gated run's gate statistics, N = also its stage-2
    # trace every N steps (pipeline/sweep_gates.py); not part of any run's identity
    gate_analysis: int | None = None


def _flatten(table: dict, where: str) -> dict[str, Any]:
    """{"train": {"steps": 8}} (TOML `train.steps = 8`) and {"train.steps": 8} -> {"train.steps": 8}."""
    out = {}
    for key, value in table.items():
        if isinstance(value, dict):
            for sub, v in value.items():
                if isinstance(v, dict):
                    raise UserError(f"{where}: {key}.{sub} nests too deep (keys are section.key)")
                out[f"{key}.{sub}"] = v
        else:
            out[key] = value
    return out


def _is_list_key(key: str) -> bool:
    section, name = key.split(".")
    return isinstance(getattr(presets.SECTIONS[section](), name), tuple)


def _check_key(key: str, where: str) -> None:
    section, _, name = key.partition(".")
    if section not in presets.SECTIONS or not name or "." in name or \
            name not in {f.name for f in dataclasses.fields(presets.SECTIONS[section])}:
        raise UserError(f"{where}: unknown key {key!r} (cell keys: name, method, lr, or a config key "
                        f"section.key, e.g. train.steps)")


def _axes(cell: dict[str, Any], where: str) -> list[tuple[str, list]]:
    """(key, values) per key; a list is an axis of values (a list of lists for list-valued keys)."""
    out = []
    for key, value in cell.items():
        listy = isinstance(value, list) and (not _is_list_key(key) or (value and isinstance(value[0], list)))
        if listy and not value:
            raise UserError(f"{where}: {key} is an empty axis (give at least one value)")
        out.append((key, list(value) if listy else [value]))
    return out


def _merge(base: dict, overrides: dict[str, Any]) -> dict:
    data = {k: dict(v) for k, v in base.items()}
    for key, value in overrides.items():
        section, name = key.split(".")
        data.setdefault(section, {})[name] = value
    return data


def setting_label(key: str, value) -> str:
    """How a cell's name shows one axis value: "lr=0.001" for the method's lr key, else the
    key's own name ("train_examples=160")."""
    return f"{'lr' if key.startswith('lr.') else key.split('.')[1]}={_fmt(value)}"


def _fmt(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def load_grid(path: str | Path, overrides: list[str] = ()) -> Grid:
    """Parse and expand a grid file; every run's config is built (so range-checked) here.
    `overrides` ("section.key=value", as --set) go on top of sweep.set, beneath the cells.
    Raises UserError (one line) for an unknown key, a bad value or an empty axis."""
    path = Path(path)
    doc = presets.read_toml(path)
    where = str(path)
    if set(doc) != {"sweep"}:
        extra = sorted(set(doc) - {"sweep"})
        raise UserError(f"{where}: the grid is one [sweep] table" + (f"; unknown table [{extra[0]}]" if extra else ""))
    sweep = doc["sweep"]
    unknown = sorted(set(sweep) - SWEEP_KEYS)
    if unknown:
        raise UserError(f"{where}: unknown key sweep.{unknown[0]} (known: {', '.join(sorted(SWEEP_KEYS))})")
    if "base" not in sweep or not isinstance(sweep["base"], str):
        raise UserError(f"{where}: sweep.base must name a preset or a config file")
    base_name = sweep["base"]
    base_file = (path.parent / base_name) if base_name.endswith(".toml") else None
    if base_file is not None and not base_file.is_file():
        base_file = Path(base_name)
    base = presets.read_toml(base_file) if base_file is not None else presets.read_toml(presets.preset_path(base_name))
    seeds = sweep.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds:
        raise UserError(f"{where}: sweep.seeds is an empty axis (give at least one seed)")
    if any(not isinstance(s, int) or isinstance(s, bool) or s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise UserError(f"{where}: sweep.seeds must be distinct integers >= 0, got {seeds}")
    common = _flatten(sweep.get("set", {}), f"{where} sweep.set")
    common.update(_flatten(presets.apply_overrides({}, list(overrides)), "--set"))
    for key in common:
        _check_key(key, f"{where} sweep.set / --set")
    specs = sweep.get("cell", [])
    if not isinstance(specs, list) or not specs:
        raise UserError(f"{where}: no [[sweep.cell]] (the grid has no runs)")
    gates = _gate_analysis(sweep.get("gate_analysis"), f"{where}: sweep.gate_analysis")
    cells, seen, owner = [], {}, {}
    for i, spec in enumerate(specs):
        if not isinstance(spec, dict):
            raise UserError(f"{where}: sweep.cell must be [[sweep.cell]] tables")
        new = _expand(spec, f"{where} cell {i + 1}", base, common, seeds, seen, gates)
        for name in {c.name for c in new}:
            # the report pools a name's runs over seeds: one name, one setting
            if owner.setdefault(name, i) != i:
                raise UserError(f"{where}: cells {owner[name] + 1} and {i + 1} are both named {name!r}; "
                                f"give them different names")
        cells += new
    names = {c.name for c in cells}
    baseline = sweep.get("baseline")
    if baseline is not None and not isinstance(baseline, (str, list)):
        raise UserError(f"{where}: sweep.baseline must be a cell name or a list of them, got {baseline!r}")
    for base in [baseline] if isinstance(baseline, str) else baseline or []:
        if base not in names:
            raise UserError(f"{where}: sweep.baseline {base!r} is not a cell name (names: {', '.join(sorted(names))})")
    # Seed-major: every cell's seed 0, then seed 1, ...: a sweep stopped part-way (a time
    # limit, a lost machine) holds whole seeds of the grid to compare, not a few cells' seeds.
    return Grid(tuple(sorted(cells, key=lambda c: c.seed)), baseline, path, gates)


def _gate_analysis(value, where: str) -> int | None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
        raise UserError(f"{where} must be an integer >= 0 (0: gate statistics only, "
                        f"N: also the stage-2 trace every N steps), got {value!r}")
    return value


def _expand(spec: dict, where: str, base: dict, common: dict, seeds: list, seen: dict,
            gates: int | None = None) -> list[Cell]:
    spec = dict(spec)
    if "gate_analysis" in spec:         # the cell's own: a trace for some cells, statistics for the rest
        gates = _gate_analysis(spec.pop("gate_analysis"), f"{where}: gate_analysis")
    spec = _flatten(spec, where)
    method = spec.pop("method", None)
    if method not in METHODS:
        raise UserError(f"{where}: method must be one of {', '.join(METHODS)}, got {method!r}")
    name = spec.pop("name", None)
    if name is not None and not isinstance(name, str):
        raise UserError(f"{where}: name must be a string, got {name!r}")
    if "lr" in spec:
        if method not in LR_KEY:
            raise UserError(f"{where}: method {method} trains nothing, so it takes no lr")
        spec[LR_KEY[method]] = spec.pop("lr")
    for key in spec:
        _check_key(key, where)
        if key == "train.seed":
            raise UserError(f"{where}: seeds come from sweep.seeds, not train.seed")
        if key == "mode.expert_init" and method == "uninit":
            # uninit ignores expert_init (it has no stage 1 to start from): say so, never run it silently
            raise UserError(f"{where}: method uninit does not read mode.expert_init; for copied experts "
                            f'without stage 1 set "mode.uninit_experts" = "copy"')
        if method in UNREAD.get(key, ()):
            raise UserError(f"{where}: method {method} does not read {key} ({UNREAD_HINT[key]})")
    axes = _axes(spec, where)
    varying = [k for k, values in axes if len(values) > 1]
    out = []
    for combo in itertools.product(*(values for _, values in axes)):
        settings = dict(zip([k for k, _ in axes], combo))
        label = name or method
        if varying:
            label += " " + " ".join(setting_label(k, settings[k]) for k in varying)
        for seed in seeds:
            data = _merge(base, {**common, **settings, "train.seed": seed})
            try:
                cfg = presets.from_dict(data)
            except UserError as err:
                raise UserError(f"{where}: {err}") from None
            if method == "expert" and len(cfg.domains.targets) > 1:
                raise UserError(f"{where}: method expert trains one expert: set domains.targets to one domain")
            cell = Cell(label, method, seed, tuple((k, settings[k]) for k in varying), cfg, gates)
            if cell.id in seen:
                raise UserError(f"{where}: {label} (seed {seed}) is the same run as {seen[cell.id]}")
            seen[cell.id] = f"{label} (seed {seed})"
            out.append(cell)
    return out


# ----------------------------------------------------------------------------- results file

def read_results(out: Path) -> list[dict]:
    """The finished runs in <out>/results.jsonl (a line that does not parse is ignored)."""
    path = Path(out) / RESULTS
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def append_result(out: Path, record: dict) -> None:
    """Add one line to results.jsonl: the whole file is rewritten under a temporary name and
    renamed, so a reader (or a kill) sees either the old file or the new one."""
    path = Path(out) / RESULTS
    old = path.read_text(encoding="utf-8") if path.is_file() else ""
    if old and not old.endswith("\n"):
        old += "\n"
    write_text_atomic(path, old + strict_json(record, sort_keys=True) + "\n")
