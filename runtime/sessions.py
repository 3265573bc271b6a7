"""onnxruntime sessions for a bundle: frozen weights mapped once, one capped memory arena.

* **Frozen weights** are memory-mapped once from the verified ``weights.bin`` and handed to every
  session (``add_initializer``); without this each session maps the file on its own and the pages
  it touches count again in the RSS (measured: +48 MB for a second MiniLM session). They are
  dropped from the RSS (``MADV_DONTNEED``) after each pass, so they count only while a pass reads
  them. Large embedding tables are read row by row with ``pread`` (``SharedWeights.lookup``).
* **One arena for every session.** All sessions allocate from one onnxruntime CPU arena registered
  for the process (``use_arena``), optionally with a hard cap: an allocation past the cap fails
  (``is_out_of_memory``) instead of growing the process, and the session stays usable. The arena
  keeps what it allocated for the next micro-batch (no page faults), which on MiniLM cut the step
  time 1.2 s -> 0.55 s and the kernel's share of the CPU time from ~40 % to ~2 % (docs/memory.md).
* **Graphs are loaded from verified bytes** (checked against the manifest's SHA-256 as read),
  and their external data may only resolve inside the bundle folder: onnxruntime checks that the
  resolved path (symlinks followed) stays inside it; every external initializer the manifest
  lists is supplied by the runtime from the verified ``weights.bin`` instead.
"""

from __future__ import annotations

import mmap
import os

import numpy as np
import onnxruntime as ort

from contract import UserError, names
from contract.errors import ort_message

from .bundle import Bundle
from .config import SessionConfig

__all__ = ["SharedWeights", "arena_cap", "check_provider_started", "is_out_of_memory",
           "make_session", "providers_for", "resolve_device", "shrink_arena", "use_arena"]

_ARENA: dict[str, int | None] = {}  # process-wide: the registered arena's cap (None: no cap)


def use_arena(cap: int | None) -> None:
    """Register the process's shared CPU arena (once, before the first session), capped at
    ``cap`` bytes (None: no cap). A process-wide setting: call it at the CLI edge or in a probe.

    Raises:
        RuntimeError: called twice with different caps (onnxruntime cannot unregister).
    """
    if "cap" in _ARENA:
        if _ARENA["cap"] != cap:
            raise RuntimeError(f"the arena is already registered with cap {_ARENA['cap']}")
        return
    info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0,
                             ort.OrtMemType.DEFAULT)
    cfg = {"max_mem": int(cap) if cap else 0, "arena_extend_strategy": 0}
    ort.create_and_register_allocator(info, ort.OrtArenaCfg(cfg))
    _ARENA["cap"] = cap


def arena_cap() -> int | None:
    return _ARENA.get("cap")


def is_out_of_memory(exc: BaseException) -> bool:
    """True for onnxruntime's failure to allocate past the arena's cap."""
    text = str(exc)
    return "Available memory of" in text or "Failed to allocate memory" in text


# Providers the training graphs run on. TensorRT builds an engine per input shape, which the
# changing ranks and micro-batches of training would rebuild again and again: a profile may list
# it, but training uses CUDA for it.
TRAINING_PROVIDERS = ("CUDAExecutionProvider", "CPUExecutionProvider")


def resolve_device(cfg: SessionConfig, available: list[str] | None = None) -> tuple[str, str]:
    """(onnxruntime device name, one line saying what was chosen) for ``cfg.device``.

    ``auto``: the profile's providers (or CUDA, then CPU) that this onnxruntime build offers.

    Raises:
        UserError: ``--device cuda`` where this onnxruntime has no CUDA provider.
    """
    have = list(available if available is not None else ort.get_available_providers())
    if cfg.device == "cpu":
        return "cpu", "device: CPU"
    if cfg.device == "cuda":
        if "CUDAExecutionProvider" not in have:
            raise UserError("--device cuda: this onnxruntime build has no CUDA provider "
                            f"(available: {', '.join(have)}); install onnxruntime-gpu in its "
                            "place (pip uninstall -y onnxruntime, then pip install "
                            "onnxruntime-gpu: the two builds share one folder) or use --device "
                            "cpu")
        return "cuda", "device: CUDA"
    wanted = list(cfg.profile_providers or TRAINING_PROVIDERS)
    if any(p in wanted for p in ("CUDAExecutionProvider", "TensorrtExecutionProvider")):
        if "CUDAExecutionProvider" in have:
            return "cuda", "device auto: CUDA (this onnxruntime build has it)"
        # (session 38 probe: "the profile lists" where no profile was given)
        who = "the profile lists" if cfg.profile_providers else "no --profile: trying"
        return "cpu", (f"device auto: {who} a GPU provider, but this onnxruntime build has "
                       "only " + ", ".join(have) + "; using CPU")
    return "cpu", "device auto: CPU (the profile lists no GPU provider)"


