"""Named compile-only accelerator targets for ``python -m benchmarks --target NAME``.

A target is a device JAX can compile for on a CPU-only machine (``jax.experimental.topologies``):
an H100 through the CUDA PJRT plugin and a ``GpuTargetConfigProto`` description shipped beside
this file, TPUs through ``libtpu``. Nothing runs on the device; the figures are the compiler's.
To add one, append a :class:`Target` to :data:`TARGETS` (a GPU needs its description file in
``benchmarks/targets/``, e.g. from openxla/xla ``xla/tools/hlo_opt/gpu_specs``).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

TARGET_DIR = Path(__file__).resolve().parent / "targets"


@dataclasses.dataclass(frozen=True)
class Target:
    """One compile-only device.

    Attributes:
      name: the ``--target`` name.
      platform: ``"cuda"`` or ``"tpu"`` (the PJRT plugin that compiles for it).
      topology: the topology of one device, as ``get_topology_desc`` spells it.
      multi_topology: the topology of eight devices (the sharding checks).
      bandwidth: HBM bytes per second (roofline time = modelled bytes / bandwidth).
      description: what the device is, for the table title.
      sizes: the ``(N, C)`` grid; the last is where the cross_entropy goals are judged (a TPU
        v5e's 16 GiB hold 8192×131072 float32 logits and their gradient, not 16384×131072).
      linear_points: ``((N, D, V), dtype)`` of linear_cross_entropy (temporaries only).
      config_file: the GPU target description (``GpuTargetConfigProto`` text), GPUs only.
    """

    name: str
    platform: str
    topology: str
    multi_topology: str
    bandwidth: float
    description: str
    sizes: tuple[tuple[int, int], ...]
    linear_points: tuple[tuple[tuple[int, int, int], str], ...]
    config_file: str | None = None

    def target_config(self) -> str | None:
        return None if self.config_file is None else (TARGET_DIR / self.config_file).read_text()


_GRID = ((4096, 32768),)
_LLM = (8192, 4096, 131072)  # an 8B-class head: hidden 4096, vocabulary 128 Ki
_LLM_SMALL = (8192, 2048, 131072)

TARGETS: dict[str, Target] = {
    t.name: t
    for t in (
        Target(
            "h100", "cuda", "1x1x1", "1x1x8", 3.35232e12,
            "NVIDIA H100 SXM 80GB (XLA's published spec)",
            (*_GRID, (16384, 131072)), ((_LLM, "bf16"), (_LLM_SMALL, "f32")), "h100_sxm.txtpb",
        ),
        Target(
            "tpu-v5e", "tpu", "v5e:1x1", "v5e:2x4", 8.19e11, "TPU v5e",
            (*_GRID, (8192, 131072)), ((_LLM_SMALL, "bf16"),),
        ),
        Target(
            "tpu-v5p", "tpu", "v5p:1x1x1", "v5p:2x2x2", 2.765e12, "TPU v5p",
            (*_GRID, (8192, 131072)), ((_LLM_SMALL, "f32"), (_LLM, "bf16")),
        ),
    )
}  # fmt: skip
