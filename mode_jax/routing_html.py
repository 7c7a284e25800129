"""A self-contained HTML page of which experts spoke for which token (paper eq. 2's gate).

Each token is shaded in the colour of the expert with the largest gate weight (averaged
over blocks) and as strongly as that weight; hovering shows every block's weights, and a
table below lists them. Tokens without a routing (the first prompt token, which no
position predicted) stay plain.
"""

from __future__ import annotations

import html

import numpy as np

# Backbone first (grey), then one colour per expert.
COLOURS = ("#bbbbbb", "#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6")


def colour(expert: int) -> str:
    return COLOURS[0] if expert == 0 else COLOURS[1 + (expert - 1) % (len(COLOURS) - 1)]


def render(pieces: list[str], routing: list[np.ndarray | None], names: list[str], *, n_prompt: int,
           title: str) -> str:
    """pieces: each token's text; routing: per token [n_blocks, E] weights or None;
    names: the E gate columns' names; the first `n_prompt` tokens are the prompt."""
    legend = " ".join(f'<span class="tok" style="background:{colour(e)}">{html.escape(n)}</span>'
                      for e, n in enumerate(names))
    spans, rows = [], []
    for i, (piece, r) in enumerate(zip(pieces, routing)):
        text = html.escape(piece).replace("\n", "&#8629;<br>")
        cls = "tok prompt" if i < n_prompt else "tok"
        if r is None:
            spans.append(f'<span class="{cls}">{text}</span>')
            continue
        mean = r.mean(axis=0)
        best = int(np.argmax(mean))
        tip = "; ".join(f"block {b}: " + ", ".join(f"{n} {w:.2f}" for n, w in zip(names, r[b])) for b in range(len(r)))
        alpha = f"{int(round(255 * float(mean[best]))):02x}"
        spans.append(f'<span class="{cls}" style="background:{colour(best)}{alpha}" title="{html.escape(tip)}">'
                     f'{text}</span>')
        cells = "".join(f"<td>{w:.3f}</td>" for w in r.reshape(-1))
        rows.append(f"<tr><td>{i}</td><td>{'prompt' if i < n_prompt else 'new'}</td>"
                    f"<td><code>{html.escape(repr(piece))}</code></td>{cells}</tr>")
    n_blocks = next((len(r) for r in routing if r is not None), 0)
    head = "".join(f"<th>b{b} {html.escape(n)}</th>" for b in range(n_blocks) for n in names)
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;max-width:60em;margin:2em auto}} .text{{font-family:monospace;
line-height:1.8;white-space:pre-wrap}} .tok{{padding:1px 0;border-radius:3px}} .prompt{{opacity:.6}}
table{{border-collapse:collapse;font-size:80%}} td,th{{border:1px solid #ddd;padding:2px 5px}}</style></head>
<body><h1>{html.escape(title)}</h1>
<p>Each token is shaded by the expert with the largest gate weight (mean over blocks) at the position
that predicted it; hover for every block's weights. Faded: the prompt. Experts: {legend}</p>
<div class="text">{''.join(spans)}</div>
<h2>Gate weights per token and block</h2>
<table><tr><th>#</th><th></th><th>token</th>{head}</tr>
{chr(10).join(rows)}
</table></body></html>
"""
