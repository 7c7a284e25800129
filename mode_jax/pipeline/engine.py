"""The training and evaluation loops every command shares.

The steps themselves come from `mode_jax.fast.steps.make_steps` (re-exported here with
its `Steps` interface), the one place that picks a backend ("ref", "fast", "spmd",
"mpmd"); the loops here do not care which they got.

`train_loop` runs steps with a progress bar (tokens/s and loss), logs metrics to
the run directory, checkpoints every N steps and, on --resume, continues from the
last checkpoint with exactly the batches and state it would have had. `evaluate`
computes next-token loss and accuracy per domain and, for MoDE models, the gate's
mean routing weights per block (what the gate learned; paper eq. 2).
"""

from __future__ import annotations

import dataclasses
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from mode_jax.fast.steps import Steps, make_steps  # noqa: F401  (re-exported: the loops' interface)
from mode_jax.pipeline import checkpoint, finite
from mode_jax.pipeline.runs import RunDir
from mode_jax.ref.methods import METHODS

def _bar_interval() -> float:
    """Redraw often on a terminal; in a log file (no TTY) every 30 s is plenty."""
    return 0.2 if sys.stderr.isatty() else 30.0


def param_count(tree) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


@dataclasses.dataclass
class TrainOutcome:
    params: dict               # trained model (float32), frozen parts untouched
    finished: bool             # False: stopped at the time limit (a checkpoint holds the state)
    steps_done: int
    trainable_params: int
    seconds: float


def train_loop(run: RunDir, *, phase: str, params: dict, method: str, steps: Steps,
               batch_fn: Callable[[int], np.ndarray], total_steps: int, checkpoint_every: int,
               log_every: int = 1, seed: int = 0, progress: bool = True, deadline: float | None = None,
               throttle: float = 0.0) -> TrainOutcome:
    """Train `params` for `total_steps` on `batch_fn(step)` (int32 [B, T+1]); resumable.

    A checkpoint in `run` (from an earlier, interrupted call) is picked up
    automatically: training continues from its step. `deadline` (time.time()) stops
    early, after writing a checkpoint, so a long job can be split into calls. The first
    non-finite loss, gradient norm or state raises `finite.NonFiniteTraining` (naming
    the step and the last good checkpoint) before anything else is written."""
    from tqdm.auto import tqdm

    trainable, frozen = steps.split(steps.to_backend(params), METHODS[method])
    # Own copies: a donating step must never free arrays the caller still holds (the backbone).
    trainable = jax.tree.map(jnp.copy, trainable)
    opt_state = steps.init_opt(trainable)
    frozen_compute = steps.prepare_frozen(frozen)
    start, tokens_seen = 0, 0
    found = checkpoint.latest(run.checkpoints)
    if found is not None:
        # Checkpoints hold the single-device structure (steps.state_out): any layout resumes.
        t_like, opt_like = steps.state_out(trainable, opt_state)
        trainable, opt_state, meta = checkpoint.restore(found, trainable_template=t_like, opt_template=opt_like)
        trainable, opt_state = steps.place(*steps.state_in(trainable, opt_state))
        start, tokens_seen = meta["step"], meta["tokens_seen"]
        run.truncate_metrics(phase, start)
    n_train = param_count(trainable)
    began = time.perf_counter()
    bar = tqdm(total=total_steps, initial=start, desc=phase, unit="step", disable=not progress,
               dynamic_ncols=True, leave=True, mininterval=_bar_interval())

    watch = finite.Watch()

    def stop(bad_step, what):
        # Nothing of this phase is written past here: the last checkpoint on disk was
        # checked finite before it was written, so it is the one --resume goes on from.
        bar.close()
        last_good = checkpoint.latest(run.checkpoints)
        raise finite.NonFiniteTraining(finite.stop_message(
            phase, bad_step, what, last_good=last_good, lr_key=finite.lr_key(method),
            last_step=None if last_good is None else checkpoint.step_of(last_good)))

    def check_state(done):
        watch.check(stop)
        if not finite.state_finite(trainable, opt_state):
            stop(done, "parameters or optimizer state after the update")

    def save(step):
        check_state(step)       # never a checkpoint of non-finite state
        t_out, opt_out = steps.state_out(trainable, opt_state)
        checkpoint.save(run.checkpoints, step=step, trainable=t_out, opt_state=opt_out,
                        meta={"phase": phase, "tokens_seen": tokens_seen, "data_position": step,
                              "seed": seed, "prng_key": [int(x) for x in np.asarray(
                                  jax.random.key_data(jax.random.key(seed)))]})

    last, last_done = time.perf_counter(), start
    for step in range(start, total_steps):
        if deadline is not None and time.time() > deadline:
            save(step)
            bar.close()
            print(f"{phase}: time limit reached at step {step}/{total_steps}; checkpoint saved", file=sys.stderr)
            return TrainOutcome(params, False, step, n_train, time.perf_counter() - began)
        batch = {"tokens": jnp.asarray(batch_fn(step))}
        trainable, opt_state, m = steps.train_step(trainable, frozen_compute, opt_state, batch)
        done = step + 1
        tokens_seen += int(np.prod(batch["tokens"][:, 1:].shape))
        watch.add(done, m)
        if done % log_every == 0 or done == total_steps:
            # Only here does the host wait for the device, so steps in between queue up;
            # their losses and gradient norms are checked finite together, now.
            watch.check(stop)
            loss = float(m["loss"])
            now = time.perf_counter()
            rate = (done - last_done) * int(np.prod(batch["tokens"][:, 1:].shape)) / max(now - last, 1e-9)
            last, last_done = now, done
            run.log({"phase": phase, "step": done, "loss": loss, "accuracy": float(m["accuracy"]),
                     "lr": float(m["lr"]), "grad_norm": float(m["grad_norm"]),
                     "tokens_seen": tokens_seen, "tokens_per_s": round(rate, 1),
                     # a model's auxiliary loss (BTX's load balancing), beside the plain loss
                     **({"aux_loss": float(m["aux_loss"])} if "aux_loss" in m else {})})
            bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{rate:,.0f}", refresh=False)
        bar.update(1)
        if checkpoint_every and done % checkpoint_every == 0 and done < total_steps:
            save(done)
        if throttle:
            time.sleep(throttle)
    check_state(total_steps)    # the artifact is written from this state
    bar.close()
    trained = steps.from_backend(steps.join(trainable, frozen))
    return TrainOutcome(trained, True, total_steps, n_train, time.perf_counter() - began)


