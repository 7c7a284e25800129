"""An independent float64 NumPy Llama and MoDE, for checking `mode_jax.ref`.

Written differently on purpose: explicit loops over heads and positions,
rotary embedding applied pair by pair from its definition (frequency i rotates
dims (i, i + H/2)), softmax by hand. Shares no code with the package.
"""

import numpy as np


def rms_norm(x, w, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def frequencies(cfg):
    """Angle per position of each pair, [H/2]: theta^(-2i/H), with Llama 3's rule applied as
    Hugging Face's `_compute_llama3_parameters` states it (on the frequencies, not divisors)."""
    h = cfg.head_dim
    freq = np.array([cfg.rope_theta ** (-2.0 * i / h) for i in range(h // 2)])
    if getattr(cfg, "rope_freq_factors", None) is not None:
        return freq / np.asarray(cfg.rope_freq_factors, np.float64)
    sc = getattr(cfg, "rope_scaling", None)
    if sc is None:
        return freq
    wavelen = 2 * np.pi / freq
    low_wavelen = sc.original_max_position_embeddings / sc.low_freq_factor
    high_wavelen = sc.original_max_position_embeddings / sc.high_freq_factor
    scaled = np.where(wavelen > low_wavelen, freq / sc.factor, freq)
    smooth = ((sc.original_max_position_embeddings / wavelen - sc.low_freq_factor)
              / (sc.high_freq_factor - sc.low_freq_factor))
    smoothed = (1 - smooth) * scaled / sc.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, smoothed, scaled)


def rotate(v, pos, theta, freqs=None):
    """Rotate vector v [H] at position pos: pair (i, i + H/2) by angle pos * theta^(-2i/H)
    (or pos * freqs[i])."""
    h = v.shape[0]
    out = v.copy()
    for i in range(h // 2):
        ang = pos * (theta ** (-2.0 * i / h) if freqs is None else freqs[i])
        a, b = v[i], v[i + h // 2]
        out[i] = a * np.cos(ang) - b * np.sin(ang)
        out[i + h // 2] = b * np.cos(ang) + a * np.sin(ang)
    return out


def attention(x, layer, cfg):
    t = x.shape[0]
    nh, kh, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    q = (x @ layer["wq"] + layer.get("bq", 0.0)).reshape(t, nh, hd)
    k = (x @ layer["wk"] + layer.get("bk", 0.0)).reshape(t, kh, hd)
    v = (x @ layer["wv"] + layer.get("bv", 0.0)).reshape(t, kh, hd)
    freqs = frequencies(cfg)
    out = np.zeros((t, nh, hd))
    for n in range(nh):
        kv = n // (nh // kh)
        qs = np.stack([rotate(q[i, n], i, cfg.rope_theta, freqs) for i in range(t)])
        ks = np.stack([rotate(k[j, kv], j, cfg.rope_theta, freqs) for j in range(t)])
        for i in range(t):
            s = qs[i] @ ks[: i + 1].T / np.sqrt(hd)
            p = np.exp(s - s.max())
            p /= p.sum()
            out[i, n] = p @ v[: i + 1, kv]
    return out.reshape(t, nh * hd) @ layer["wo"]


def layer(x, p, cfg):
    h = x + attention(rms_norm(x, p["attn_norm"], cfg.norm_eps), p, cfg)
    u = rms_norm(h, p["mlp_norm"], cfg.norm_eps)
    g = u @ p["w_gate"]
    return h + ((g / (1 + np.exp(-g))) * (u @ p["w_up"])) @ p["w_down"]


def head(params, h, cfg):
    h = rms_norm(h, params["final_norm"], cfg.norm_eps)
    w = params["embed"].T if cfg.tie_embeddings else params["lm_head"]
    return h @ w


def llama_logits(params, tokens, cfg):
    """tokens [T] -> logits [T, V], one sequence."""
    x = params["embed"][np.asarray(tokens)]
    for p in params["layers"]:
        x = layer(x, p, cfg)
    return head(params, x, cfg)


def mode_logits(params, tokens, cfg):
    """MoDE eq. 1-2 for one sequence: per block, softmax gate over [backbone, experts]."""
    bb = params["backbone"]
    x = bb["embed"][np.asarray(tokens)]
    per = len(bb["layers"]) // len(params["blocks"])
    for i, block in enumerate(params["blocks"]):
        outs = []
        for stack in [bb["layers"][i * per:(i + 1) * per]] + list(block["experts"]):
            h = x
            for p in stack:
                h = layer(h, p, cfg)
            outs.append(h)
        z = x @ block["gate_w"] + block["gate_b"]
        a = np.exp(z - z.max(-1, keepdims=True))
        a /= a.sum(-1, keepdims=True)
        x = sum(a[:, e:e + 1] * outs[e] for e in range(len(outs)))
    return head(bb, x, cfg)


def to_numpy(tree):
    """Nested dicts/lists of jax arrays -> the same of float64 numpy arrays."""
    if isinstance(tree, dict):
        return {k: to_numpy(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [to_numpy(v) for v in tree]
    return np.asarray(tree, np.float64)
