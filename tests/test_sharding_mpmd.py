"""MPMD (paper section 3.3, 4.4): backbone and experts on disjoint sub-meshes of the 8
forced CPU devices, against `ref.train.train_step` run unsharded and against the
single-device fast step (fast/train.py) with the same merge; placement checks; the
`--mesh` / `--placement` flags of `mode_jax.distributed`.

The model, batches, reference run and tolerances are those of test_sharding_spmd.py
(its docstring says why each tolerance is what it is); two steps per placement against
the reference, one step against the single-device step. fast/model.py's layers merge
with the fused merge (`FastConfig.merge`, the default: each expert mesh ships r, u and
W of its last layer) or the stacked one; ref/'s layers (fast=None) merge stacked.
"""

from __future__ import annotations

import argparse

import jax
import numpy as np
import pytest

from mode_jax import distributed
from mode_jax.fast import optim
from mode_jax.fast import train as fast_train
from mode_jax.fast.mpmd import MpmdStep
from mode_jax.fast.optim import adam_state
from mode_jax.fast.placement import Placement, SubMesh, even_placement
from mode_jax.fast.params import partition, to_fast
from tests.test_sharding_spmd import (BATCH, CFG, EXACT, FAST_COMPILE, MOMENT_SCALE, OPT, SEQ, STACKED,
                                      assert_matches_reference, make_params, reference_run)
from tests.tolerances import assert_close

# 4 experts on: one expert mesh; one mesh per expert (backbone fsdp x tp, one expert
# on tp=2); uneven meshes hosting experts out of order (0, 2, 3 and 1).
# The layers run as ref/ does (None) or as fast/model.py does (float32).
PLACEMENTS = {
    "one_expert_mesh": ("backbone=0-3;experts=4-7", None),
    "mesh_per_expert": ("backbone=0-3[fsdp=2,tp=2];experts=4,5,6,7", EXACT),
    "uneven": ("backbone=0-1[dp=2];experts=2-5[dp=2,tp=2]:0+2+3,6-7[tp=2]:1", EXACT),
}


def _run(placement: Placement, trainable: str = "experts_and_gates", fast=None):
    params, batches, *_ = reference_run(trainable)
    stacked = to_fast(params)
    step = MpmdStep(stacked, CFG, OPT, placement, trainable=trainable, batch_size=BATCH, seq_len=SEQ,
                    masked=True, fast=fast, compiler_options=FAST_COMPILE)
    state = step.place(stacked)
    metrics = []
    for i, batch in enumerate(batches):
        profile = {} if i else None   # the second step serialised, as the benchmark measures it
        state, m = step(state, step.place_batch(batch), profile=profile)
        metrics.append(jax.device_get(m))
    assert set(profile) == {"transfer", *step.placement.names()}
    return step, state, metrics


@pytest.mark.parametrize("name", list(PLACEMENTS))
def test_mpmd_placement_matches_reference(name):
    text, fast = PLACEMENTS[name]
    step, state, metrics = _run(distributed.parse_placement(text), fast=fast)
    # Each component lives on its own devices.
    devices = [set(step.placement.backbone.devices), *(set(s.devices) for s in step.placement.experts)]
    assert {d.id for d in state["gates"]["gate_w"].sharding.device_set} == devices[0]
    for m, experts in enumerate(state["experts"]):
        assert {d.id for d in experts["experts"]["wq"].sharding.device_set} == devices[m + 1]
    adam = {"gates": adam_state(state["opt"]["gates"]), "experts": [adam_state(o) for o in state["opt"]["experts"]]}
    mu = {"blocks": {"experts": _gather_experts(step, [a.mu for a in adam["experts"]]),
                     **jax.tree.map(np.asarray, adam["gates"].mu)}}
    nu = {"blocks": {"experts": _gather_experts(step, [a.nu for a in adam["experts"]]),
                     **jax.tree.map(np.asarray, adam["gates"].nu)}}
    assert_matches_reference(metrics, step.gather(state), {**mu, "backbone": None}, {**nu, "backbone": None})


def _gather_experts(step, trees):
    return step.gather({"backbone": {}, "gates": {}, "experts": trees})["blocks"]["experts"]


