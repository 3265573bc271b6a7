"""Device profiles: what a board has (RAM, cores, execution providers) and a safe default budget.

One small TOML file per device lives in ``devices/profiles/<name>.toml``; ``null`` is a do-nothing
profile for tests. Sizes are parsed here once (``parse_size``) and stored as bytes.

Pure standard library: this package never imports torch, onnx or onnxruntime.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import platform
import re
import stat
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

__all__ = [
    "Profile",
    "ProfileError",
    "detect_profile",
    "format_size",
    "list_profiles",
    "load_profile",
    "parse_size",
    "resolve_profile",
]

PROFILES_DIR = Path(__file__).with_name("profiles")
GENERIC = "generic-x86-64"
MAX_PROFILE_BYTES = 1 << 20  # a profile is a few hundred bytes
MAX_CORES = 1 << 16
MIN_GFLOPS, MAX_GFLOPS = 1e-3, 1e9  # sustained GFLOP/s: a megaflop to an exaflop

ARCHES = ("aarch64", "x86_64")
EXECUTION_PROVIDERS = (
    "CPUExecutionProvider",
    "CUDAExecutionProvider",
    "TensorrtExecutionProvider",
)
GPU_PROVIDERS = frozenset(EXECUTION_PROVIDERS) - {"CPUExecutionProvider"}

# platform.machine() spellings -> profile arch
_MACHINE_ARCH = {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "aarch64", "arm64": "aarch64"}


class ProfileError(ValueError):
    """A size string or a device profile is invalid, unknown or undetectable."""


# ---------------------------------------------------------------------------------------- sizes

_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_UNIT_NAMES = "B, kB, MB, GB, TB, KiB, MiB, GiB, TiB"
_EXAMPLES = "examples: 256MB, 1.5GB, 512MiB"
_SIZE_RE = re.compile(r"^\s*(?P<sign>[-+]?)(?P<num>(?:\d+(?:\.\d*)?|\.\d+)"
                      r"(?:[eE](?P<exp>[+-]?\d{1,9}))?)\s*(?P<unit>[A-Za-z]*)\s*$",
                      re.ASCII)  # (ASCII digits: "１２８MB" was 128 MB)


def parse_size(text: str, flag: str | None = None) -> int:
    """:func:`_parse_size`, its error led by ``flag`` (the option the size was given to) where
    one is named (session 47 probe: "invalid size '0'" named no option)."""
    try:
        return _parse_size(text)
    except ProfileError as exc:
        raise ProfileError(f"{flag}: {exc}" if flag else str(exc)) from None


def _parse_size(text: str) -> int:
    """Parse a size such as ``256MB``, ``1.5GB``, ``512MiB`` or ``100 kB`` into bytes.

    Units are case-insensitive; decimal units (kB, MB, GB, TB) are powers of 1000 and binary
    units (KiB, MiB, GiB, TiB) powers of 1024. Fractions of a byte are rounded down.

    Raises:
        ProfileError: not a string, no unit or an unknown one, not a number, under 1 byte.
    """
    if not isinstance(text, str):
        raise ProfileError(
            f"invalid size {text!r}: expected a string with a unit, got {type(text).__name__}; "
            f"{_EXAMPLES}"
        )
    match = _SIZE_RE.match(text)
    if match is None:
        raise ProfileError(f"invalid size {text!r}: expected a number and a unit; {_EXAMPLES}")
    unit = match["unit"]
    if not unit:
        raise ProfileError(f"invalid size {text!r}: a unit is required; {_EXAMPLES}")
    factor = _UNITS.get(unit.lower())
    if factor is None:
        raise ProfileError(f"invalid size {text!r}: unknown unit {unit!r}; accepted units: "
                           f"{_UNIT_NAMES}; {_EXAMPLES}")
    if match["exp"] and abs(int(match["exp"])) > 40:  # (1e400MB was "not a number and unit")
        raise ProfileError(f"invalid size {text!r}: "
                           + ("must be greater than zero" if match["sign"] == "-"
                              or not Decimal(match["num"]) else
                              "larger than any machine's memory" if int(match["exp"]) > 0
                              else "less than one byte") + f"; {_EXAMPLES}")
    try:
        nbytes = int(Decimal(match["num"]) * factor)
    except InvalidOperation:  # pragma: no cover - the regex only admits valid decimals
        raise ProfileError(f"invalid size {text!r}: not a number; {_EXAMPLES}") from None
    if match["sign"] == "-" or nbytes <= 0:
        raise ProfileError(f"invalid size {text!r}: must be greater than zero"
                           + ("" if match["sign"] == "-" or not Decimal(match["num"]) else
                              " (it is less than one byte)") + f"; {_EXAMPLES}")
    if nbytes > 1 << 60:
        raise ProfileError(f"invalid size {text!r}: larger than any machine's memory; "
                           f"{_EXAMPLES}")
    return nbytes


def format_size(nbytes: int) -> str:
    """Format a byte count in decimal megabytes with one decimal, e.g. ``256.0 MB``."""
    return f"{nbytes / 10**6:.1f} MB"


# ------------------------------------------------------------------------------------- profiles


@dataclass(frozen=True)
class Profile:
    """One device: hardware facts plus the defaults the runtime starts from.

    ``ram`` and ``default_budget`` are bytes. ``detect_model_contains`` and ``detect_ram_max``
    come from the optional ``[detect]`` table and are only used by :func:`detect_profile`.
    """

    name: str
    description: str
    arch: str
    ram: int
    cores: int
    execution_providers: tuple[str, ...]
    default_threads: int
    default_budget: int
    source: Path
    gflops: float | None = None  # sustained fp32 GFLOP/s: `plan` estimates step time with it
    cpu_gflops: float | None = None  # the CPU's, where gflops is its GPU's (a Jetson)
    detect_model_contains: tuple[str, ...] = ()
    detect_ram_max: int | None = None


# field -> kind; every field is required.
_FIELDS = {
    "name": "str",
    "description": "str",
    "arch": "str",
    "ram": "size",
    "cores": "int",
    "execution_providers": "list[str]",
    "default_threads": "int",
    "default_budget": "size",
}
_OPTIONAL = {"gflops": "float", "cpu_gflops": "float"}
_DETECT_FIELDS = {"model_contains": "list[str]", "ram_max": "size"}
_EXPECTED = {
    "str": "a non-empty string",
    "int": "an integer",
    "float": "a number",
    "bool": "true or false",
    "list[str]": "a non-empty list of strings",
    "size": "a size string such as '4GB'",
    "table": "a table",
}


def _field(source: Path, field: str, value: Any, kind: str) -> Any:
    """Type-check one raw TOML value and convert it (sizes to bytes, numbers to float)."""
    ok = {
        "str": isinstance(value, str) and value.strip() != "",
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": isinstance(value, (int, float)) and not isinstance(value, bool),
        "bool": isinstance(value, bool),
        "list[str]": isinstance(value, list)
        and len(value) > 0
        and all(isinstance(v, str) and v for v in value),
        "size": isinstance(value, str),
        "table": isinstance(value, dict),
    }[kind]
    if not ok:
        raise ProfileError(
            f"{source}: field {field!r}: expected {_EXPECTED[kind]}, "
            f"got {_show(value)} ({type(value).__name__})"
        )
    if kind == "size":
        try:
            return parse_size(value)
        except ProfileError as exc:
            raise ProfileError(f"{source}: field {field!r}: {exc}") from None
    if kind == "float":
        try:
            return float(value)
        except OverflowError:
            raise ProfileError(f"{source}: field {field!r}: expected {_EXPECTED[kind]} in "
                               f"range, got {_show(value)}") from None
    if kind == "list[str]":
        return tuple(value)
    return value


def _show(value: Any) -> str:
    """``repr(value)``, cut to its start and end when long (a profile is untrusted input)."""
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:40]}...{text[-12:]}"


def _check_keys(source: Path, raw: dict[str, Any], allowed: dict[str, str], prefix: str) -> None:
    for key in raw:
        if key not in allowed:
            names = ", ".join(prefix + k for k in allowed)
            raise ProfileError(f"{source}: unknown field {_show(prefix + key)}; allowed: {names}")


def _parse_profile(source: Path, raw: dict[str, Any], *, builtin: bool) -> Profile:
    """Validate a parsed TOML document and build a Profile from it."""
    _check_keys(source, raw, {**_FIELDS, **_OPTIONAL, "detect": "table"}, "")
    values: dict[str, Any] = {}
    for field, kind in _FIELDS.items():
        if field not in raw:
            raise ProfileError(
                f"{source}: missing required field {field!r} ({_EXPECTED[kind]}); "
                f"required: {', '.join(_FIELDS)}"
            )
        values[field] = _field(source, field, raw[field], kind)
    for field, kind in _OPTIONAL.items():
        if field in raw:
            values[field] = _field(source, field, raw[field], kind)

    def bad(field: str, why: str) -> ProfileError:
        return ProfileError(f"{source}: field {field!r}: {why}, got {_show(raw[field])}")

    if builtin and values["name"] != source.stem:
        raise bad("name", f"must match the file name {source.stem!r}")
    if not values["name"].isprintable() or not values["name"].strip():  # (printed in plans:
        raise bad("name", "must be printable text")  # session 34 probe, raw escape codes)
    if values["arch"] not in ARCHES:
        raise bad("arch", f"expected one of {', '.join(ARCHES)}")
    unknown = [ep for ep in values["execution_providers"] if ep not in EXECUTION_PROVIDERS]
    if unknown:
        allowed = ", ".join(EXECUTION_PROVIDERS)
        raise bad("execution_providers", f"unknown {unknown[0]!r}; allowed: {allowed}")
    if len(set(values["execution_providers"])) != len(values["execution_providers"]):
        raise bad("execution_providers", "duplicate entries")
    if not 1 <= values["cores"] <= MAX_CORES:
        raise bad("cores", f"must be from 1 to {MAX_CORES}")
    if not 1 <= values["default_threads"] <= values["cores"]:
        raise bad("default_threads", f"must be between 1 and cores ({values['cores']})")
    for f in (f for f in _OPTIONAL if values.get(f) is not None):  # gflops, cpu_gflops
        if not MIN_GFLOPS <= values[f] <= MAX_GFLOPS:
            raise bad(f, f"must be a number from {MIN_GFLOPS:g} to {MAX_GFLOPS:g}")
    if values["default_budget"] > values["ram"]:
        raise bad("default_budget", f"must not exceed ram ({raw['ram']})")

    detect = _field(source, "detect", raw.get("detect", {}), "table")
    _check_keys(source, detect, _DETECT_FIELDS, "detect.")
    for field, kind in _DETECT_FIELDS.items():
        if field in detect:
            values[f"detect_{field}"] = _field(source, f"detect.{field}", detect[field], kind)
    return Profile(source=source, **values)


def _read_bytes(path: Path) -> bytes:
    """The bytes of a profile file: a regular file (a symlink to one is fine) of at most
    MAX_PROFILE_BYTES. Opened without blocking (a FIFO would wait for a writer for ever) and
    checked on the open descriptor, then read up to one byte past the limit (``/dev/zero``
    never ends)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise ProfileError(f"profile file not found: {path}") from None
    except OSError as exc:
        raise ProfileError(f"cannot read profile {path}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ProfileError(f"profile {path} is not a regular file; pass a .toml file "
                               "(see devices/profiles/) or a built-in profile name")
        if st.st_size > MAX_PROFILE_BYTES:
            raise ProfileError(f"profile {path} has {st.st_size} bytes, more than a profile can "
                               f"have ({MAX_PROFILE_BYTES}); pass a small .toml file "
                               "(see devices/profiles/)")
        os.set_blocking(fd, True)
        chunks, n = [], 0
        while n <= MAX_PROFILE_BYTES:
            chunk = os.read(fd, MAX_PROFILE_BYTES + 1 - n)
            if not chunk:
                break
            chunks.append(chunk)
            n += len(chunk)
        if n > MAX_PROFILE_BYTES:  # it grew while being read
            raise ProfileError(f"profile {path} has more than {MAX_PROFILE_BYTES} bytes; pass "
                               "a small .toml file (see devices/profiles/)")
        return b"".join(chunks)
    except OSError as exc:
        raise ProfileError(f"cannot read profile {path}: {exc.strerror}") from None
    finally:
        os.close(fd)


