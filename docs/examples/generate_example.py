"""The README's generation example: a composed MoDE model answers a Math and a Code prompt,
and a picture shows which expert spoke for each generated token.

    python docs/examples/generate_example.py RUN_DIR OUT_DIR [--model smollm2-135m]

RUN_DIR is a finished composed run (`mode-jax compose`, or a sweep cell kept with
`--keep-models`). Writes OUT_DIR/example.md (prompts, answers, per-token top expert)
and OUT_DIR/routing.png (per generated token, the gate weights averaged over the blocks).
Greedy decoding: the output is a pure function of the model and the prompts.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

PROMPTS = (
    "Solve -42*r + 27*c = -1167 and 130*r + 4*c = 372 for r.\n",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run")
    p.add_argument("out")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--max-new-tokens", type=int, default=48)
    args = p.parse_args(argv)

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    import mode_jax

    model = mode_jax.load(args.model, run=args.run, progress=False)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    names = model.expert_names
    lines = [f"Run: `{args.run}`; experts {', '.join(names)}; greedy, {args.max_new_tokens} new tokens.", ""]
    fig, axes = plt.subplots(len(PROMPTS), 1, figsize=(14, 3.2 * len(PROMPTS)), squeeze=False)
    colours = ["#9e9e9e", "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e"]
    for ax, prompt in zip(axes[:, 0], PROMPTS):
        done = model.generate(prompt, max_new_tokens=args.max_new_tokens)
        weights = np.asarray(done.routing, np.float64).mean(axis=1)         # [tokens, E]
        pieces = [model.tokenizer.decode([t]) for t in done.tokens]
        lines += ["Prompt:", "", "```", prompt.rstrip("\n"), "```", "", "Answer:", "", "```", done.text, "```", "",
                  "Top expert per generated token (gate averaged over blocks): "
                  + " ".join(f"`{s!r}`:{names[int(np.argmax(w))]}" for s, w in zip(pieces, weights)), ""]
        bottom = np.zeros(len(pieces))
        for e, name in enumerate(names):
            ax.bar(np.arange(len(pieces)), weights[:, e], bottom=bottom, color=colours[e % len(colours)],
                   label=name, width=0.9)
            bottom += weights[:, e]
        ax.set_xticks(np.arange(len(pieces)))
        ax.set_xticklabels([s.replace("\n", "\\n") for s in pieces], rotation=90, fontsize=7)
        ax.set_ylim(0, 1)
        ax.set_ylabel("gate weight")
        ax.set_title(prompt.splitlines()[0][:80], fontsize=9)
    axes[0, 0].legend(loc="upper right", ncol=len(names), fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "routing.png", dpi=110)
    (out / "example.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
