"""One call to load a backbone with its experts (or a composed run) and use it as a language model.

    import mode_jax
    model = mode_jax.load("smollm2-135m", experts=["math.safetensors", "code.safetensors"])
    out = model.generate("Solve 3*x + 5 = 11 for x.", max_new_tokens=32)
    out.text, out.tokens, out.finish       # the continuation, its ids, "eos" / "stop" / "length"
    out.routing                            # [new tokens, n_blocks, E] gate weights (column 0 the backbone)
    model.logits("some text")              # float32 [T, V]
    model.routing("some text")             # [T, n_blocks, E]: the gate at every position
    model.expert_names                     # ["backbone", "math", "code"]

`model` is a name known to `mode-jax fetch` (already fetched), a .gguf path, or "tiny"
(a random tiny backbone with the one-byte-per-token tokenizer, as `--set
model.source="tiny"` runs use). `experts` are expert files (`mode-jax train-expert`);
several are composed with their stage-1 gates, as `mode-jax eval --experts` does. `run`
is a finished training run directory (its experts or composed model.safetensors).

Generation runs on `mode_jax.fast` (`fast/decode.py`); a generated token's routing is
the gate of the position that predicted it: the experts that spoke for that token. A run
trained with top-k gating (mode.gate_top_k) decodes and scores with that gate
(`Model.gate_top_k`; its routing is 0 outside each token's kept k).
"""

from __future__ import annotations

import dataclasses
import types
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from mode_jax.errors import UserError


@dataclasses.dataclass
class Completion:
    text: str                   # the continuation, cut before an EOS or a stop string
    tokens: list[int]           # its token ids (an EOS that ended it included)
    finish: str                 # "eos", "stop" or "length"
    routing: np.ndarray         # [len(tokens), n_blocks, E]
    prompt_tokens: list[int]


def _load_params(model: str, experts, run, progress: bool):
    """(ref params, Backbone, model source, expert names, the gate's top-k or None) as the
    eval command would load them."""
    import jax

    from mode_jax.data.pack import ByteTokenizer
    from mode_jax.pipeline import expert_io, presets, runs, sources, stages
    from mode_jax.ref.config import ModeConfig
    from mode_jax.ref.methods import init_method

    if run is not None:
        source_run = runs.RunDir(run)
        if not source_run.path.is_dir():
            raise UserError(f"run directory {run} does not exist")
        if not source_run.is_done():
            raise UserError(f"{run} is not a finished run (no result.json)")
        cfg = source_run.config()
    else:
        cfg = presets.load_config()
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, source=str(model)))
        layout = expert_io.load_expert(experts[0]).mode if experts else ModeConfig(n_blocks=1, expert_layers=1)
        cfg = dataclasses.replace(cfg, mode=dataclasses.replace(cfg.mode, n_blocks=layout.n_blocks,
                                                                 expert_layers=layout.expert_layers))
    vocab = ByteTokenizer.vocab_size if cfg.model.source == "tiny" else 0
    bb = sources.load_backbone(cfg, vocab, progress=progress)
    names = ["backbone"]
    params = {"backbone": bb.params}
    gate_top_k = None               # expert files compose with the dense gate (stage-1 gates)
    if experts:
        loaded = expert_io.load_compatible(experts, llama=bb.config, mode=sources.mode_config(cfg, 1),
                                           fingerprint=bb.fingerprint, base=bb.base)
        stage1 = [e.stage1_model(bb.params) for e in loaded]
        params = stage1[0] if len(stage1) == 1 else init_method(
            "stage2", jax.random.key(0), bb.params, bb.config, mode=sources.mode_config(cfg, len(stage1)),
            stage1=stage1, gate_from=cfg.mode.stage2_gate_from)
        names += [e.domain for e in loaded]
    elif run is not None:
        from mode_jax.commands.evaluate import _load_run
        ctx = types.SimpleNamespace(cfg=cfg, backbone=bb, llama=bb.config)
        params, method, _ = _load_run(source_run, ctx)
        if set(params) != {"backbone", "blocks"}:       # the decoders run the backbone and MoDE blocks only
            raise UserError(f"{run} holds a {method} model, not a MoDE one: generate serves backbones and MoDE")
        # The gate the run was trained and evaluated with (top-k where N experts are mixed).
        gate_top_k = stages.gate_top_k(cfg, method)
        n = len(params["blocks"][0]["experts"])
        info = source_run.info()          # compose runs record "domains", train-expert runs "domain"
        # a sweep's phases record neither: their experts follow the config's domains.targets
        domains = (info.get("domains") or ([info["domain"]] if info.get("domain") else [])
                   or list(cfg.domains.targets))
        names += list(domains) if len(domains) == n else [f"expert{j + 1}" for j in range(n)]
    return params, bb, cfg.model.source, names, gate_top_k


