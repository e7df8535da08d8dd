"""Checkpoints that a killed run cannot half-write: temp dir + rename, a manifest of SHA-256 sums.

Layout of one checkpoint dir:
  model/          an ordinary HF checkpoint (config, safetensors, tokenizer): `--model DIR/model` works
  trainer.pt      optimizer and scheduler state
  rng.pt          python, numpy, torch and device RNG states
  state.json      step, data cursor, weight version, config digest, scenario
  manifest.json   sha256 of every file above, verified on load
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import UserError
from ..paths import atomic_directory

MANIFEST = "manifest.json"


def optimizer_checksum(optimizer: torch.optim.Optimizer) -> str:
    """A checksum of every tensor in the optimizer's state (moments, step counts)."""
    from ..sync.checksum import weights_checksum

    named = []
    for index, state in optimizer.state_dict()["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                named.append((f"{index}.{key}", value))
    return weights_checksum(named)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass
class Checkpoint:
    path: Path
    state: dict[str, Any]
    trainer: dict[str, Any]
    rng: dict[str, Any]

    @property
    def model_dir(self) -> Path:
        return self.path / "model"

    @property
    def step(self) -> int:
        return int(self.state["step"])


def save_checkpoint(path: Path, *, model: torch.nn.Module, tokenizer: Any, trainer_state: dict[str, Any],
                    rng_state: dict[str, Any], state: dict[str, Any],
                    weights: dict[str, torch.Tensor] | None = None) -> Path:
    """`weights`: the model's Hugging Face state dict when the caller already gathered it (a split model).
    The other model-parallel ranks' optimizer states, written beside `path` (shard_path), move in with it."""
    shards = sorted(path.parent.glob(f".{path.name}.trainer-rank*.pt"))
    with atomic_directory(path) as tmp:
        for shard in shards:
            shard.replace(tmp / shard.name.split(".", 2)[-1])  # → trainer-rankN.pt
        if weights is None:
            model.save_pretrained(tmp / "model", safe_serialization=True)
        else:
            model.save_pretrained(tmp / "model", state_dict=weights)
        tokenizer.save_pretrained(tmp / "model")
        torch.save(trainer_state, tmp / "trainer.pt")
        torch.save(rng_state, tmp / "rng.pt")
        (tmp / "state.json").write_text(json.dumps(state, indent=2, default=str))
        files = sorted(p for p in tmp.rglob("*") if p.is_file())
        manifest = {str(p.relative_to(tmp)): _sha256(p) for p in files}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return path


def shard_path(path: Path, rank: int) -> Path:
    """Where model-parallel rank `rank` (> 0: a tensor- or expert-parallel part of the model, tp + TP x ep) leaves
    its optimizer state for the checkpoint `path`."""
    return path.parent / f".{path.name}.trainer-rank{rank}.pt"


def save_trainer_shard(path: Path, rank: int, trainer_state: dict[str, Any]) -> None:
    target = shard_path(path, rank)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    torch.save(trainer_state, partial)
    partial.replace(target)


def load_trainer_shard(checkpoint: Checkpoint, rank: int) -> dict[str, Any]:
    """Model-parallel rank `rank`'s optimizer state (rank 0's is `checkpoint.trainer`)."""
    if rank == 0:
        return checkpoint.trainer
    file = checkpoint.path / f"trainer-rank{rank}.pt"
    earlier = checkpoint.path / f"trainer-tp{rank}.pt"  # as saved before expert parallelism: rank = tp rank
    if not file.is_file() and earlier.is_file() and int(checkpoint.state.get("expert_parallel", 1)) == 1:
        file = earlier
    if not file.is_file():
        raise UserError(f"checkpoint '{checkpoint.path}' holds no optimizer state for model-parallel rank {rank}: "
                        "resume with the tensor- and expert-parallel sizes it was saved with")
    return torch.load(file, map_location="cpu", weights_only=False)  # listed in the verified manifest


def step_of(path: Path) -> int:
    """The step number in a `step-NNNNNN` dir name (-1 when it has none), for numeric ordering."""
    suffix = path.name.split("-", 1)[-1]
    return int(suffix) if suffix.isdigit() else -1


def find_checkpoint(path: Path) -> Path:
    """A checkpoint dir, or a run dir / checkpoints dir → its newest complete checkpoint."""
    path = Path(path)
    if (path / MANIFEST).is_file():
        return path
    for candidates in (path / "checkpoints", path):
        if candidates.is_dir():
            found = sorted((p for p in candidates.glob("step-*") if (p / MANIFEST).is_file()), key=step_of)
            if found:
                return found[-1]
    raise UserError(f"no checkpoint in '{path}': expected a checkpoint dir (with {MANIFEST}) or a run dir")


def load_checkpoint(path: Path) -> Checkpoint:
    path = find_checkpoint(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"checkpoint '{path}': unreadable {MANIFEST} ({exc})") from exc
    for name, digest in manifest.items():
        file = path / name
        if not file.is_file():
            raise UserError(f"checkpoint '{path}' is incomplete: {name} is missing")
        if _sha256(file) != digest:
            raise UserError(f"checkpoint '{path}' is corrupt: {name} does not match its checksum in {MANIFEST}")
    state = json.loads((path / "state.json").read_text())
    # our own files, verified against the manifest above: full unpickling is safe here
    trainer = torch.load(path / "trainer.pt", map_location="cpu", weights_only=False)
    rng = torch.load(path / "rng.pt", map_location="cpu", weights_only=False)
    return Checkpoint(path=path, state=state, trainer=trainer, rng=rng)


def check_resumable(checkpoint: Checkpoint, config: Any) -> None:
    """Raise UserError unless `config` (a RunConfig) can continue training from `checkpoint`."""
    c = config
    if c.run.mode == "eval":
        raise UserError(f"--resume continues a training run; to evaluate checkpoint '{checkpoint.path}' "
                        f"pass --model {checkpoint.model_dir} --mode eval")
    if checkpoint.state.get("scenario") != c.scenario:
        raise UserError(f"checkpoint '{checkpoint.path}' is of scenario '{checkpoint.state.get('scenario')}', "
                        f"not '{c.scenario}'")
    saved_trainer = checkpoint.state.get("trainer", "torch")
    saved_tp = int(checkpoint.state.get("tensor_parallel", 1))
    saved_ep = int(checkpoint.state.get("expert_parallel", 1))
    if (saved_trainer, saved_tp, saved_ep) != (c.run.trainer, c.tensor_parallel, c.expert_parallel):
        split = (f" split over tensor parallel {saved_tp} x expert parallel {saved_ep}"
                 if saved_trainer == "megatron" else "")
        raise UserError(f"checkpoint '{checkpoint.path}' holds the optimizer state of the {saved_trainer} trainer{split}; "
                        f"resume it with --trainer {saved_trainer}"
                        + (f" --set megatron.tensor_parallel={saved_tp} --set megatron.expert_parallel={saved_ep}"
                           if saved_trainer == "megatron" else ""))
    saved_ranks = int(checkpoint.state.get("train_ranks", 1))
    if saved_ranks != c.cluster.train_devices:
        raise UserError(f"checkpoint '{checkpoint.path}' was saved by {saved_ranks} trainer rank(s); "
                        f"resume it with --train-devices {saved_ranks}")
    if checkpoint.step >= c.run.steps:
        raise UserError(f"checkpoint '{checkpoint.path}' is already at step {checkpoint.step}; "
                        f"pass --steps larger than {checkpoint.step} to continue")
