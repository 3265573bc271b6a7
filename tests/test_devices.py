"""devices/: size parsing, profile files and detection on fake filesystem trees."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import devices
from devices import (
    ProfileError,
    detect_profile,
    format_size,
    list_profiles,
    load_profile,
    parse_size,
    resolve_profile,
)

BUILTINS = {
    "rpi4-1gb", "rpi4-2gb", "rpi4-4gb", "rpi4-8gb", "rpi5-4gb", "rpi5-8gb", "rpi-zero-2w",
    "jetson-nano", "jetson-orin-nano", "jetson-agx-orin", "generic-x86-64", "null",
}  # fmt: skip
GIB = 2**30

# ------------------------------------------------------------------------------------- sizes


@pytest.mark.parametrize(
    ("text", "nbytes"),
    [
        ("256MB", 256 * 10**6),
        ("1.5GB", 1_500_000_000),
        ("512MiB", 512 * 2**20),
        ("2GiB", 2 * GIB),
        ("100kB", 100_000),
        ("100KB", 100_000),
        ("1024B", 1024),
        ("256 mb", 256 * 10**6),
        ("0.5gib", GIB // 2),
        (" 3 TB ", 3 * 10**12),
    ],
)
def test_parse_size_good(text, nbytes):
    assert parse_size(text) == nbytes


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("256", "unit is required"),
        ("-5MB", "greater than zero"),
        ("0MB", "greater than zero"),
        ("0.0001B", "greater than zero"),
        ("5XB", "unknown unit 'XB'"),
        ("5 M", "unknown unit 'M'"),
        ("lots", "expected a number"),
        ("1.2.3MB", "expected a number"),
        ("", "expected a number"),
        ("MB", "expected a number"),
        # session 24's budget probe: fullwidth digits were read as 128 MB, an exponent past 99
        # was "expected a number and a unit"
        ("\uff11\uff12\uff18MB", "expected a number"),
        ("1e400MB", "larger than any machine's memory"),
        ("1e-400GB", "less than one byte"),  # (it said "greater than zero": session 49)
        ("-1e-400GB", "greater than zero"),
        ("0e400MB", "greater than zero"),
    ],
)
def test_parse_size_bad(text, why):
    with pytest.raises(ProfileError) as exc:
        parse_size(text)
    msg = str(exc.value)
    assert repr(text) in msg and why in msg and "256MB" in msg
    assert "\n" not in msg


def test_parse_size_rejects_non_string():
    with pytest.raises(ProfileError, match="invalid size 256: expected a string"):
        parse_size(256)  # type: ignore[arg-type]


def test_format_size():
    assert format_size(256 * 10**6) == "256.0 MB"
    assert format_size(512 * 2**20) == "536.9 MB"
    assert format_size(parse_size("1.5GB")) == "1500.0 MB"


# ---------------------------------------------------------------------------------- built-ins


def test_builtin_profiles_load_and_are_sane():
    profiles = list_profiles()
    assert [p.name for p in profiles] == sorted(BUILTINS)
    for p in profiles:
        assert p.source.stem == p.name and p.source.is_file()
        assert load_profile(p.name) == p
        assert 0 < p.default_budget < p.ram, p.name
        assert 1 <= p.default_threads <= p.cores, p.name
        assert "CPUExecutionProvider" in p.execution_providers, p.name
        if p.arch == "aarch64" and p.ram <= 8 * GIB:  # small boards leave room for the OS
            assert 0.35 <= p.default_budget / p.ram <= 0.65, p.name


def test_builtin_facts():
    pi4 = load_profile("rpi4-2gb")
    assert (pi4.arch, pi4.cores, pi4.ram, pi4.default_budget) == ("aarch64", 4, 2 * GIB, GIB)
    assert pi4.execution_providers == ("CPUExecutionProvider",)
    nano = load_profile("jetson-nano")
    assert {"CUDAExecutionProvider", "TensorrtExecutionProvider"} <= set(
        nano.execution_providers
    )
    assert load_profile("jetson-agx-orin").cores == 12
    assert "32GB" in load_profile("jetson-agx-orin").description
    assert load_profile("jetson-orin-nano").cores == 6
    assert load_profile("rpi-zero-2w").ram == 512 * 2**20
    # faster boards rate faster
    gflops = {p.name: p.gflops for p in list_profiles()}
    assert gflops["rpi-zero-2w"] < gflops["rpi4-4gb"] < gflops["rpi5-4gb"] < gflops["jetson-nano"]
    assert gflops["jetson-nano"] < gflops["jetson-orin-nano"] < gflops["jetson-agx-orin"]
    null = load_profile("null")
    assert null.execution_providers == ("CPUExecutionProvider",) and null.cores == 1
    assert null.detect_model_contains == ()


def test_unknown_builtin_lists_available():
    with pytest.raises(ProfileError, match=r"unknown device profile 'rpi3'; available: .*rpi4-1gb"):
        load_profile("rpi3")
    with pytest.raises(ProfileError) as err:  # a near name is offered; the tests' profile is not
        load_profile("rpi4-4G")
    assert "did you mean 'rpi4-4gb'?" in str(err.value) and "null" not in str(err.value)


def test_resolve_profile():
    assert resolve_profile("rpi5-8gb").name == "rpi5-8gb"
    assert resolve_profile("auto") == detect_profile()


def test_devices_never_imports_ml_frameworks():
    code = (
        "import sys, devices; devices.list_profiles(); devices.detect_profile(); "
        "bad = {'torch', 'onnx', 'onnxruntime'} & set(sys.modules); assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])


# ----------------------------------------------------------------------------- custom files

VALID = {
    "name": '"my-board"',
    "description": '"a test board"',
    "arch": '"aarch64"',
    "ram": '"2GB"',
    "cores": "4",
    "execution_providers": '["CPUExecutionProvider"]',
    "gflops": "12",
    "default_threads": "2",
    "default_budget": '"900MB"',
}


def write_profile(tmp_path: Path, fields: dict[str, str], tail: str = "") -> Path:
    path = tmp_path / "board.toml"
    path.write_text("".join(f"{k} = {v}\n" for k, v in fields.items()) + tail)
    return path


def test_custom_profile_loads(tmp_path):
    path = write_profile(tmp_path, VALID, '[detect]\nmodel_contains = ["X"]\nram_max = "3GB"\n')
    for spec in (path, str(path)):
        p = load_profile(spec)
        assert p.name == "my-board" and p.source == path  # name need not match the file stem
        assert (p.ram, p.default_budget, p.gflops) == (2 * 10**9, 900 * 10**6, 12.0)
        assert (p.detect_model_contains, p.detect_ram_max) == (("X",), 3 * 10**9)
    assert resolve_profile(str(path)).name == "my-board"


@pytest.mark.parametrize(
    ("change", "tail", "expected"),
    [
        ({"cores": None}, "", "missing required field 'cores'"),
        ({"cores": '"4"'}, "", "field 'cores': expected an integer, got '4' (str)"),
        ({"fp16": "false"}, "", "unknown field 'fp16'"),
        ({"gflops": '"fast"'}, "", "field 'gflops': expected a number"),
        ({"ram": "2048"}, "", "field 'ram': expected a size string"),
        ({"ram": '"2048"'}, "", "field 'ram': invalid size '2048': a unit is required"),
        ({"colour": '"red"'}, "", "unknown field 'colour'; allowed: name, description"),
        ({"arch": '"armv7l"'}, "", "field 'arch': expected one of aarch64, x86_64, got 'armv7l'"),
        ({"execution_providers": '["CoreMLExecutionProvider"]'}, "",
         "field 'execution_providers': unknown 'CoreMLExecutionProvider'"),
        ({"execution_providers": "[]"}, "", "field 'execution_providers': expected a non-empty"),
        ({"default_threads": "8"}, "", "field 'default_threads': must be between 1 and cores (4)"),
        ({"default_budget": '"3GB"'}, "", "field 'default_budget': must not exceed ram"),
        ({}, '[detect]\nram_min = "1GB"\n', "unknown field 'detect.ram_min'; allowed"),
        ({}, '[detect]\nmodel_contains = "Pi"\n', "field 'detect.model_contains': expected a"),
        ({"name": "="}, "", "invalid TOML"),
        ({"name": '"\\u001b[31mRED"'}, "", "field 'name': must be printable text"),
    ],
)  # fmt: skip
def test_malformed_custom_profile(tmp_path, change, tail, expected):
    fields = {**VALID, **change}
    fields = {k: v for k, v in fields.items() if v is not None}
    path = write_profile(tmp_path, fields, tail)
    with pytest.raises(ProfileError) as exc:
        load_profile(path)
    assert str(path) in str(exc.value)
    assert expected in str(exc.value)


def test_what_a_device_user_is_told(tmp_path, capsys):
    """Session 34 probe of the device profiles: a profile in JSON or with a byte order mark got
    "Invalid statement" alone; a budget above a profile's RAM named no way out; the warning of
    a profile's own budget above this machine's RAM said "--budget", which was not given; a
    refusal's way out could be past the profile's RAM (1478 MB on a 537 MB board)."""
    from runtime.budget import BudgetTooSmall, _stated_minimum
    from runtime.config import check_budget
    from runtime.errors import UserError
    from runtime.memory import set_budget

    js = tmp_path / "board.toml"
    js.write_text('{"name": "x", "ram": "2GB"}\n')
    with pytest.raises(ProfileError, match="it looks like JSON: a profile is TOML"):
        load_profile(js)
    bom = write_profile(tmp_path, VALID)
    bom.write_bytes(b"\xef\xbb\xbf" + bom.read_bytes())
    with pytest.raises(ProfileError, match="starts with a byte order mark"):
        load_profile(bom)
    prof = load_profile(write_profile(tmp_path, VALID))
    with pytest.raises(UserError, match=r"exceeds the 2000 MB of RAM of profile 'my-board'; pass "
                                        r"a --budget below it, or the profile of a device"):
        check_budget(3 * 10**9, "3GB", prof)
    big = prof.__class__(**{**prof.__dict__, "ram": 10**15, "default_budget": 10**14})
    check_budget(10**14, None, big)
    assert "the budget of profile 'my-board': 100000000 MB exceeds this machine's RAM" in \
        capsys.readouterr().err
    # a --budget above what the profile gives a run, within its RAM: a warning (session 47
    # probe: 530 MB on a Pi Zero 2 W, whose profile gives 201 MB, without a word)
    capsys.readouterr()
    check_budget(1500 * 10**6, "1500MB", prof)
    assert "warning: --budget 1500 MB is above the 900 MB that profile 'my-board' gives a run" \
        in capsys.readouterr().err
    check_budget(800 * 10**6, "800MB", prof)
    assert "warning" not in capsys.readouterr().err
    set_budget(100 * 10**6, ("my-board", 500 * 10**6))
    try:
        said = str(_stated_minimum(BudgetTooSmall("x", 600 * 10**6), 100 * 10**6))
        assert "raise --budget to 750MB" in said and "that is more than the 500 MB of RAM of " \
            "profile 'my-board': on that device, train fewer layers" in said, said
        said = str(_stated_minimum(BudgetTooSmall("x", 300 * 10**6), 100 * 10**6))
        assert "RAM of profile" not in said, said
        # a probe alone passed 290 MB: twice it is a guess, not the device's verdict (session
        # 43 probe: "train fewer layers" on a device where 320 MB then trained)
        said = str(_stated_minimum(BudgetTooSmall("x", None, 100 * 10**6), 290 * 10**6))
        assert "e.g. to 580MB, a generous guess" in said and "that guess is more than the 500 " \
            "MB of RAM of profile 'my-board', and a budget below it may do" in said, said
        assert "smaller --batch" not in said, said
        assert "`instant-runtime plan --data DATA` without --budget estimates" in said, said
        # the profile's own budget: "without --budget" alone gave the same refusal again, and
        # at the profile's RAM no budget can rise (session 49 probe)
        set_budget(290 * 10**6, ("my-board", 500 * 10**6), from_profile=True)
        said = str(_stated_minimum(BudgetTooSmall("x", None, 100 * 10**6), 290 * 10**6))
        assert "without --budget and --profile estimates the minimum" in said, said
        said = str(_stated_minimum(BudgetTooSmall("x", None, 100 * 10**6), 500 * 10**6))
        assert "and profile 'my-board' has no more RAM (500 MB): on that device, train fewer " \
            "layers (export --trainable)" in said and "raise" not in said, said
    finally:
        set_budget(None)
    # a profile with less RAM than the runtime takes: only another profile can do (session 49
    # probe: "raise --budget well above it", then "exceeds the 64 MB of RAM"; "0 MB of RAM")
    for ram, budget, given in ((64 * 10**6, 40 * 10**6, None), (64 * 10**6, 64 * 10**6, "64MB"),
                               (1000, 1000, None), (1000, 256 * 10**6, "256MB")):
        tiny = prof.__class__(**{**prof.__dict__, "ram": ram, "default_budget": min(ram, 10**6)})
        with pytest.raises(UserError) as e:
            check_budget(budget, given, tiny)
        said = str(e.value)
        assert said.endswith("pass the profile of a device with more RAM"), said
        assert "raise --budget" not in said and "set there" not in said and " 0 MB" not in said \
            and "below it" not in said, said
        assert ("64 MB of RAM" if ram > 10**6 else "1,000 bytes of RAM") in said, said


def test_missing_custom_file(tmp_path):
    with pytest.raises(ProfileError, match="profile file not found: .*nope.toml"):
        load_profile(tmp_path / "nope.toml")


def test_builtin_name_must_match_stem(tmp_path, monkeypatch):
    monkeypatch.setattr(devices, "PROFILES_DIR", tmp_path)
    write_profile(tmp_path, VALID).rename(tmp_path / "other.toml")
    with pytest.raises(ProfileError, match="field 'name': must match the file name 'other'"):
        load_profile("other")


# ---------------------------------------------------------------------------------- detection


def fake_tree(root: Path, model: str | None = None, mem_kib: int | None = None,
              tegra: bool = False) -> Path:  # fmt: skip
    root.mkdir(parents=True, exist_ok=True)
    if model is not None:
        (root / "proc/device-tree").mkdir(parents=True)
        (root / "proc/device-tree/model").write_bytes(model.encode() + b"\x00")
    if mem_kib is not None:
        (root / "proc").mkdir(exist_ok=True)  # may exist from device-tree
        (root / "proc/meminfo").write_text(
            f"MemTotal:       {mem_kib} kB\nMemFree:         123456 kB\n"
        )
    if tegra:
        (root / "etc").mkdir()
        (root / "etc/nv_tegra_release").write_text("# R32 (release), REVISION: 7.1\n")
    return root


@pytest.mark.parametrize(
    ("model", "mem_kib", "tegra", "expected"),
    [
        ("Raspberry Pi 4 Model B Rev 1.4", 1_890_000, False, "rpi4-2gb"),  # ~1.8 GiB
        ("Raspberry Pi 4 Model B Rev 1.2", 944_000, False, "rpi4-1gb"),
        ("Raspberry Pi 4 Model B Rev 1.4", 3_880_000, False, "rpi4-4gb"),
        ("Raspberry Pi 4 Model B Rev 1.4", 7_990_000, False, "rpi4-8gb"),
        ("Raspberry Pi 4 Model B Rev 1.4", None, False, "rpi4-1gb"),  # unknown RAM: smallest
        ("Raspberry Pi 4 Model B Rev 1.4", 16_000_000, False, "rpi4-8gb"),  # above all: largest
        ("Raspberry Pi 5 Model B Rev 1.0", 8_245_328, False, "rpi5-8gb"),
        ("Raspberry Pi 5 Model B Rev 1.0", 4_122_000, False, "rpi5-4gb"),
        ("Raspberry Pi Zero 2 W Rev 1.0", 439_000, False, "rpi-zero-2w"),
        ("Raspberry Pi 400 Rev 1.0", 3_880_000, False, "rpi4-4gb"),  # one SoC: session 44
        ("Raspberry Pi Compute Module 4 Rev 1.1", 1_890_000, False, "rpi4-2gb"),
        ("Raspberry Pi Compute Module 5 Rev 1.0", 8_245_328, False, "rpi5-8gb"),
        ("NVIDIA Jetson Nano Developer Kit", 4_059_416, True, "jetson-nano"),
        ("NVIDIA Jetson Orin Nano Developer Kit", 7_620_000, True, "jetson-orin-nano"),
        ("Jetson AGX Orin", 64_300_000, True, "jetson-agx-orin"),
    ],
)
def test_detect_board(tmp_path, model, mem_kib, tegra, expected):
    root = fake_tree(tmp_path, model, mem_kib, tegra)
    assert detect_profile(root).name == expected
    assert detect_profile(str(root), machine="riscv64").name == expected  # arch only for fallback


@pytest.mark.parametrize(("model", "mem_kib", "tegra", "family"), [
    ("Raspberry Pi 5 Model B Rev 1.0", 2_011_712, False, "rpi5-4gb"),  # a Pi 5 2GB
    ("Jetson AGX Orin", 31_000_000, True, "jetson-agx-orin"),  # the 32GB module
])
def test_a_board_with_less_ram_than_every_variant_gets_a_scaled_profile(
        tmp_path, model, mem_kib, tegra, family):
    """An outside review: a board below every variant's RAM took the smallest variant's RAM and
    default budget (a Pi 5 2GB planned for 2.25 GiB of its 1.9). Both scale to MemTotal."""
    p = detect_profile(fake_tree(tmp_path, model, mem_kib, tegra))
    base = load_profile(family)
    assert p.name == family and p.ram == mem_kib * 1024 < base.ram
    assert p.default_budget == base.default_budget * p.ram // base.ram < p.ram
    assert "scaled to it" in p.description


@pytest.mark.parametrize(("cgroup", "files", "limit"), [
    ("0::/box/run\n", {"box/memory.max": "1073741824", "box/run/memory.max": "max"}, 1 << 30),
    ("4:memory:/docker/abc\n0::/\n", {"memory/docker/abc/memory.limit_in_bytes": "536870912",
                                        "memory/memory.limit_in_bytes": "9223372036854771712"},
     512 << 20),
    ("0::/\n", {"memory.max": "max"}, None),
    ("0::/box\n", {"box/memory.max": "17179869184"}, None),  # above the board's RAM
], ids=["v2-parent", "v1", "unlimited", "above-ram"])
def test_a_cgroup_memory_limit_scales_the_profile(tmp_path, cgroup, files, limit):
    """A container's memory limit: MemTotal there is the host's, and `auto` planned for RAM the
    process could not have (a session 43 probe, from reading)."""
    for model, family in (("Raspberry Pi 4 Model B Rev 1.4", "rpi4-4gb"), (None, None)):
        root = fake_tree(tmp_path / str(family), model or "Some Other Board", 3_880_000)
        (root / "proc/self").mkdir(parents=True)
        (root / "proc/self/cgroup").write_text(cgroup)
        for name, text in files.items():
            (root / "sys/fs/cgroup" / name).parent.mkdir(parents=True, exist_ok=True)
            (root / "sys/fs/cgroup" / name).write_text(text + "\n")
        p = detect_profile(root, machine="aarch64")
        base = load_profile(family) if family else detect_profile(
            fake_tree(tmp_path / "plain", "Some Other Board", 3_880_000), machine="aarch64")
        assert p.name == base.name
        if limit is None:
            assert (p.ram, p.default_budget) == (base.ram, base.default_budget)
        else:
            assert p.ram == limit and p.default_budget == base.default_budget * limit // base.ram
            assert "cgroup allows" in p.description


def test_jetson_without_l4t_is_not_given_cuda(tmp_path):
    root = fake_tree(tmp_path, "NVIDIA Jetson Nano Developer Kit", 4_059_416, tegra=False)
    p = detect_profile(root, machine="aarch64")
    assert p.name == "generic-aarch64"
    assert p.execution_providers == ("CPUExecutionProvider",)


def test_fallback_uses_host_values(tmp_path):
    generic = load_profile("generic-x86-64")
    root = fake_tree(tmp_path, "Some Other Board", mem_kib=3_000_000)
    p = detect_profile(root, machine="aarch64")
    assert (p.name, p.arch) == ("generic-aarch64", "aarch64")
    assert p.ram == 3_000_000 * 1024
    assert p.cores == p.default_threads == os.cpu_count()
    assert p.default_budget == 3_000_000 * 1024 // 2  # generic keeps half of RAM
    assert (p.gflops, p.execution_providers) == (generic.gflops, generic.execution_providers)


def test_fallback_on_empty_tree(tmp_path):
    p = detect_profile(tmp_path, machine="AMD64")
    assert (p.name, p.arch, p.cores) == ("generic-x86-64", "x86_64", os.cpu_count())
    if hasattr(os, "sysconf"):
        assert p.ram == os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    assert 0 < p.default_budget < p.ram


def test_fallback_unknown_arch_is_an_error(tmp_path):
    with pytest.raises(ProfileError, match="unsupported machine 'riscv64'; supported .*aarch64"):
        detect_profile(tmp_path, machine="riscv64")


def test_detect_ram_max_overrides_nominal(tmp_path, monkeypatch):
    # a custom variant written in decimal GB sits below MemTotal; detect.ram_max fixes that
    small = load_profile(write_profile(tmp_path, VALID, '[detect]\nmodel_contains = ["Board"]\n'))
    big = load_profile(write_profile(
        tmp_path, {**VALID, "name": '"big"', "ram": '"4GB"'}, '[detect]\nmodel_contains = ["Board"]\n'
    ))  # fmt: skip
    monkeypatch.setattr(devices, "list_profiles", lambda: [big, small])
    root = fake_tree(tmp_path / "root", "My Board", mem_kib=1_990_000)  # 2.04e9 bytes > 2GB
    assert detect_profile(root).name == "big"
    patched = write_profile(
        tmp_path, VALID, '[detect]\nmodel_contains = ["Board"]\nram_max = "2GiB"\n'
    )
    monkeypatch.setattr(devices, "list_profiles", lambda: [big, load_profile(patched)])
    assert detect_profile(root).name == "my-board"


def test_a_guess_past_the_devices_ram_is_said_not_cut_to_it(mlp_bundle):
    """Session 43 probe: the weights' refusal under a profile suggested "e.g. to 150MB", twice
    the need cut to the profile's RAM without a word, and that budget was refused again. The
    guess is named with the RAM it passes."""
    import math

    from helpers import make_trainer

    from contract.errors import UserError
    from runtime.memory import current_rss, set_budget

    tr = make_trainer(mlp_bundle, mode="vanilla")
    size = sum(4 * math.prod(p.shape) for p in tr.bundle.params)  # (need: now + 2 x size)
    now = current_rss()
    set_budget(now + size, ("tiny", int(1.5 * now)))  # (room for pages touched meanwhile)
    try:
        with pytest.raises(UserError) as exc:
            tr._check_buffers_fit()
    finally:
        set_budget(None)
    said = str(exc.value)
    assert "a generous guess, is more than the" in said and "RAM of profile 'tiny': it may " \
        "not fit that device), or export with fewer trainable tensors" in said, said


def test_a_budget_is_said_as_it_was_given():
    """Session 43 probe: --budget 85.9MB was refused as "budget 86 MB is below the minimum",
    and 86MB then trained; a profile's 1.5MB read "budget 2 MB"."""
    from devices.planner import budget_mb
    from runtime.budget import BudgetTooSmall, _stated_minimum

    assert [budget_mb(b) for b in (256_000_000, 85_900_000, 1_500_000, 85_550_000)] == \
        ["256", "85.9", "1.5", "85.55"]
    said = str(_stated_minimum(BudgetTooSmall("x", 80 * 10**6), 85_900_000))
    assert said.startswith("budget 85.9 MB is below the minimum"), said
