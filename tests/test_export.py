"""`mode-jax export`: LoRA runs to PEFT, full fine-tuning (and merged LoRA) to transformers,
loaded back by peft and transformers themselves (Python 3.11 env,
tests/crosscheck/arch_reference.py) with the same float32 logits; MoDE runs refused by
name and loaded back in one call; bad input one line, exit 2, nothing written.

The runs are real and are issue 15's end-to-end case: a tiny random Qwen2 (q/k/v biases)
that transformers creates and saves, a BPE tokenizer trained on the user's own files
(tests/tiny_hf.py), `data build --domain` on two of them, two experts trained
(`train-expert`), composed and evaluated, and the `finetune --method lora|full`
baselines, all through the CLI; then the exports.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from mode_jax.cli import main
from mode_jax.export import HF_MODULES, load_run
from mode_jax.ref.llama import llama_forward
from tests import tiny_hf
from tests.crosscheck_setup import py311  # noqa: F401 (fixture)
from tests.test_crosscheck_arch import run_reference
from tests.tolerances import assert_close

TEXT = "Recipe 7: mix 3 cups of flour with 2 eggs, bake for 40 minutes."


def _qwen2_base(path: Path, tok, python) -> Path:
    """A tiny random Qwen2 (4 layers, width 32, tied head, q/k/v biases) that transformers
    itself creates and saves (Qwen2Config -> Qwen2ForCausalLM.save_pretrained), with `tok`."""
    config = {"vocab_size": tok.get_vocab_size(), "hidden_size": 32, "num_hidden_layers": 4,
              "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 64,
              "max_position_embeddings": 512, "rms_norm_eps": 1e-6, "tie_word_embeddings": True,
              "rope_theta": 1e6}
    work = path.parent / "make"
    work.mkdir()
    run_reference(python, {"make": [{"name": "base", "model_type": "qwen2", "config": config, "seed": 5,
                                     "dir": str(path), "shard_size": None, "gguf": str(work / "base.gguf"),
                                     "tokens": [[1, 2, 3]], "prompt": [1], "new_tokens": 1}]}, work)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"eos_token": tiny_hf.EOS}))
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory, py311):  # noqa: F811
    """The issue's end-to-end case: two domains of the user's own files on a transformers-made
    Qwen2; two experts trained and composed, evaluated; LoRA and full fine-tuning baselines."""
    root = tmp_path_factory.mktemp("export")
    jsonl, folder = tiny_hf.write_corpora(root / "src")
    tok = tiny_hf.train_tokenizer(tiny_hf.recipes() + tiny_hf.forecasts())
    base = _qwen2_base(root / "qwen2", tok, py311)
    data = root / "data"
    assert main(["data", "build", "--out", str(data), "--model", str(base), "-q", "--split", "0.1,0.3",
                 "--domain", f"recipes={jsonl}:body", "--domain", f"weather={folder}"]) == 0
    common = ["--preset", "smoke", "--model", str(base), "--data-dir", str(data), "--set", 'data.source="built"',
              "--set", "domains.targets=[]", "--set", "domains.retention=[]", "--set", 'lora.targets="attn_mlp"',
              "--quiet"]
    for method in ("lora", "full"):
        assert main(["finetune", "--method", method, "--steps", "6", "--out", str(root / method), *common]) == 0
    for d in ("recipes", "weather"):
        assert main(["train-expert", "--domain", d, "--steps", "4", "--out", str(root / d), *common]) == 0
    experts = [str(root / d / f"expert-{d}.safetensors") for d in ("recipes", "weather")]
    assert main(["compose", "--experts", *experts, "--steps", "4", "--out", str(root / "mode"), *common]) == 0
    assert main(["eval", "--run", str(root / "mode"), "--out", str(root / "eval"), "--quiet"]) == 0
    return {"root": root, "base": base, "tok": tok}


@pytest.fixture(scope="module")
def exported(runs, py311):  # noqa: F811
    """Each export, and what peft / transformers compute from it."""
    root = runs["root"]
    outs = {"peft": ("lora", "peft"), "merged": ("lora", "hf"), "full": ("full", "hf")}
    for name, (run, to) in outs.items():
        assert main(["export", "--run", str(root / run), "--to", to, str(root / "out" / name), "--quiet"]) == 0
    tokens = np.random.default_rng(3).integers(0, runs["tok"].get_vocab_size(), (2, 20)).tolist()
    load = [{"name": name, "kind": to if to == "peft" else "hf", "dir": str(root / "out" / name),
             "base": str(runs["base"]), "tokens": tokens, "text": TEXT} for name, (_, to) in outs.items()]
    work = root / "theirs"
    work.mkdir()
    results = run_reference(py311, {"load": load}, work)
    return {"tokens": np.array(tokens, np.int32), "results": results,
            "logits": {name: np.load(work / "out" / f"{name}.npy") for name in outs}}


@pytest.mark.slow
def test_lora_run_loads_in_peft_with_the_same_logits(runs, exported):
    ours = load_run(runs["root"] / "lora")
    assert ours.method == "lora" and ours.config.qkv_bias
    want = ours.logits(exported["tokens"])
    assert exported["results"]["peft"]["class"] == "PeftModelForCausalLM"
    assert_close(exported["logits"]["peft"], want)
    # The adapter matters: without it the logits differ by far more than the tolerance.
    plain = np.asarray(llama_forward(ours.params["backbone"], exported["tokens"], ours.config))
    assert np.abs(plain - want).max() > 1e-2
    # Every targeted projection of every layer, in PEFT's names and layout.
    tensors = load_file(runs["root"] / "out" / "peft" / "adapter_model.safetensors")
    config = json.loads((runs["root"] / "out" / "peft" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8.0 and len(config["target_modules"]) == 7
    assert len(tensors) == 2 * 7 * ours.config.n_layers
    a = tensors[f"base_model.model.model.layers.1.{HF_MODULES['w_up']}.lora_A.weight"]
    assert a.shape == (4, ours.config.d_model)
    np.testing.assert_array_equal(a, np.asarray(ours.params["lora"]["layers"][1]["w_up"]["a"]).T)


@pytest.mark.slow
def test_full_and_merged_runs_load_in_transformers_with_the_same_logits(runs, exported):
    full = load_run(runs["root"] / "full")
    assert exported["results"]["full"]["class"] == "Qwen2ForCausalLM"
    assert_close(exported["logits"]["full"], full.logits(exported["tokens"]))
    lora = load_run(runs["root"] / "lora")
    assert_close(exported["logits"]["merged"], lora.logits(exported["tokens"]), scale=2)
    # The base's tokenizer files travel with the model, unchanged. (transformers 5 then builds a
    # Qwen2Tokenizer from model_type, whose own pre-tokenizer this test's custom BPE does not have.)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (runs["root"] / "out" / "full" / name).read_bytes() == (runs["base"] / name).read_bytes()
    assert "ids" in exported["results"]["full"]          # AutoTokenizer loads the exported directory


@pytest.mark.slow
def test_mode_runs_are_refused_and_load_back_in_one_call(runs, tmp_path, capsys):
    root = runs["root"]
    for run, method in (("recipes", "stage1"), ("mode", "stage2")):
        for to in ("peft", "hf"):
            assert main(["export", "--run", str(root / run), "--to", to, str(tmp_path / to)]) == 2
            err = capsys.readouterr().err.strip()
            assert len(err.splitlines()) == 1 and f"MoDE run (method {method})" in err
            assert "mode-jax's format" in err and "load_run" in err
            assert not (tmp_path / to).exists()
    loaded = load_run(root / "mode")
    assert loaded.method == "stage2" and len(loaded.params["blocks"][0]["experts"]) == 2
    assert set(loaded.params["blocks"][0]["experts"][1][0]) >= {"bq", "bk", "bv"}     # Qwen2's biases
    tokens = np.arange(12, dtype=np.int32).reshape(1, 12)
    logits = loaded.logits(tokens)
    plain = np.asarray(llama_forward(loaded.params["backbone"], tokens, loaded.config))
    assert np.isfinite(logits).all() and logits.shape == (1, 12, loaded.config.vocab_size)
    assert np.abs(logits - plain).max() > 1e-4           # the experts and gates are in there
    # The composed run, evaluated again from its directory, scores what it reported.
    composed = json.loads((root / "mode" / "result.json").read_text())
    assert composed["domains_trained"] == ["recipes", "weather"]
    assert json.loads((root / "eval" / "result.json").read_text())["domains"] == composed["domains"]


@pytest.mark.slow
def test_output_is_atomic_and_force_replaces(runs, tmp_path, capsys, monkeypatch):
    lora = str(runs["root"] / "lora")
    out = tmp_path / "adapter"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["export", "--run", lora, "--to", "peft", str(out)]) == 2
    assert "not empty: pass --force" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"

    import safetensors.numpy

    def boom(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.numpy, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        main(["export", "--run", lora, "--to", "peft", str(out), "--force"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"] and (out / "keep.txt").is_file()
    monkeypatch.undo()
    assert main(["export", "--run", lora, "--to", "peft", str(out), "--force", "-q"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


# ----------------------------------------------------------------------------- bad input
# Fabricated run directories: every refusal here comes before any model is loaded.

def _fake_run(path: Path, method: str | None, *, done: bool = True) -> Path:
    path.mkdir(parents=True)
    (path / "config.toml").write_text("")
    if done:
        (path / "result.json").write_text("{}")
    if method is not None:
        save_file({"x": np.ones(2, np.float32)}, str(path / "model.safetensors"), metadata={"method": method})
    return path


@pytest.mark.parametrize("setup, to, message", [
    (lambda p: p / "missing", "peft", "does not exist"),
    (lambda p: (p / "empty").mkdir() or p / "empty", "peft", r"not a run directory \(no config.toml\)"),
    (lambda p: _fake_run(p / "r", "lora", done=False), "peft", "not a finished run"),
    (lambda p: _fake_run(p / "r", None), "hf", "neither an expert file nor model.safetensors"),
    (lambda p: _fake_run(p / "r", "full"), "peft", "full fine-tuning run.*use --to hf"),
    (lambda p: _fake_run(p / "r", "stage2"), "hf", "MoDE run \\(method stage2\\).*mode-jax's format"),
])
def test_bad_input_is_one_line_exit_2_nothing_written(tmp_path, capsys, setup, to, message):
    run = setup(tmp_path)
    out = tmp_path / "out"
    assert main(["export", "--run", str(run), "--to", to, str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert re.search(message, err), err
    assert not out.exists()


def test_unknown_format_is_an_argparse_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "--run", str(tmp_path), "--to", "onnx", str(tmp_path / "o")])
    assert exit_info.value.code == 2 and "invalid choice: 'onnx'" in capsys.readouterr().err


def test_peft_tensors_by_hand():
    """Names and transposes on a 1-layer tree: A [in, R] -> lora_A.weight [R, in]."""
    from mode_jax.export import peft_config, peft_tensors
    from mode_jax.ref.config import LoraConfig
    a, b = np.arange(6, dtype=np.float32).reshape(3, 2), np.arange(8, dtype=np.float32).reshape(2, 4)
    out = peft_tensors({"layers": [{"wk": {"a": a, "b": b}}]})
    assert sorted(out) == ["base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight",
                           "base_model.model.model.layers.0.self_attn.k_proj.lora_B.weight"]
    np.testing.assert_array_equal(out["base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight"],
                                  [[0, 2, 4], [1, 3, 5]])
    cfg = peft_config(LoraConfig(rank=2, alpha=6.0, targets="attn"), base="/m")
    assert cfg["target_modules"] == ["k_proj", "o_proj", "q_proj", "v_proj"] and cfg["lora_alpha"] / cfg["r"] == 3.0


def test_gguf_backbone_exports_with_a_tokenizer_json(tmp_path):
    """A model whose backbone came from a GGUF file is written with the file's tokenizer as
    tokenizer.json (+ its special tokens), which reads back as the same tokenizer."""
    import types

    import jax
    from mode_jax.export import LoadedRun, write_hf
    from mode_jax.model_io.gguf_loader import write_gguf
    from mode_jax.model_io.hf_loader import read_hf_dir
    from mode_jax.ref.config import LlamaConfig
    from mode_jax.ref.llama import init_llama
    from mode_jax.model_io.tokenizer import load_hf_tokenizer, load_tokenizer
    from tests.test_tokenizer import tiny_metadata

    cfg = LlamaConfig.tiny(vocab_size=3 + 256 + 7, n_layers=2)
    params = jax.tree.map(np.asarray, init_llama(jax.random.key(0), cfg))
    gguf = write_gguf(tmp_path / "m.gguf", params, cfg, tokenizer=tiny_metadata())
    loaded = LoadedRun(params={"backbone": params}, config=cfg, method="full", lora=None, label="full-ft",
                       backbone=types.SimpleNamespace(kind="gguf"), source=str(gguf))
    out = tmp_path / "out"
    out.mkdir()
    write_hf(out, loaded)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json",
                                                     "tokenizer_config.json"]
    back, back_cfg = read_hf_dir(out)
    assert back_cfg == cfg and np.array_equal(back["layers"][1]["wk"], params["layers"][1]["wk"])
    ours, theirs = load_tokenizer(gguf), load_hf_tokenizer(out)
    text = "the 12 thin men in the hall"
    assert theirs.encode(text) == ours.encode(text) and len(ours.encode(text)) < len(text.encode())
    assert (theirs.eos_id, theirs.bos_id) == (ours.eos_id, ours.bos_id) == (2, 1)