def _tokenizer(source: str):
    """(tokenizer, chat template or None) of the backbone: a GGUF file's metadata, or a
    Hugging Face directory's tokenizer_config.json."""
    import json

    from mode_jax.data.pack import ByteTokenizer
    if source == "tiny":
        return ByteTokenizer(), None
    from mode_jax.pipeline.sources import model_path_for
    from mode_jax.model_io.tokenizer import model_tokenizer
    path = model_path_for(source)
    if path.is_dir():
        config = path / "tokenizer_config.json"
        template = json.loads(config.read_text()).get("chat_template") if config.is_file() else None
    else:
        from mode_jax.model_io.gguf_loader import gguf_field, open_gguf
        template = gguf_field(open_gguf(path), "tokenizer.chat_template")
    return model_tokenizer(path), template if isinstance(template, str) else None


class Model:
    """A backbone (with or without experts) ready to generate; see the module doc."""

    def __init__(self, params: dict, cfg, tokenizer, *, name: str, expert_names: list[str],
                 chat_template: str | None = None, compute_dtype: str | None = None,
                 gate_top_k: int | None = None):
        import jax

        from mode_jax.fast import decode
        from mode_jax.fast.config import FastConfig
        from mode_jax.fast.params import to_fast
        self.params, self.cfg, self.tokenizer, self.name = params, cfg, tokenizer, name
        self.expert_names, self.chat_template = expert_names, chat_template
        # Static in every decoding program (fast/decode.py): top-k changes what is compiled.
        self.gate_top_k = gate_top_k
        # bf16 where matmuls are fast in it (GPU/TPU); a CPU computes float32 faster.
        dtype = compute_dtype or ("float32" if jax.default_backend() == "cpu" else "bfloat16")
        self.fast = FastConfig(compute_dtype=dtype)
        self.prepared = decode.prepare(to_fast(params), self.fast)

    @property
    def n_blocks(self) -> int:
        return len(self.params.get("blocks", []))

    @property
    def eos_id(self) -> int:
        return int(self.tokenizer.eos_id)

    def chat_prompt(self, message: str, system: str | None = None) -> str:
        """`message` as a user turn in the model's chat template, ready for the answer."""
        if not self.chat_template:
            raise UserError(f"model {self.name} has no chat template in its metadata")
        import jinja2.sandbox
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": message}]
        env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        return env.from_string(self.chat_template).render(messages=messages, add_generation_prompt=True,
                                                          bos_token="", eos_token="")

    def encode(self, text: str) -> list[int]:
        ids = self.tokenizer.encode(text)
        if not ids:
            raise UserError("the prompt is empty (no tokens)")
        return ids

    def generate(self, prompt: str | Sequence[str], *, max_new_tokens: int = 64, temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 1.0, seed: int = 0, stop: Sequence[str] = (),
                 stream: Callable[[str, np.ndarray], None] | None = None):
        """A Completion for one prompt, a list for a list of prompts (decoded as one batch).
        `stream(piece, routing [n_blocks, E])` gets each new piece of text as it is decoded
        (one prompt only)."""
        import jax

        from mode_jax.fast.generate import generate
        from mode_jax.ref.sampling import SamplingConfig
        single = isinstance(prompt, str)
        prompts = [self.encode(p) for p in ([prompt] if single else prompt)]
        if max_new_tokens < 1:
            raise UserError(f"max new tokens must be >= 1, got {max_new_tokens}")
        longest = max(map(len, prompts))
        if longest + max_new_tokens > self.cfg.max_seq_len:
            raise UserError(f"the prompt has {longest} tokens; with {max_new_tokens} new tokens that exceeds the "
                            f"model's context of {self.cfg.max_seq_len} tokens")
        try:
            sampling = SamplingConfig(temperature=float(temperature), top_k=int(top_k), top_p=float(top_p))
        except ValueError as err:
            raise UserError(str(err)) from None
        on_token = None
        if stream is not None:
            if not single:
                raise UserError("streaming takes one prompt")
            on_token = _Streamer(self.tokenizer.decode, stream, stop, self.eos_id)
        out = generate(self.prepared, prompts, self.cfg, self.fast, max_new_tokens=max_new_tokens, sampling=sampling,
                       key=jax.random.key(seed), eos_id=self.eos_id, stop_strings=tuple(stop),
                       detokenize=self.tokenizer.decode, on_token=on_token, gate_top_k=self.gate_top_k)
        done = [self._completion(p, t, f, r, stop) for p, t, f, r in zip(prompts, out.tokens, out.finish, out.routing)]
        if on_token is not None:
            on_token.flush(done[0].text)
        return done[0] if single else done

    def _completion(self, prompt, tokens, finish, routing, stop) -> Completion:
        from mode_jax.ref.decode import first_stop
        text = self.tokenizer.decode(tokens[:-1] if finish == "eos" else tokens)
        cut = first_stop(text, stop) if finish == "stop" else None
        return Completion(text if cut is None else text[:cut], tokens, finish, routing, prompt)

    def _score(self, text: str):
        from mode_jax.fast import decode
        from mode_jax.fast.generate import left_pad
        ids = self.encode(text)
        tokens, pad = left_pad([ids], bucket=16)
        logits, probs = decode.score(self.prepared, tokens, pad, cfg=self.cfg, fast=self.fast,
                                     gate_top_k=self.gate_top_k)
        logits = np.asarray(logits[0, pad[0]:])
        probs = None if probs is None else np.asarray(probs[0, pad[0]:])
        return logits, probs

    def logits(self, text: str) -> np.ndarray:
        """float32 next-token logits [T, V] at every token of `text`."""
        return self._score(text)[0]

    def routing(self, text: str) -> np.ndarray:
        """Gate weights [T, n_blocks, E] at every token of `text` (column 0: the backbone)."""
        probs = self._score(text)[1]
        if probs is None:
            return np.ones((len(self.encode(text)), 0, 1), np.float32)
        return probs