def providers_for(cfg: SessionConfig) -> list[str]:
    """Execution providers for the sessions of ``cfg``."""
    device, _ = resolve_device(cfg)
    return ["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "cuda" else \
        ["CPUExecutionProvider"]


class SharedWeights:
    """The bundle's frozen weights, memory-mapped once and handed to every session."""

    def __init__(self, bundle: Bundle) -> None:
        self.bundle = bundle
        self.tensors = bundle.manifest.weights
        self.by_graph = bundle.manifest.graph_weights
        self._fd = bundle.open_weights()
        self._map: mmap.mmap | None = None
        if self._fd is not None and os.fstat(self._fd).st_size:
            self._map = mmap.mmap(self._fd, 0, prot=mmap.PROT_READ)
        self._values: dict[str, ort.OrtValue] = {}

    def close(self) -> None:
        self._values.clear()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    def lookup(self, table: str, ids: np.ndarray) -> np.ndarray:
        """Rows ``ids`` of the frozen ``table`` (an embedding lookup, ``Gather`` on axis 0),
        read with ``pread``: only those rows enter the process RSS, not the 64 KB around each
        one that a fault on the memory map would bring in.

        Raises:
            UserError: an id outside the table (data tokenised for another vocabulary).
        """
        t = self.tensors[table]
        shape, dtype = t.shape, np.dtype(t.dtype)
        row = int(np.prod(shape[1:])) * dtype.itemsize
        uniq, inverse = np.unique(np.asarray(ids).reshape(-1), return_inverse=True)
        if uniq.size and (uniq[0] < -shape[0] or uniq[-1] >= shape[0]):
            bad = uniq[-1] if uniq[-1] >= shape[0] else uniq[0]
            raise UserError(f"token id {int(bad)} is outside the {shape[0]}-row table '{table}'; "
                            "tokenise the data with the model's own vocabulary")
        rows = np.empty((uniq.size, row), np.uint8)
        for k, i in enumerate(uniq % shape[0]):
            os.preadv(self._fd, [rows[k]], t.offset + int(i) * row)
        return rows.view(dtype).reshape(uniq.size, *shape[1:])[inverse].reshape(
            *np.shape(ids), *shape[1:])

    def release(self) -> None:
        """Drop the mapped pages from this process's RSS (MADV_DONTNEED on a read-only file
        mapping: the next access faults them back in from the page cache)."""
        if self._map is not None and hasattr(mmap, "MADV_DONTNEED"):
            self._map.madvise(mmap.MADV_DONTNEED)

    def for_graph(self, graph_file: str) -> dict[str, ort.OrtValue]:
        out = {}
        for name in self.by_graph.get(graph_file, []):
            if name not in self._values:
                t = self.tensors[name]
                arr = np.ndarray(t.shape, dtype=np.dtype(t.dtype), buffer=self._map,
                                 offset=t.offset)
                self._values[name] = ort.OrtValue.ortvalue_from_numpy(arr)
            out[name] = self._values[name]
        return out


def make_session(bundle: Bundle, mode: str, part: str, cfg: SessionConfig,
                 shared: SharedWeights) -> ort.InferenceSession:
    """A session for one of the bundle's graphs, on the process arena.

    Raises:
        UserError: onnxruntime cannot load the graph (a damaged or incompatible bundle).
    """
    graph_file = bundle.graph_file(mode, part)
    so = ort.SessionOptions()
    for name, value in shared.for_graph(graph_file).items():
        so.add_initializer(name, value)
    so.execution_order = ort.ExecutionOrder.PRIORITY_BASED
    so.enable_mem_pattern = False
    if "cap" in _ARENA:
        so.add_session_config_entry("session.use_env_allocators", "1")
    else:
        so.enable_cpu_mem_arena = False
    # Basic (constant folding, redundant-node removal) by default: the extended fusions raised the
    # training peak by 30-55 % on the token-MLP benchmark (vanilla 438 -> 570 MB above idle).
    so.graph_optimization_level = {
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}[cfg.optimization]
    # Pre-packed copies of constant (frozen) weights cost ~30 MB per MiniLM session and defeat
    # the memory-mapping of weights.bin.
    so.add_session_config_entry("session.disable_prepacking", "1")
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if cfg.spinning else "0")
    so.log_severity_level = 4  # allocation failures past the cap are handled by the caller
    so.intra_op_num_threads = cfg.intra_threads
    so.inter_op_num_threads = 1
    providers: list = providers_for(cfg)
    if providers[0] == "CUDAExecutionProvider":
        providers[0] = ("CUDAExecutionProvider", cuda_options())
    session = load_graph(bundle, graph_file, so, providers)
    if providers[0] != "CPUExecutionProvider":
        check_provider_started(session)
    return session


