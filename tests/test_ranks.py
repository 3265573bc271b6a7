"""The rank policies (runtime/ranks.py) on known spectra: an output-gradient rank that would cost
as much as the exact input gradient becomes the exact one; everything else as chosen."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from contract.manifest import LayerInfo
from runtime.calibrate import Spectrum
from runtime.config import InstantConfig
from runtime.ranks import choose_ranks, gx_break_even, layer_flops


def _layer(name: str, tokens=128, cx=512, cy=512, exact_at_full=True) -> LayerInfo:
    return LayerInfo(name=name, kind="linear", node=name, x=f"{name}.x", y=f"{name}.y",
                     weight=f"{name}.w", weight_layout="in_out", tokens=tokens, cx=cx, cy=cy,
                     x_axis="token", g_axis="token", rank3=True, p_input=f"{name}.P",
                     q_input=f"{name}.Q", x_dim=tokens, g_dim=tokens,
                     gx_exact_at_full=exact_at_full)


def _spectrum(values) -> Spectrum:
    v = np.asarray(values, dtype=np.float64)
    return Spectrum(v, np.eye(v.size))


def _steep(n: int) -> Spectrum:
    return _spectrum(0.8 ** np.arange(n))


def _flat(n: int) -> Spectrum:
    return _spectrum(np.linspace(1.0, 0.9, n))


def _exact_flops(layers) -> int:
    return sum(4 * ly.tokens * ly.cx * ly.cy for ly in layers)


def test_break_even_is_where_the_compressed_input_gradient_costs_the_exact_one():
    ly = _layer("a")
    r = gx_break_even(ly)
    exact = 2 * ly.tokens * ly.cx * ly.cy
    unit = 2 * (ly.tokens * ly.cx + ly.tokens * ly.cy + ly.cx * ly.cy)
    assert unit * (r - 1) < exact <= unit * r
    assert r - 1 < ly.g_dim
    # at full rank the layer costs its weight side plus the exact product
    assert layer_flops(ly, 10, ly.g_dim) == unit * 10 + exact
    assert layer_flops(_layer("old", exact_at_full=False), 10, ly.g_dim) == unit * (10 + 128)


@pytest.mark.parametrize("policy", ["budget", "energy"])
def test_a_flat_gradient_spectrum_gets_the_exact_input_gradient(policy):
    """Flat output-gradient spectrum: keeping 99 % needs ~126 of 128 directions, far past the
    break-even (~86): the policy gives it the exact product. A steep one stays compressed, and
    a bundle without the exact branch keeps the compressed rank."""
    flat, steep = _layer("flat"), _layer("steep")
    old = _layer("old", exact_at_full=False)
    spectra = {"flat": (_steep(128), _flat(128)), "steep": (_steep(128), _steep(128)),
               "old": (_steep(128), _flat(128))}
    cfg = InstantConfig(rank_policy=policy, flop_cap_min=0)  # the cap at any size
    if policy == "energy":
        cfg = replace(cfg, energy=0.99, oversample=0)
    ranks = choose_ranks([flat, steep, old], spectra, cfg, None)
    assert ranks["flat"][1] == 128
    assert 1 <= ranks["steep"][1] < gx_break_even(steep)
    assert gx_break_even(old) <= ranks["old"][1] < 128
    assert ranks["flat"][0] == ranks["old"][0] < 128  # the activation side is not touched
    # --max-rank below the dimension is kept as asked
    capped = choose_ranks([flat], spectra, replace(cfg, max_rank=100), None)
    assert capped["flat"][1] <= 100
    if policy == "budget":  # the FLOP cap (1.0 × exact by default) still holds
        layers = [flat, steep, old]
        assert sum(layer_flops(ly, *ranks[ly.name]) for ly in layers) <= _exact_flops(layers)


def test_snapping_never_adds_flops_or_activation_memory():
    """Against the same policy on a bundle without the exact branch: the same activation ranks
    (memory), at most the same FLOPs, at a FLOP cap and under a memory budget alike."""
    rng = np.random.default_rng(0)
    for trial in range(20):
        n = int(rng.integers(2, 5))
        new = [_layer(f"l{i}", tokens=int(rng.integers(4, 130)), cx=int(rng.integers(8, 600)),
                      cy=int(rng.integers(8, 600))) for i in range(n)]
        old = [replace(ly, gx_exact_at_full=False) for ly in new]
        spectra = {ly.name: (_spectrum(rng.random(ly.tokens) ** rng.uniform(1, 8)),
                             _spectrum(rng.random(ly.tokens) ** rng.uniform(0.1, 8)))
                   for ly in new}
        cfg = InstantConfig(flop_ratio=float(rng.choice([1.0, 0.7, 0.4])), flop_cap_min=0)
        budget = int(rng.integers(1, 4 * 128 * 600)) if trial % 2 else None
        a, b = choose_ranks(new, spectra, cfg, budget), choose_ranks(old, spectra, cfg, budget)
        assert [a[ly.name][0] for ly in new] == [b[ly.name][0] for ly in old]
        assert sum(layer_flops(ly, *a[ly.name]) for ly in new) <= \
            sum(layer_flops(ly, *b[ly.name]) for ly in old)
        for ly in new:
            ry = a[ly.name][1]
            assert ry == ly.g_dim or ry < gx_break_even(ly), (ly, ry)


def test_a_channel_axis_layer_pays_its_cx_cy_product_once_per_micro_batch():
    """A 2-D [N, C] layer (L = 1, both bases over channels): per sample, x·Pᵀ and gᵀx̂ cost
    2·(Cx + Cy) per rank and the ·P product 2·Cx·Cy once per micro-batch. Counted per sample,
    even rank 1 cost more than the exact product, and the FLOP cap lowered every rank to 1 (a
    weight gradient through one direction: the default on any plain MLP). At the run's
    micro-batch the cap leaves real ranks, and the FLOPs stay within the exact backward's."""
    ly = LayerInfo(name="fc", kind="linear", node="fc", x="fc.x", y="fc.y", weight="fc.w",
                   weight_layout="out_in", tokens=1, cx=64, cy=128, x_axis="channel",
                   g_axis="channel", rank3=False, p_input="fc.P", q_input="fc.Q", x_dim=64,
                   g_dim=128, gx_exact_at_full=True)
    spectra = {"fc": (_spectrum(0.93 ** np.arange(64)), _spectrum(0.95 ** np.arange(128)))}
    cfg = InstantConfig(flop_cap_min=0)
    per_row = choose_ranks([ly], spectra, cfg, None, rows=1)
    assert per_row["fc"][0] == 1  # what the per-sample count did
    ranks = choose_ranks([ly], spectra, cfg, None, rows=32)
    assert ranks["fc"][0] >= 10, ranks
    assert layer_flops(ly, *ranks["fc"], 32) <= 4 * 64 * 128
    assert layer_flops(ly, 10, 5, 32) == 10 * (2 * 192 + 2 * 64 * 128 // 32) + \
        5 * (2 * 192 + 2 * 64 * 128 // 32)


@pytest.mark.parametrize("policy", ["budget", "energy"])
def test_layers_sharing_a_basis_get_one_activation_rank_counted_once(policy):
    """Three layers over one x (one basis, one saved x̂) and one alone, all with the same
    spectra: the three get one Rx whose bytes count once; under a budget for compressed
    activations, the shared rank, whose every direction serves three layers' weight gradients,
    falls last."""
    from runtime.ranks import saved_bytes

    group = [replace(_layer(n, tokens=64, cx=64, cy=64), p_input="qkv.P") for n in "qkv"]
    alone = _layer("o", tokens=64, cx=64, cy=64)
    layers = [*group, alone]
    spectra = {ly.name: (_steep(64), _steep(64)) for ly in layers}
    cfg = InstantConfig(rank_policy=policy, flop_ratio=None)
    free = choose_ranks(layers, spectra, cfg, None)
    assert len({free[n][0] for n in "qkv"}) == 1
    rx = free["q"][0]
    assert saved_bytes(layers, free) == 4 * 64 * (rx + free["o"][0])
    budget = 4 * 64 * (rx + free["o"][0] - 4)  # four rank units too many
    tight = choose_ranks(layers, spectra, cfg, budget)
    assert len({tight[n][0] for n in "qkv"}) == 1
    assert saved_bytes(layers, tight) <= budget
    assert tight["q"][0] > tight["o"][0], tight


def test_saved_ratio_counts_a_shared_input_once():
    """``--saved-ratio r``: compressed bytes at most r × the exact layer inputs, an input read
    by three layers (one x) counted once on both sides."""
    from runtime.ranks import saved_bytes

    group = [replace(_layer(n, tokens=64, cx=64, cy=64), p_input="qkv.P", x="x") for n in "qkv"]
    layers = [*group, _layer("o", tokens=64, cx=64, cy=64)]
    spectra = {ly.name: (_flat(64), _flat(64)) for ly in layers}
    ranks = choose_ranks(layers, spectra, InstantConfig(saved_ratio=0.25, flop_ratio=None), None)
    exact = 2 * 4 * 64 * 64  # x and o's input
    assert saved_bytes(layers, ranks) <= 0.25 * exact
    assert saved_bytes(layers, ranks) >= 0.2 * exact  # the flat spectra use what they may


def test_the_default_flop_cap_binds_only_where_the_backward_is_large():
    """A 2-layer transformer over 16 tokens (width 32-64) needs near-full activation ranks for
    0.99 of their variance; the default cap (1.0 x exact) pushed some to 1-4 of 16 and the
    model ended 3.4 points below exact training (session-20 probe), to save microseconds. The
    default cap now binds where the layers' exact backward takes 1e8 FLOPs a micro-batch or
    more; an explicit --flop-ratio binds at any size."""
    from types import SimpleNamespace

    from runtime.cli import _train_config

    small = [_layer(f"s{i}", tokens=16, cx=32, cy=64) for i in range(4)]
    spectra = {ly.name: (_flat(16), _flat(16)) for ly in small}
    assert 32 * _exact_flops(small) < InstantConfig().flop_cap_min
    free = choose_ranks(small, spectra, InstantConfig(), None, rows=32)
    assert all(r[0] >= 15 for r in free.values()), free  # the variance target's ranks
    capped = choose_ranks(small, spectra, InstantConfig(flop_cap_min=0), None, rows=32)
    assert sum(layer_flops(ly, *capped[ly.name], 32) for ly in small) <= _exact_flops(small)
    big = [_layer("b", tokens=128, cx=512, cy=512)]
    assert 32 * _exact_flops(big) >= InstantConfig().flop_cap_min
    ranks = choose_ranks(big, {"b": (_flat(128), _flat(128))}, InstantConfig(), None, rows=32)
    assert layer_flops(big[0], *ranks["b"], 32) <= _exact_flops(big)
    # the CLI: an explicit --flop-ratio binds at any size
    settings = SimpleNamespace(energy=0.95, oversample=0, calib_every=50, calib_batches=2)
    bundle = SimpleNamespace(manifest=SimpleNamespace(instant=SimpleNamespace(settings=settings)),
                             layers=big)
    args = dict(rank_policy=None, energy=None, oversample=None, calib_every=None,
                calib_batches=None, max_rank=None, variance=None, saved_ratio=None,
                mode="instant", threads=1, device="cpu")
    for given, floor in ((None, 1e8), (1.0, 0.0)):
        cfg = _train_config(SimpleNamespace(**args, flop_ratio=given), bundle, None)
        assert cfg.instant.flop_cap_min == floor


def test_the_cap_threshold_is_not_a_resume_setting(mlp_bundle):
    """flop_cap_min follows from whether --flop-ratio was given; it is no flag, so a resume
    that gives --flop-ratio where the run did not (or the reverse) is judged by --flop-ratio
    alone, never by a flag that does not exist."""
    from helpers import make_trainer

    settings = make_trainer(mlp_bundle).settings()
    assert "--flop-ratio" in settings and "--flop-cap-min" not in settings
    # nor is the exact start of small layers (the checkpoint records it apart)
    assert "--exact-when-small" not in settings and settings["--variance"] == 0.99


def test_energy_one_is_full_rank_up_to_the_computed_directions():
    """Session 26 probe: `--energy 1` (documented as INSTANT at full rank) kept 19 of 64
    token positions, the cumulative variance passing its total by rounding where the texts the
    calibration saw ended, and a longer text in a later batch lost those positions' gradient.
    It keeps every computed direction now; never more than the decomposition computed (the
    width the budget's probes measure, budget._full_rank_bases; a reviewer)."""
    ly = _layer("a", tokens=64, cx=32, cy=32)
    rng = np.random.default_rng(0)
    values = np.r_[np.sort(rng.random(19))[::-1], 1e-9 * rng.random(45)]
    cfg = replace(InstantConfig(), energy=1.0, rank_policy="energy")
    full = choose_ranks([ly], {"a": (Spectrum(values, np.eye(64)),) * 2}, cfg, None)
    assert full["a"][0] == 64, full
    few = Spectrum(values, np.eye(64)[:, :24])  # a wide Gram of few vectors: 24 computed
    assert choose_ranks([ly], {"a": (few, few)}, cfg, None)["a"][0] == 24
    part = choose_ranks([ly], {"a": (Spectrum(values, np.eye(64)),) * 2},
                        replace(cfg, energy=0.99), None)
    assert part["a"][0] <= 19, part


def test_energy_one_counts_directions_of_tiny_variance_too():
    """ε = 1 with a Gram whose last directions hold rounding-level variance (a randomized
    range finder's): the cumulative sum passed the total by rounding at the 19th direction and
    the rank stopped there (seed 0 below); every direction is kept now."""
    from runtime.calibrate import rank_for_energy

    for seed in range(8):
        rng = np.random.default_rng(seed)
        s = np.r_[np.sort(rng.random(19))[::-1], 1e-9 * rng.random(45)]
        assert rank_for_energy(s, 1.0, 0) == 64
        assert rank_for_energy(s, 0.99, 0) <= 19


def test_the_budget_policy_keeps_a_quarter_of_the_directions_where_memory_allows():
    """Session 26 probe: a from-scratch CNN's ReLU outputs and early output gradients put 99 %
    of their variance in 1-3 directions, and those ranks left INSTANT 11.9 points below exact
    (3 seeds, 1000 steps; −1.7 with the floor: tests/test_training.py, slow tier). The first
    pick keeps at least a quarter of the directions; a memory budget still lowers it."""
    ly = _layer("a", tokens=64, cx=32, cy=32)
    peaked = _spectrum(np.r_[1.0, np.full(63, 1e-5)])  # 99.9 % in one direction
    cfg = replace(InstantConfig(), rank_policy="budget", exact_when_small=False)  # (--variance)
    rx, ry = choose_ranks([ly], {"a": (peaked, peaked)}, cfg, None)["a"]
    assert rx == 16 and ry >= 16, (rx, ry)  # (Ry 16 is past this small layer's break-even)
    tight = choose_ranks([ly], {"a": (peaked, peaked)}, cfg, 4 * 32 * 4)  # bytes of rank 4
    assert tight["a"][0] <= 4, tight


def test_the_table_says_where_instant_costs_more_compute_than_exact():
    """Layers too small for INSTANT's projections to pay (a session 36 probe: a d=32 ViT, 1.14x
    the exact backward FLOPs, said nothing): the table says so and names --mode vanilla."""
    from runtime.accounting import LayerCost, format_table

    cheap = [LayerCost("fc", "t/t", 8, 8, 1_000_000, 600_000, 4000, 1000)]
    dear = [LayerCost("fc", "t/t", 30, 30, 1_000_000, 1_140_000, 4000, 3000)]
    assert "--mode vanilla" not in format_table(cheap)
    table = format_table(dear)
    assert "INSTANT's backward costs more than the exact one here" in table \
        and "at 1.33x INSTANT's saved activations" in table, table


def test_small_layers_start_at_exact_ranks_until_memory_or_the_variance_rule_lowers_them():
    """Session 37 probe: a from-scratch DS-CNN (two 32-wide 1x1 convs, 600 steps, 3 seeds) ended
    8.9 points below exact training at the variance rule's ranks (8-21 of 32), and 0.9 above
    with exact ones, which cost 18 KB a sample more. Where the default FLOP cap does not bind
    (the layers' exact backward below flop_cap_min a micro-batch), ranks start at exact; the
    plan's memory still lowers them, --variance (from_bundle) restores the variance rule, and a
    layer large enough for the cap keeps it."""
    from runtime.ranks import saved_bytes, starts_exact

    small = _layer("s", tokens=64, cx=32, cy=32)
    peaked = _spectrum(np.r_[1.0, np.full(63, 1e-5)])
    cfg = InstantConfig()
    assert starts_exact([small], cfg, 32)
    assert choose_ranks([small], {"s": (peaked, peaked)}, cfg, None, rows=32)["s"] == (64, 64)
    tight = choose_ranks([small], {"s": (peaked, peaked)}, cfg, 4 * 32 * 4, rows=32)
    assert saved_bytes([small], tight) <= 4 * 32 * 4, tight
    half = choose_ranks([small], {"s": (peaked, peaked)}, cfg, 32 * 32 * 4, rows=32)
    assert half["s"][0] == 32, half  # as many as the memory holds
    # an explicit --variance asks for the variance rule (its quarter floor: 16 of 64)
    from contract.manifest import InstantSettings

    given = InstantConfig.from_bundle(InstantSettings(), variance=0.99)
    assert not given.exact_when_small and InstantConfig.from_bundle(InstantSettings()).exact_when_small
    assert not starts_exact([small], given, 32)
    assert choose_ranks([small], {"s": (peaked, peaked)}, given, None, rows=32)["s"][0] == 16
    # neither where the cap binds (a large layer, an explicit --flop-ratio) nor without a cap
    big = _layer("b", tokens=128, cx=512, cy=512)
    assert not starts_exact([big], cfg, 32)
    assert choose_ranks([big], {"b": (_steep(128), _steep(128))}, cfg, None, rows=32)["b"][0] < 64
    assert not starts_exact([small], replace(cfg, flop_cap_min=0), 32)
    assert not starts_exact([small], replace(cfg, flop_ratio=None), 32)
    assert not starts_exact([small], replace(cfg, rank_policy="energy"), 32)
    assert not starts_exact([small], replace(cfg, variance=0.9), 32)  # (the API's --variance)
