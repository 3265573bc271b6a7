"""aarch64 test tier without an ARM machine (``make test-arm64``).

Builds once, and caches under ``.cache/arm64/`` (ARM64_CACHE overrides):

* ``root/``: a Debian 12 arm64 userland (``debootstrap --foreign`` downloads the .debs, ``dpkg -x``
  unpacks them; no maintainer script runs) that provides an aarch64 ``python3.11``, run as
  ``qemu-aarch64-static -cpu cortex-a72 -L root root/usr/bin/python3.11`` (ARM64_CPU overrides);
* ``site-<key>/``: aarch64 wheels of the device dependencies, read from pyproject.toml
  (``[project] dependencies``) and installed by the host's pip with
  ``--platform manylinux_2_*_aarch64 --python-version 3.11 --only-binary=:all:``, so a dependency
  without an aarch64 wheel fails the build (ARM64_PINS="onnxruntime==1.17.0 numpy<2" replaces
  the project's specifiers); plus scikit-learn's digits file in a data-only ``sklearn`` stub
  (the runtime reads the file and never imports scikit-learn).

Every run then installs the project itself (``pip install --no-deps --target``, no torch) from a
copy of the working tree (or ``--ref REV``: ``git archive``), exports the bundles on the host
with the x86 venv (torch), and runs the device side under qemu: environment checks, then for
``mlp`` and ``cnn --trainable all``: train 10 steps in INSTANT mode with ``--checkpoint-every
5``, evaluate, resume to 15 steps, evaluate. The same commands run on the host, and the
aarch64 numbers must agree with them. Last, check_wheels.py (aarch64 wheels for Python
3.10-3.13). One PASS/FAIL line per check, a summary, exit status 1 on any failure.

    .venv/bin/python tests/arm64/tier.py             # build if needed, run, summary
    .venv/bin/python tests/arm64/tier.py --build     # build the cache only
    .venv/bin/python tests/arm64/tier.py --rebuild   # drop the cache first
    .venv/bin/python tests/arm64/tier.py --ref HEAD  # test the last commit, not the working tree
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import deps  # noqa: E402

REPO = deps.REPO
HERE = Path(__file__).resolve().parent
CACHE = Path(os.environ.get("ARM64_CACHE") or REPO / ".cache" / "arm64").resolve()
ROOT = CACHE / "root"
WORK = CACHE / "work"
SRC = WORK / "src"
HOST_PY = Path(sys.executable)
QEMU = "qemu-aarch64-static"
# Emulated CPU: Cortex-A72 (Raspberry Pi 4; ARMv8.0 + CRC, no SVE, no dot product), so numpy's
# OpenBLAS and onnxruntime's MLAS choose the kernels they would on a Pi 4. Under qemu's default
# `max` CPU (SVE and every newer extension) numpy ran 5x slower (3 eigh of 300x300: 75 s vs 14 s).
CPU = os.environ.get("ARM64_CPU", "cortex-a72")
# /proc/cpuinfo fields per CPU model, as the real cores report them (MIDR parts, Features line).
CPUINFO = {
    "cortex-a57": ("0xd07", "0x1", "1", "fp asimd evtstrm crc32 cpuid"),  # Jetson Nano
    "cortex-a72": ("0xd08", "0x0", "3", "fp asimd evtstrm crc32 cpuid"),  # Raspberry Pi 4
    "cortex-a76": ("0xd0b", "0x4", "1", "fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics "
                   "fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp"),  # Raspberry Pi 5
    "neoverse-n1": ("0xd0c", "0x3", "1", "fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics "
                    "fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp ssbs"),
}
ROOT_PACKAGES = "python3,libstdc++6"  # libstdc++6: onnxruntime's and tokenizers' C++ runtime
ROOT_VERSION = 2  # bump when the root recipe changes
SITE_VERSION = 2  # bump when the site recipe changes
STEP_TIMEOUT_S = 900  # one emulated command
CHANCE = 0.1  # 10 digit classes

# Training recipe: the mlp reaches ~0.5 held-out accuracy in 10 INSTANT steps with these
# settings on x86; the cnn needs hundreds of steps to leave chance, so it is checked for finite
# numbers and agreement with the host only.
TRAIN = ["--data", "digits", "--batch", "32", "--mode", "instant", "--lr", "0.01",
         "--energy", "0.99", "--oversample", "4", "--threads", "1", "--seed", "0",
         "--checkpoint-every", "5", "--no-progress"]
# the mlp's hidden Linears are kept INSTANT layers (the export leaves layers over one vector
# per sample exact by default)
MODELS = {"mlp": ["--model", "mlp", "--instant-exclude", "4"], "cnn": ["--model", "cnn", "--trainable", "all"]}
ACC_ABOVE_CHANCE = {"mlp": True, "cnn": False}
# aarch64 (NEON kernels, the aarch64 site's onnxruntime) vs x86 (AVX kernels, the venv's):
# same math, different kernels and summation orders.
LOSS_RTOL, ACC_ATOL = 0.02, 0.03


def log(msg: str) -> None:
    print(msg, flush=True)


def run(cmd: list, **kw) -> subprocess.CompletedProcess:
    log("+ " + shlex.join(map(str, cmd)))
    return subprocess.run(list(map(str, cmd)), check=True, **kw)


def pins() -> list[str]:
    """ARM64_PINS: requirements that replace the project's, e.g. "onnxruntime==1.17.0 numpy<2"."""
    return os.environ.get("ARM64_PINS", "").split()


