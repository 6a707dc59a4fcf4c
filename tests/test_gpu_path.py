"""The GPU path's CPU twins (issue 15): bf16 autocast, attention through
``scaled_dot_product_attention`` with its FLOPs, data placement, and the GPU benchmark's
smoke run. Everything here runs without a GPU."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from spaces import FeatureSpec, ModelConfig
from spaces.blocks.attention import Attention, AttentionConfig, softmax_attention
from spaces.features import SequenceSpec
from spaces.flops import torch_flops
from tests.test_model import planted_pairwise
from trainers.data import Split
from trainers.loop import TrainConfig, train
from trainers.placement import BatchSource, choose_placement, split_bytes
from trainers.sequences import build_histories, model_inputs

ROOT = Path(__file__).resolve().parents[1]
CFG = ModelConfig(block="attention", d_model=16, n_tokens=4, n_layers=1, embed_dim=8,
                  head_hidden=(16,), attention={"n_heads": 2})


def _reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         tau: torch.Tensor | None) -> torch.Tensor:
    """``softmax(Q Kᵀ / (√d_h τ)) V`` written out, ``(B, N_b, H, T_g, d_h)``."""
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if tau is not None:
        scores = scores / tau[..., None, None]
    return torch.softmax(scores, dim=-1) @ v


@pytest.mark.parametrize(("g", "h", "tg", "dh", "with_tau"),
                         [(1, 2, 4, 8, False), (2, 4, 3, 4, True), (4, 1, 2, 16, True)])
def test_sdpa_equals_the_written_out_attention(g: int, h: int, tg: int, dh: int,
                                               with_tau: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(5, g, h, tg, dh, generator=gen, requires_grad=True) for _ in range(3))
    tau = torch.rand(5, g, h, generator=gen) + 0.5 if with_tau else None
    out = softmax_attention(q, k, v, tau)
    ref = _reference_attention(q, k, v, tau)
    assert torch.allclose(out, ref, atol=1e-6)
    w = torch.randn_like(out)
    grads = torch.autograd.grad((out * w).sum(), (q, k, v))
    grads_ref = torch.autograd.grad((ref * w).sum(), (q, k, v))
    for a, b in zip(grads, grads_ref, strict=True):
        assert torch.allclose(a, b, atol=1e-5)


def test_sdpa_flops_are_the_analytic_count() -> None:
    """The counter's own SDPA formula is the analytic ``4 T² D / N_b`` per example; on a
    CPU torch 2.13's fused kernel is not counted unless the math backend is forced
    (``spaces.flops.torch_flops`` forces it), and then the whole block is exact."""
    t, d, b = 8, 16, 4
    for g, heads in ((1, 2), (2, 4)):
        cfg = AttentionConfig(kind="softmax", n_heads=heads, partitions=g)
        tg, dh = t // g, d // heads
        shape = (b * g, heads, tg, dh)
        assert sdpa_flop_count(shape, shape, shape) == b * 4 * t * t * d // g
        blk = Attention(cfg, t, d)
        x = torch.randn(b, t, d)
        analytic = b * Attention.count_flops(cfg, t, d).per_example
        assert torch_flops(blk, (x,)) == analytic
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            blk(x).sum().backward()
        # forward + backward is 3x the forward under the math backend, as MFU assumes
        assert counter.get_total_flops() == 3 * analytic


def test_defaults_keep_fp32_and_host() -> None:
    tc = TrainConfig()
    assert (tc.precision, tc.placement) == ("fp32", "host")


@pytest.fixture(scope="module")
def data():
    spec, tr = planted_pairwise(2000, seed=0)
    _, va = planted_pairwise(500, seed=1)
    return spec, tr, va


def test_bf16_autocast_trains_and_stays_close_to_fp32(data) -> None:
    spec, tr, va = data
    dtypes: set[torch.dtype] = set()

    def hook(mod: nn.Module, args: object, out: object) -> None:
        if isinstance(mod, nn.Linear) and isinstance(out, torch.Tensor) and mod.training:
            dtypes.add(out.dtype)

    tc = TrainConfig(lr=3e-3, batch_size=100, max_examples=2000, eval_every=1000, seed=0)
    losses: dict[str, list[float]] = {"fp32": [], "bf16": []}
    results = {}
    for prec in ("fp32", "bf16"):
        handle = nn.modules.module.register_module_forward_hook(hook)
        try:
            results[prec] = train(CFG, tc.model_copy(update={"precision": prec}), spec, tr, va,
                                  on_step=lambda n, loss, p=prec: losses[p].append(loss))
        finally:
            handle.remove()
        assert dtypes == ({torch.float32} if prec == "fp32" else {torch.bfloat16})
        dtypes.clear()
    a, b = results["fp32"], results["bf16"]
    assert b.status == "completed"
    assert all(p.dtype == torch.float32 for p in b.model.parameters())  # master weights
    assert losses["bf16"][0] == pytest.approx(losses["fp32"][0], abs=0.01)  # same init
    assert losses["bf16"] != losses["fp32"]  # the autocast path really ran
    assert b.metrics["val_logloss"] == pytest.approx(a.metrics["val_logloss"], abs=0.03)


@pytest.mark.parametrize("placement", ["resident", "pinned", "auto"])
def test_every_placement_trains_the_same_weights(data, placement: str) -> None:
    spec, tr, va = data
    tc = TrainConfig(batch_size=96, max_examples=3000, eval_every=1500, seed=1)
    host = train(CFG, tc, spec, tr, va)
    other = train(CFG, tc.model_copy(update={"placement": placement}), spec, tr, va)
    assert other.history == [
        {**m, "examples_per_s": o["examples_per_s"]} for m, o in zip(host.history, other.history,
                                                                     strict=True)]
    for (name, w), w2 in zip(host.model.state_dict().items(), other.model.state_dict().values(),
                             strict=True):
        assert torch.equal(w, w2), name


def test_placement_decision_with_fake_sizes() -> None:
    gib = 1 << 30
    assert choose_placement("auto", "cuda", 30 * gib, 120 * gib, 0.25) == "resident"
    assert choose_placement("auto", "cuda", 30 * gib + 1, 120 * gib, 0.25) == "pinned"
    assert choose_placement("auto", "cuda", 1, None, 0.25) == "pinned"  # unknown free memory
    assert choose_placement("auto", "cpu", 1, None, 1.0) == "host"
    assert choose_placement("auto", "cpu", 1, 100 * gib, 1.0) == "host"
    # fractional trials: what fits alone may not fit once others took memory
    assert choose_placement("auto", "cuda", 10 * gib, 100 * gib, 0.5) == "resident"
    assert choose_placement("auto", "cuda", 10 * gib, 15 * gib, 0.5) == "pinned"
    for forced in ("host", "resident", "pinned"):
        assert choose_placement(forced, "cpu", 10 * gib, 1, 0.1) == forced  # type: ignore[arg-type]
    s = Split(torch.zeros(7, 3, dtype=torch.int64), torch.zeros(7, 2), torch.zeros(7))
    assert split_bytes(s) == 7 * 3 * 8 + 7 * 2 * 4 + 7 * 4


def _history_split(n: int = 300) -> tuple[FeatureSpec, Split]:
    g = torch.Generator().manual_seed(0)
    user = torch.randint(0, 20, (n,), generator=g).numpy()
    time = torch.randperm(n, generator=g).double().numpy()
    item = torch.randint(1, 30, (n,), generator=g).numpy()
    label = (torch.rand(n, generator=g) < 0.4).float()
    _, hist = build_histories(user, time, item, label.numpy(), {"train": torch.arange(n).numpy()})
    cat = torch.stack([torch.from_numpy(user) + 1, torch.from_numpy(item)], dim=1)
    spec = FeatureSpec(cardinalities=(21, 30), n_numeric=1, sequence=SequenceSpec(item_field=1))
    return spec, Split(cat, torch.randn(n, 1), label, hist["train"])


@pytest.mark.parametrize("placement", ["resident", "pinned"])
def test_batches_equal_the_host_path_with_histories(placement: str) -> None:
    """Every batch, the double-buffered pinned ones included (a buffer is reused every
    other step, and the last batch is short), is the host path's, histories too."""
    from spaces import build_model

    spec, split = _history_split()
    model = build_model(ModelConfig(block="attention", d_model=16, n_tokens=2, embed_dim=8,
                                    seq_len=4, attention={"n_heads": 2}), spec)
    src = BatchSource(split, torch.device("cpu"), placement, max_batch=64)  # type: ignore[arg-type]
    order = torch.randperm(len(split), generator=torch.Generator().manual_seed(1))
    sizes = []
    for i in range(0, len(split), 64):
        idx = order[i:i + 64]
        inputs, label = src.batch(model, idx)
        expected = model_inputs(model, split, idx, "cpu")
        assert len(inputs) == 3
        for a, b in zip(inputs, expected, strict=True):
            assert torch.equal(a, b)
        assert torch.equal(label, split.label[idx])
        sizes.append(len(label))
    assert sizes == [64] * 4 + [300 - 4 * 64]


