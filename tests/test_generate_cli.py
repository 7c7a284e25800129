"""`mode-jax generate` and `mode_jax.load` on the tiny backbone with two expert files: the
streamed text and the routing page equal ref/decode.py's greedy decoding of the same model,
and bad input is refused in one line with exit code 2."""

import html
import io
import re

import jax.numpy as jnp
import numpy as np
import pytest

import mode_jax
from mode_jax.cli import main
from mode_jax.data.pack import ByteTokenizer
from mode_jax.pipeline import expert_io
from mode_jax.ref import decode
from tests.helpers import assert_refused, stage1_expert
from tests.tolerances import PRINTED_3_DECIMALS, assert_close

PROMPT = "What is 2 + 3?"


@pytest.fixture(scope="module")
def experts(tmp_path_factory):
    d = tmp_path_factory.mktemp("experts")
    return [str(expert_io.save_expert(d / f"{name}.safetensors", stage1_expert(domain=name, key=key, model_seed=seed)))
            for name, key, seed in (("math", 3, 0), ("code", 4, 0), ("other", 5, 1))]


@pytest.fixture(scope="module")
def model(experts):
    return mode_jax.load("tiny", experts=experts[:2])


def test_load_composes_the_experts_and_matches_ref(model):
    assert model.expert_names == ["backbone", "math", "code"] and model.n_blocks == 2
    ids = ByteTokenizer().encode(PROMPT)
    want = decode.generate(model.params, np.array([ids]), model.cfg, max_new_tokens=5, keep_logits=True)
    got = model.generate(PROMPT, max_new_tokens=5)
    assert got.tokens == want.tokens[0] and got.prompt_tokens == ids
    assert_close(got.routing, want.routing[0], dtype=jnp.float32)
    # logits / routing of a text: the cached prefill's, i.e. the full forward at every position.
    logits, cache, probs = decode.prefill(model.params, jnp.asarray([ids]), model.cfg)
    assert_close(model.logits(PROMPT), logits[0], dtype=jnp.float32)
    assert_close(model.routing(PROMPT), np.stack([p[0] for p in probs], axis=1), dtype=jnp.float32)


def test_cli_streams_the_text_and_writes_the_routing_page(experts, model, tmp_path, capsys):
    page = tmp_path / "routing.html"
    code = main(["generate", "--model", "tiny", "--experts", *experts[:2], "--prompt", PROMPT,
                 "--max-new-tokens", "6", "--show-routing", "--routing-html", str(page)])
    out, err = capsys.readouterr()
    assert code == 0, err
    ids = ByteTokenizer().encode(PROMPT)
    want = decode.generate(model.params, np.array([ids]), model.cfg, max_new_tokens=6, eos_id=2)
    text = ByteTokenizer().decode(want.tokens[0])
    assert re.sub(r"\033\[\d*m", "", out) == text + "\n"
    assert "\033[" in out and "backbone" in err and "math" in err and "code" in err
    # The page: one row per token that has a routing (all but the first prompt token), holding
    # its 2 blocks x 3 gate weights; the new tokens' rows are ref's routing.
    rows = re.findall(r"<tr><td>(\d+)</td><td>(prompt|new)</td><td><code>(.*?)</code></td>(.*?)</tr>",
                      page.read_text())
    assert len(rows) == len(ids) - 1 + len(want.tokens[0])
    new = np.array([[float(w) for w in re.findall(r"<td>([0-9.]+)</td>", r[3])] for r in rows if r[1] == "new"])
    np.testing.assert_allclose(new.reshape(-1, 2, 3), want.routing[0], **PRINTED_3_DECIMALS)
    assert html.unescape(rows[0][2]) == repr(PROMPT[1])


