"""Do the device dependencies have aarch64 wheels, for every Python the project supports?

For each target (CPython 3.10 ... 3.13 on aarch64 Linux, each with the glibc of a typical device
OS), it asks pip, with ``--platform manylinux_2_X_aarch64 --python-version X.Y --only-binary=:all:``:

* which onnxruntime versions have an aarch64 wheel (``pip index versions``);
* what ``pip install`` would pick for ``[project] dependencies`` (``--dry-run --report``), with
  the markers of every requirement, transitive ones included, evaluated for the target (pip
  evaluates them for the host);
* the same with onnxruntime at the oldest version the project allows (``onnxruntime>=1.17``).

It downloads metadata only (no wheels), about 1 minute. Exit status 1 when the dependencies do
not resolve to wheels for a supported Python; 3 when they do but a picked set is known to be
broken: onnxruntime 1.17.0 ... 1.18.1 are built against NumPy 1.x and fail at import under NumPy 2
(verified under the emulator: 1.17.0, 1.18.0, 1.18.1 fail with numpy 2.4.6 and import with
1.26.4; 1.19.0 imports with both), and 1.17.x / 1.18.0 do not cap numpy, so pip pairs them with
NumPy 2. --warn-only: exit 0 for those.

    .venv/bin/python tests/arm64/check_wheels.py
    .venv/bin/python tests/arm64/check_wheels.py --python 3.12 --glibc 2.31
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import deps  # noqa: E402

# (python, glibc, a device OS with that pair)
TARGETS = [
    ("3.10", (2, 35), "Ubuntu 22.04 / JetPack 6"),
    ("3.11", (2, 36), "Debian 12 / Raspberry Pi OS 12"),
    ("3.12", (2, 39), "Ubuntu 24.04"),
    ("3.13", (2, 41), "Debian 13 / Raspberry Pi OS 13"),
]


def _version_key(v: str) -> tuple:
    return tuple(int(x) if x.isdigit() else 0 for x in re.split(r"[.+-]", v))


def pip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True,
                          check=False)


def ort_versions(python: str, glibc: tuple[int, int]) -> list[str]:
    """onnxruntime versions with an aarch64 wheel for this target, oldest first."""
    p = pip("index", "versions", "onnxruntime", *deps.pip_target_args(python, glibc))
    m = re.search(r"Available versions: (.*)", p.stdout)
    if not m:
        return []
    return sorted((v.strip() for v in m.group(1).split(",")), key=_version_key)


def resolve(reqs: list[str], python: str, glibc: tuple[int, int]) -> dict:
    """pip's picks for ``reqs`` on the target: {"ok": bool, "picks": {name: (version, wheel)},
    "error": str}. Transitive markers that pip evaluated for the host are re-evaluated for the
    target; requirements pip skipped are added and the resolution repeated."""
    env = deps.target_env(python)
    reqs = list(reqs)
    for _ in range(4):
        with tempfile.TemporaryDirectory() as tmp:
            report = Path(tmp) / "report.json"
            p = pip("install", "--dry-run", "--quiet", "--no-warn-conflicts", "--target",
                    str(Path(tmp) / "t"), "--report", str(report),
                    *deps.pip_target_args(python, glibc), *reqs)
            if p.returncode:
                errs = [x for x in p.stderr.splitlines() if x.startswith("ERROR")]
                return {"ok": False, "picks": {}, "error": " ".join(errs[:2]) or p.stderr[-300:]}
            items = json.loads(report.read_text())["install"]
        picks = {deps.canonicalize_name(i["metadata"]["name"]):
                 (i["metadata"]["version"], i["download_info"]["url"].rsplit("/", 1)[-1])
                 for i in items}
        missing = []
        for i in items:
            extras = [""] + list(i.get("requested_extras") or [])
            for line in i["metadata"].get("requires_dist") or []:
                req = deps.Requirement(line)
                if req.marker is not None and not any(
                        req.marker.evaluate({**env, "extra": e}) for e in extras):
                    continue
                if deps.canonicalize_name(req.name) not in picks:
                    req.marker = None
                    missing.append(str(req))
        if not missing:
            return {"ok": True, "picks": picks, "error": ""}
        reqs += sorted(set(missing))
    return {"ok": False, "picks": picks, "error": f"markers did not settle: {missing}"}


def known_broken(picks: dict) -> str:
    ort = picks.get("onnxruntime", ("0",))[0]
    np_ = picks.get("numpy", ("0",))[0]
    if _version_key(ort) < (1, 19) and _version_key(np_) >= (2,):
        return (f"onnxruntime {ort} with numpy {np_}: onnxruntime < 1.19 is built against "
                "NumPy 1.x and fails at import under NumPy 2 (needs numpy<2)")
    return ""


def binary_tags(picks: dict) -> str:
    out = []
    for name, (version, wheel) in sorted(picks.items()):
        if wheel.endswith(".whl") and not wheel.endswith("-none-any.whl"):
            tag = wheel[:-4].split("-")[-1]
            out.append(f"{name} {version} ({tag.split('.')[0]})")
    return ", ".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--python", action="append",
                    help="only this Python (repeatable), e.g. 3.12")
    ap.add_argument("--glibc", default=None, help="use this glibc for every target, e.g. 2.31")
    ap.add_argument("--warn-only", action="store_true",
                    help="exit 0 even for known-broken combinations")
    ap.add_argument("--json", default=None, help="also write the results to this file")
    a = ap.parse_args(argv)
    pyproject = deps.pyproject()
    requires = deps.Requirement(f"x{pyproject['project']['requires-python']}").specifier
    ort_spec = next(deps.Requirement(r).specifier for r in pyproject["project"]["dependencies"]
                    if deps.canonicalize_name(deps.Requirement(r).name) == "onnxruntime")
    targets = [t for t in TARGETS if requires.contains(t[0] + ".0")
               and (not a.python or t[0] in a.python)]
    if a.glibc:
        g = tuple(int(x) for x in a.glibc.split("."))
        targets = [(py, g, f"glibc {a.glibc}") for py, _, _ in targets]
    print(f"device dependencies (pyproject.toml): {', '.join(pyproject['project']['dependencies'])}")
    failures, warnings, rows = [], [], []
    for py, glibc, os_name in targets:
        where = f"cp{py.replace('.', '')} aarch64, glibc {glibc[0]}.{glibc[1]} ({os_name})"
        print(f"\n== {where}", flush=True)
        versions = [v for v in ort_versions(py, glibc) if ort_spec.contains(v)]
        print(f"onnxruntime{ort_spec} with an aarch64 wheel: "
              + (f"{len(versions)} versions, {versions[0]} ... {versions[-1]}: "
                 + ", ".join(versions) if versions else "none"))
        sets = [("newest", deps.device_requirements(py))]
        if versions:
            oldest = versions[0]
            sets.append((f"oldest allowed onnxruntime ({oldest})",
                         deps.device_requirements(py, [f"onnxruntime=={oldest}"])))
        for label, reqs in sets:
            r = resolve(reqs, py, glibc)
            if not r["ok"]:
                print(f"  {label}: NO RESOLUTION: {r['error']}")
                (failures if label == "newest" else warnings).append(f"{where}, {label}")
                rows.append((py, label, "no wheels", r["error"][:80]))
                continue
            picks = r["picks"]
            bad = known_broken(picks)
            print(f"  {label}: " + ", ".join(f"{n} {picks[n][0]}" for n in
                                             (deps.canonicalize_name(deps.Requirement(q).name)
                                              for q in reqs)))
            print(f"    binary wheels: {binary_tags(picks)}")
            print(f"    all {len(picks)}: "
                  + ", ".join(f"{n} {v}" for n, (v, _) in sorted(picks.items())))
            if bad:
                print(f"    BROKEN: {bad}")
                warnings.append(f"{where}, {label}: {bad}")
            rows.append((py, label, f"onnxruntime {picks['onnxruntime'][0]}, numpy "
                         f"{picks['numpy'][0]}", "BROKEN: needs numpy<2" if bad else "ok"))
        if not versions:
            failures.append(f"{where}: no onnxruntime{ort_spec} wheel")
    print("\n| Python | set | picks | status |\n|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    for f in failures:
        print(f"FAIL: {f}")
    for w in warnings:
        print(f"WARNING: {w}")
    if a.json:
        Path(a.json).write_text(json.dumps({"targets": [t[0] for t in targets], "rows": rows,
                                            "failures": failures, "warnings": warnings}))
    bad = failures or (warnings and not a.warn_only)
    print(("FAIL" if bad else "PASS") + f": {len(targets)} targets, {len(failures)} without "
          f"wheels, {len(warnings)} known-broken or unresolvable oldest sets")
    return 1 if failures else 3 if warnings and not a.warn_only else 0


if __name__ == "__main__":
    sys.exit(main())