def pinned(name: str) -> str | None:
    """The exact version ARM64_PINS pins ``name`` to, if it does."""
    for p in pins():
        req = deps.Requirement(p)
        spec = str(req.specifier)
        if deps.canonicalize_name(req.name) == name and spec.startswith("=="):
            return spec[2:]
    return None


def write_cpuinfo() -> None:
    """An ARM /proc/cpuinfo inside the root (qemu -L serves it to the emulated process).

    qemu-user 7.2 passes the host's /proc/cpuinfo through to aarch64 guests; onnxruntime 1.28
    to 1.32 crash with SIGSEGV at import on the x86 one (1.23 to 1.27 print "Unknown CPU
    vendor"). With this file in the root, 1.32.0 imports and trains. One entry per CPU the
    host's /sys says is present: the emulated process reads /sys/devices/system/cpu from the
    host (the root has none).
    """
    if CPU not in CPUINFO:
        sys.exit(f"error: ARM64_CPU={CPU!r}: choose one of {', '.join(CPUINFO)}")
    part, variant, rev, features = CPUINFO[CPU]
    n = os.cpu_count() or 1
    present = Path("/sys/devices/system/cpu/present")
    if present.is_file():
        n = 0
        for rng in present.read_text().strip().split(","):
            lo, _, hi = rng.partition("-")
            n = max(n, int(hi or lo) + 1)
    blocks = [f"processor\t: {i}\nBogoMIPS\t: 108.00\nFeatures\t: {features}\n"
              f"CPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: {variant}\n"
              f"CPU part\t: {part}\nCPU revision\t: {rev}\n" for i in range(n)]
    (ROOT / "proc").mkdir(exist_ok=True)
    (ROOT / "proc/cpuinfo").write_text("\n".join(blocks))


# ------------------------------------------------------------------------------------- build

def _mirror() -> str:
    """The Debian mirror apt uses here (deb822 or one-line sources), else deb.debian.org."""
    if os.environ.get("ARM64_MIRROR"):
        return os.environ["ARM64_MIRROR"]
    srcs = sorted(Path("/etc/apt/sources.list.d").glob("*.sources"))
    for src in srcs + [Path("/etc/apt/sources.list")]:
        text = src.read_text() if src.is_file() else ""
        for m in re.finditer(r"^(?:URIs:\s*|deb\s+(?:\[[^]]*\]\s+)?)(\S+)", text, re.M):
            url = m.group(1).rstrip("/")
            if url.endswith("/debian") and "security" not in url:
                return url
    return "http://deb.debian.org/debian"


def ensure_tools() -> None:
    missing = [t for t in (QEMU, "debootstrap", "dpkg") if shutil.which(t) is None]
    if not missing:
        return
    if os.geteuid() == 0 and shutil.which("apt-get"):
        log(f"installing qemu-user-static and debootstrap (missing: {', '.join(missing)})")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        run(["apt-get", "update", "-qq"], env=env)
        run(["apt-get", "install", "-y", "-qq", "qemu-user-static", "debootstrap"], env=env,
            stdout=subprocess.DEVNULL)
        return
    sys.exit(f"error: the aarch64 tier needs {', '.join(missing)}: "
             "sudo apt-get install qemu-user-static debootstrap (Debian/Ubuntu)")


