"""Named compile-only accelerators for ``python -m benchmarks --target NAME``.

A target is a device JAX can compile for on a CPU-only machine (``jax.experimental.topologies``):
an H100 or a B200 through the CUDA PJRT plugin and a ``GpuTargetConfigProto`` beside this file
(from openxla/xla ``xla/backends/gpu/target_config/specs``), TPUs through ``libtpu``. Nothing
runs: :mod:`benchmarks.hlo` prices the compiler's program with the peaks below.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

# libtpu takes a machine-wide lock unless told that other processes may load it too, and
# without a GPU the CUDA plugin (with it the compile-only H100) is not registered unless its
# check for CUDA libraries is skipped; compiling needs neither a chip nor those libraries.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")


@dataclasses.dataclass(frozen=True)
class Target:
    """``topology`` of one device and ``multi_topology`` of eight (``get_topology_desc``'s
    spelling); HBM ``bandwidth`` (bytes/s); dense matmul ``peak_flops`` by operand kind
    (``"bf16"``, ``"f32"`` at DEFAULT precision, ``"f32_high"``, ``"f32_highest"``); the
    ``(N, C)`` ``sizes`` (the cross_entropy goals at the last); ``linear_points``,
    ``((N, D, V), dtype)`` of the linear heads; a GPU's ``config_file``."""

    name: str
    platform: str  # "cuda" or "tpu"
    topology: str
    multi_topology: str
    bandwidth: float
    peak_flops: Mapping[str, float]
    description: str
    sizes: tuple[tuple[int, int], ...]
    linear_points: tuple[tuple[tuple[int, int, int], str], ...]
    config_file: str | None = None


@functools.cache
def devices(target_name: str, multi: bool = False) -> tuple[Any, ...]:
    """The compile-only devices of a target (one, or eight with ``multi``)."""
    from jax.experimental import topologies

    t = TARGETS[target_name]
    topology = t.multi_topology if multi else t.topology
    if t.platform != "cuda":
        return tuple(topologies.get_topology_desc(topology, t.platform).devices)
    config = (Path(__file__).resolve().parent / "targets" / str(t.config_file)).read_text()
    desc = topologies.get_topology_desc("", "cuda", target_config=config, topology=topology)
    return tuple(desc.devices)


_GRID = ((4096, 32768),)
_LLM = (8192, 4096, 131072)  # an 8B-class head: hidden 4096, vocabulary 128 Ki
_LLM_SMALL = (8192, 2048, 131072)
_TPU_SIZES = (*_GRID, (8192, 131072))  # a v5e's 16 GiB hold these f32 logits and gradient


def _tpu_peaks(bf16: float) -> dict[str, float]:
    """A TPU's MXU multiplies bf16: float32 at DEFAULT precision is one bf16 pass, HIGH three
    (bf16_3x), HIGHEST six (bf16_6x); the passes, not the dtype, set the time."""
    return {"bf16": bf16, "f32": bf16, "f32_high": bf16 / 3, "f32_highest": bf16 / 6}


# Peaks are dense (no 2:4 sparsity) tensor-core / MXU rates.
# - H100 SXM: NVIDIA H100 Tensor Core GPU datasheet: BF16 989 TFLOP/s, TF32 495 TFLOP/s,
#   FP32 (CUDA cores) 67 TFLOP/s; HBM3 3.35 TB/s (XLA's h100_sxm.txtpb: 3.35232e12 B/s, and its
#   matrix_unit_description gives the same BF16 rate: 132 SMs x 4 x 512 FMA x 2 x 1.8295 GHz).
#   XLA:GPU runs a float32 dot at DEFAULT (and HIGH) precision as TF32 on tensor cores; HIGHEST
#   is true float32 on the CUDA cores. bf16 inputs run at the BF16 rate.
# - B200: NVIDIA HGX B200 / DGX B200 specifications: BF16 2.25 PFLOP/s dense per GPU, HBM3e
#   8 TB/s (XLA's b200.txtpb says 7.67e12 B/s); TF32 1.11 PFLOP/s and FP32 74 TFLOP/s from
#   b200.txtpb's matrix and scalar unit rates (148 SMs x 4 x 512 FMA x 2 x 1.835 GHz;
#   148 x 128 x 2 x 1.965 GHz). Float32 precision as on the H100.
# - TPU v5e: Google Cloud TPU v5e documentation: 197 TFLOP/s bf16, 819 GB/s HBM2.
# - TPU v5p: Google Cloud TPU v5p documentation: 459 TFLOP/s bf16, 2765 GB/s HBM2e.
# - TPU v6e (Trillium): Google Cloud TPU v6e documentation: 918 TFLOP/s bf16, 1640 GB/s HBM.
TARGETS: dict[str, Target] = {
    t.name: t
    for t in (
        Target(
            "h100", "cuda", "1x1x1", "1x1x8", 3.35232e12,
            {"bf16": 989e12, "f32": 495e12, "f32_high": 495e12, "f32_highest": 67e12},
            "NVIDIA H100 SXM 80GB (XLA's published spec)",
            (*_GRID, (16384, 131072)), ((_LLM, "bf16"), (_LLM_SMALL, "f32")), "h100_sxm.txtpb",
        ),
        Target(
            "b200", "cuda", "1x1x1", "1x1x8", 8e12,
            {"bf16": 2250e12, "f32": 1112e12, "f32_high": 1112e12, "f32_highest": 74.4e12},
            "NVIDIA B200 (XLA's published spec)",
            (*_GRID, (16384, 131072)), ((_LLM, "bf16"),), "b200.txtpb",
        ),
        Target(
            "tpu-v5e", "tpu", "v5e:1x1", "v5e:2x4", 8.19e11, _tpu_peaks(197e12), "TPU v5e",
            _TPU_SIZES, ((_LLM_SMALL, "bf16"),),
        ),
        Target(
            "tpu-v5p", "tpu", "v5p:1x1x1", "v5p:2x2x2", 2.765e12, _tpu_peaks(459e12), "TPU v5p",
            _TPU_SIZES, ((_LLM_SMALL, "f32"), (_LLM_SMALL, "bf16"), (_LLM, "bf16")),
        ),
        Target(
            "tpu-v6e", "tpu", "v6e:1x1", "v6e:2x4", 1.64e12, _tpu_peaks(918e12), "TPU v6e",
            _TPU_SIZES, ((_LLM_SMALL, "bf16"),),
        ),
    )
}  # fmt: skip
