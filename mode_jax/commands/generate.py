"""`mode-jax generate`: text from a backbone, a backbone with expert files, or a composed run.

The continuation streams to stdout as it is decoded. The prompt comes from --prompt,
--prompt-file (- for stdin) or stdin; --chat wraps it in the model's chat template (its
GGUF metadata, or a Hugging Face directory's tokenizer_config.json). Temperature 0 (the
default) is greedy decoding; otherwise tokens are sampled (--top-k, --top-p) with --seed,
so a run repeats exactly.

--show-routing colours each new token by the expert with the largest gate weight
(averaged over blocks, or of one block: --show-routing 2), a legend on stderr;
--routing-html FILE writes a page with every token's per-block gate weights.

    mode-jax generate --prompt "The capital of France is"
    mode-jax generate --experts math.safetensors code.safetensors --chat \\
        --prompt "Solve 3*x + 5 = 11 for x." --show-routing --routing-html routing.html
    mode-jax generate --run runs/mode-2x --temperature 0.8 --top-p 0.9 --seed 1 < prompt.txt
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mode_jax.errors import UserError

ANSI = ("", "\033[31m", "\033[32m", "\033[34m", "\033[33m", "\033[35m", "\033[36m")   # backbone plain
RESET = "\033[0m"


def register(sub) -> None:
    p = sub.add_parser("generate", help="generate text (backbone, expert files or a composed run), with routing",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m",
                   help="a model name from `mode-jax fetch --list`, a .gguf path, a Hugging Face directory "
                        "(config.json, *.safetensors, tokenizer.json), or 'tiny' (default smollm2-135m)")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--experts", nargs="+", default=None, metavar="FILE",
                      help="expert files to compose with their stage-1 gates")
    what.add_argument("--run", default=None, metavar="DIR",
                      help="a finished train-expert / compose run (its model and backbone; a run trained "
                           "with top-k gating, mode.gate_top_k, decodes with that gate)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", default=None, help="the prompt text")
    src.add_argument("--prompt-file", default=None, metavar="FILE", help="read the prompt from FILE (- for stdin)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--system", default=None, help="with --chat: a system message")
    p.add_argument("--max-new-tokens", type=int, default=128, help="most new tokens (default 128)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    p.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0 = all)")
    p.add_argument("--top-p", type=float, default=1.0, help="sample from the smallest set of mass >= p (1 = all)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop at this text (repeatable)")
    p.add_argument("--show-routing", nargs="?", const="mean", default=None, metavar="BLOCK",
                   help="colour tokens by the expert with the largest gate weight (mean over blocks, or block N)")
    p.add_argument("--routing-html", default=None, metavar="FILE", help="write a page of per-token gate weights")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                   help="compute dtype (default: bfloat16 on a GPU, float32 on a CPU)")
    p.set_defaults(func=run)


def _check_args(args) -> None:
    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if not args.temperature >= 0:
        raise UserError(f"--temperature must be >= 0, got {args.temperature}")
    if args.top_k < 0:
        raise UserError(f"--top-k must be >= 0, got {args.top_k}")
    if not 0 < args.top_p <= 1:
        raise UserError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.system is not None and not args.chat:
        raise UserError("--system goes with --chat")
    if args.show_routing not in (None, "mean") and not args.show_routing.isdigit():
        raise UserError(f"--show-routing takes 'mean' or a block number, got {args.show_routing!r}")


def _read_prompt(args) -> str:
    if args.prompt is not None:
        text = args.prompt
    elif args.prompt_file not in (None, "-"):
        path = Path(args.prompt_file)
        if not path.is_file():
            raise UserError(f"--prompt-file {path} does not exist")
        text = path.read_text(encoding="utf-8")
    elif args.prompt_file == "-" or not sys.stdin.isatty():
        text = sys.stdin.read()
    else:
        raise UserError("no prompt: give --prompt, --prompt-file, or text on stdin")
    if not text.strip():
        raise UserError("the prompt is empty")
    return text


def _block(args, routing):
    """[n_blocks, E] -> the E weights that pick a token's colour."""
    if args.show_routing == "mean":
        return routing.mean(axis=0)
    return routing[int(args.show_routing)]


def run(args) -> int:
    _check_args(args)
    prompt = _read_prompt(args)
    from mode_jax import api

    model = api.load(args.model, experts=args.experts, run=args.run, compute_dtype=args.dtype)
    n_blocks = model.n_blocks
    if args.show_routing not in (None, "mean") and int(args.show_routing) >= n_blocks:
        raise UserError(f"--show-routing {args.show_routing}: the model has {n_blocks} blocks")
    text = model.chat_prompt(prompt, args.system) if args.chat else prompt
    colour = args.show_routing is not None and n_blocks > 0

    def stream(piece: str, routing) -> None:
        if colour and routing is not None:
            piece = ANSI[int(_block(args, routing).argmax()) % len(ANSI)] + piece + RESET
        sys.stdout.write(piece)
        sys.stdout.flush()

    out = model.generate(text, max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                         top_p=args.top_p, seed=args.seed, stop=args.stop, stream=stream)
    sys.stdout.write("\n")
    if colour:
        legend = " ".join(f"{ANSI[e % len(ANSI)]}{n}{RESET}" for e, n in enumerate(model.expert_names))
        shares = out.routing.mean(axis=(0, 1)) if len(out.tokens) else []
        print(f"routing ({args.show_routing}): {legend}; mean gate weights over the new tokens: "
              + ", ".join(f"{n} {w:.2f}" for n, w in zip(model.expert_names, shares)), file=sys.stderr)
    if args.routing_html:
        _write_html(args.routing_html, model, text, out)
    print(f"[{len(out.tokens)} tokens, finished: {out.finish}]", file=sys.stderr)
    return 0


def _write_html(path: str, model, text: str, out) -> None:
    from mode_jax import routing_html
    from mode_jax.atomic import write_text_atomic

    ids = out.prompt_tokens + out.tokens
    decode = model.tokenizer.decode
    pieces = [decode(ids[:i + 1])[len(decode(ids[:i])):] for i in range(len(ids))]
    prompt_routing = model.routing(text)                                           # gate at each prompt position
    # A token's routing is the gate at the position that predicted it (see mode_jax/api.py).
    routing = [None] + [prompt_routing[i] for i in range(len(out.prompt_tokens) - 1)] + list(out.routing)
    if prompt_routing.shape[1] == 0:
        routing = [None] * len(ids)
    write_text_atomic(path, routing_html.render(pieces, routing, model.expert_names,
                                                n_prompt=len(out.prompt_tokens),
                                                title=f"mode-jax generate: {model.name}"))
