"""The `compile` setting of training, prediction and the benchmarks: "auto" | "on" | "off" or a torch.compile mode.

"auto" compiles on CUDA (where it pays: fewer kernel launches, fused elementwise work) and runs eagerly on the CPU,
where a first Inductor compile costs minutes for seconds of work; a caller says which mode "auto" means on CUDA
(training: CUDA graphs, see rwkvseg.train.run; prediction: the default mode). "on" is torch.compile's "default"
mode, and a mode name ("reduce-overhead", "max-autotune", ...) compiles in that mode. The backend is a separate
setting: "inductor" (code generation) is what users run; "aot_eager" traces the same graphs with eager kernels
(fast to build: what the CPU tests use). Compilation happens at the first call, so callers time that call apart
from the rest and report it ("compiled in X s").
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch

log = logging.getLogger(__name__)

COMPILE_SETTINGS = ("auto", "on", "off")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
COMPILE_BACKENDS = ("inductor", "aot_eager", "eager", "cudagraphs")


def check_compile(setting: str, backend: str = "inductor", name: str = "compile") -> None:
    """A clear error for a setting or backend that is not one of the choices."""
    if setting not in COMPILE_SETTINGS + COMPILE_MODES:
        raise ValueError(
            f"{name} = {setting!r} is not valid; choose auto, on, off or a torch.compile mode "
            f"({', '.join(COMPILE_MODES)})"
        )
    if backend not in COMPILE_BACKENDS:
        raise ValueError(f"{name}_backend = {backend!r} is not valid; choose one of {', '.join(COMPILE_BACKENDS)}")


def compile_mode(setting: str, device: torch.device | str, auto: str = "default") -> str | None:
    """The torch.compile mode a setting asks for on device, or None to run eagerly; "auto" means the mode `auto`
    on CUDA."""
    check_compile(setting)
    if auto not in COMPILE_MODES:
        raise ValueError(f"compile_mode(auto={auto!r}): choose one of {', '.join(COMPILE_MODES)}")
    if setting == "off" or (setting == "auto" and torch.device(device).type != "cuda"):
        return None
    return {"auto": auto, "on": "default"}.get(setting, setting)


def inductor_options(
    mode: str, freeze: bool = False, keep_conv_layouts: bool = False, extra: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Inductor's options for a torch.compile mode (torch.compile takes a mode or options, not both): the mode's
    own options, with keep_conv_layouts the KeepChannelsLast3d pass (rwkvseg.inductor_passes), with freeze
    Inductor's freezing (parameters folded in as constants: inference only), then extra (e.g. the bench's
    --inductor options, rwkvseg.cli.bench.inductor_settings)."""
    from torch import _inductor

    options: dict[str, Any] = dict(_inductor.list_mode_options(mode))
    if keep_conv_layouts:
        from .inductor_passes import KeepChannelsLast3d  # imports Inductor (about 1 s): only when compiling

        options["post_grad_custom_post_pass"] = KeepChannelsLast3d()
    if freeze:
        options["freezing"] = True
    options.update(extra or {})
    return options


def freezing(on: bool = True) -> contextlib.AbstractContextManager:
    """The context to call a torch.compile'd inference model in for Inductor's freezing (nullcontext when not on).
    Dynamo reads `torch._inductor.config.freezing` itself, while it traces the first call, to decide whether the
    parameters become constants of the graph; torch.compile's options reach only Inductor, so
    `options={"freezing": True}` alone (inductor_options(freeze=True)) leaves the weights graph inputs and folds
    nothing (seen with torch 2.13). Calls after the first may run outside it: the frozen graph is kept."""
    if not on:
        return contextlib.nullcontext()
    from torch._inductor import config  # imports Inductor (about 1 s): only when freezing

    return config.patch(freezing=True)


def prediction_freezes(device: torch.device | str) -> bool:
    """Whether prediction compiles its model frozen on device (docs/speed.md, "Inductor freezing"): on the
    CPU (BatchNorms folded, oneDNN's packed weights; 1.2-1.6x faster on 2 cores) and on CUDA (under CUDA graphs on
    an H100: 2D models 1.1-1.3x, a few MiB more at the peak; MMSegRWKV at 128^3 1.13x, 20 % less peak memory;
    prediction's default mode not timed frozen)."""
    return torch.device(device).type in ("cpu", "cuda")


def compile_callable(
    fn: Callable[..., Any],
    mode: str,
    backend: str = "inductor",
    fullgraph: bool = False,
    freeze: bool = False,
    dynamic: bool | None = False,
    keep_conv_layouts: bool = False,
    extra: Mapping[str, Any] | None = None,
) -> Any:
    """torch.compile(fn) with static shapes by default (a training step and a prediction batch keep their shape;
    the bench may pass dynamic=True or None); modes and the Inductor options of inductor_options (keep_conv_layouts,
    extra) only apply to Inductor. freeze (Inductor, inference only: fn's weights must not change after its first
    call): the weights become constants of the graph, and every call runs in `freezing()`."""
    options: dict[str, Any] = {"backend": backend, "fullgraph": fullgraph, "dynamic": dynamic}
    freeze = freeze and backend == "inductor"
    if backend == "inductor":
        options["options"] = inductor_options(mode, freeze=freeze, keep_conv_layouts=keep_conv_layouts, extra=extra)
    compiled = torch.compile(fn, **options)
    if not freeze:
        return compiled

    def frozen(*args: Any, **kwargs: Any) -> Any:
        with freezing():
            return compiled(*args, **kwargs)

    return frozen


def synchronize(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


class FirstCallTimed:
    """fn, whose first call is timed apart (synchronised) and logged as "compiled <what> in X s"; with fallback,
    a failure of that first call (a compiler error) is logged and the eager function is used instead."""

    def __init__(
        self, fn: Callable[..., Any], eager: Callable[..., Any], what: str, device: torch.device | str, fallback: bool
    ) -> None:
        self.fn, self.eager, self.what, self.device, self.fallback = fn, eager, what, torch.device(device), fallback
        self.first = True
        self.compile_seconds: float | None = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not self.first:
            return self.fn(*args, **kwargs)
        start = time.perf_counter()
        try:
            out = self.fn(*args, **kwargs)
        except Exception as err:  # a compiler failure in auto mode: run eagerly rather than not at all
            if not self.fallback:
                raise
            log.warning("compiling %s failed (%s: %s); running eagerly", self.what, type(err).__name__, err)
            self.fn = self.eager
            out = self.fn(*args, **kwargs)
        synchronize(self.device)
        self.compile_seconds = time.perf_counter() - start
        self.first = False
        if self.fn is not self.eager:
            log.info("compiled %s in %.1f s", self.what, self.compile_seconds)
        return out


def maybe_compile(
    fn: Callable[..., Any],
    setting: str,
    device: torch.device | str,
    what: str,
    backend: str = "inductor",
    fullgraph: bool = False,
    freeze: bool = False,
) -> Callable[..., Any]:
    """fn compiled as setting says for device (timed and logged at its first call), or fn itself; freeze: see
    compile_callable."""
    check_compile(setting, backend)
    mode = compile_mode(setting, device)
    if mode is None:
        return fn
    compiled = compile_callable(fn, mode, backend, fullgraph, freeze)
    return FirstCallTimed(compiled, fn, what, device, fallback=setting == "auto")
