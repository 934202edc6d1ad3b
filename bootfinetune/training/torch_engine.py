"""The plain engine: one worker's model, optimizer and LR schedule in torch, without DeepSpeed.

`zero_stage="auto"` picks it for a run on one worker whose model states fit (`engine_choice`): there
DeepSpeed has nothing to shard or reduce, and its stage-0 engine only adds work: its forward and backward
hooks, timers, its own clipping and overflow checks in every step, and its import in every worker. An
explicit `zero_stage` (0 included) keeps DeepSpeed.

`TorchEngine` offers what the training loop uses of DeepSpeed's engine, with its semantics:
`engine(**batch)` is the module's forward (under bf16 autocast with `bf16`: float32 weights, gradients and
AdamW state, bf16 compute, as the Hugging Face Trainer's bf16 does); `backward(loss)` scales the loss by
1/accumsteps; `step()` counts micro batches and, on the last of each accumulation group, clips the gradients
to `max_grad_norm`, steps the optimizer and the schedule and counts `global_steps`.

Its checkpoints use the layout of DeepSpeed's stage-0 ones, so the export reads both alike:
`{dir}/{tag}/mp_rank_00_model_states.pt` holds {"module": state dict}, and `optim_states.pt` beside it the
optimizer, the schedule and the step counts. Both are tensors and plain containers, loaded back with
`torch.load(weights_only=True)` (no pickled code).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

MODEL_FILE = "mp_rank_00_model_states.pt"
"""The module's weights in a checkpoint tag (DeepSpeed's stage-0 name, read by the export)."""
OPTIM_FILE = "optim_states.pt"


class TorchEngine:
    """A model trained by a torch optimizer on one worker; see the module docstring."""

    def __init__(self, model: Any, optimizer: Any, scheduler: Any, *, accumsteps: int, max_grad_norm: float,
                 bf16: bool, device: Any):
        self.module = model.to(device)  # a no-op where build_engine moved it already
        self.optimizer, self.scheduler = optimizer, scheduler
        self.accumsteps, self.max_grad_norm, self.bf16 = max(1, int(accumsteps)), float(max_grad_norm), bf16
        self.device, self.device_type = device, getattr(device, "type", str(device))
        self.global_steps = 0
        self.micro_steps = 0
        self._params = [p for p in model.parameters() if p.requires_grad]

    def __call__(self, **inputs: Any) -> Any:
        import torch

        ctx = (torch.autocast(self.device_type, dtype=torch.bfloat16) if self.bf16 else contextlib.nullcontext())
        with ctx:
            return self.module(**inputs)

    def backward(self, loss: Any) -> None:
        (loss / self.accumsteps if self.accumsteps > 1 else loss).backward()

    def step(self) -> None:
        import torch

        self.micro_steps += 1
        if self.micro_steps % self.accumsteps:
            return
        if self.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self._params, self.max_grad_norm, foreach=True)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.global_steps += 1

    def train(self) -> None:
        self.module.train()

    def eval(self) -> None:
        self.module.eval()

    def get_lr(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]

    def save_checkpoint(self, save_dir: str, tag: str) -> None:
        import torch

        out = Path(save_dir) / tag
        out.mkdir(parents=True, exist_ok=True)
        torch.save({"module": self.module.state_dict()}, out / MODEL_FILE)
        torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                    "global_steps": self.global_steps, "micro_steps": self.micro_steps}, out / OPTIM_FILE)

    def load_checkpoint(self, load_dir: str, tag: str) -> None:
        import torch

        where = Path(load_dir) / tag
        model = torch.load(where / MODEL_FILE, map_location=self.device, weights_only=True)
        self.module.load_state_dict(model["module"])
        rest = torch.load(where / OPTIM_FILE, map_location=self.device, weights_only=True)
        self.optimizer.load_state_dict(rest["optimizer"])
        self.scheduler.load_state_dict(rest["scheduler"])
        self.global_steps, self.micro_steps = int(rest["global_steps"]), int(rest["micro_steps"])
