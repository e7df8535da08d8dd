"""Checkpoints: a round trip restores everything, the manifest catches damage, the newest complete one is
found, and a save that fails midway leaves nothing half-written and older checkpoints intact."""

from __future__ import annotations

import json
import pickle
import random

import numpy as np
import pytest
import torch

from agentbench_npu.devices.cpu import CpuDevice
from agentbench_npu.errors import UserError
from agentbench_npu.models import load_model, resolve_model_dir
from agentbench_npu.models.loading import load_causal_lm, load_tokenizer
from agentbench_npu.training.checkpoint import find_checkpoint, load_checkpoint, save_checkpoint


@pytest.fixture(scope="module")
def tiny():
    """The tiny model after one AdamW step, so that the optimizer has state worth saving."""
    loaded = load_model("tiny")
    optimizer = torch.optim.AdamW(loaded.model.parameters(), lr=1e-3)
    ids = torch.tensor([[1, 5, 9, 2]])
    loaded.model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return loaded, optimizer


def save(tiny, path, step: int, trainer_state=None):
    loaded, optimizer = tiny
    return save_checkpoint(
        path, model=loaded.model, tokenizer=loaded.tokenizer,
        trainer_state=trainer_state if trainer_state is not None else {"optimizer": optimizer.state_dict()},
        rng_state=CpuDevice().rng_state(), state={"step": step, "cursor": 8 * step, "scenario": "base"},
    )


