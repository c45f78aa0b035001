"""Process settings that make training faster on CPU hosts, applied only where the user set none.

Call `configure_cpu()` at the very start of a script, before JAX creates its backend (the first
`jax.devices()`, array or jit call); XLA reads `XLA_FLAGS` once, at that moment.

    from flaxformer_lite import perf
    perf.configure_cpu()          # then import and use jax as usual

What it does (each measured by `experiments/benchmark.py`, see docs/performance.md):
- `XLA_FLAGS`: adds the flags in `CPU_XLA_FLAGS` whose names are not already in the variable, so
  a flag you set always wins.
- glibc malloc: raises the mmap and trim thresholds with `mallopt`, so XLA's step buffers are
  reused instead of being unmapped and faulted in again every step. Skipped when the
  `MALLOC_MMAP_THRESHOLD_` / `MALLOC_TRIM_THRESHOLD_` variables are set or another allocator
  (jemalloc, tcmalloc) is preloaded.

Those thresholds stop at 32 MiB; glibc still maps every larger block (and, from a thread's
own heap, every block past 64 MiB) afresh and returns it on free, so a model whose step buffers
are large faults them in again on every step (the 6-layer d_model-384 GPT at batch 64 x 256:
~0.97M page faults and ~5 s of kernel time per 15 s step). Two allocator settings fix that,
and both must be in place when the process starts:
- jemalloc preloaded, when installed (Debian/Ubuntu: `apt install libjemalloc2`): the
  0.8M-parameter Shakespeare run went from ~19M minor page faults and 162 s to 0.2M and 122 s.
- otherwise glibc's malloc on transparent huge pages (`GLIBC_TUNABLES=glibc.malloc.hugetlb=1`,
  glibc >= 2.35, kernel mode "madvise"): ~4k page faults per step of that GPT instead of 0.97M;
  its one-device step 1.11x faster and the small model's 1.35x, about level on two devices
  (1.04x and 1.00x; one run each on a 2-core AMD EPYC).
Two ways to get them:

    python -m flaxformer_lite.perf experiments/lm.py --config=...   # allocator + XLA flags
    perf.relaunch_with_fast_malloc()   # first line of a script: re-executes it with them

`allocator_env()` gives the same environment for other launchers.

`step_compiler_options(devices)` gives the compile options `training.Engine` builds its train
and eval steps with: on Intel CPUs, matmuls through oneDNN (~11% off the Shakespeare model's
train step, ~15% off its eval step, on a Sapphire Rapids Xeon; 4-8% slower on an AMD EPYC, so
not used there).

`enable_compilation_cache()` turns on JAX's persistent compilation cache, so a rerun (or any
run of the same shapes) loads compiled programs from disk instead of compiling them again: on
the Shakespeare model the init took 3.7 s to compile on a first run and 0.35 s to load on a
rerun, the sampler 2.3 s and 0.13 s. XLA cannot serialize programs that call oneDNN, so on Intel
CPUs the train and eval steps are compiled on every run (~2 s and ~0.5 s there); elsewhere they
are cached too. The experiment scripts call it; the library never does.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import re
import sys
import threading
import warnings

# XLA:CPU flags added when absent from XLA_FLAGS. An empty value for the YNN fusion type turns
# off YNNPACK dot fusions, whose small matmuls are slower than XLA's own on x86 CPUs.
CPU_XLA_FLAGS: dict[str, str] = {
    "--xla_cpu_experimental_ynn_fusion_type": "",
}

# XLA:CPU compile options for the training and evaluation steps (see `step_compiler_options`):
# every matmul (dot) runs as its own oneDNN call instead of XLA's Eigen kernel. Measured on two
# 2-core x86 CPUs, the same step compiled both ways and timed in alternation (same loss):
# - Intel Xeon (Sapphire Rapids, AVX-512): the Shakespeare model's train step 0.88-0.99x the
#   time (0.885x over 12 rounds), its eval step at batch 128 0.84-0.88x, the
#   6-layer/384/context-256 model's train step 0.96x.
# - AMD EPYC (Zen 3, AVX2): the Shakespeare model's train step 1.04x and 1.08x the time, on
#   one device and on two; slower, and the program cannot be cached (see below).
# So they are used by default on Intel CPUs only (`FLAXFORMER_LITE_ONEDNN=1` or `=0` decides
# instead).
CPU_STEP_COMPILER_OPTIONS: dict[str, object] = {
    "xla_cpu_use_onednn": True,
    "xla_cpu_experimental_onednn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT",
}
_ONEDNN_SWITCH = "FLAXFORMER_LITE_ONEDNN"

# glibc mallopt parameters (malloc.h) and the value used for both: the largest mmap threshold
# glibc accepts on 64-bit hosts (32 MiB) and a trim threshold that keeps freed memory mapped.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD = 32 * 1024 * 1024
_TRIM_THRESHOLD = 4 * 1024 * 1024 * 1024 - 1

# jemalloc options: keep freed pages mapped and never give them back during the run.
JEMALLOC_CONF = "retain:true,dirty_decay_ms:-1,muzzy_decay_ms:-1"

# glibc tunable (GLIBC_TUNABLES, read when a process starts) that madvises the memory malloc
# maps as transparent huge pages; see `hugepage_env`.
GLIBC_HUGEPAGE_TUNABLE = "glibc.malloc.hugetlb=1"


def _backend_initialized() -> bool:
    try:
        from jax._src import xla_bridge
    except ImportError:  # jax not installed or layout changed: assume not yet
        return False
    return bool(getattr(xla_bridge, "_backends", None))


def _flag_names(flags: str) -> set[str]:
    return {f.split("=", 1)[0] for f in flags.split()}


def _switched_off(variable: str) -> bool:
    """True when the environment variable `variable` is set to 0 or false."""
    return os.environ.get(variable, "") in ("0", "false", "False")


def _other_allocator(env=None) -> bool:
    preload = (os.environ if env is None else env).get("LD_PRELOAD", "")
    return any(name in preload for name in ("jemalloc", "tcmalloc", "mimalloc"))


def _tune_glibc_malloc() -> bool:
    if _other_allocator() or any(
            v in os.environ for v in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")):
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS)
        return False
    ok = mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD) == 1
    return ok and mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD) == 1


def configure_cpu(*, xla_flags: bool = True, malloc: bool = True) -> dict[str, object]:
    """Apply the CPU settings described in the module docstring where the user set none.

    Returns what was applied: `{"xla_flags": [added flags], "malloc": bool}`. Warns (and adds no
    flags) if JAX's backend already exists, since XLA would ignore them.
    """
    applied: dict[str, object] = {"xla_flags": [], "malloc": False}
    if xla_flags:
        if _backend_initialized():
            warnings.warn("flaxformer_lite.perf.configure_cpu() was called after JAX created "
                          "its backend, so XLA_FLAGS cannot change; call it before using jax.",
                          stacklevel=2)
        else:
            current = os.environ.get("XLA_FLAGS", "")
            have = _flag_names(current)
            added = [f"{k}={v}" for k, v in CPU_XLA_FLAGS.items() if k not in have]
            if added:
                os.environ["XLA_FLAGS"] = " ".join([current, *added]).strip()
            applied["xla_flags"] = added
    if malloc:
        applied["malloc"] = _tune_glibc_malloc()
    return applied


def cpu_vendor(cpuinfo: str = "/proc/cpuinfo") -> str:
    """The host CPU's vendor string from /proc/cpuinfo ("GenuineIntel", "AuthenticAMD", ...);
    "" where there is none (not Linux, not x86)."""
    try:
        with open(cpuinfo, encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def _onednn_by_default() -> bool:
    """Whether the CPU steps use oneDNN: `FLAXFORMER_LITE_ONEDNN` when set, else on Intel CPUs
    (where it was measured faster; see `CPU_STEP_COMPILER_OPTIONS`)."""
    if _switched_off(_ONEDNN_SWITCH):
        return False
    if os.environ.get(_ONEDNN_SWITCH, "") in ("1", "true", "True"):
        return True
    return cpu_vendor() == "GenuineIntel"


def step_compiler_options(devices) -> dict[str, object]:
    """XLA compile options for a train or eval step that runs on `devices` (`jax.Device`s).

    On Intel CPUs, `CPU_STEP_COMPILER_OPTIONS` (matmuls through oneDNN) less any option that
    `XLA_FLAGS` already names, so a flag you set wins; `{}` for accelerators and other CPUs.
    `FLAXFORMER_LITE_ONEDNN=0` turns the options off everywhere, `=1` on for every CPU. Options
    apply to one compiled program, not the process, which is why `Engine` can use them without
    `configure_cpu()`.
    """
    devices = list(devices)
    if (not devices or any(d.platform != "cpu" for d in devices)
            or not _onednn_by_default()):
        return {}
    have = _flag_names(os.environ.get("XLA_FLAGS", ""))
    return {k: v for k, v in CPU_STEP_COMPILER_OPTIONS.items() if f"--{k}" not in have}


def lower_thread_priority(increment: int = 10) -> bool:
    """Raise the calling thread's nice value by `increment` (Linux, where each thread has its
    own); True if done. Background compilations call it so that the work the main thread
    waits for gets the CPU first. Elsewhere a thread id is not a process id, so nothing is done.
    """
    if not sys.platform.startswith("linux"):
        return False
    tid = threading.get_native_id()
    try:
        os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + increment)
    except OSError:
        return False
    return True


def compile_in_background(lower, name: str = "compile-in-background") -> threading.Thread:
    """Start `lower().compile()` on a daemon thread of lower priority; returns the thread.

    `lower` returns a `jax.stages.Lowered` (`lambda: jitted.lower(*args)` traces on the thread
    too; `lambda: lowered` keeps the tracing on the caller's). The executable lands in JAX's
    cache, where a later call with arguments of the same shapes, dtypes and placement finds it;
    join the thread before that call so it does not compile a second copy. Failures are left
    for that call to raise, with a useful traceback.
    """
    def run():
        lower_thread_priority()
        try:
            lower().compile()
        except Exception:  # the real call raises it
            pass

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    return thread


class CompiledAhead:
    """A jitted (or pmapped) function whose compilation can start ahead, in the background.

        sample = perf.CompiledAhead(jax.jit(sample_fn))
        sample.warm_up(params, rng)   # traces, then compiles on a thread; returns once traced
        ...                           # other work: XLA compiles without holding the GIL
        out = sample(params, rng)     # waits for that compilation, then runs it from the cache

    `warm_up(*args)` traces on the caller's thread, so errors raise there, and lowers and
    compiles on the thread (arguments may be `jax.ShapeDtypeStruct`s);
    `compile_ahead(lowered)` compiles a program already lowered on the caller's thread, for
    tracing that needs the caller's context (a mesh, logical axis rules). Both go through
    `compile_in_background`. A call waits for every pending compilation first, so the
    executable is found in JAX's cache and nothing compiles twice; the training `Engine`
    wraps its steps in this, and the experiment scripts their sampler and beam search.
    """

    def __init__(self, fn):
        self.fn = fn
        self._pending: list[threading.Thread] = []

    def warm_up(self, *args, **kwargs) -> None:
        """Trace for arguments shaped like these, then compile in the background; returns once
        traced. Tracing here, on the caller's thread, raises a bad argument (a temperature of
        0, a model of the wrong kind) now, not at the first call, maybe hours of training
        later. (A pmapped function, which cannot be traced apart, traces on the thread.)"""
        if hasattr(self.fn, "trace"):
            traced = self.fn.trace(*args, **kwargs)
            self._pending.append(compile_in_background(traced.lower))
        else:
            self._pending.append(compile_in_background(lambda: self.fn.lower(*args, **kwargs)))

    def compile_ahead(self, lowered, name: str = "compile-in-background") -> None:
        """Start compiling `lowered` (this function's `lower(...)`, traced by the caller)."""
        self._pending.append(compile_in_background(lambda: lowered, name=name))

    @property
    def compiling(self) -> bool:
        """Whether a background compilation has not been waited for yet."""
        return bool(self._pending)

    def wait(self) -> None:
        """Block until every background compilation started so far has finished."""
        while self._pending:
            self._pending.pop().join()

    def lower(self, *args, **kwargs):
        return self.fn.lower(*args, **kwargs)

    def __call__(self, *args, **kwargs):
        if self._pending:
            self.wait()
        return self.fn(*args, **kwargs)


_CACHE_SWITCH = "FLAXFORMER_LITE_COMPILATION_CACHE"


def default_cache_dir() -> str:
    """`$XDG_CACHE_HOME/flaxformer_lite/jax` (default `~/.cache/flaxformer_lite/jax`)."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "flaxformer_lite", "jax")


def enable_compilation_cache(directory: str | None = None, *,
                             min_compile_seconds: float = 0.5) -> str | None:
    """Turn on JAX's persistent compilation cache; returns its directory (None: left off).

    A directory the user already chose (`JAX_COMPILATION_CACHE_DIR` or
    `jax.config.jax_compilation_cache_dir`) wins over `directory`, which defaults to
    `default_cache_dir()`. `FLAXFORMER_LITE_COMPILATION_CACHE=0` leaves the cache off and any
    other value of it names the directory; one that cannot be created leaves the cache off with a
    warning. Only programs that took at least `min_compile_seconds` to compile are written. The
    cache is trusted code: keep it in a directory only you can write to.
    """
    import jax

    if _switched_off(_CACHE_SWITCH):
        return None
    switch = os.environ.get(_CACHE_SWITCH, "")
    chosen = jax.config.jax_compilation_cache_dir
    if not chosen:
        chosen = directory or switch or default_cache_dir()
        try:
            os.makedirs(chosen, exist_ok=True)
        except OSError as e:  # read-only home, say: run uncached rather than fail
            warnings.warn(f"Compilation cache left off: cannot create {chosen} ({e}).",
                          stacklevel=2)
            return None
        jax.config.update("jax_compilation_cache_dir", chosen)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", min_compile_seconds)
    return chosen


def jemalloc_path() -> str | None:
    """Path of the jemalloc shared library if one is installed (e.g. Debian's libjemalloc2)."""
    name = ctypes.util.find_library("jemalloc")
    if name is None:
        return None
    for d in ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64",
              "/usr/lib", "/usr/local/lib"):
        path = os.path.join(d, name)
        if os.path.exists(path):
            return path
    return name


def jemalloc_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """A copy of `env` (default `os.environ`) that preloads jemalloc in a child process.

    Puts jemalloc before anything already in `LD_PRELOAD`, unless that preloads an allocator
    (then the copy is unchanged, as when jemalloc is not installed); an existing `MALLOC_CONF`
    is kept.
    """
    env = dict(os.environ if env is None else env)
    path = jemalloc_path()
    if path is None or _other_allocator(env):
        return env
    env["LD_PRELOAD"] = " ".join(p for p in (path, env.get("LD_PRELOAD", "")) if p)
    env.setdefault("MALLOC_CONF", JEMALLOC_CONF)
    return env


def transparent_hugepages(path: str = "/sys/kernel/mm/transparent_hugepage/enabled") -> str:
    """The kernel's transparent huge page mode: "always", "madvise" or "never"; "" if unknown."""
    try:
        with open(path, encoding="ascii") as f:
            text = f.read()
    except OSError:
        return ""
    m = re.search(r"\[(\w+)\]", text)
    return m.group(1) if m else ""


def glibc_version() -> tuple[int, int] | None:
    """(major, minor) of the C library when it is glibc, else None."""
    try:
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()
        major, minor = version.split(".")[:2]
        return (int(major), int(minor)) if name == "glibc" else None
    except (AttributeError, ValueError, OSError):
        return None


def hugepage_env(env: dict[str, str] | None = None, *,
                 thp: str | None = None, glibc: tuple[int, int] | None = None) -> dict[str, str]:
    """A copy of `env` (default `os.environ`) whose `GLIBC_TUNABLES` has glibc's malloc back its
    blocks with transparent huge pages (`glibc.malloc.hugetlb=1`, glibc >= 2.35).

    Why: glibc hands blocks over 32 MiB (and every block of a thread's heap that outgrows 64 MiB)
    to mmap, and returns them on free, so XLA's step buffers are mapped and faulted in again on
    every step: ~0.97M page faults and ~5 s of kernel time per step of the 6-layer, d_model-384
    GPT at batch 64 x 256 (4 GB of buffers). With huge pages that is ~4k faults. Only added where
    it changes something: the kernel's mode is "madvise" (with "always" the pages are huge
    already; with "never" there are none), glibc is new enough, no other allocator is preloaded,
    and the user set no `glibc.malloc.hugetlb` of their own. `thp` and `glibc` override what this
    machine reports (for tests).
    """
    env = dict(os.environ if env is None else env)
    thp = transparent_hugepages() if thp is None else thp
    glibc = glibc_version() if glibc is None else glibc
    tunables = env.get("GLIBC_TUNABLES", "")
    if (thp != "madvise" or glibc is None or glibc < (2, 35) or _other_allocator(env)
            or "glibc.malloc.hugetlb" in tunables):
        return env
    env["GLIBC_TUNABLES"] = ":".join(t for t in (tunables, GLIBC_HUGEPAGE_TUNABLE) if t)
    return env


def allocator_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """A copy of `env` that gives a child process the faster allocator this machine has:
    jemalloc preloaded when installed (`jemalloc_env`), else glibc on huge pages
    (`hugepage_env`); unchanged when neither applies."""
    return jemalloc_env(env) if jemalloc_path() is not None else hugepage_env(env)


_RELAUNCHED = "FLAXFORMER_LITE_RELAUNCHED"


def _rerunnable() -> bool:
    """Whether executing this process's command line again would run the same program: not a
    script read from stdin (`python - < script.py`: already consumed, the rerun would read
    nothing and exit 0), nor an interactive session or a notebook kernel."""
    args = sys.orig_argv[1:]
    return bool(args) and sys.argv[:1] not in ([], [""], ["-"]) and not (
        sys.flags.interactive or hasattr(sys, "ps1") or "ipykernel" in sys.modules)


def relaunch_with_fast_malloc() -> bool:
    """Re-execute the running script once with a faster allocator (`allocator_env`): jemalloc
    preloaded when installed, else glibc's malloc on transparent huge pages.

    Call it first thing in a training script, before importing jax: both take effect only when
    a process starts. It returns False (and does nothing) when `allocator_env` would change
    nothing, the process was already relaunched, JAX has started, the program cannot be run
    again from its command line (a script on stdin, an interactive session, a notebook: use
    `python -m flaxformer_lite.perf script.py` there), or `FLAXFORMER_LITE_RELAUNCH=0` is
    set; otherwise it replaces the process (same pid, same arguments) and does not return.
    Measured: jemalloc took the small Shakespeare run from ~19M page faults to 0.2M and cut a
    quarter of its wall time; huge pages made the 6-layer d_model-384 GPT's one-device step
    1.11x faster (see docs/performance.md).
    """
    if (os.environ.get(_RELAUNCHED) or _switched_off("FLAXFORMER_LITE_RELAUNCH")
            or _backend_initialized() or not _rerunnable()):
        return False
    env = allocator_env()
    if env == dict(os.environ):
        return False
    env[_RELAUNCHED] = "1"
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
    return True  # not reached


def main(argv: list[str] | None = None) -> None:
    """`python -m flaxformer_lite.perf script.py [args]`: run a script with the faster allocator
    (`allocator_env`) and the CPU XLA flags."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m flaxformer_lite.perf script.py [args...]\n"
              "Runs the script with jemalloc preloaded (if installed; else glibc's malloc on "
              "transparent huge pages) and CPU XLA flags added to XLA_FLAGS where unset.")
        raise SystemExit(0 if argv else 2)
    env = allocator_env()
    have = _flag_names(env.get("XLA_FLAGS", ""))
    added = [f"{k}={v}" for k, v in CPU_XLA_FLAGS.items() if k not in have]
    env["XLA_FLAGS"] = " ".join([env.get("XLA_FLAGS", ""), *added]).strip()
    os.execve(sys.executable, [sys.executable, *argv], env)


if __name__ == "__main__":
    main()
