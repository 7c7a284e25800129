"""CLI subcommands: each module defines `register(subparsers)`, which adds its parser
and sets `func=run` (a callable taking the parsed args and returning an exit code)."""

# Order here is the order `mode-jax --help` lists them.
COMMANDS = ["fetch", "data", "train_expert", "compose", "compose_lora", "btx", "finetune", "evaluate", "export", "generate", "reproduce", "sweep",
            "demo"]
