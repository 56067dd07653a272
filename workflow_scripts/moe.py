"""Mixture of LoRA experts on a frozen Whisper, routed per utterance by a small gate.

Why not PEFT multi-adapter: ``set_adapter`` freezes every other adapter (their gradients are
silently dropped) and ``adapter_names=`` mixed batches are inference-only. Here every target
Linear carries K LoRA pairs and a per-sample routing, so one backward pass reaches every routed
expert and the gate. Experts stay interchangeable with real PEFT LoRA adapter folders.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from peft import LoraConfig
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from workflow_scripts.atomic import atomic_dir
from workflow_scripts.gate_mlp import GateMLP, load_gate, save_gate
from workflow_scripts.model_files import (
    ModelFolderError,
    check_adapter,
    check_expert_folders,
    check_moe_config,
    read_json,
)
from workflow_scripts.whisper_io import generate as whisper_generate

DEFAULT_TARGETS = ("q_proj", "v_proj")
WEIGHTINGS = ("prob", "straight_through")
GATE_FILE = "gate.safetensors"  # a model folder's gate (gate_mlp.py)


class RoutedLoRALinear(nn.Module):
    """Frozen Linear + K LoRA pairs; each sample only passes through the expert(s) it is routed to.

    With `shared`, pair K is one more LoRA that every routed sample passes through (DeepSeekMoE's
    shared expert): it sees all the data, so each routed expert only has to learn what is specific
    to its group.
    """

    def __init__(self, base_layer: nn.Linear, num_experts: int, r: int, alpha: float, dropout: float,
                 shared: bool = False):
        super().__init__()
        self.base_layer = base_layer
        self.r, self.scaling = r, alpha / r
        self.num_experts, self.shared = num_experts, shared
        dev = base_layer.weight.device
        # float32 adapters (as PEFT does by default) so a half-precision base still trains stably
        slots = num_experts + int(shared)
        self.lora_A = nn.ParameterList(
            [nn.Parameter(torch.empty(r, base_layer.in_features, device=dev)) for _ in range(slots)])
        self.lora_B = nn.ParameterList(
            [nn.Parameter(torch.zeros(base_layer.out_features, r, device=dev)) for _ in range(slots)])
        for a in self.lora_A:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # PEFT/loralib init; B stays zero
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self._routing: RowGroups | None = None

    def set_routing(self, route: RowGroups | None) -> None:
        """The batch's row groups (shared by every layer), or None: LoRA path off (plain base layer)."""
        if route is not None and route.max_expert >= self.num_experts:
            raise ValueError(f"expert index out of range 0..{self.num_experts - 1}: {route.idx.tolist()}")
        self._routing = route

    def forward(self, x: Tensor) -> Tensor:
        out = self.base_layer(x)
        if self._routing is None:
            return out
        n = x.shape[0]
        bcast = (-1,) + (1,) * (x.dim() - 1)
        if self.shared:
            a, b = self.lora_A[self.num_experts], self.lora_B[self.num_experts]
            out = out + (F.linear(F.linear(self.dropout(x.to(a.dtype)), a), b) * self.scaling).to(out.dtype)
        for k, rows, wk in self._routing.groups(n, x.device):
            a, b = self.lora_A[k], self.lora_B[k]
            xs = x if rows is None else x.index_select(0, rows)
            h = F.linear(F.linear(self.dropout(xs.to(a.dtype)), a), b) * (self.scaling * wk).view(bcast)
            # out-of-place index_add keeps autograd to every routed expert's A/B (and to wk -> gate)
            out = out + h.to(out.dtype) if rows is None else out.index_add(0, rows, h.to(out.dtype))
        return out