def build_root() -> str:
    """Debian arm64 userland with python3.11; cached until the recipe changes."""
    key = json.dumps({"suite": deps.SUITE, "include": ROOT_PACKAGES, "v": ROOT_VERSION})
    stamp = ROOT / ".arm64-tier-root"
    if stamp.is_file() and stamp.read_text() == key:
        return "cached"
    if os.geteuid() != 0:
        sys.exit("error: building the arm64 root (debootstrap) needs root; run once as root, "
                 f"or point ARM64_CACHE at a cache built elsewhere ({CACHE})")
    tmp = CACHE / "root.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(ROOT, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    # --foreign: download and unpack the base only; the second stage would have to run arm64
    # maintainer scripts, which the tier does not need.
    run(["debootstrap", "--foreign", "--arch=arm64", "--variant=minbase",
         f"--include={ROOT_PACKAGES}", deps.SUITE, tmp, _mirror()], stdout=subprocess.DEVNULL)
    debs = sorted((tmp / "var/cache/apt/archives").glob("*.deb"))
    log(f"unpacking {len(debs)} arm64 .debs")
    for deb in debs:
        subprocess.run(["dpkg", "-x", str(deb), str(tmp)], check=True)
        deb.unlink()
    # qemu -L falls back to the host's file for any path missing in the root: give the paths
    # the emulated Python and loader look up their own (empty) versions.
    (tmp / "usr/local/lib/python3.11/dist-packages").mkdir(parents=True, exist_ok=True)
    (tmp / "etc/ld.so.cache").write_bytes(b"")  # no cache: the loader searches its own dirs
    py = tmp / "usr/bin/python3.11"
    if not py.is_file():
        sys.exit(f"error: {py} missing after unpacking the arm64 .debs")
    # Debian compiles the stdlib in a maintainer script, which --foreign skips: compile it here
    # with the host's Python 3.11 (same bytecode format), or every emulated start compiles the
    # modules it imports (12 s instead of 3 s to import the runtime under qemu).
    compileall(tmp / "usr/lib/python3.11")
    tmp.rename(ROOT)
    stamp.write_text(key)
    return "built"


def compileall(path: Path) -> None:
    """Byte-compile with the host's CPython (its minor version must be the root's, 3.11)."""
    if sys.version_info[:2] != tuple(int(x) for x in deps.PYTHON.split(".")):
        return  # other bytecode format: the emulated Python compiles what it imports
    subprocess.run([str(HOST_PY), "-m", "compileall", "-q", "-j", "2", str(path)],
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)


def _site_key(reqs: list[str]) -> str:
    h = hashlib.sha256(json.dumps({"reqs": reqs, "tags": deps.pip_target_args(deps.PYTHON),
                                   "v": SITE_VERSION}).encode())
    return h.hexdigest()[:12]


def build_site() -> tuple[Path, str]:
    """aarch64 site-packages of the device dependencies; one folder per requirement set."""
    try:
        reqs = deps.device_requirements(deps.PYTHON, pins(), SRC)
    except ValueError as exc:
        sys.exit(f"error: ARM64_PINS: {exc}")
    site = CACHE / f"site-{_site_key(reqs)}"
    if (site / ".complete").is_file():
        return site, "cached"
    for old in CACHE.glob("site-*"):  # keep one: each is ~200 MB
        shutil.rmtree(old)
    tmp = CACHE / "site.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    log("device requirements (pyproject.toml" + (", ARM64_PINS" if pins() else "") + "): "
        + " ".join(reqs))
    run([HOST_PY, "-m", "pip", "install", "-q", "--no-warn-conflicts", "--target", tmp,
         *deps.pip_target_args(deps.PYTHON), *reqs])
    # digits: the one data file the runtime reads from scikit-learn's package folder. The stub
    # package refuses imports, so nothing can import scikit-learn by accident.
    digits = _host_digits()
    stub = tmp / "sklearn"
    (stub / "datasets/data").mkdir(parents=True)
    shutil.copyfile(digits, stub / "datasets/data/digits.csv.gz")
    (stub / "__init__.py").write_text(
        'raise ImportError("arm64 tier: sklearn is a data-only stub (digits.csv.gz)")\n')
    (tmp / ".requirements.txt").write_text("\n".join(reqs) + "\n")
    tmp.rename(site)
    (site / ".complete").write_text("")
    return site, "built"