def evaluate(steps: Steps, params: dict, eval_sets: dict[str, np.ndarray], *, batch_size: int,
             progress: bool = True, desc: str = "eval", separator: int | None = None,
             documents: dict[str, tuple[np.ndarray, str]] | None = None,
             answers: dict[str, np.ndarray] | None = None) -> dict[str, dict[str, Any]]:
    """Per domain: mean next-token loss and accuracy over its eval rows (all batches the same
    size, so the mean of batch means is the token mean), and routing [n_blocks][E] for MoDE.

    Besides, the counts intervals and paired comparisons need (mode_jax/pipeline/stats.py),
    with targets equal to `separator` (the EOS between packed documents) left out:
    `per_row` {correct, tokens, nll} per eval row, `per_document` {unit, ids, correct, tokens}
    per test document (`documents[domain]` = (document id of every target [n, T], unit);
    without it each row is its own unit), and `accuracy_content` (their pooled accuracy).
    `answers[domain]` (bool [n, T], pipeline/answers.py) marks a question/answer domain's
    answer targets: their accuracy and per-document counts go under `answers`."""
    from tqdm.auto import tqdm

    total = sum(rows.shape[0] // batch_size for rows in eval_sets.values())
    params = steps.to_backend(params)
    out = {}
    with tqdm(total=total, desc=desc, unit="batch", disable=not progress, leave=False,
              mininterval=_bar_interval()) as bar:
        for domain, rows in eval_sets.items():
            losses, accs, routes, correct, nll = [], [], [], [], []
            for i in range(0, rows.shape[0], batch_size):
                m = steps.eval_step(params, jnp.asarray(rows[i:i + batch_size]))
                losses.append(float(m["loss"]))
                accs.append(float(m["accuracy"]))
                correct.append(np.asarray(m["token_correct"], bool))
                nll.append(np.asarray(m["token_nll"], np.float64))
                if m["routing"] is not None:
                    routes.append(np.asarray(m["routing"], np.float64))
                bar.update(1)
            out[domain] = {"loss": float(np.mean(losses)), "accuracy": float(np.mean(accs)),
                           "tokens": int(rows.shape[0] * (rows.shape[1] - 1))}
            if routes:
                out[domain]["routing"] = np.mean(routes, axis=0).round(6).tolist()
            out[domain].update(_unit_counts(rows, np.concatenate(correct), np.concatenate(nll), separator,
                                            (documents or {}).get(domain)))
            if answers and domain in answers:
                from mode_jax.pipeline.answers import answer_counts
                out[domain]["answers"] = answer_counts(np.concatenate(correct), answers[domain],
                                                       (documents or {}).get(domain))
    return out


def _unit_counts(rows, correct, nll, separator, documents) -> dict[str, Any]:
    """Correct and counted targets per row and per document (separator targets excluded)."""
    targets = np.asarray(rows)[:, 1:]                                          # [n, T]
    keep = np.ones(targets.shape, bool) if separator is None else targets != separator
    counted = int(keep.sum())
    return {"accuracy_content": float((correct & keep).sum() / max(counted, 1)), "separator": separator,
            "per_row": {"correct": (correct & keep).sum(axis=1).tolist(), "tokens": keep.sum(axis=1).tolist(),
                        "nll": np.where(keep, nll, 0.0).sum(axis=1).round(6).tolist()},
            "per_document": document_counts(correct, keep, documents)}


def document_counts(correct: np.ndarray, keep: np.ndarray, documents) -> dict[str, Any]:
    """{unit, ids, correct, tokens}: the `keep` targets ([n, T] bool) counted per document
    (`documents` = (document id of every target [n, T], unit); None: each row its own unit)."""
    ids, unit = documents if documents is not None else (
        np.repeat(np.arange(keep.shape[0])[:, None], keep.shape[1], axis=1), "row")
    uniq, inverse = np.unique(ids[keep], return_inverse=True)
    doc_correct = np.bincount(inverse, weights=correct[keep], minlength=uniq.size)
    doc_tokens = np.bincount(inverse, minlength=uniq.size)
    return {"unit": unit, "ids": uniq.tolist(), "correct": doc_correct.astype(int).tolist(),
            "tokens": doc_tokens.tolist()}
