"""Model selection on validation answers: keep the adapter whose validation NLL is lowest.

An adapter trained on a few hundred answers grows overconfident long before its training loss stops falling; its
validation NLL turns back up at that point. `BestOnValidation` scores the validation answers every `every`
optimizer steps (and at the last step), keeps a copy of the trainable parameters of the best-scoring step, and
puts them back into the model at the end. Its state is plain data (numbers and tensors), so a checkpoint carries
it and a resumed run selects exactly what the uninterrupted run would have.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch

from . import calibration as C


class BestOnValidation:
    """score(model) -> (choice logits of the validation answers, their true choice indices); the trainable
    parameters of the step with the lowest mean NLL are kept (the first such step on ties)."""

    def __init__(self, every: int, score: Callable[[torch.nn.Module], tuple[list, list]]):
        if every < 1:
            raise ValueError(f"selection needs a scoring interval of at least 1 step, got {every}")
        self.every, self.score = every, score
        self.scores: list[dict] = []  # {"step", "val_nll", "val_nll_calibrated", "temperature"}
        self.best_step: int | None = None
        self.best_params: dict[str, torch.Tensor] = {}

    @property
    def best_nll(self) -> float:
        return min((s["val_nll"] for s in self.scores), default=math.inf)

    def due(self, step: int, total_steps: int) -> bool:
        return (step % self.every == 0 or step == total_steps) and not any(s["step"] == step for s in self.scores)

    def observe(self, model: torch.nn.Module, step: int) -> dict:
        """Score the validation answers now (the model is put in eval mode and back); keep the weights if best."""
        was_training = model.training
        model.eval()
        try:
            logits, true = self.score(model)
        finally:
            model.train(was_training)
        temperature = C.fit_temperature(logits, true)
        entry = {"step": step, "val_nll": C.mean_nll_at(logits, true, 1.0),
                 "val_nll_calibrated": C.mean_nll_at(logits, true, temperature), "temperature": temperature}
        if entry["val_nll"] < self.best_nll:
            self.best_step = step
            self.best_params = {n: p.detach().to("cpu", copy=True) for n, p in _trainable(model).items()}
        self.scores.append(entry)
        return entry

    def restore(self, model: torch.nn.Module) -> int:
        """Put the best step's parameters back into `model`; returns that step."""
        if self.best_step is None:
            raise RuntimeError("no validation score was recorded: nothing to select")
        params = _trainable(model)
        if set(params) != set(self.best_params):
            raise ValueError("the model's trainable parameters are not those the selection kept")
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(self.best_params[name].to(p.device, p.dtype))
        return self.best_step

    def summary(self) -> dict:
        """What metrics.json records: the interval, every score, and the step kept."""
        return {"every": self.every, "best_step": self.best_step, "scores": [dict(s) for s in self.scores]}

    def state_dict(self) -> dict:
        return {"every": self.every, "scores": [dict(s) for s in self.scores], "best_step": self.best_step,
                "best_params": dict(self.best_params)}

    def load_state_dict(self, state: Mapping) -> None:
        if state["every"] != self.every:
            raise ValueError(f"the checkpoint selected every {state['every']} steps, this run every {self.every}")
        self.scores = [dict(s) for s in state["scores"]]
        self.best_step, self.best_params = state["best_step"], dict(state["best_params"])


def _trainable(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}