def site_versions(site: Path) -> dict[str, str]:
    """Installed distributions of the aarch64 site: canonical name -> version."""
    out = {}
    for d in site.glob("*.dist-info"):
        name, _, version = d.name[:-len(".dist-info")].partition("-")
        out[deps.canonicalize_name(name)] = version
    return out


def _host_digits() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("error: the host venv has no scikit-learn (needed for its digits file); "
                 "run `make test` first or pip install scikit-learn")
    path = Path(list(spec.submodule_search_locations)[0]) / "datasets/data/digits.csv.gz"
    with gzip.open(path) as f:  # fail here, not under the emulator, if it is damaged
        f.read()
    return path


def prepare_source(ref: str | None) -> Path:
    """The code under test, in WORK/src: the working tree's packages and metadata files, or
    ``git archive REF`` (read-only) with ``--ref``. The host runs (export, reference training)
    and the aarch64 install both use it."""
    shutil.rmtree(SRC, ignore_errors=True)
    SRC.mkdir(parents=True)
    if ref:
        archive = subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", ref],
                                 capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(SRC)], input=archive, check=True)
        return SRC
    for name in ("pyproject.toml", "README.md", "LICENSE", "setup.py", "setup.cfg", "MANIFEST.in"):
        if (REPO / name).is_file():
            shutil.copy2(REPO / name, SRC / name)
    for pkg in _local_packages(REPO):
        shutil.copytree(REPO / pkg, SRC / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    return SRC


def install_project(dest: Path) -> tuple[list[str], list[str]]:
    """`pip install --no-deps --target dest SRC`: the project without dependencies (so without
    torch), built from the copy in SRC so the working tree is not touched.

    Returns the top-level packages installed and the modules of SRC that the installed code
    imports, or that sit inside an installed package, but that the install lacks (a package
    missing from ``[tool.setuptools] packages``); those are then copied from SRC so that the
    remaining checks can still run.
    """
    shutil.rmtree(dest, ignore_errors=True)
    cmd = [HOST_PY, "-m", "pip", "install", "-q", "--no-deps", "--no-warn-conflicts",
           "--target", dest, SRC]
    if _has_setuptools():  # else pip fetches setuptools for an isolated build
        cmd.insert(-1, "--no-build-isolation")
    log("+ " + shlex.join(map(str, cmd)))
    p = subprocess.run(list(map(str, cmd)), capture_output=True, text=True, check=False)
    if p.returncode:  # setuptools' warnings only when the build fails
        sys.exit(f"error: installing the project failed:\n{p.stdout}{p.stderr}")
    local = _local_packages(SRC)
    installed = _installed_packages(dest)
    found = set(_missing_imports(dest, local)) | set(_missing_subpackages(dest))
    missing = sorted(m for m in found if not any(m.startswith(o + ".") for o in found))
    for mod in missing:  # copy what the install lacks, so the other checks still say something
        rel = Path(*mod.split("."))
        target = dest / rel
        if (SRC / rel).is_dir():
            shutil.copytree(SRC / rel, target, dirs_exist_ok=True,
                            ignore=shutil.ignore_patterns("__pycache__", "build"))
        elif (SRC / rel).with_suffix(".py").is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2((SRC / rel).with_suffix(".py"), target.with_suffix(".py"))
    if missing:
        compileall(dest)
    return installed, missing


def _has_setuptools() -> bool:
    import importlib.util

    return importlib.util.find_spec("setuptools") is not None


def _local_packages(top: Path) -> list[str]:
    """Top-level folders of ``top`` that are Python packages (tests excluded)."""
    return sorted(d.name for d in top.iterdir() if (d / "__init__.py").is_file()
                  and d.name not in ("tests", "build") and not d.name.startswith("."))


def _installed_packages(dest: Path) -> list[str]:
    return sorted(d.name for d in dest.iterdir() if (d / "__init__.py").is_file())


def _missing_subpackages(dest: Path) -> list[str]:
    """Packages (folders with __init__.py) inside the installed ones that were not installed."""
    out = []
    for pkg in _installed_packages(dest):
        if not (SRC / pkg).is_dir():
            continue
        for init in (SRC / pkg).rglob("__init__.py"):
            rel = init.parent.relative_to(SRC)
            if not (dest / rel / "__init__.py").is_file() and "__pycache__" not in rel.parts:
                out.append(".".join(rel.parts))
    return out


def _missing_imports(dest: Path, local: list[str]) -> list[str]:
    """Repository modules imported by installed code (absolute or relative imports, at any
    depth) that the install does not contain; shortest missing prefix of each, sorted."""
    import ast

    def exists(mod: str) -> bool:
        rel = Path(*mod.split("."))
        return (dest / rel / "__init__.py").is_file() or (dest / rel).with_suffix(".py").is_file()

    wanted: set[str] = set()
    for path in dest.rglob("*.py"):
        rel = path.relative_to(dest)
        if rel.parts[0] not in local:
            continue
        pkg = list(rel.parts[:-1])
        try:
            tree = ast.parse(path.read_text(), str(path))
        except SyntaxError:
            continue
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = pkg[:len(pkg) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                names = [base] + [f"{base}.{a.name}" for a in node.names if a.name != "*"]
            for name in names:
                if name and name.split(".")[0] in local:
                    wanted.add(name)
    missing = set()
    for name in sorted(wanted):
        parts = name.split(".")
        for i in range(1, len(parts) + 1):
            prefix = ".".join(parts[:i])
            if exists(prefix):
                continue
            # `from pkg import name` may import an attribute, not a module: only a module that
            # exists in the working tree counts as missing.
            rel = SRC.joinpath(*parts[:i])
            if rel.is_dir() or rel.with_suffix(".py").is_file():
                missing.add(prefix)
            break
    return sorted(missing)


# --------------------------------------------------------------------------------------- run

class Tier:
    def __init__(self, site: Path) -> None:
        self.site = site
        self.project = WORK / "project"
        self.results: list[tuple[str, bool, str]] = []

    def check(self, name: str, ok: bool, detail: str = "") -> bool:
        self.results.append((name, bool(ok), detail))
        log(f"[{'PASS' if ok else 'FAIL'}] {name}" + (f": {detail}" if detail else ""))
        return bool(ok)

    def emu_env(self) -> dict[str, str]:
        keep = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "TERM")}
        return {**keep, "PYTHONPATH": f"{self.project}:{self.site}", "PYTHONNOUSERSITE": "1",
                "OMP_NUM_THREADS": "1"}

    def emulated(self, args: list) -> subprocess.CompletedProcess:
        cmd = [QEMU, "-cpu", CPU, "-L", ROOT, ROOT / "usr/bin/python3.11", *args]
        return self._run(cmd, self.emu_env())

    def host(self, args: list) -> subprocess.CompletedProcess:
        env = {**os.environ, "PYTHONPATH": str(SRC)}
        return self._run([HOST_PY, *args], env)

    def _run(self, cmd: list, env: dict) -> subprocess.CompletedProcess:
        log("+ " + shlex.join(map(str, cmd)))
        t = time.perf_counter()
        try:
            p = subprocess.run(list(map(str, cmd)), env=env, cwd=WORK, capture_output=True,
                               text=True, timeout=STEP_TIMEOUT_S, check=False)
        except subprocess.TimeoutExpired as exc:
            p = subprocess.CompletedProcess(exc.cmd, 124, exc.stdout or "",
                                            f"timed out after {STEP_TIMEOUT_S} s")
        p.elapsed = time.perf_counter() - t  # type: ignore[attr-defined]
        for line in (p.stdout + p.stderr).splitlines():
            log("    " + line)
        log(f"    (exit {p.returncode}, {p.elapsed:.1f} s)")  # type: ignore[attr-defined]
        return p

    # ------------------------------------------------------------------------------- checks

    def environment(self) -> bool:
        p = self.emulated([HERE / "inside.py", self.site, self.project])
        facts = {}
        if p.returncode == 0:
            try:
                facts = json.loads(p.stdout.strip().splitlines()[-1])
            except (ValueError, IndexError):
                facts = {}
        ok = self.check("emulated python runs and reports", p.returncode == 0 and facts,
                        _error_line(p) if p.returncode else "")
        if not ok:
            return False
        self.facts = facts
        self.check("platform.machine() is aarch64", facts["machine"] == "aarch64",
                   facts["machine"])
        self.check("onnxruntime's extension is an aarch64 ELF", facts["ort_elf"] == "aarch64",
                   f"{facts['ort_so']} ({facts['ort_elf']})")
        self.check("numpy's extension is an aarch64 ELF", facts["numpy_elf"] == "aarch64",
                   facts["numpy_elf"])
        want = pinned("onnxruntime") or site_versions(self.site).get("onnxruntime")
        self.check("onnxruntime is the one installed for aarch64"
                   + (" (ARM64_PINS)" if pinned("onnxruntime") else " (pip's pick)"),
                   facts["onnxruntime"] == want, f"{facts['onnxruntime']}, expected {want}")
        self.check("`import torch` fails with ModuleNotFoundError", facts["torch"] ==
                   "ModuleNotFoundError", facts["torch"])
        self.check("`import sklearn` fails (data-only stub)", facts["sklearn"] == "ImportError",
                   facts["sklearn"])
        self.check("runtime imports no torch/onnx/sklearn", not facts["heavy_modules"],
                   ", ".join(facts["heavy_modules"]) or "none loaded")
        self.check("every sys.path entry is in the root, the site or the project",
                   not facts["foreign_path"], ", ".join(facts["foreign_path"]) or "")
        self.check("device profile detection says generic-aarch64",
                   facts["profile"] == "generic-aarch64", facts["profile"])
        return True

    def model(self, name: str, export_args: list[str]) -> None:
        bundle = WORK / "bundles" / name
        p = self.host(["-m", "runtime", "export", *export_args, "--out", bundle])
        if not self.check(f"{name}: export on the host (x86, torch)", p.returncode == 0):
            return
        emu = self._train_eval_resume(name, bundle, self.emulated, "aarch64")
        ref = self._train_eval_resume(name, bundle, self.host, "x86_64", quiet=True)
        if emu and ref:
            self._compare(name, emu, ref)

    def _train_eval_resume(self, name: str, bundle: Path, runner, arch: str,
                           quiet: bool = False) -> dict | None:
        out = WORK / "runs" / f"{name}-{arch}"
        shutil.rmtree(out, ignore_errors=True)
        tag = f"{name} [{arch}]"
        res: dict = {}
        t = runner(["-m", "runtime", "train", bundle, *TRAIN, "--steps", "10", "--out", out])
        res["train_s"] = t.elapsed
        r1 = _parse_train(t.stdout)
        ok = self.check(f"{tag}: train 10 steps (instant)", t.returncode == 0 and r1 is not None
                        and r1["mode"] == "instant" and r1["steps"] == 10,
                        _fmt(r1) if r1 else _tail(t))
        if not ok:
            return None
        ckpts = sorted(x.name for x in (out / "checkpoints").glob("ckpt-*.npz"))
        self.check(f"{tag}: checkpoints at steps 5 and 10",
                   ckpts == ["ckpt-000005.npz", "ckpt-000010.npz"], ", ".join(ckpts))
        e1 = runner(["-m", "runtime", "eval", bundle, "--data", "digits", "--threads", "1",
                     "--weights", out / "params.npz"])
        ev1 = _parse_eval(e1.stdout)
        self.check(f"{tag}: eval after 10 steps", e1.returncode == 0 and ev1 is not None
                   and _finite(ev1.values()), _fmt(ev1) if ev1 else _tail(e1))
        r = runner(["-m", "runtime", "train", bundle, *TRAIN, "--steps", "15", "--out", out,
                    "--resume"])
        res["resume_s"] = r.elapsed
        r2 = _parse_train(r.stdout)
        self.check(f"{tag}: resume from step 10 to 15", r.returncode == 0 and r2 is not None
                   and r2.get("resumed_from") == 10 and r2["steps"] == 15
                   and (out / "checkpoints/ckpt-000015.npz").is_file(),
                   _fmt(r2) if r2 else _tail(r))
        e2 = runner(["-m", "runtime", "eval", bundle, "--data", "digits", "--threads", "1",
                     "--weights", out / "params.npz"])
        ev2 = _parse_eval(e2.stdout)
        self.check(f"{tag}: eval after resume", e2.returncode == 0 and ev2 is not None
                   and _finite(ev2.values()), _fmt(ev2) if ev2 else _tail(e2))
        nums = [v for d in (r1, r2 or {}, ev1 or {}, ev2 or {}) for k, v in d.items()
                if isinstance(v, float)]
        self.check(f"{tag}: every loss and accuracy printed is finite", _finite(nums),
                   f"{len(nums)} numbers")
        if ev1 and r1:
            self.check(f"{tag}: eval reproduces train's held-out numbers",
                       abs(ev1["acc"] - r1["test_acc"]) < 1e-9
                       and math.isclose(ev1["loss"], r1["test_loss"], rel_tol=1e-3),
                       f"eval {ev1['acc']:.3f}/{ev1['loss']:.4f}, "
                       f"train {r1['test_acc']:.3f}/{r1['test_loss']:.4f}")
        if ACC_ABOVE_CHANCE[name] and ev1 and ev2:
            self.check(f"{tag}: held-out accuracy above chance (>= 2x {CHANCE})",
                       min(ev1["acc"], ev2["acc"]) >= 2 * CHANCE,
                       f"{ev1['acc']:.3f} after 10 steps, {ev2['acc']:.3f} after 15")
        res.update(train=r1, resume=r2, eval10=ev1, eval15=ev2)
        return res

    def _compare(self, name: str, emu: dict, ref: dict) -> None:
        pairs = []
        for k in ("train", "resume"):
            if emu.get(k) and ref.get(k):
                pairs += [(f"{k} loss_last", emu[k]["loss_last"], ref[k]["loss_last"])]
        for k in ("eval10", "eval15"):
            if emu.get(k) and ref.get(k):
                pairs += [(f"{k} loss", emu[k]["loss"], ref[k]["loss"])]
        bad = [f"{what} {a:.4f} vs {b:.4f}" for what, a, b in pairs
               if not math.isclose(a, b, rel_tol=LOSS_RTOL)]
        accs = [(k, emu[k]["acc"], ref[k]["acc"]) for k in ("eval10", "eval15")
                if emu.get(k) and ref.get(k)]
        bad += [f"{k} accuracy {a:.3f} vs {b:.3f}" for k, a, b in accs if abs(a - b) > ACC_ATOL]
        detail = "; ".join(bad) or ", ".join(f"{k} acc {a:.3f} vs {b:.3f}" for k, a, b in accs)
        self.check(f"{name}: aarch64 results match x86 (loss rtol {LOSS_RTOL}, "
                   f"acc atol {ACC_ATOL})", bool(pairs) and not bad, detail)
        self.timings = getattr(self, "timings", {})
        self.timings[name] = {"emu_train_s": emu["train_s"], "host_train_s": ref["train_s"]}


