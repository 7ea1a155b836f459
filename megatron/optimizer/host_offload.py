"""AdamW with its state in host memory and its step on the CPU; the parameters stay on the GPU.

``--cpu-optimizer`` (Megatron-DeepSpeed), ``--optimizer-cpu-offload`` (Megatron-LM) and
DeepSpeed's ``zero_optimization.offload_optimizer``: the optimizer's two fp32 moments and an
fp32 copy of each parameter (its ZeRO shard) live in host memory, pinned where CUDA exists.
A step copies the gradients (and the parameters, which are the fp32 masters of this code
base and so are read back rather than mirrored) to the host, runs PyTorch's fused CPU AdamW
(``torch.optim.adam.adam``, the update ``torch.optim.AdamW`` makes) and copies the updated
parameters back. The GPU keeps the parameters and gradients; the 8 bytes per parameter of
optimizer state leave it.

The state dict is ``torch.optim.AdamW``'s (``step``, ``exp_avg``, ``exp_avg_sq`` per
parameter; under ZeRO DTensors sharded as the parameters, their local shards on the host):
checkpoints move between this optimizer and the GPU one either way.

Offloading the parameters too is FSDP2's ``CPUOffloadPolicy`` (``--cpu-offload-params``,
:func:`megatron.core.distributed.fsdp.shard_model_for_zero`): then the parameters are on the
host and the ordinary AdamW steps there.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._dtensor_spec import DTensorSpec, TensorMeta
from torch.optim.adam import adam

from megatron.optimizer.adamw import ADAMW_GROUP_FLAGS


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


class HostOffloadAdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay) whose state and step are on the host."""

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        pin_memory: bool = True,
    ) -> None:
        # The keys of torch.optim.AdamW's groups, so that state dicts move either way.
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay,
                    **ADAMW_GROUP_FLAGS}  # fmt: skip
        super().__init__(params, defaults)
        self.pin_memory = pin_memory and torch.cuda.is_available()
        self._master: dict[torch.Tensor, tuple[torch.Tensor, torch.Tensor]] = {}

    def _host_empty(self, like: torch.Tensor) -> torch.Tensor:
        pin = self.pin_memory and like.is_cuda
        return torch.empty(like.shape, dtype=torch.float32, device="cpu", pin_memory=pin)

    def _as_state(self, p: torch.Tensor, host: torch.Tensor) -> torch.Tensor:
        """``host`` (``p``'s local shard, in host memory) as ``p`` is: a DTensor under ZeRO.

        Built around ``host`` itself, as FSDP2's CPU offload builds its parameters:
        ``DTensor.from_local`` would copy it onto the device of a CUDA mesh."""
        if isinstance(p, DTensor):
            meta = TensorMeta(p.shape, p.stride(), host.dtype)
            spec = DTensorSpec(p.device_mesh, tuple(p.placements), tensor_meta=meta)
            return DTensor(host, spec, requires_grad=False)
        return host

    def _to_host(self, p: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        local = _local(p)
        host = self._host_empty(local)
        host.copy_(_local(value))
        return self._as_state(p, host)

    def _init_state(self, p: torch.Tensor) -> dict:
        local = _local(p)
        state = self.state[p]
        state["step"] = torch.tensor(0.0)
        state["exp_avg"] = self._as_state(p, self._host_empty(local).zero_())
        state["exp_avg_sq"] = self._as_state(p, self._host_empty(local).zero_())
        return state

    def _buffers(self, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Host fp32 (parameter, gradient) buffers of ``p``'s local shard."""
        if p not in self._master:
            local = _local(p)
            self._master[p] = (self._host_empty(local), self._host_empty(local))
        return self._master[p]

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """One AdamW update of every parameter with a gradient (the others are left alone)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        todo = []
        for group in self.param_groups:
            work = []
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p] or self._init_state(p)
                master, grad = self._buffers(p)
                master.copy_(_local(p), non_blocking=True)
                grad.copy_(_local(p.grad), non_blocking=True)
                work.append((p, master, grad, state))
            todo.append((group, work))
        if torch.cuda.is_available() and any(p.is_cuda for _, w in todo for p, *_ in w):
            torch.cuda.current_stream().synchronize()  # the copies to the host have landed
        for group, work in todo:
            if not work:
                continue
            beta1, beta2 = group["betas"]
            adam(
                [m for _, m, _, _ in work],
                [g for _, _, g, _ in work],
                [_local(s["exp_avg"]) for *_, s in work],
                [_local(s["exp_avg_sq"]) for *_, s in work],
                [],
                [s["step"] for *_, s in work],
                amsgrad=False,
                has_complex=False,
                beta1=beta1,
                beta2=beta2,
                lr=group["lr"],
                weight_decay=group["weight_decay"],
                eps=group["eps"],
                maximize=False,
                foreach=False,
                capturable=False,
                differentiable=False,
                fused=True,
                grad_scale=None,
                found_inf=None,
                decoupled_weight_decay=True,
            )
            for p, master, _, _ in work:
                _local(p).copy_(master, non_blocking=True)
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        """As ``torch.optim.Optimizer.load_state_dict`` (parameters matched by position),
        except that the moments go straight to host memory, never through the GPU."""
        groups, saved_groups = self.param_groups, state_dict["param_groups"]
        if len(groups) != len(saved_groups) or any(
            len(g["params"]) != len(s["params"]) for g, s in zip(groups, saved_groups)
        ):
            raise ValueError("loaded state dict has a different number of parameters or groups")
        by_id = {
            saved_id: p
            for g, s in zip(groups, saved_groups)
            for saved_id, p in zip(s["params"], g["params"])
        }
        self.state.clear()
        self._master.clear()
        for saved_id, values in state_dict["state"].items():
            p = by_id[saved_id]
            self.state[p] = {
                "step": torch.tensor(float(values["step"])),
                "exp_avg": self._to_host(p, values["exp_avg"]),
                "exp_avg_sq": self._to_host(p, values["exp_avg_sq"]),
            }
        for g, s in zip(groups, saved_groups):
            g.update({k: v for k, v in s.items() if k != "params"})
