"""What a method's `train_step` works with (methods/base.py): the student's DeepSpeed engine, the frozen
teacher, the method's aux modules with their optimizers, and seeded randomness.

Aux modules (a generator, a discriminator) are data-parallel by hand: every rank holds the same copy,
gradients are averaged across ranks before each optimizer step and floating buffers (BatchNorm running
statistics, which each rank updates from its own batch) are averaged after it, so the copies stay equal.
They are saved by rank 0 beside the DeepSpeed checkpoint (`method_state.pt`) and loaded by every rank on
resume, which is the same under every ZeRO stage because they never enter the engine.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch import nn

METHOD_STATE = "method_state.pt"


def cosine_factor(step: int, total: int) -> float:
    """Cosine annealing from 1 to 0 over `total` steps (CosineAnnealingLR with eta_min 0)."""
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, step / max(1, total))))


class StepContext:
    """One per worker; `step` is the loop step being taken (0-based), set by the loop before each call."""

    def __init__(self, engine, teacher: Optional[nn.Module], method, *, seed: int, rank: int, world: int,
                 total_steps: int, dtype: torch.dtype, device: torch.device):
        self.engine, self.teacher, self.method = engine, teacher, method
        self.seed, self.rank, self.world = seed, rank, world
        self.total_steps, self.dtype, self.device = total_steps, dtype, device
        self.step = 0
        self.aux_total = method.aux_steps(total_steps)
        self._opt: dict[str, torch.optim.Optimizer] = {}
        self._aux_step: dict[str, int] = {}
        for name, a in method.aux.items():
            a.module.to(device)
            self._opt[name] = a.make_optimizer([p for p in a.module.parameters() if p.requires_grad])
            self._aux_step[name] = 0
            self._set_lr(name)

    @property
    def student(self) -> nn.Module:
        return self.engine.module.student

    # --- the student ---
    def forward(self, fn: Callable, *args, **kwargs):
        """Run `fn(*args)` inside the engine's forward (ZeRO-3 gathers the student's parameters there)."""
        return self.engine(fn, *args, **kwargs)

    def through_student(self, fn: Callable, *args, **kwargs):
        """Run `fn(*args)` outside the engine, for a loss whose gradient must reach only an aux module
        (`aux_step`): DeepSpeed hooks the engine's outputs to refuse any backward but its own. ZeRO-3
        still gathers the student's parameters through the hooks on its modules."""
        return fn(*args, **kwargs)

    def student_step(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)
        self.engine.step()

    # --- aux modules ---
    def aux_step(self, name: str, loss: torch.Tensor) -> None:
        """One optimizer step of aux module `name` on `loss`; gradients reach only that module.

        torch.autograd.grad leaves the student's parameters alone even when `loss` flows through the
        student (a generator fooling it): no gradient is accumulated and no ZeRO reduction hook fires.
        """
        module, opt = self.method.aux[name].module, self._opt[name]
        params = [p for p in module.parameters() if p.requires_grad]
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        for p, g in zip(params, grads):
            p.grad = torch.zeros_like(p) if g is None else g
        if self.world > 1 and dist.is_initialized():
            flat = torch.cat([p.grad.reshape(-1) for p in params])
            dist.all_reduce(flat)
            flat /= self.world
            off = 0
            for p in params:
                n = p.numel()
                p.grad.copy_(flat[off:off + n].view_as(p))
                off += n
        opt.step()
        opt.zero_grad(set_to_none=True)
        self._aux_step[name] += 1
        self._set_lr(name)
        self._sync_buffers(module)

    def _set_lr(self, name: str) -> None:
        f = self.method.aux[name].lr_factor
        if f is None:
            return
        opt = self._opt[name]
        for g in opt.param_groups:
            g.setdefault("initial_lr", g["lr"])
            g["lr"] = g["initial_lr"] * f(self._aux_step[name], self.aux_total)

    def _sync_buffers(self, module: nn.Module) -> None:
        if self.world <= 1 or not dist.is_initialized():
            return
        bufs = [b for b in module.buffers() if b.is_floating_point()]
        if not bufs:
            return
        flat = torch.cat([b.reshape(-1).float() for b in bufs])
        dist.all_reduce(flat)
        flat /= self.world
        off = 0
        for b in bufs:
            n = b.numel()
            b.copy_(flat[off:off + n].view_as(b))
            off += n

    # --- randomness ---
    def generator(self, tag: int = 0) -> torch.Generator:
        """A torch.Generator seeded from (run seed, step, rank, tag): a resumed step draws what it drew before."""
        g = torch.Generator(device=self.device)
        g.manual_seed((self.seed * 1_000_003 + self.step * 7_919 + self.rank * 104_729 + tag * 15_485_863)
                      & 0x7FFF_FFFF_FFFF)
        return g

    # --- checkpoint ---
    def state_dict(self) -> dict:
        return {"aux": {n: {"module": a.module.state_dict(), "optimizer": self._opt[n].state_dict(),
                            "step": self._aux_step[n]} for n, a in self.method.aux.items()},
                "extra": self.method.extra_state()}

    def save(self, folder: Path) -> None:
        """Rank 0 writes the method's state beside the DeepSpeed checkpoint (nothing when it has none)."""
        st = self.state_dict()
        if st["aux"] or st["extra"]:
            torch.save(st, Path(folder) / METHOD_STATE)

    def load(self, folder: Path) -> bool:
        path = Path(folder) / METHOD_STATE
        if not path.is_file():
            if self.method.aux:
                raise RuntimeError(f"{path}: the checkpoint has no state for the method's aux modules")
            return False
        st = torch.load(path, map_location=self.device, weights_only=True)
        for n, a in self.method.aux.items():
            rec = st["aux"][n]
            a.module.load_state_dict(rec["module"])
            self._opt[n].load_state_dict(rec["optimizer"])
            self._aux_step[n] = int(rec["step"])
            self._set_lr(n)
        self.method.load_extra_state(st.get("extra") or {})
        return True