def check_wheels(tier: Tier) -> None:
    """check_wheels.py (aarch64 wheels for every supported Python) as two checks of the tier."""
    out = WORK / "wheels.json"
    out.unlink(missing_ok=True)
    p = tier._run([HOST_PY, HERE / "check_wheels.py", "--json", out], dict(os.environ))
    res = json.loads(out.read_text()) if out.is_file() else None
    if res is None:
        tier.check("check_wheels.py ran", False, _tail(p))
        return
    pys = ", ".join(res["targets"])
    tier.check(f"device dependencies have aarch64 wheels for Python {pys}", not res["failures"],
               "; ".join(res["failures"]))
    tier.check("oldest allowed onnxruntime resolves to a working set on aarch64",
               not res["warnings"], "; ".join(res["warnings"]))


_NUM = r"([-+]?(?:\d+\.?\d*(?:e[-+]?\d+)?|nan|inf))"


def _parse_train(out: str) -> dict | None:
    m = re.search(r"^mode (\w+): (\d+) steps", out, re.M)
    loss = re.search(rf"^loss {_NUM} -> {_NUM}(?:, train accuracy {_NUM})?", out, re.M)
    test = re.search(rf"^held-out accuracy {_NUM}(?: \(before {_NUM}\))?, loss {_NUM}", out, re.M)
    if not (m and loss and test):
        return None
    res = {"mode": m.group(1), "steps": int(m.group(2)), "loss_first": float(loss.group(1)),
           "loss_last": float(loss.group(2)), "test_acc": float(test.group(1)),
           "test_loss": float(test.group(3))}
    if loss.group(3):
        res["train_acc"] = float(loss.group(3))
    ck = re.search(r"^checkpoint: .*?(?:\(resumed from step (\d+)\))?$", out, re.M)
    if ck and ck.group(1):
        res["resumed_from"] = int(ck.group(1))
    return res


