"""The transformers side of the generation crosscheck: run under Python 3.11 with torch.

    python3.11 hf_generate.py REQUEST.json OUT.json

Loads the GGUF with transformers (its own reader and dequantizer) and runs its
`generate` (greedy, KV cache) on each prompt's token ids, writing the new ids.
Request keys: gguf (path), prompts (lists of ids), max_new_tokens, eos_id.
Imports nothing from mode_jax (it runs in another interpreter).
"""

import json
import sys
import time
from pathlib import Path


def main(request_path: str, out_path: str) -> None:
    t0 = time.time()
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)      # see hf_reference.py: spinning OpenMP threads on 2 shared cores
    request = json.loads(Path(request_path).read_text())
    gguf = Path(request["gguf"])
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    generated = []
    with torch.no_grad():
        for ids in request["prompts"]:
            x = torch.tensor([ids], dtype=torch.long)
            y = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=request["max_new_tokens"],
                               do_sample=False, eos_token_id=request["eos_id"], pad_token_id=request["eos_id"])
            generated.append(y[0, len(ids):].tolist())
    Path(out_path).write_text(json.dumps({
        "generated": generated, "seconds": round(time.time() - t0, 1),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__}}))


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: hf_generate.py REQUEST.json OUT.json")
    main(sys.argv[1], sys.argv[2])
