"""The transformers side of the crosscheck: run under Python 3.11 with torch.

    python3.11 hf_reference.py INPUTS.json OUT_DIR

Reads a request written by tests/test_crosscheck_transformers.py, loads the
same GGUF file with transformers (its own GGUF reader, dequantizer, q/k
reverse-permutation and tokenizer converter: code nobody in this project
wrote), and writes what it computes to OUT_DIR:

    results.json          token ids, decodes, greedy continuation, log-likelihoods, versions
    gguf_logits.npy       float32 logits [B, T, V] for the request's token ids
    gguf_weights.npz      a few dequantized weights, in torch's [out, in] layout
    hf_dir_<i>.npy        float32 logits of each tiny Hugging Face directory in the request

Request keys: gguf (path), texts (list of str), logit_tokens (list of equal-length
id lists), prompt (str), max_new_tokens (int), ll_texts (list of str),
hf_dirs (list of {path, tokens}).

This file imports nothing from mode_jax (it runs in another interpreter).
"""

import json
import sys
import time
from pathlib import Path


def main(request_path: str, out_dir: str) -> None:
    t_start = time.time()
    import numpy as np
    import tokenizers
    import torch
    import transformers
    from tokenizers import pre_tokenizers
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    torch.manual_seed(0)
    # One thread: on a 2-core machine shared with the jax side (or anything else), OpenMP's
    # spin-waiting threads made forwards 3-7x slower than a single thread.
    torch.set_num_threads(1)
    request = json.loads(Path(request_path).read_text())
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    gguf = Path(request["gguf"])
    timings = {"imports": time.time() - t_start}

    # --- tokenizer: transformers' GGUF conversion, as it comes and with the file's digit split added
    t0 = time.time()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    raw = tok.backend_tokenizer
    # tokenizer.ggml.pre = "smollm" means: split every digit, then GPT-2's regex (llama.cpp's
    # llama-vocab.cpp; Hugging Face's original tokenizer.json has Digits + ByteLevel).
    # transformers 5.x's GGUF converter ignores it, so rebuild that pipeline on its vocabulary.
    digits = tokenizers.Tokenizer.from_str(raw.to_str())
    digits.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    texts = request["texts"]
    ids_raw = [e.ids for e in raw.encode_batch(texts, add_special_tokens=False)]
    ids_digits = [e.ids for e in digits.encode_batch(texts, add_special_tokens=False)]
    decoded = [tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
               for ids in ids_digits]
    timings["tokenizer"] = time.time() - t0

    # --- model
    t0 = time.time()
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model.eval()
    timings["model_load"] = time.time() - t0
    layer0 = model.model.layers[0]
    np.savez(out / "gguf_weights.npz",
             q_proj=layer0.self_attn.q_proj.weight.detach().numpy(),
             k_proj=layer0.self_attn.k_proj.weight.detach().numpy(),
             v_proj=layer0.self_attn.v_proj.weight.detach().numpy(),
             embed_rows=model.model.embed_tokens.weight[:64].detach().numpy(),
             final_norm=model.model.norm.weight.detach().numpy())

    t0 = time.time()
    with torch.no_grad():
        tokens = torch.tensor(request["logit_tokens"], dtype=torch.long)
        logits = model(input_ids=tokens, attention_mask=torch.ones_like(tokens)).logits
    np.save(out / "gguf_logits.npy", logits.float().numpy())
    timings["logits"] = time.time() - t0

    # --- greedy decoding. torch on CPU is slow on every new input shape, so instead of
    # generate() (a KV cache: a new shape per step) run the full forward on one right-padded
    # [1, 32] buffer; causal attention keeps the padding from touching earlier positions.
    t0 = time.time()
    prompt_ids = tok(request["prompt"], add_special_tokens=False)["input_ids"]
    ids = list(prompt_ids)
    width = len(ids) + request["max_new_tokens"]
    with torch.no_grad():
        for _ in range(request["max_new_tokens"]):
            buf = torch.full((1, width), tok.eos_token_id, dtype=torch.long)
            buf[0, :len(ids)] = torch.tensor(ids)
            ids.append(int(model(input_ids=buf).logits[0, len(ids) - 1].argmax()))
            if ids[-1] == tok.eos_token_id:
                break
    new_ids = ids[len(prompt_ids):]
    timings["greedy"] = time.time() - t0

    # --- which pre-tokenizer did the model train on? Log-likelihood of the same text cut both
    # ways, one right-padded batch (same reason as above).
    t0 = time.time()
    rows = []
    for text in request.get("ll_texts", []):
        for backend in (raw, digits):
            rows.append([tok.eos_token_id] + backend.encode(text, add_special_tokens=False).ids)  # doc start
    ll = []
    if rows:
        width = max(map(len, rows))
        batch = torch.full((len(rows), width), tok.eos_token_id, dtype=torch.long)
        for i, r in enumerate(rows):
            batch[i, :len(r)] = torch.tensor(r)
        with torch.no_grad():
            logp = model(input_ids=batch).logits.float().log_softmax(-1)
        scores = [float(logp[i, :len(r) - 1].gather(-1, batch[i, 1:len(r), None]).sum())
                  for i, r in enumerate(rows)]
        ll = [{"raw": scores[2 * k], "digits": scores[2 * k + 1], "raw_tokens": len(rows[2 * k]) - 1,
               "digits_tokens": len(rows[2 * k + 1]) - 1} for k in range(len(rows) // 2)]
    timings["log_likelihood"] = time.time() - t0

    # --- tiny Hugging Face directories written by mode_jax.model_io.hf_loader.save_hf_dir
    t0 = time.time()
    for i, spec in enumerate(request.get("hf_dirs", [])):
        tiny = LlamaForCausalLM.from_pretrained(spec["path"], dtype=torch.float32).eval()
        with torch.no_grad():
            x = torch.tensor(spec["tokens"], dtype=torch.long)
            np.save(out / f"hf_dir_{i}.npy", tiny(input_ids=x).logits.float().numpy())
    timings["hf_dirs"] = time.time() - t0

    results = {
        "ids_raw": ids_raw, "ids_digits": ids_digits, "decoded": decoded,
        "prompt_ids": prompt_ids, "greedy_ids": new_ids,
        "greedy_text": tok.decode(new_ids, skip_special_tokens=False),
        "log_likelihood": ll,
        "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "vocab_size": len(tok),
        "versions": {"python": sys.version.split()[0], "torch": torch.__version__,
                     "transformers": transformers.__version__, "tokenizers": tokenizers.__version__,
                     "numpy": np.__version__},
        "timings": {k: round(v, 2) for k, v in timings.items()},
    }
    (out / "results.json").write_text(json.dumps(results))


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: hf_reference.py INPUTS.json OUT_DIR")
    main(sys.argv[1], sys.argv[2])