def test_prompt_from_stdin_and_seeded_sampling(monkeypatch, capsys):
    runs = []
    for _ in range(2):
        monkeypatch.setattr("sys.stdin", io.StringIO("Once upon a time"))
        assert main(["generate", "--model", "tiny", "--max-new-tokens", "8", "--temperature", "1.0",
                     "--top-k", "50", "--seed", "3"]) == 0
        runs.append(capsys.readouterr().out)
    assert runs[0] == runs[1] and runs[0].strip()


@pytest.mark.parametrize("argv,needle", [
    (["--prompt", ""], "prompt is empty"),
    (["--prompt", "hi", "--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
    (["--prompt", "hi", "--top-p", "1.5"], "--top-p"),
    (["--prompt", "hi", "--temperature", "-1"], "--temperature"),
    (["--prompt-file", "/nonexistent/prompt.txt"], "does not exist"),
    (["--prompt", "hi", "--run", "/nonexistent/run"], "does not exist"),
    (["--prompt", "hi", "--system", "be brief"], "--system goes with --chat"),
    (["--prompt", "hi", "--chat"], "no chat template"),
])
def test_bad_input_is_refused(argv, needle, capsys, tmp_path):
    page = tmp_path / "r.html"
    assert_refused(capsys, ["generate", "--model", "tiny", "--routing-html", str(page), *argv], page, needle)


def test_prompt_longer_than_the_context_is_refused(capsys, tmp_path):
    prompt = tmp_path / "long.txt"
    prompt.write_text("a" * 65600)                 # the tiny backbone's context is 65536 tokens
    page = tmp_path / "r.html"
    assert_refused(capsys, ["generate", "--model", "tiny", "--prompt-file", str(prompt), "--routing-html",
                            str(page)], page, "65600 tokens", "context of 65536")


def test_expert_for_another_backbone_is_refused(experts, capsys, tmp_path):
    page = tmp_path / "r.html"
    assert_refused(capsys, ["generate", "--model", "tiny", "--experts", experts[0], experts[2], "--prompt", "hi",
                            "--routing-html", str(page)], page, "other.safetensors", "fingerprint")


def test_stop_string_cuts_the_text_and_the_stream_matches(model):
    full = model.generate("Once", max_new_tokens=12)
    assert full.finish == "length" and len(full.text) >= 8, full
    stop = full.text[4:6]
    pieces = []
    out = model.generate("Once", max_new_tokens=12, stop=[stop], stream=lambda piece, routing: pieces.append(piece))
    assert out.finish == "stop" and out.text == full.text[:full.text.find(stop)]
    assert "".join(pieces) == out.text and out.tokens == full.tokens[:len(out.tokens)]


def test_hugging_face_directory_with_its_chat_template(tmp_path, capsys):
    import json

    from tests.tiny_hf import recipes, train_tokenizer, write_model_dir
    path = write_model_dir(tmp_path / "model", train_tokenizer(recipes()))
    conf = json.loads((path / "tokenizer_config.json").read_text())
    conf["chat_template"] = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                             "{% if add_generation_prompt %}<assistant>{% endif %}")
    (path / "tokenizer_config.json").write_text(json.dumps(conf))
    model = mode_jax.load(str(path))
    prompt = model.chat_prompt("mix 3 cups of flour", system="be brief")
    assert prompt == "<system>be brief\n<user>mix 3 cups of flour\n<assistant>"
    out = model.generate(prompt, max_new_tokens=6)
    want = decode.generate(model.params, np.array([model.tokenizer.encode(prompt)]), model.cfg, max_new_tokens=6,
                           eos_id=model.eos_id)
    assert out.tokens == want.tokens[0] and out.routing.shape == (len(out.tokens), 0, 1)
    assert main(["generate", "--model", str(path), "--chat", "--system", "be brief", "--prompt",
                 "mix 3 cups of flour", "--max-new-tokens", "6"]) == 0
    assert capsys.readouterr().out == out.text + "\n"
    page = tmp_path / "r.html"
    assert_refused(capsys, ["generate", "--model", str(path), "--prompt", "flour " * 600, "--routing-html",
                            str(page)], page, "context of 512")