def load_error(path) -> str:
    with pytest.raises(UserError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert "\n" not in message, message
    return message


# -- round trip ------------------------------------------------------------------------------------
def test_a_saved_checkpoint_loads_back_its_state_optimizer_and_rng(tiny, tmp_path):
    _, optimizer = tiny
    rng = CpuDevice().rng_state()
    path = save(tiny, tmp_path / "step-000003", 3)
    ckpt = load_checkpoint(path)
    assert ckpt.path == path and ckpt.step == 3
    assert ckpt.state == {"step": 3, "cursor": 24, "scenario": "base"}
    saved_opt = ckpt.trainer["optimizer"]
    expected = optimizer.state_dict()
    assert saved_opt["param_groups"] == expected["param_groups"]
    for key, value in expected["state"].items():
        assert torch.equal(saved_opt["state"][key]["exp_avg"], value["exp_avg"])
    assert ckpt.rng["python"] == rng["python"] and torch.equal(ckpt.rng["torch"], rng["torch"])
    assert np.array_equal(ckpt.rng["numpy"][1], rng["numpy"][1])


def test_restoring_the_saved_rng_state_reproduces_the_random_streams(tiny, tmp_path):
    saved = random.getstate(), np.random.get_state(), torch.get_rng_state()
    try:
        path = save(tiny, tmp_path / "step-000001", 1)
        after_save = random.random(), torch.rand(2).tolist()
        CpuDevice().set_rng_state(load_checkpoint(path).rng)
        assert (random.random(), torch.rand(2).tolist()) == after_save
    finally:
        random.setstate(saved[0]), np.random.set_state(saved[1]), torch.set_rng_state(saved[2])


def test_the_model_dir_of_a_checkpoint_is_an_hf_checkpoint_with_the_same_weights(tiny, tmp_path):
    loaded, _ = tiny
    ckpt = load_checkpoint(save(tiny, tmp_path / "step-000001", 1))
    assert resolve_model_dir(str(ckpt.model_dir)) == ckpt.model_dir
    restored = load_causal_lm(ckpt.model_dir)
    original = loaded.model.state_dict()
    restored_state = restored.state_dict()
    assert sorted(restored_state) == sorted(original)
    for name, tensor in original.items():
        assert torch.equal(restored_state[name], tensor), name
    assert load_tokenizer(ckpt.model_dir).get_vocab() == loaded.tokenizer.get_vocab()


def test_the_manifest_lists_every_file_with_its_sha256(tiny, tmp_path):
    path = save(tiny, tmp_path / "step-000001", 1)
    manifest = json.loads((path / "manifest.json").read_text())
    files = {str(p.relative_to(path)) for p in path.rglob("*") if p.is_file()} - {"manifest.json"}
    assert set(manifest) == files
    assert {"trainer.pt", "rng.pt", "state.json", "model/model.safetensors", "model/config.json"} <= files
    assert all(len(digest) == 64 for digest in manifest.values())


# -- damage ----------------------------------------------------------------------------------------
def test_a_corrupted_weights_file_is_caught_by_the_manifest_and_named(tiny, tmp_path):
    path = save(tiny, tmp_path / "step-000001", 1)
    weights = path / "model" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert load_error(path) == (f"checkpoint '{path}' is corrupt: model/model.safetensors "
                                "does not match its checksum in manifest.json")


def test_an_edited_state_json_is_caught_by_the_manifest(tiny, tmp_path):
    path = save(tiny, tmp_path / "step-000001", 1)
    (path / "state.json").write_text(json.dumps({"step": 99}))
    assert "is corrupt: state.json" in load_error(path)


def test_a_missing_file_is_named(tiny, tmp_path):
    path = save(tiny, tmp_path / "step-000001", 1)
    (path / "trainer.pt").unlink()
    assert load_error(path) == f"checkpoint '{path}' is incomplete: trainer.pt is missing"


def test_an_unreadable_manifest_is_a_user_error(tiny, tmp_path):
    path = save(tiny, tmp_path / "step-000001", 1)
    (path / "manifest.json").write_text("{not json")
    assert load_error(path).startswith(f"checkpoint '{path}': unreadable manifest.json")


# -- finding the newest ----------------------------------------------------------------------------
def test_a_run_dir_resolves_to_its_newest_checkpoint(tiny, tmp_path):
    for step in (2, 10, 4):
        save(tiny, tmp_path / "checkpoints" / f"step-{step:06d}", step)
    assert find_checkpoint(tmp_path) == tmp_path / "checkpoints" / "step-000010"
    assert load_checkpoint(tmp_path).step == 10


def test_a_checkpoints_dir_and_a_checkpoint_dir_resolve_too(tiny, tmp_path):
    root = tmp_path / "checkpoints"
    save(tiny, root / "step-000001", 1)
    save(tiny, root / "step-000002", 2)
    assert find_checkpoint(root) == root / "step-000002"
    assert find_checkpoint(root / "step-000001") == root / "step-000001"


def test_an_incomplete_newer_checkpoint_dir_is_passed_over(tiny, tmp_path):
    root = tmp_path / "checkpoints"
    save(tiny, root / "step-000001", 1)
    (root / "step-000002" / "model").mkdir(parents=True)  # no manifest: never finished
    assert find_checkpoint(tmp_path) == root / "step-000001"


def test_a_dir_without_checkpoints_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match=f"^no checkpoint in '{tmp_path}': expected a checkpoint dir"):
        find_checkpoint(tmp_path)


# -- failure while saving --------------------------------------------------------------------------
class Unpicklable:
    """Stands for anything in trainer state that torch.save cannot write (a hook, a lock, a handle)."""

    def __reduce__(self):
        raise pickle.PicklingError("cannot pickle Unpicklable")


def unpicklable_trainer_state():
    return {"optimizer": {}, "hook": Unpicklable()}


def test_a_save_that_fails_midway_leaves_no_checkpoint_dir_behind_and_older_ones_intact(tiny, tmp_path):
    root = tmp_path / "checkpoints"
    older = save(tiny, root / "step-000001", 1)
    with pytest.raises(pickle.PicklingError, match="cannot pickle Unpicklable"):
        save(tiny, root / "step-000002", 2, trainer_state=unpicklable_trainer_state())
    assert [p.name for p in root.iterdir()] == ["step-000001"]  # no step-000002, no temp dir either
    assert find_checkpoint(tmp_path) == older
    assert load_checkpoint(tmp_path).step == 1