class RowGroups:
    """Which rows of a batch go to which expert, with what weight: worked out once per batch (and once
    per expanded batch size under beam search), not in each of the hundreds of routed layers, since
    finding the groups makes the host wait for the device."""

    def __init__(self, expert_idx: Tensor, weights: Tensor | None = None):
        self.idx = expert_idx.reshape(expert_idx.shape[0], -1)
        self.w = torch.ones(self.idx.shape, device=self.idx.device) if weights is None else weights.reshape(
            self.idx.shape)
        if self.idx.numel() and int(self.idx.min()) < 0:
            raise ValueError(f"expert index out of range: {self.idx.tolist()}")
        self.max_expert = int(self.idx.max()) if self.idx.numel() else -1
        self._by_size: dict[tuple[int, torch.device], list] = {}

    def groups(self, n: int, device: torch.device) -> list[tuple[int, Tensor | None, Tensor]]:
        """(expert, rows or None for all rows, weights of those rows) for a batch of n rows."""
        key = (n, device)
        if key not in self._by_size:
            idx, w = self.idx.to(device), self.w.to(device)
            if idx.shape[0] != n:
                # beam search / num_return_sequences expand the batch with repeat_interleave
                if n % idx.shape[0]:
                    raise ValueError(f"routing set for batch {idx.shape[0]} but layer got batch {n}")
                idx, w = idx.repeat_interleave(n // idx.shape[0], 0), w.repeat_interleave(n // idx.shape[0], 0)
            out = []
            for k in torch.unique(idx).tolist():
                hit = idx == k
                rows = hit.any(1).nonzero().squeeze(1)
                wk = (w * hit).sum(1).index_select(0, rows)
                out.append((k, None if rows.numel() == n else rows, wk))
            self._by_size[key] = out
        return self._by_size[key]


class Routing(NamedTuple):
    expert_idx: Tensor  # (B,) for top-1, else (B, top_k)
    weights: Tensor  # same shape; carries the gate's gradient
    probs: Tensor  # (B, K)
    logits: Tensor  # (B, K)


def load_balance_loss(probs: Tensor, expert_idx: Tensor) -> Tensor:
    """Switch Transformer aux loss K * sum_k f_k * P_k; 1.0 when balanced, K when fully collapsed."""
    k = probs.shape[1]
    counts = torch.bincount(expert_idx.reshape(-1), minlength=k).to(probs.dtype)
    return k * torch.sum(counts / counts.sum() * probs.mean(0))


def _matches(name: str, targets: str | Sequence[str]) -> bool:
    # same semantics as PEFT's target_modules: a str is a full regex, a list matches name suffixes
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


class MoEWhisper(nn.Module):
    """Frozen WhisperForConditionalGeneration + K routed LoRA experts + gate. Injects into base in place."""

    # r and alpha have no defaults here: the run's come from config/schema.yaml (lora.r, lora.alpha).
    def __init__(self, base_model: nn.Module, num_experts: int, *, r: int, alpha: float,
                 dropout: float = 0.05, target_modules: str | Sequence[str] = DEFAULT_TARGETS,
                 gate: GateMLP | None = None, weighting: str = "prob", shared: bool = False):
        super().__init__()
        if weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
        if gate is not None and gate.config["num_experts"] != num_experts:
            raise ValueError(f"gate has {gate.config['num_experts']} outputs but MoE has {num_experts} experts")
        targets = target_modules if isinstance(target_modules, str) else list(target_modules)
        self.config = {"num_experts": num_experts, "r": r, "alpha": alpha, "dropout": dropout,
                       "target_modules": targets, "weighting": weighting, "shared": shared}
        self.base = base_model
        self.base.requires_grad_(False)
        # plain dict: the layers are already registered as submodules of base
        self.layers: dict[str, RoutedLoRALinear] = {}
        for name, module in list(base_model.named_modules()):
            if not name or not _matches(name, targets):
                continue
            if not isinstance(module, nn.Linear):
                raise ValueError(f"target module {name} is a {type(module).__name__}, only nn.Linear is supported")
            parent_name, _, child = name.rpartition(".")
            layer = RoutedLoRALinear(module, num_experts, r, alpha, dropout, shared)
            setattr(base_model.get_submodule(parent_name), child, layer)
            self.layers[name] = layer
        if not self.layers:
            raise ValueError(f"target_modules {targets!r} matched no module of the base model")
        self.gate = gate

    @property
    def num_experts(self) -> int:
        return self.config["num_experts"]

    def expert_parameters(self, k: int) -> list[nn.Parameter]:
        return [p for layer in self.layers.values() for p in (layer.lora_A[k], layer.lora_B[k])]

    def route(self, embeddings: Tensor, top_k: int = 1) -> Routing:
        """Pick top_k experts per sample. Weights are the gate's (unrenormalised) probabilities, so the
        task loss reaches the gate; "straight_through" weighting has value 1 but the same gradient path."""
        if self.gate is None:
            raise ValueError("this MoE has no gate; pass expert_idx explicitly or build it with gate=GateMLP(...)")
        logits = self.gate.route_logits(embeddings)
        probs = logits.softmax(-1)
        top_p, idx = probs.topk(top_k, dim=-1)
        weights = top_p / top_p.detach() if self.config["weighting"] == "straight_through" else top_p
        if top_k == 1:
            idx, weights = idx.squeeze(1), weights.squeeze(1)
        return Routing(idx, weights, probs, logits)

    @contextlib.contextmanager
    def routing(self, expert_idx: Tensor | Sequence[int], weights: Tensor | None = None) -> Iterator[None]:
        """Route the batch inside the block (forward or base.generate); LoRA path off again afterwards."""
        # move once here rather than in each of the many routed layers
        device = next(iter(self.layers.values())).lora_A[0].device
        idx = torch.as_tensor(expert_idx, dtype=torch.long, device=device)
        route = RowGroups(idx, None if weights is None else weights.to(device))
        for layer in self.layers.values():
            layer.set_routing(route)
        try:
            yield
        finally:
            for layer in self.layers.values():
                layer.set_routing(None)

    def _resolve(self, gate_inputs: Tensor | None, expert_idx: Tensor | None,
                 top_k: int) -> tuple[Tensor, Tensor | None, Routing | None]:
        if expert_idx is not None:  # forced routing (per-expert training/eval): full-strength experts
            return torch.as_tensor(expert_idx, dtype=torch.long), None, None
        if gate_inputs is None:
            raise ValueError("give gate_inputs (utterance embeddings) or expert_idx to route the batch")
        r = self.route(gate_inputs, top_k)
        return r.expert_idx, r.weights, r

    def forward(self, input_features: Tensor, labels: Tensor, gate_inputs: Tensor | None = None, *,
                cluster_labels: Tensor | None = None, expert_idx: Tensor | None = None, top_k: int = 1,
                balance_coef: float = 0.01, gate_loss_coef: float = 1.0) -> dict[str, Tensor | None]:
        """loss = task + balance_coef * load-balance + gate_loss_coef * CE(gate, cluster_labels)."""
        idx, weights, routed = self._resolve(gate_inputs, expert_idx, top_k)
        zero = torch.zeros((), device=input_features.device)
        balance = load_balance_loss(routed.probs, idx) if routed is not None else zero
        gate_loss = zero
        if cluster_labels is not None:
            if gate_inputs is None:
                raise ValueError("cluster_labels need gate_inputs to train the gate on")
            logits = self.gate(gate_inputs)  # with dropout in training, unlike the route
            gate_loss = F.cross_entropy(logits, cluster_labels.to(logits.device))
        with self.routing(idx, weights):
            task = self.base(input_features=input_features, labels=labels).loss
        return {"loss": task + balance_coef * balance + gate_loss_coef * gate_loss, "task_loss": task,
                "balance_loss": balance, "gate_loss": gate_loss, "expert_idx": idx,
                "probs": routed.probs if routed is not None else None}

    @torch.no_grad()
    def generate(self, input_features: Tensor, gate_inputs: Tensor | None = None,
                 expert_idx: Tensor | None = None, **generate_kwargs) -> Tensor:
        """base.generate with each sample routed to its expert (gate top-1 unless expert_idx given)."""
        idx, weights, _ = self._resolve(gate_inputs, expert_idx, 1)
        with self.routing(idx, weights):
            return whisper_generate(self.base, input_features, **generate_kwargs)

    # --- PEFT interop -------------------------------------------------------------------------
    def _lora_config(self) -> LoraConfig:
        c = self.config
        return LoraConfig(r=c["r"], lora_alpha=c["alpha"], lora_dropout=c["dropout"],
                          target_modules=c["target_modules"], bias="none",
                          base_model_name_or_path=getattr(self.base.config, "_name_or_path", None) or None)

    @property
    def shared_index(self) -> int | None:
        """Slot of the shared adapter in every layer's lora_A/lora_B (None without one)."""
        return self.num_experts if self.config["shared"] else None

    def _check_expert(self, k: int) -> None:
        last = self.num_experts - 1 + int(self.config["shared"])
        if not 0 <= k <= last:
            raise ValueError(f"expert {k} out of range 0..{last}")

    @torch.no_grad()
    def load_expert_adapter(self, k: int, peft_dir: str | os.PathLike) -> None:
        """Copy a PEFT LoRA adapter folder (same r, alpha, target modules) into expert k (or shared_index)."""
        self._check_expert(k)
        linears = {name: layer.base_layer for name, layer in self.layers.items()}
        w_path = check_adapter(peft_dir, _adapter_want(self.config), _lora_shapes(linears, self.config["r"]),
                               self.config["target_modules"])
        tensors = load_file(w_path)
        for name, layer in self.layers.items():
            for ab, params in (("A", layer.lora_A), ("B", layer.lora_B)):
                params[k].copy_(tensors[f"base_model.model.{name}.lora_{ab}.weight"])

    def save_expert_adapter(self, k: int, out_dir: str | os.PathLike) -> None:
        """Write expert k as a PEFT LoRA folder that PeftModel.from_pretrained(base, out_dir) loads."""
        self._check_expert(k)
        tensors = {f"base_model.model.{name}.lora_{ab}.weight": params[k].detach().cpu().contiguous()
                   for name, layer in self.layers.items()
                   for ab, params in (("A", layer.lora_A), ("B", layer.lora_B))}
        with atomic_dir(Path(out_dir)) as tmp:
            self._lora_config().save_pretrained(tmp)
            save_file(tensors, tmp / "adapter_model.safetensors", metadata={"format": "pt"})

    def save(self, out_dir: str | os.PathLike) -> None:
        """expert_<k>/ (and shared/) PEFT folders + gate.safetensors (if any) + moe_config.json, written
        atomically. A config from_pretrained would refuse (a regex target_modules) is refused here."""
        out_dir = Path(out_dir)
        check_moe_config(self.config, out_dir / "moe_config.json", WEIGHTINGS)
        with atomic_dir(out_dir) as tmp:
            for k in range(self.num_experts):
                self.save_expert_adapter(k, tmp / f"expert_{k}")
            if self.shared_index is not None:
                self.save_expert_adapter(self.shared_index, tmp / "shared")
            if self.gate is not None:
                save_gate(self.gate, tmp / GATE_FILE)
            (tmp / "moe_config.json").write_text(json.dumps(self.config, indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, moe_dir: str | os.PathLike, base_model: nn.Module | str | os.PathLike) -> MoEWhisper:
        """Restore a saved MoE onto base_model (a loaded Whisper model, or a folder/hub id to load).

        Every file is checked before what it describes is allocated: the config's sizes, the expert
        folders it names, the gate's sizes, and each adapter's declared tensor shapes against the base
        model's layers (model_files.py)."""
        moe_dir = Path(moe_dir)
        cfg_path = moe_dir / "moe_config.json"
        if not cfg_path.is_file():
            raise FileNotFoundError(f"{cfg_path} missing: {moe_dir} is not a folder written by MoEWhisper.save")
        cfg = check_moe_config(read_json(cfg_path), cfg_path, WEIGHTINGS)
        check_expert_folders(moe_dir, cfg["num_experts"], cfg["shared"])
        if (moe_dir / "gate.pt").exists():
            raise ModelFolderError(f"{moe_dir / 'gate.pt'} is a gate in the old pickle format, which is not loaded "
                                   f"(unpickling can run code): rerun the asr stage to write {GATE_FILE}")
        gate_path = moe_dir / GATE_FILE
        gate = load_gate(gate_path) if gate_path.exists() else None
        if not isinstance(base_model, nn.Module):
            from transformers import WhisperForConditionalGeneration

            base_model = WhisperForConditionalGeneration.from_pretrained(base_model)
        linears = {name: m for name, m in base_model.named_modules()
                   if name and _matches(name, cfg["target_modules"]) and isinstance(m, nn.Linear)}
        names = [f"expert_{k}" for k in range(cfg["num_experts"])] + (["shared"] if cfg["shared"] else [])
        for name in names:  # before the MoE allocates the adapters these files describe
            check_adapter(moe_dir / name, _adapter_want(cfg), _lora_shapes(linears, cfg["r"]), cfg["target_modules"])
        moe = cls(base_model, gate=gate, **cfg)
        for k, name in enumerate(names):
            moe.load_expert_adapter(k, moe_dir / name)
        return moe


def _adapter_want(config: dict) -> dict:
    """adapter_config.json values an expert of a MoE with this config must have."""
    return {"peft_type": "LORA", "r": config["r"], "lora_alpha": config["alpha"], "use_rslora": False,
            "use_dora": False, "fan_in_fan_out": False, "bias": "none"}


def _lora_shapes(linears: dict[str, nn.Linear], r: int) -> dict[str, tuple[int, int]]:
    """Tensor name -> shape in a PEFT LoRA adapter of rank r on these Linear layers (keyed by module name)."""
    return {f"base_model.model.{name}.lora_{ab}.weight": shape for name, lin in linears.items()
            for ab, shape in (("A", (r, lin.in_features)), ("B", (lin.out_features, r)))}