def _parse_eval(out: str) -> dict | None:
    m = re.search(rf"held-out examples: (\d+), loss {_NUM}, accuracy {_NUM}", out)
    if not m:
        return None
    return {"n": float(m.group(1)), "loss": float(m.group(2)), "acc": float(m.group(3))}


def _qemu_version() -> str:
    p = subprocess.run([QEMU, "--version"], capture_output=True, text=True, check=False)
    m = re.search(r"version (\S+)", p.stdout)
    return f"{QEMU} {m.group(1) if m else '?'}"


def _finite(values) -> bool:
    return all(math.isfinite(v) for v in values)


def _fmt(d: dict | None) -> str:
    return ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                     for k, v in (d or {}).items())


def _error_line(p: subprocess.CompletedProcess) -> str:
    """The most telling line of a failed run: a NumPy ABI complaint, else the last line."""
    lines = [x.strip() for x in (p.stderr or p.stdout or "").splitlines() if x.strip()]
    for i, line in enumerate(lines):
        if "compiled using NumPy" in line:
            return " ".join(lines[i:i + 2])
    return f"exit {p.returncode}: " + (lines[-1] if lines else "no output")


def _tail(p: subprocess.CompletedProcess) -> str:
    return _error_line(p)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--build", action="store_true", help="build the cache only")
    ap.add_argument("--rebuild", action="store_true", help="delete the cache first")
    ap.add_argument("--models", default=",".join(MODELS), help="comma-separated: mlp,cnn")
    ap.add_argument("--no-wheels", action="store_true",
                    help="skip check_wheels.py (the wheel matrix for Python 3.10-3.13)")
    ap.add_argument("--ref", default=None,
                    help="test a commit (git archive REF) instead of the working tree")
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    if a.rebuild:
        shutil.rmtree(CACHE, ignore_errors=True)
    ensure_tools()
    WORK.mkdir(parents=True, exist_ok=True)
    for sub in ("bundles", "runs"):
        shutil.rmtree(WORK / sub, ignore_errors=True)
    prepare_source(a.ref)
    root_state = build_root()
    t_root = time.perf_counter()
    site, site_state = build_site()
    t_site = time.perf_counter()
    log(f"arm64 root {root_state} ({t_root - t0:.0f} s), site {site.name} {site_state} "
        f"({t_site - t_root:.0f} s): {CACHE}")
    if a.build:
        return 0
    write_cpuinfo()
    tier = Tier(site)
    pkgs, missing = install_project(tier.project)
    tier.check("the installed project has every repository module it imports",
               not missing, f"`pip install .` (pyproject.toml [tool.setuptools] packages: "
               f"{'; '.join(deps.project_packages(SRC))}) installs {', '.join(pkgs)} but lacks "
               f"{', '.join(missing)}; copied from the source to run the other checks"
               if missing else f"installed packages: {', '.join(pkgs)}")
    if tier.environment():
        for name in a.models.split(","):
            tier.model(name, MODELS[name])
    if not a.no_wheels:
        check_wheels(tier)
    total = time.perf_counter() - t0
    failed = [r for r in tier.results if not r[1]]
    facts = getattr(tier, "facts", {})
    log("\n==== aarch64 tier summary ====")
    vers = site_versions(site)
    names = [deps.canonicalize_name(deps.Requirement(r).name)
             for r in deps.device_requirements(deps.PYTHON, (), SRC)]
    log(f"emulator: {_qemu_version()} -cpu {CPU}; root: Debian {deps.SUITE} arm64, Python "
        f"{facts.get('python', '?')}; aarch64 wheels: "
        + ", ".join(f"{n} {vers.get(n, '?')}" for n in names))
    for name, ok, detail in tier.results:
        log(f"  {'PASS' if ok else 'FAIL'}  {name}" + (f"  ({detail})" if detail and not ok
                                                      else ""))
    for name, t in getattr(tier, "timings", {}).items():
        log(f"  {name}: 10 training steps incl. start-up {t['emu_train_s']:.1f} s emulated, "
            f"{t['host_train_s']:.1f} s on the host")
    log(f"cache: root {root_state}, site {site_state}; total {total:.0f} s "
        f"(build {t_site - t0:.0f} s)")
    log(f"{'FAIL' if failed or not tier.results else 'PASS'}: "
        f"{len(tier.results) - len(failed)}/{len(tier.results)} checks passed")
    return 1 if failed or not tier.results else 0


if __name__ == "__main__":
    sys.exit(main())