class _Streamer:
    """Turns decoded tokens into new pieces of text for `stream`, holding back bytes of an
    unfinished character and anything that may be the start of a stop string."""

    def __init__(self, detokenize, stream, stop, eos_id):
        self.detokenize, self.stream, self.stop = detokenize, stream, [s for s in stop if s]
        self.eos_id = eos_id
        self.ids, self.sent, self.routing = [], "", None

    def __call__(self, step: int, tokens: np.ndarray, routing: np.ndarray) -> bool:
        if int(tokens[0]) == self.eos_id:      # the end, not text
            return True
        from mode_jax.ref.decode import first_stop
        self.ids.append(int(tokens[0]))
        text = self.detokenize(self.ids)
        cut = first_stop(text, self.stop)
        if cut is not None:                   # send what comes before the stop string, and stop
            ready, finished = text[:cut], True
        else:
            hold = max((len(s) - 1 for s in self.stop), default=0)
            ready, finished = text[:max(len(self.sent), len(text) - hold)], False
            if ready.endswith("\ufffd"):      # half of a multi-byte character
                return False
        if len(ready) > len(self.sent) and ready.startswith(self.sent):
            self.stream(ready[len(self.sent):], routing[0])
            self.sent = ready
        return finished

    def flush(self, final_text: str) -> None:
        """Send what the final (cut) text still holds beyond what was sent."""
        if final_text.startswith(self.sent) and len(final_text) > len(self.sent):
            self.stream(final_text[len(self.sent):], None)


def load(model: str = "smollm2-135m", *, experts: Sequence[str] | None = None, run: str | None = None,
         compute_dtype: str | None = None, progress: bool = False) -> Model:
    """A Model from a backbone name/.gguf/"tiny", plus expert files or a run directory."""
    if experts and run:
        raise UserError("give expert files or a run directory, not both")
    params, bb, source, names, gate_top_k = _load_params(model, list(experts or []), run, progress)
    tokenizer, template = _tokenizer(source)
    return Model(params, bb.config, tokenizer, name=bb.name, expert_names=names, chat_template=template,
                 compute_dtype=compute_dtype, gate_top_k=gate_top_k)