def test_mpmd_frozen_experts_trains_gates_only():
    step, state, metrics = _run(Placement(SubMesh((0, 1, 2, 3)), (SubMesh((4, 5, 6, 7)),)), trainable="gates",
                                fast=EXACT)
    assert step.fused and state["opt"]["experts"] == [None]
    gates = adam_state(state["opt"]["gates"])
    gates_mu = {"blocks": {"experts": None, **jax.tree.map(np.asarray, gates.mu)}}
    gates_nu = {"blocks": {"experts": None, **jax.tree.map(np.asarray, gates.nu)}}
    assert_matches_reference(metrics, step.gather(state), {**gates_mu, "backbone": None},
                             {**gates_nu, "backbone": None}, trainable="gates")


@pytest.mark.parametrize("trainable", ["experts_and_gates", "gates"])
@pytest.mark.parametrize("fast", [EXACT, STACKED], ids=["fused", "stacked"])
def test_mpmd_step_equals_single_device_step(trainable, fast):
    """One MPMD step (two expert meshes hosting the experts out of order) against one
    step of fast/train.py on one device with the same FastConfig, and the reference's
    loss and gradient norm: loss, accuracy, gradient norm, gradients (the first moment
    after one step is (1 - b1) g) and the updated trainable params."""
    params, batches, ref_metrics, *_ = reference_run(trainable)
    stacked = to_fast(params)
    placement = distributed.parse_placement("backbone=0-3[fsdp=2,tp=2];experts=4-5:0+2,6-7[tp=2]:1+3")
    step = MpmdStep(stacked, CFG, OPT, placement, trainable=trainable, batch_size=BATCH, seq_len=SEQ,
                    masked=True, fast=fast, compiler_options=FAST_COMPILE)
    assert step.fused == (fast.merge == "fused")
    state, got = step(step.place(stacked), step.place_batch(batches[0]))
    template, frozen = partition(stacked, trainable)
    got_t, got_opt = step.to_canonical({"gates": state["gates"], "experts": state["experts"]}, state["opt"],
                                       template)

    single = fast_train.train_step_keep.lower(template, frozen, optim.init(template, OPT), batches[0],
                                              cfg=CFG, opt=OPT, fast=fast).compile(FAST_COMPILE)
    want_t, want_opt, want = single(template, frozen, optim.init(template, OPT), batches[0])
    for key in ("loss", "accuracy", "grad_norm", "lr"):
        assert_close(got[key], want[key], err_msg=f"single-device {key}")
    for key in ("loss", "accuracy", "grad_norm"):
        assert_close(got[key], ref_metrics[0][key], err_msg=f"reference {key}")
    jax.tree.map_with_path(lambda p, a, b: assert_close(np.asarray(a), b, err_msg=jax.tree_util.keystr(p)),
                           got_t, want_t)

    def moments_close(path, a, b):     # relative to the largest entry: see test_sharding_spmd.py
        top = float(np.max(np.abs(b))) or 1.0
        assert_close(np.asarray(a) / top, np.asarray(b) / top, scale=MOMENT_SCALE,
                     err_msg=jax.tree_util.keystr(path))
    jax.tree.map_with_path(moments_close, adam_state(got_opt).mu, adam_state(want_opt).mu)


def _step(placement, **kw):
    return MpmdStep(to_fast(make_params()), CFG, OPT, placement, batch_size=kw.pop("batch_size", BATCH),
                    seq_len=SEQ, **kw)


@pytest.mark.parametrize("text, message", [
    ("backbone=0-3;experts=3-5", r"device 3 is in both 'backbone' and 'experts\[0\]' \(sub-meshes must be disjoint\)"),
    ("backbone=0-3;experts=4-5,5-6", r"device 5 is in both 'experts\[0\]' and 'experts\[1\]'"),
    ("backbone=0-3;experts=8-9", r"placement 'experts\[0\]': device 8 does not exist \(8 devices: 0-7\)"),
    ("backbone=0-3;experts=4-6", r"placement 'experts\[0\]'.*dimension 0 \('batch'\) of hidden activations "
                                 r"\(8, 16, 32\) has size 8, not divisible by mesh axes \('dp',\) of size 3"),
    ("backbone=0-3;experts=4-6[tp=3]", r"placement 'experts\[0\]'.*\('mlp'\) of params/experts/w_down has size 64, "
                                       r"not divisible by mesh axes \('tp',\) of size 3"),
    ("backbone=0-3;experts=4-7[ep=4]:0-2,", r"cannot read sub-mesh"),
    ("backbone=0-3;experts=4-5:0-1,6-7:1-3", r"each of the 4 experts \(0-3\) must be on exactly one"),
    ("backbone=0-3;experts=4-5:0-1,6-7", r"give the experts of every expert sub-mesh, or of none"),
    ("backbone=0-3[dp=2];experts=4-7", r"placement 'backbone': mesh axes \{'dp': 2\} hold 2 devices but 4"),
    ("backbone=0-3;experts=4,5,6,7,4-7", r"5 expert sub-meshes for only 4 experts|device 4 is in both"),
])
def test_misconfigured_placement_fails_before_compiling(text, message):
    # The constructor validates and lays out shardings but compiles nothing.
    with pytest.raises(ValueError, match=message):
        _step(distributed.parse_placement(text))


