"""Where a GPU step's time goes: a `jax.profiler` trace of a few steps, summed per kernel
and per kind of kernel (matmul, attention, fusions, ...), per step.

Used by `bench/gpu_train.py --profile DIR`; on its own:
    python bench/profile_summary.py DIR/<run> --steps 3
reads the newest `*.xplane.pb` under a trace directory and prints the tables. Kernels
are read off the device plane's stream lines ("Stream #..."), so the times are GPU
busy time; the step's wall time minus their sum is idle time (launch gaps, host work).
On a CPU there is no device plane and the summary says so.
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re

import jax

# First match wins; patterns are matched against the lower-cased kernel name.
CATEGORIES = (
    ("attention", r"cudnn|fmha|flash|sdpa|attention"),
    ("matmul", r"gemm|cublas|cutlass|xmma|nvjet|__dot|_dot_|dot_fusion|matmul"),
    ("scatter/gather", r"scatter|gather|dynamic_update_slice"),
    ("reduction fusion", r"reduce"),
    ("copy/transpose", r"copy|transpose|memcpy|memset"),
    ("elementwise fusion", r"fusion|convert|multiply|add|select|broadcast|concatenate"),
)


def category(kernel: str) -> str:
    name = kernel.lower()
    for label, pattern in CATEGORIES:
        if re.search(pattern, name):
            return label
    return "other"


def trace(fn, state, *, steps: int, logdir: str):
    """Run state = fn(state) `steps` times under the profiler; returns the last state."""
    os.makedirs(logdir, exist_ok=True)
    jax.block_until_ready(state)
    jax.profiler.start_trace(logdir)
    try:
        for _ in range(steps):
            state = fn(state)
        jax.block_until_ready(state)
    finally:
        jax.profiler.stop_trace()
    return state


def kernel_times(logdir: str) -> dict[str, tuple[float, int]] | None:
    """{kernel name: (total ns, count)} over the device planes of the newest trace, or None
    when the trace has no GPU plane."""
    files = sorted(glob.glob(os.path.join(logdir, "**", "*.xplane.pb"), recursive=True), key=os.path.getmtime)
    if not files:
        raise FileNotFoundError(f"no *.xplane.pb under {logdir}")
    data = jax.profiler.ProfileData.from_file(files[-1])
    totals: dict[str, list] = collections.defaultdict(lambda: [0.0, 0])
    found = False
    for plane in data.planes:
        if not plane.name.startswith("/device:GPU"):
            continue
        for line in plane.lines:
            if not line.name.startswith("Stream"):
                continue
            found = True
            for event in line.events:
                entry = totals[event.name]
                entry[0] += event.duration_ns
                entry[1] += 1
    return {k: (v[0], v[1]) for k, v in totals.items()} if found else None


def summarize(logdir: str, *, steps: int, step_ms: float | None = None, top: int = 25) -> str:
    """Per-step GPU time by category and the `top` kernels, as text."""
    times = kernel_times(logdir)
    if times is None:
        return f"{logdir}: no GPU device plane in the trace (CPU run?)"
    busy = sum(t for t, _ in times.values()) / steps / 1e6
    lines = [f"GPU busy {busy:.2f} ms per step" + (f" (step {step_ms:.2f} ms, idle {step_ms - busy:.2f} ms)"
                                                     if step_ms else "")]
    by_category = collections.Counter()
    for name, (t, _) in times.items():
        by_category[category(name)] += t
    lines.append(f"{'category':<20} {'ms/step':>8} {'share':>6}")
    for label, t in by_category.most_common():
        lines.append(f"{label:<20} {t / steps / 1e6:8.2f} {t / steps / 1e6 / busy:6.1%}")
    lines.append(f"{'kernel':<80} {'ms/step':>8} {'calls/step':>10}")
    ranked = sorted(times.items(), key=lambda kv: -kv[1][0])[:top]
    for name, (t, n) in ranked:
        short = name if len(name) <= 80 else name[:77] + "..."
        lines.append(f"{short:<80} {t / steps / 1e6:8.3f} {n / steps:10.1f}")
    return "\n".join(lines)


def read_categories(text: str) -> dict[str, dict[str, float]]:
    """The per-category ms/step of every profile in a printed log: `--- profile: RUN` (as
    gpu_train.py prints it) followed by summarize()'s category table -> {RUN: {category: ms}}."""
    found, run, rows = {}, None, None
    for line in text.splitlines():
        if line.startswith("--- profile: "):
            run, rows = line[len("--- profile: "):].strip(), None
        elif run is not None and line.startswith("category"):
            rows = found.setdefault(run, {})
        elif rows is not None:
            label, _, rest = line.rpartition(" ")          # "<label> <ms> <share%>"
            label, _, ms = label.strip().rpartition(" ")
            if not rest.endswith("%") or label.strip() not in {c for c, _ in CATEGORIES} | {"other"}:
                run, rows = None, None                       # the kernel table starts: this profile is read
                continue
            rows[label.strip()] = float(ms)
    return found


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("logdir")
    p.add_argument("--steps", type=int, required=True, help="steps the trace holds")
    p.add_argument("--top", type=int, default=25)
    args = p.parse_args(argv)
    print(summarize(args.logdir, steps=args.steps, top=args.top))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