def load_graph(bundle: Bundle, graph_file: str, so: ort.SessionOptions,
               providers: list) -> ort.InferenceSession:
    """A session of one of the bundle's graphs (a step's or the optimizer's), from its verified
    bytes, after ``check_external_data``; its external data resolves inside the bundle folder
    only (onnxruntime >= 1.19 checks the resolved path, symlinks included, stays inside it; a
    graph given as bytes otherwise resolved a relative location against the current folder,
    '..' allowed: session 40 probe, a tampered optimizer graph read a file outside the bundle).

    Raises:
        UserError: an unsafe graph, or one onnxruntime cannot load (a damaged bundle).
    """
    data = bundle.read_file(graph_file)
    check_external_data(bundle, graph_file, data)
    so.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                str(bundle.path.resolve()))
    # read as ONNX whatever the bytes say: onnxruntime reads its own flatbuffer (ORT) format
    # where bytes 4-7 are "ORTM", and the checks above read protobuf (session 46 probe: bytes
    # that are both hid a Loop from them)
    so.add_session_config_entry("session.load_model_format", "ONNX")
    try:
        return ort.InferenceSession(data, so, providers=providers)
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises several types
        raise UserError(f"onnxruntime cannot load {bundle.path / graph_file}: "
                        f"{ort_message(exc, 300)}; re-export the bundle") from None


def cuda_options() -> dict[str, str]:
    """The CUDA provider's options: full float32 matrix products (onnxruntime's default TF32
    rounds their inputs to 10 bits: on an H200 the losses of 20 steps then drifted up to 5e-3
    from the CPU's; with full float32 they agree to float32 noise), and under a budget the device
    arena gets the budget's hard cap."""
    options = {"use_tf32": "0"}
    if _ARENA.get("cap"):
        options.update(gpu_mem_limit=str(int(_ARENA["cap"])),
                       arena_extend_strategy="kNextPowerOfTwo")
    return options


def check_provider_started(session: ort.InferenceSession) -> None:
    """onnxruntime falls back to the CPU, silently at our log level, when its CUDA provider's
    libraries (CUDA runtime, cuBLAS, cuDNN) do not load: ``--device cuda`` would then train on
    the CPU under a GPU's plan.

    Raises:
        UserError: the session has no CUDA provider though one was asked for.
    """
    if "CUDAExecutionProvider" not in session.get_providers():
        raise UserError("--device cuda: onnxruntime's CUDA provider did not start (the CUDA "
                        "runtime, cuBLAS or cuDNN libraries that this onnxruntime-gpu build needs "
                        "did not load; see onnxruntime's CUDA requirements and LD_LIBRARY_PATH), "
                        "or use --device cpu")




def check_external_data(bundle: Bundle, graph_file: str, data: bytes) -> None:
    """Every tensor of a graph with external data must be a frozen weight the manifest lists for
    that graph, at its listed place in weights.bin (the runtime supplies those itself): a graph
    can name no other file or byte range, whatever onnxruntime version loads it. And no graph
    may loop (``LOOP_OPS``).

    Raises:
        UserError: any other external reference, or bytes that are not an ONNX model.
    """
    from contract.onnx_scan import LOOP_OPS, OnnxScanError, external_data_refs, op_types

    if data[4:8] == b"ORTM":  # (a clear line: the session, told to read ONNX, would fail on it)
        raise UserError(f"{bundle.path / graph_file} is in onnxruntime's ORT format, which no "
                        "bundle graph is; the bundle was tampered with or is not from "
                        "instant-runtime's exporter: re-export it")
    try:
        refs = external_data_refs(data)
        loops = sorted(op_types(data) & LOOP_OPS)
    except OnnxScanError as exc:
        raise UserError(f"{bundle.path / graph_file} is not a valid ONNX model ({exc}); "
                        "re-export the bundle") from None
    if loops:  # the exporter never writes one; a step must end (no trip count to trust)
        raise UserError(f"{bundle.path / graph_file} holds a {loops[0]} node, which no bundle "
                        "graph has; the bundle was tampered with or is not from instant-runtime's "
                        "exporter: re-export it")
    check_value_sizes(bundle, graph_file, data)
    listed = set(bundle.manifest.graph_weights.get(graph_file, []))
    weights = bundle.manifest.weights
    for ref in refs:
        w = weights.get(ref.tensor)
        if (ref.tensor not in listed or w is None or ref.location != names.WEIGHTS_FILE
                or ref.offset != w.offset or ref.length not in (None, w.length)):
            where = None if ref.location is None else ref.location[:80]
            raise UserError(f"{bundle.path / graph_file}: tensor '{ref.tensor[:80]}' points at "
                            f"external data {where!r} that the manifest does not list; "
                            "the bundle is damaged or was tampered with; re-export it")