def test_even_placement_and_one_device_fallback():
    p = even_placement(8, 2)
    assert p.backbone.devices == (0, 1, 2, 3) and [s.devices for s in p.experts] == [(4, 5), (6, 7)]
    p = even_placement(8, 4)
    assert p.backbone.devices == (0, 1, 2, 3) and [s.devices for s in p.experts] == [(4,), (5,), (6,), (7,)]
    p = even_placement(7, 2)   # leftovers go to the backbone
    assert p.backbone.devices == (0, 1, 2) and [s.devices for s in p.experts] == [(3, 4), (5, 6)]
    p = even_placement(1, 2)   # one GPU: every sub-mesh on device 0, which only this flag allows
    assert p.allow_shared_devices and p.resolve(4, 1).experts[1].experts == (2, 3)


def test_flags_parse_into_meshes_and_placements():
    assert distributed.parse_mesh("dp=2,tp=4") == (("dp", 2), ("tp", 4))
    assert distributed.parse_mesh("fsdp,tp=2") == (("fsdp", -1), ("tp", 2))
    assert distributed.parse_mesh("fsdp_tp") == (("fsdp", -1), ("tp", 2))
    p = distributed.parse_placement("backbone=0-3[fsdp=2,tp=2]; experts=4-5[tp=2]:0+2,6+7:1-1")
    assert p == Placement(SubMesh((0, 1, 2, 3), (("fsdp", 2), ("tp", 2))),
                          (SubMesh((4, 5), (("tp", 2),), (0, 2)), SubMesh((6, 7), (), (1,))))
    for bad, message in (("dp=2,model=4", r"unknown mesh axis 'model'"), ("dp:2", r"cannot read 'dp:2'")):
        with pytest.raises(ValueError, match=message):
            distributed.parse_mesh(bad)
    for bad, message in (("experts=4-7", r"lacks backbone"), ("backbone=0-3;gpu=4", r"cannot read 'gpu=4'"),
                         ("backbone=3-0;experts=4", r"empty range"),
                         ("backbone=0-3:1;experts=4-7", r"backbone cannot list experts")):
        with pytest.raises(ValueError, match=message):
            distributed.parse_placement(bad)

    parser = argparse.ArgumentParser()
    distributed.add_mesh_args(parser)
    spmd = distributed.mesh_from_args(parser.parse_args(["--mesh", "dp=4,tp=2"]))
    assert spmd.kind == "spmd" and dict(spmd.mesh.shape) == {"dp": 4, "tp": 2}
    assert spmd.rules["mlp"] == ("tp",) and spmd.describe() == "SPMD mesh {'dp': 4, 'tp': 2}"
    mpmd = distributed.mesh_from_args(parser.parse_args(["--placement", "backbone=0-3;experts=4-5,6-7"]))
    assert mpmd.kind == "mpmd" and mpmd.placement.experts[1].devices == (6, 7)
    with pytest.raises(ValueError, match=r"--placement: device 8 does not exist \(8 devices: 0-7\)"):
        distributed.mesh_from_args(parser.parse_args(["--placement", "backbone=0-3;experts=4-9"]))
    with pytest.raises(ValueError, match=r"hold 16 devices but 8"):
        distributed.mesh_from_args(parser.parse_args(["--mesh", "dp=4,tp=4"]))


def test_distributed_initialize_reads_flags_and_environment(monkeypatch):
    for var in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(var, raising=False)
    assert distributed.initialize() is False            # single process: nothing to do
    with pytest.raises(ValueError, match=r"--num-processes=2 needs --coordinator"):
        distributed.initialize(num_processes=2)
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")
    with pytest.raises(ValueError, match=r"needs --num-processes and --process-id"):
        distributed.initialize()
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    monkeypatch.setenv("JAX_PROCESS_ID", "1")
    monkeypatch.setattr(distributed, "_initialized", False)
    assert distributed.initialize() is True
    assert calls == [{"coordinator_address": "10.0.0.1:1234", "num_processes": 2, "process_id": 1}]
