"""The experiment pipeline behind `mode-jax train-expert / compose / finetune / eval / reproduce`.

    presets.py    configuration: dataclasses, TOML files, flag overrides, validation
    sources.py    where the backbone and the domain data come from (real or synthetic)
    runs.py       one run directory: resolved config, metrics (JSON lines), results
    expert_io.py  an expert as a standalone safetensors artifact, with compatibility checks
    checkpoint.py atomic training-state checkpoints and resume
    engine.py     train / eval loops (progress bars), routing statistics; the steps they
                  drive come from mode_jax.fast.steps (every backend, one interface)
    sharded.py    which methods --mesh / --placement shard (refused for the others)
    stages.py     the workflow's steps (stage 1, stage 2, baselines, eval) on a run directory
    report.py     Table 1 (markdown + JSON) with the paper's numbers beside ours
    plots.py      PNG figures: loss curves, accuracy per domain, gate routing per block
"""