# (bundle, forward graph, its sha256): its outputs, and the tensors it derives from values
# that change
_CHANGING: dict[tuple[str, str, str], tuple[set[str], set[str]]] = {}


def check_value_sizes(bundle: Bundle, graph_file: str, data: bytes) -> None:
    """No graph may size a tensor by values that change as the run trains: the trainable
    weights, the optimizer's state, INSTANT's bases (every graph input but the data, the labels
    and the frozen prefix's outputs), and in a backward graph the tensors its forward graph
    derived from those. The planning probes measure a step at the initial weights, so such a
    graph passes them and then grows past the budget (a session 44 probe: a tampered forward
    graph's Unique over a Range of the weights' distance from their start took 390 MB under
    --budget 256MB; onnxruntime's arena cap does not hold a Unique's working memory).

    Raises:
        UserError: a graph that does, or bytes that are not an ONNX model.
    """
    from contract.onnx_scan import OnnxScanError, main_graph, sized_by_values

    m = bundle.manifest
    fixed = {i.name for i in m.inputs} | {m.loss.labels.name, names.LOSS_SCALE}
    fixed |= set(m.prefix.outputs) if m.prefix is not None else set()
    forward = next((g.forward for g in m.graphs.values() if g.backward == graph_file), None)
    try:
        graph = main_graph(data)
        changing = {i for i in graph.inputs if i not in fixed}
        if forward is not None:  # the forward's outputs change only where derived from those
            entry = m.files.get(forward)  # (its hash: a bundle re-exported in place)
            key = (str(bundle.path), forward, getattr(entry, "sha256", ""))
            if key not in _CHANGING:
                fwd = main_graph(bundle.read_file(forward))
                derived = {i for i in fwd.inputs if i not in fixed}
                sized_by_values(fwd, derived)  # (its own check comes as it loads)
                _CHANGING[key] = (set(fwd.outputs), derived)
            outputs, derived = _CHANGING[key]
            changing = {i for i in changing if i not in outputs or i in derived}
        hit = sized_by_values(graph, changing)
    except OnnxScanError as exc:
        raise UserError(f"{bundle.path / graph_file} is not a valid ONNX model ({exc}); "
                        "re-export the bundle") from None
    if hit is not None:
        raise UserError(f"{bundle.path / graph_file}: its {hit[0]} node sizes a tensor by "
                        f"values that change as the run trains ('{hit[1][:80]}'), which no "
                        "memory plan can bound; no bundle graph does: the bundle was tampered "
                        "with or is not from instant-runtime's exporter: re-export it")


_RUN: list[ort.RunOptions] = []


def run_options() -> ort.RunOptions:
    """The RunOptions every training and evaluation run takes: ``abort_runs`` (the signal
    watchdog, ``checkpoint.StopSignals``) sets its terminate flag, which ends the run in progress
    with an error, where a Python signal handler cannot run until onnxruntime returns."""
    if not _RUN:
        _RUN.append(ort.RunOptions())
    return _RUN[0]


def abort_runs(on: bool = True) -> None:
    """Stop the run in progress and every later one (``on``), or let runs go on again."""
    run_options().terminate = on


def runs_aborted() -> bool:
    return bool(_RUN) and bool(_RUN[0].terminate)


def shrink_arena(session: ort.InferenceSession, feeds: dict, output: str) -> None:
    """Run ``session`` once with arena shrinkage on: free arena regions no tensor uses (after
    planning probes or a calibration, whose shapes differ from a step's)."""
    if not _ARENA:
        return
    ro = ort.RunOptions()
    ro.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
    session.run_with_ort_values([output], feeds, ro)