def test_a_history_model_without_histories_is_one_clear_error() -> None:
    from spaces import build_model

    spec, split = _history_split(50)
    model = build_model(ModelConfig(block="attention", d_model=16, n_tokens=2, embed_dim=8,
                                    seq_len=4, attention={"n_heads": 2}), spec)
    bare = Split(split.cat, split.num, split.label)
    with pytest.raises(ValueError, match="DataConfig\\(sequences=True\\)"):
        BatchSource(bare, torch.device("cpu"), "pinned", 8).batch(model, torch.arange(8))


@pytest.mark.slow
def test_gpu_bench_check_and_quick_run_on_cpu(tmp_path: Path) -> None:
    """``bench/gpu.py --device cpu --quick`` writes its JSON; ``--check`` passes on a CPU.
    (slow: ~80 s on these shared cores; the two runs start processes and train ~20 models.)"""
    out = tmp_path / "gpu.json"
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    run = subprocess.run([sys.executable, "bench/gpu.py", "--device", "cpu", "--quick",
                          "--threads", "1", "--out", str(out)], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    res = json.loads(out.read_text())
    assert res["device"] == "cpu" and res["peak_source"] == "measured"
    assert res["peak_flops"]["fp32"] > 0 and res["peak_flops"]["bf16"] > 0
    fams = {r["family"] for r in res["throughput"]}
    assert {"attention", "tokenmixer"} <= fams
    for r in res["throughput"]:
        assert r["examples_per_s"] > 0 and r["mfu"] > 0
        assert r["precision"] in ("fp32", "bf16") and r["placement"] in ("host", "resident",
                                                                         "pinned")
    assert {r["trials_per_device"] for r in res["packing"]} >= {1, 2}
    assert all(r["trials_per_hour"] > 0 for r in res["packing"])
    check = subprocess.run([sys.executable, "bench/gpu.py", "--device", "cpu", "--check",
                            "--threads", "1"],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert check.returncode == 0, check.stdout[-2000:] + check.stderr[-2000:]
    assert "all checks passed" in check.stdout
