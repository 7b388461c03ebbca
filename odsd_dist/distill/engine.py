"""The DeepSpeed side: config from `distill`, the trained module (student + method heads), the engine,
the consolidated fp32 student, and the per-rank state bytes that ZeRO saves.

The engine wraps `DistillModule`, which holds the student and the method (its heads train and
checkpoint with the student); the frozen teacher is held outside the module tree, so it is neither
trained, partitioned nor saved.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from ..optim import sgd, warmup_cosine


class DistillModule(nn.Module):
    """student + method heads; forward(fn, *args) runs fn(*args) inside the engine's forward.

    Methods compute their losses in functions of their own (methods/base.py); running them through the
    engine's forward is what lets ZeRO-3 gather the partitioned student parameters they use.
    """

    def __init__(self, student: nn.Module, method: nn.Module, teacher: Optional[nn.Module]):
        super().__init__()
        self.student = student
        self.method = method
        self.__dict__["teacher"] = teacher  # not a submodule

    def forward(self, fn: Callable, *args, **kwargs):
        return fn(*args, **kwargs)


def ds_config(dcfg, world: int) -> dict:
    """The DeepSpeed config: ZeRO stage, bf16, micro batch = distill.batch_size, no DS optimizer (a client one)."""
    zero: dict = {"stage": dcfg.zero_stage}
    if dcfg.zero_stage == 3:
        # small models: keep every parameter partitioned (the default threshold would keep most whole)
        zero.update({"stage3_param_persistence_threshold": 0, "stage3_max_live_parameters": int(1e9),
                     "stage3_prefetch_bucket_size": int(5e7)})
    if dcfg.zero_stage in (1, 2):
        zero.update({"reduce_bucket_size": int(5e7), "allgather_bucket_size": int(5e7),
                     "overlap_comm": dcfg.device == "cuda", "contiguous_gradients": True})
    return {
        "train_micro_batch_size_per_gpu": dcfg.batch_size,
        "train_batch_size": dcfg.batch_size * world,
        "gradient_accumulation_steps": 1,
        "zero_optimization": zero,
        "bf16": {"enabled": dcfg.dtype == "bf16"},
        # DeepSpeed >= 0.19 casts only the parameters to bf16 and keeps buffers at their dtype: BatchNorm
        # then gets bf16 weights beside fp32 running statistics, which torch's batch_norm rejects. Cast
        # the buffers too (what module.bfloat16() did); the exported student converts them back to fp32.
        **({"data_types": {"buffer_dtype": "bf16"}} if dcfg.dtype == "bf16" else {}),
        "gradient_clipping": dcfg.grad_clip,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def lr_factor(total_steps: int, warmup: int) -> Callable[[int], float]:
    """Linear warm-up over `warmup` steps, then cosine from 1 to 0 at `total_steps` (optim.warmup_cosine)."""
    return lambda step: warmup_cosine(step, total_steps, warmup)


def make_optimizer(params, dcfg) -> torch.optim.Optimizer:
    """The client optimizer DeepSpeed wraps: SGD with momentum (optim.sgd) or AdamW."""
    params = [p for p in params if p.requires_grad]
    if dcfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=dcfg.lr, weight_decay=dcfg.weight_decay)
    return sgd(params, lr=dcfg.lr, momentum=dcfg.momentum, weight_decay=dcfg.weight_decay)


def build_engine(module: nn.Module, dcfg, world: int, total_steps: int):
    """deepspeed.initialize with the client optimizer and the cosine schedule (checkpointed by DeepSpeed)."""
    import deepspeed

    opt = make_optimizer(module.parameters(), dcfg)
    factor = lr_factor(total_steps, dcfg.warmup_steps)
    engine, _, _, _ = deepspeed.initialize(
        model=module, optimizer=opt, config=ds_config(dcfg, world),
        lr_scheduler=lambda o: torch.optim.lr_scheduler.LambdaLR(o, factor),
    )
    _share_fp32_partitions(engine)
    return engine


def _share_fp32_partitions(engine) -> None:
    """ZeRO-3 in fp32: let the optimizer update the module's own parameter partition in place.

    DeepSpeed 0.19 means to skip its fp32 master copy when the partition is already fp32 on the right
    device, but compares `tensor.device` with the device *string*, which is never equal, so every fp32
    run carries a second copy of its partition (docs/BENCHMARKS.md, "ZeRO memory"). Re-pointing the
    master tensor at the partition's storage is what that branch does: the optimizer object, its state
    keys and the checkpoint layout stay the same; the copy back after each step becomes a no-op.
    """
    opt = engine.optimizer
    masters, parts = getattr(opt, "fp32_partitioned_groups_flat", None), getattr(opt, "fp16_partitioned_groups_flat", None)
    if not masters or not parts or len(masters) != len(parts):
        return
    for m, p in zip(masters, parts):
        if (m.dtype == p.dtype == torch.float32 and m.device == p.device and m.numel() == p.numel()
                and m.data_ptr() != p.data_ptr()):
            m.data = p.data


def full_student_state(engine) -> dict[str, torch.Tensor]:
    """The student's full fp32 state dict, gathered across ranks (collective: every rank must call it).

    Parameters come from the fp32 master copy where DeepSpeed keeps one (bf16, ZeRO 1-3), gathered
    for ZeRO-3; buffers (BatchNorm statistics) are never partitioned and come from this rank.
    """
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    student = engine.module.student
    stage = engine.zero_optimization_stage()
    out: dict[str, torch.Tensor] = {}
    for name, p in student.named_parameters():
        v = None
        if stage > 0 or hasattr(p, "_hp_mapping"):
            v = safe_get_full_fp32_param(p)
        if v is None:
            if hasattr(p, "ds_tensor"):
                with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                    v = p.detach().clone()
            else:
                v = p.detach()
        out[name] = v.float().cpu().clone()
    for name, b in student.named_buffers():
        out[name] = b.detach().cpu().clone() if not b.is_floating_point() else b.detach().float().cpu().clone()
    return out


def _storages(tensors) -> dict[int, int]:
    out: dict[int, int] = {}
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.numel():
            s = t.untyped_storage()
            out[s.data_ptr()] = s.nbytes()
    return out


def rank_state_bytes(engine) -> dict[str, int]:
    """This rank's parameter bytes and optimizer-state bytes (fp32 master copies + moments), by storage.

    Parameters: the rank's ZeRO-3 partition (`ds_tensor`) or the whole parameter. Optimizer state: the
    tensors the innermost torch optimizer updates (DeepSpeed's fp32 partitions, when they are not the
    module parameters themselves) and its state (momentum, Adam moments).
    """
    params = []
    for p in engine.module.parameters():
        params.append(p.ds_tensor if hasattr(p, "ds_tensor") else p.data)
    pstore = _storages(params)
    inner = engine.optimizer
    while not isinstance(inner, torch.optim.Optimizer) and hasattr(inner, "optimizer"):
        inner = inner.optimizer
    opt_tensors = [p for g in inner.param_groups for p in g["params"]]
    for st in inner.state.values():
        opt_tensors.extend(v for v in st.values() if isinstance(v, torch.Tensor))
    for attr in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat", "fp32_groups_flat_partition"):
        opt_tensors.extend(getattr(engine.optimizer, attr, None) or [])
    ostore = {k: v for k, v in _storages(opt_tensors).items() if k not in pstore}
    return {"param_bytes": sum(pstore.values()), "optimizer_bytes": sum(ostore.values())}
