"""Which document separator should the built data use? The backbone's next-token accuracy with
the tokenizer's EOS (SmolLM2-135M-Instruct: id 2, `<|im_end|>`, what `mode-jax data build` packs)
against the id SmolLM2 was pretrained with (0, `<|endoftext|>`), on the same rows of a split.

Every separator in the rows is replaced by the candidate (the rows are otherwise identical);
accuracy counts content targets only (a target that is the separator is left out under both, so
both count the same targets), pooled per domain, with a 95% paired bootstrap over rows.
Measured on the validation split: the separator is a design choice, chosen like one.

    python scripts/separator_check.py --data DIR [--split validation] [--rows 16] [--seq 1024]
    python scripts/separator_check.py --data DIR --out docs/results/separator/results.json

Needs the fetched backbone (`mode-jax fetch smollm2-135m`) and a `mode-jax data build` folder.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="a `mode-jax data build` folder")
    p.add_argument("--split", default="validation", choices=("train", "validation", "test"))
    p.add_argument("--domains", default=None, help="comma-separated (default: every domain in the build)")
    p.add_argument("--rows", type=int, default=16, help="rows per domain, the split's first")
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--candidates", default="2,0", help="separator ids; the first is the build's")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--n-boot", type=int, default=2000)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    return p.parse_args(argv)


def row_counts(steps, params, rows: np.ndarray, separator: int, batch: int):
    """Per row: (correct, counted) content targets, the separator's targets left out: the
    pipeline's own evaluation (engine.evaluate's per-row counts)."""
    from mode_jax.pipeline.engine import evaluate
    per_row = evaluate(steps, params, {"rows": rows}, batch_size=batch, progress=False,
                       separator=separator)["rows"]["per_row"]
    return np.asarray(per_row["correct"]), np.asarray(per_row["tokens"])


def paired_interval(ya, na, yb, nb, n_boot: int, seed: int = 0) -> tuple[float, float, float]:
    """accuracy(a) - accuracy(b) over the same rows and its 95% bootstrap over rows
    (stats.paired_difference with the rows as units, one seed)."""
    from mode_jax.pipeline.stats import paired_difference
    v = paired_difference([ya], [na], [yb], [nb], n_boot=n_boot, seed=seed)
    return v.estimate, v.low, v.high


def main(argv=None) -> int:
    args = parse_args(argv)
    from mode_jax.data.pack import rows as stream_rows
    from mode_jax.data.store import load_split, read_manifest
    from mode_jax.errors import UserError

    try:
        import mode_jax
        from mode_jax.fast.steps import make_steps
        from mode_jax.ref.config import OptimConfig
        data = Path(args.data)
        manifest = read_manifest(data)
        build_sep = int(manifest["tokenizer"]["eos_id"])
        candidates = [int(c) for c in args.candidates.split(",")]
        if candidates[0] != build_sep:
            raise UserError(f"--candidates must start with the build's separator {build_sep}, got {candidates[0]}")
        domains = args.domains.split(",") if args.domains else sorted(manifest["domains"])
        model = mode_jax.load(args.model)
        steps = make_steps("full", model.cfg, opt=OptimConfig(total_steps=1), compute_dtype="float32",
                           layer_loop="scan")
        params = {"backbone": model.params["backbone"]}
    except UserError as e:
        print(f"separator_check: {e}", file=sys.stderr)
        return 2
    out = {"model": args.model, "split": args.split, "rows": args.rows, "seq": args.seq,
           "candidates": candidates, "domains": {}}
    for domain in domains:
        rows = np.asarray(stream_rows(load_split(data, domain, args.split), args.seq)[:args.rows], np.int64)
        counts = {}
        for sep in candidates:
            t0 = time.time()
            swapped = np.where(rows == build_sep, sep, rows)
            counts[sep] = row_counts(steps, params, swapped, sep, args.batch)
            print(f"{domain:15s} separator {sep}: {100 * counts[sep][0].sum() / counts[sep][1].sum():.2f}% "
                  f"({counts[sep][1].sum()} content targets, {time.time() - t0:.0f} s)", flush=True)
        entry = {"separators": int((rows == build_sep).sum()),
                 "accuracy": {str(s): float(c[0].sum() / c[1].sum()) for s, c in counts.items()}}
        for sep in candidates[1:]:
            d, low, high = paired_interval(*counts[sep], *counts[candidates[0]], args.n_boot)
            entry[f"{sep} - {candidates[0]}"] = {"estimate": d, "low": low, "high": high}
            print(f"{domain:15s} {sep} - {candidates[0]}: {100 * d:+.2f} [{100 * low:+.2f}, {100 * high:+.2f}] points")
        out["domains"][domain] = entry
    if args.out:
        from mode_jax.atomic import write_text_atomic
        write_text_atomic(Path(args.out), json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
