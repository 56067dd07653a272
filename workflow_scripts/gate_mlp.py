"""The gate, a small MLP from a pooled utterance embedding to expert logits, and its file.

A gate file (the gating stage's `gating.safetensors`, a model folder's `gate.safetensors`) is one
safetensors file: the weights as tensors, and in the header's string metadata, as JSON, the MLP's sizes
(`config`) and the gate's record (`extra`: how its inputs were embedded). One file rather than weights
plus a JSON file beside them: it is written in one atomic rename, so sizes and weights cannot come from
two different saves, and a stage that declares it as an output tracks one file. Loading it runs no code
(no pickle), checks the sizes (model_files.check_gate_config) and compares the tensors' declared shapes
with them before any weight is read.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from torch import Tensor, nn

from workflow_scripts.atomic import atomic_file
from workflow_scripts.model_files import (
    POOLINGS,
    REDO,
    ModelFolderError,
    check_choice,
    check_gate_config,
    check_layer,
    check_shapes,
    read_header,
)

GATE_FORMAT = "moe-gate-v2"  # v1 was a torch pickle (gating.pt / gate.pt), no longer read


class GateMLP(nn.Module):
    """Utterance embedding -> expert logits. Inputs are standardised with stored training stats."""

    def __init__(self, input_dim: int, num_experts: int, hidden_dim: int = 256, dropout: float = 0.1):
        super().__init__()
        self.config = {"input_dim": input_dim, "num_experts": num_experts,
                       "hidden_dim": hidden_dim, "dropout": dropout}
        self.register_buffer("mean", torch.zeros(input_dim))
        self.register_buffer("std", torch.ones(input_dim))
        self.net = nn.Sequential(nn.Linear(input_dim, hidden_dim), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(hidden_dim, num_experts))

    @staticmethod
    def shapes(config: dict) -> dict[str, tuple[int, ...]]:
        """The state_dict's tensor shapes for a config: what a gate file must hold."""
        d, h, k = config["input_dim"], config["hidden_dim"], config["num_experts"]
        return {"mean": (d,), "std": (d,), "net.0.weight": (h, d), "net.0.bias": (h,), "net.3.weight": (k, h),
                "net.3.bias": (k,)}

    @torch.no_grad()
    def fit_standardization(self, embeddings: Tensor) -> None:
        """Set mean/std from training embeddings (N, input_dim); std floored so constant dims stay finite."""
        emb = self._check(embeddings)
        self.mean.copy_(emb.mean(0))
        self.std.copy_(emb.std(0, unbiased=False).clamp_min(1e-6))

    def _check(self, x: Tensor) -> Tensor:
        if x.dim() != 2 or x.shape[1] != self.config["input_dim"]:
            raise ValueError(f"gate expects embeddings of shape (batch, {self.config['input_dim']}), "
                             f"got {tuple(x.shape)}; use the pooling the gate was trained with")
        return x.to(self.mean.dtype)

    def forward(self, x: Tensor) -> Tensor:
        return self.net((self._check(x) - self.mean) / self.std)

    def route_logits(self, x: Tensor) -> Tensor:
        """Logits with dropout off, whatever the mode: the route an utterance takes must not depend on a
        dropout draw, so training routes it exactly as eval will. Dropout still regularises the
        supervised gate loss, which uses forward()."""
        h = (self._check(x) - self.mean) / self.std
        for layer in self.net:
            if not isinstance(layer, nn.Dropout):
                h = layer(h)
        return h


def save_gate(gate: GateMLP, path: str | os.PathLike, extra: dict | None = None) -> None:
    """The gate's weights, config and `extra` (JSON values) in one safetensors file, written atomically."""
    tensors = {name: t.detach().cpu().contiguous() for name, t in gate.state_dict().items()}
    metadata = {"format": GATE_FORMAT, "config": json.dumps(gate.config), "extra": json.dumps(extra or {})}
    with atomic_file(path) as f:
        f.write(safetensors_bytes(tensors, metadata=metadata))


def _metadata_json(path: Path, metadata: dict[str, str], key: str) -> object:
    try:
        return json.loads(metadata[key])
    except (KeyError, ValueError, RecursionError) as err:
        raise ModelFolderError(f"{path}: the header's {key!r} metadata is missing or not JSON; {REDO}") from err


def read_gate_file(path: str | os.PathLike) -> tuple[GateMLP, dict]:
    """Load a gate saved by :func:`save_gate`; returns (gate, extra)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"gate file {path} does not exist; train the gate first")
    metadata, shapes = read_header(path)
    if metadata.get("format") != GATE_FORMAT:
        raise ModelFolderError(f"{path} is not a gate file written by save_gate (format {GATE_FORMAT}); "
                               "rerun the gating stage")
    config = check_gate_config(_metadata_json(path, metadata, "config"), path)
    extra = _metadata_json(path, metadata, "extra")
    if not isinstance(extra, dict):
        raise ModelFolderError(f"{path}: the header's 'extra' metadata is not a JSON object; {REDO}")
    # The stages embed utterances the way the record says: checked like training.json's same fields.
    if "pooling" in extra:
        check_choice(extra["pooling"], path, "pooling", POOLINGS)
    if "layer" in extra:
        check_layer(extra["layer"], path)
    check_shapes(path, shapes, GateMLP.shapes(config))
    gate = GateMLP(**config)
    gate.load_state_dict(load_file(path))
    return gate, extra


def load_gate(path: str | os.PathLike) -> GateMLP:
    return read_gate_file(path)[0]