def _read_profile(path: Path, *, builtin: bool) -> Profile:
    data = _read_bytes(path)
    try:
        raw = tomllib.loads(data.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        first = data.lstrip()[:1]
        why = (" (the file starts with a byte order mark: save it as UTF-8 without one)"
               if data.startswith(b"\xef\xbb\xbf") else " (it looks like JSON: a profile is "
               "TOML, written as the files in devices/profiles/)" if first in (b"{", b"[")
               and b"=" not in data.split(b"\n", 1)[0] else "; see devices/profiles/ for the "
               "form")
        raise ProfileError(f"{path}: invalid TOML: {str(exc)[:200]}{why}") from None
    except RecursionError:
        raise ProfileError(f"{path}: invalid TOML: nested too deeply") from None
    return _parse_profile(path, raw, builtin=builtin)


def _builtin_names() -> list[str]:
    return sorted(p.stem for p in PROFILES_DIR.glob("*.toml"))


def list_profiles() -> list[Profile]:
    """Return every built-in profile, sorted by name.

    Raises:
        ProfileError: a built-in profile file is invalid.
    """
    return [_read_profile(PROFILES_DIR / f"{n}.toml", builtin=True) for n in _builtin_names()]


def load_profile(name_or_path: str | os.PathLike[str]) -> Profile:
    """Load a built-in profile by name (``rpi4-4gb``) or a custom one from a ``.toml`` path.

    A value ending in ``.toml`` or containing a path separator is treated as a path.

    Raises:
        ProfileError: unknown name (the message lists the built-ins), missing or unreadable
            file, invalid TOML, or a missing, unknown or mistyped field.
    """
    text = os.fspath(name_or_path)
    is_path = isinstance(name_or_path, os.PathLike) or text.endswith(".toml")
    if is_path or "/" in text or os.sep in text:
        return _read_profile(Path(text), builtin=False)
    names = _builtin_names()
    if text not in names:
        shown = [n for n in names if n != "null"]  # the tests' do-nothing profile: no device's
        near = difflib.get_close_matches(text.lower(), shown, n=1, cutoff=0.6)
        hint = f"did you mean {near[0]!r}? " if near else ""
        raise ProfileError(
            f"unknown device profile {text!r}; {hint}available: {', '.join(shown)}; "
            "or pass 'auto' or a path to a .toml file"
        )
    return _read_profile(PROFILES_DIR / f"{text}.toml", builtin=True)


def resolve_profile(spec: str) -> Profile:
    """Turn a CLI ``--profile`` value into a Profile: ``auto``, a built-in name, or a .toml path.

    Raises:
        ProfileError: see :func:`load_profile` and :func:`detect_profile`.
    """
    if spec == "auto":
        return detect_profile()
    return load_profile(spec)


# ------------------------------------------------------------------------------------ detection


def _read_text(path: Path) -> str | None:
    try:
        return path.read_bytes().decode("utf-8", errors="replace")
    except OSError:
        return None


def _mem_total(root: Path) -> int | None:
    """MemTotal from ``proc/meminfo`` under root, in bytes (the file says kB, meaning KiB)."""
    text = _read_text(root / "proc" / "meminfo")
    match = re.search(r"^MemTotal:\s*(\d+)\s*kB", text or "", re.MULTILINE)
    return int(match[1]) * 1024 if match else None


def _cgroup_limit(root: Path) -> int | None:
    """The tightest memory limit of this process's cgroup and its parents under ``root`` (v2
    ``memory.max``, v1 ``memory.limit_in_bytes``), in bytes; None where none is set. A
    container's ``--memory`` limit is one: MemTotal there is the host's (a session 43 probe)."""
    base = root / "sys" / "fs" / "cgroup"
    own = _read_text(root / "proc" / "self" / "cgroup") or ""
    folders = []  # (v2 first: a v1 memory hierarchy, where mounted, is named by its line)
    for line in own.splitlines():
        ids, _, rest = line.partition(":")
        kinds, _, path = rest.partition(":")
        if ids == "0" and not kinds:
            folders.append((base, path, "memory.max"))
        elif "memory" in kinds.split(","):
            folders.append((base / "memory", path, "memory.limit_in_bytes"))
    folders += [(base, "/", "memory.max"), (base / "memory", "/", "memory.limit_in_bytes")]
    limits = []
    for top, path, name in folders:
        parts = [p for p in path.split("/") if p and p not in (".", "..")]
        for depth in range(len(parts), -1, -1):  # the cgroup, then each parent
            text = (_read_text(top.joinpath(*parts[:depth], name)) or "").strip()
            if text.isdigit() and 0 < int(text) < 1 << 60:  # (v1 "unlimited": ~2**63)
                limits.append(int(text))
    return min(limits) if limits else None


def _within_cgroup(profile: Profile, limit: int | None) -> Profile:
    """``profile`` with its RAM and default budget scaled down to a cgroup memory ``limit``
    below its RAM (a container started with a memory limit)."""
    if limit is None or limit >= profile.ram:
        return profile
    return dataclasses.replace(
        profile, ram=limit, default_budget=profile.default_budget * limit // profile.ram,
        description=f"{profile.description} (this process's cgroup allows "
        f"{format_size(limit)} of memory: RAM and default budget scaled to it)")


def _host_ram() -> int | None:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def _pick_variant(candidates: list[Profile], mem_total: int | None) -> Profile:
    """Smallest variant whose nominal RAM (or ``detect.ram_max``) is >= MemTotal.

    MemTotal sits a little below the nominal size, so this picks the board's own variant. With
    no MemTotal the smallest variant is the safe choice; above every variant, the largest; well
    below the variant picked, that variant scaled to the board (:func:`_scaled_to`).
    """
    by_size = sorted(candidates, key=lambda p: (p.detect_ram_max or p.ram, p.name))
    if mem_total is None:
        return by_size[0]
    for profile in by_size:
        if mem_total <= (profile.detect_ram_max or profile.ram):
            return _scaled_to(profile, mem_total)
    return by_size[-1]


def _scaled_to(profile: Profile, mem_total: int) -> Profile:
    """``profile`` with its RAM and default budget scaled down to a board that has well under
    its nominal RAM (a variant without a profile: a Pi 5 2GB matched rpi5-4gb, whose 2.25 GiB
    default budget exceeds the board; a 32GB AGX Orin the 64GB profile's 40 GiB)."""
    if mem_total >= profile.ram * 3 // 4:  # MemTotal of the board's own variant sits just below
        return profile
    return dataclasses.replace(
        profile, ram=mem_total,
        default_budget=profile.default_budget * mem_total // profile.ram,
        description=f"{profile.description} (this board has {format_size(mem_total)} of RAM: "
        "RAM and default budget scaled to it)")


def _host_profile(mem_total: int | None, machine: str) -> Profile:
    """generic-x86-64 defaults with this host's arch, cores and RAM; budget keeps its ratio."""
    base = load_profile(GENERIC)
    arch = _MACHINE_ARCH.get(machine.lower())
    if arch is None:
        raise ProfileError(
            f"cannot detect a device profile: unsupported machine {machine!r}; "
            f"supported architectures: {', '.join(ARCHES)}; pass a built-in name or a .toml path"
        )
    cores = os.cpu_count() or 1
    ram = mem_total or _host_ram() or base.ram
    return dataclasses.replace(
        base,
        name=GENERIC if arch == "x86_64" else "generic-aarch64",
        description=f"this host ({arch}, {cores} cores, {format_size(ram)} RAM), "
        f"other values from {GENERIC}",
        arch=arch,
        ram=ram,
        cores=cores,
        default_threads=cores,
        default_budget=base.default_budget * ram // base.ram,
    )


def detect_profile(root: str | os.PathLike[str] = "/", *, machine: str | None = None) -> Profile:
    """Pick the built-in profile for the machine whose filesystem is at ``root``.

    Reads ``proc/device-tree/model`` (matched against each profile's ``detect.model_contains``),
    ``etc/nv_tegra_release`` (Jetson userspace: required before a profile with CUDA or TensorRT
    is chosen) and ``proc/meminfo`` MemTotal (picks the RAM variant); a cgroup memory limit
    below the profile's RAM (``proc/self/cgroup``, ``sys/fs/cgroup``) scales its RAM and
    default budget down to it. Without a match it returns
    a host profile: generic-x86-64 values with this host's cores (``os.cpu_count()``), RAM and
    arch (``machine``, default ``platform.machine()``), named ``generic-aarch64`` on ARM.

    Raises:
        ProfileError: no profile matches and the host architecture is not aarch64 or x86_64.
    """
    root = Path(root)
    model = (_read_text(root / "proc" / "device-tree" / "model") or "").strip("\x00 \n").casefold()
    tegra = (root / "etc" / "nv_tegra_release").is_file()
    mem_total = _mem_total(root)
    candidates = [
        p
        for p in list_profiles()
        if model
        and any(s.casefold() in model for s in p.detect_model_contains)
        and (tegra or not GPU_PROVIDERS.intersection(p.execution_providers))
    ]
    if candidates:
        return _within_cgroup(_pick_variant(candidates, mem_total), _cgroup_limit(root))
    return _within_cgroup(_host_profile(mem_total, machine if machine is not None
                                        else platform.machine()), _cgroup_limit(root))