def test_a_failed_save_over_an_existing_checkpoint_keeps_the_existing_one(tiny, tmp_path):
    path = save(tiny, tmp_path / "step-000001", 1)
    with pytest.raises(pickle.PicklingError, match="cannot pickle Unpicklable"):
        save(tiny, path, 1, trainer_state=unpicklable_trainer_state())
    assert load_checkpoint(path).state["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["step-000001"]


def test_saving_again_to_the_same_path_replaces_the_checkpoint(tiny, tmp_path):
    path = tmp_path / "step-000001"
    save(tiny, path, 1)
    loaded, _ = tiny
    save_checkpoint(path, model=loaded.model, tokenizer=loaded.tokenizer, trainer_state={"v": 2},
                    rng_state=CpuDevice().rng_state(), state={"step": 1, "note": "second"})
    ckpt = load_checkpoint(path)
    assert ckpt.trainer == {"v": 2} and ckpt.state["note"] == "second"
    assert [p.name for p in tmp_path.iterdir()] == ["step-000001"]


def test_model_parallel_ranks_optimizer_states_move_into_the_checkpoint_and_back(tiny, tmp_path):
    from agentbench_npu.training.checkpoint import load_trainer_shard, save_trainer_shard

    path = tmp_path / "step-000002"
    save_trainer_shard(path, 1, {"optimizer": "rank 1's moments"})  # left beside it before rank 0 saves
    save(tiny, path, 2)
    assert not list(tmp_path.glob(".step-000002.*"))  # moved in, nothing left beside
    checkpoint = load_checkpoint(path)
    assert "trainer-rank1.pt" in json.loads((path / "manifest.json").read_text())
    assert load_trainer_shard(checkpoint, 1) == {"optimizer": "rank 1's moments"}
    assert load_trainer_shard(checkpoint, 0) is checkpoint.trainer
    with pytest.raises(UserError, match="no optimizer state for model-parallel rank 2"):
        load_trainer_shard(checkpoint, 2)


def test_a_tensor_parallel_checkpoint_saved_before_expert_parallelism_still_resumes(tiny, tmp_path):
    from agentbench_npu.training.checkpoint import load_trainer_shard

    path = tmp_path / "step-000002"
    save(tiny, path, 2)
    torch.save({"optimizer": "rank 1's moments"}, path / "trainer-tp1.pt")  # the earlier name of rank 1's file
    assert load_trainer_shard(load_checkpoint(path), 1) == {"optimizer": "rank 1's moments"}


def test_a_checkpoint_resumes_only_with_the_trainer_and_split_that_saved_it(tiny, tmp_path):
    from agentbench_npu.config import resolve
    from agentbench_npu.recipes import Layer
    from agentbench_npu.training.checkpoint import check_resumable

    path = tmp_path / "step-000002"
    save_checkpoint(path, model=tiny[0].model, tokenizer=tiny[0].tokenizer, trainer_state={}, rng_state={},
                    state={"step": 2, "scenario": "base", "trainer": "megatron", "tensor_parallel": 2,
                           "train_ranks": 2})
    checkpoint = load_checkpoint(path)

    def config(**sections):
        return resolve("base", [Layer({"run": {"steps": 4}, **sections}, "test")], {})

    with pytest.raises(UserError, match=r"megatron trainer split over tensor parallel 2 x expert parallel 1; resume "
                                        r"it with --trainer megatron --set megatron.tensor_parallel=2"):
        check_resumable(checkpoint, config())
    with pytest.raises(UserError, match="tensor parallel 2"):
        check_resumable(checkpoint, config(run={"steps": 4, "trainer": "megatron"}))
    with pytest.raises(UserError, match="expert parallel 1"):  # the experts' optimizer states are split as saved
        check_resumable(checkpoint, config(run={"steps": 4, "trainer": "megatron"},
                                           cluster={"executor": "ray", "train_devices": 4},
                                           megatron={"tensor_parallel": 2, "expert_parallel": 2}))
    check_resumable(checkpoint, config(run={"steps": 4, "trainer": "megatron"},
                                       cluster={"executor": "ray", "train_devices": 2},
                                       megatron={"tensor_parallel": 2}))
