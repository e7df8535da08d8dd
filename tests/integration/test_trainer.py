"""The GRPO trainer on trajectories the reference engine really generated from the tiny model.

Engine and trainer hold separate copies of the same weights (as in a colocated run), so every
agreement checked here is between two implementations: the engine's cached decode and the
trainer's HF full forward, both through engines/sampling.py's definition of the sampled distribution.
"""

from __future__ import annotations

import copy

import pytest
import torch

from agentbench_npu.engines.reference import ReferenceEngine
from agentbench_npu.models import load_model
from agentbench_npu.sync import ColocateSync
from agentbench_npu.sync.checksum import weights_checksum
from agentbench_npu.training.batch import pack
from agentbench_npu.training.losses import k3
from agentbench_npu.training.trainer import TrainConfig, Trainer
from agentbench_npu.types import GenerateRequest, SamplingParams, Trajectory

CPU = torch.device("cpu")
TEXTS = [
    "What is 3 + 4?",
    "hi",
    "Compute 12 * 7 and put the final answer in boxed please, then print it",
    "<|im_start|>user\nprint the sum of 5 and 9<|im_end|>\n<|im_start|>assistant\n",
]
TOOL_OUTPUT = "<tool_response>\n42\n</tool_response>"
FULL = {"temperature": 1.0, "top_p": 1.0, "top_k": -1}
TRUNCATED = {"temperature": 0.7, "top_p": 0.9, "top_k": 20}


# -- fixtures and helpers ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lm():
    lm = load_model("tiny")
    lm.model.eval().requires_grad_(False)  # the pristine weights: only ever deep-copied
    return lm


@pytest.fixture(scope="module")
def tok(lm):
    return lm.tokenizer


@pytest.fixture(scope="module")
def prompts(tok):
    return [list(tok.encode(t)) for t in TEXTS]


def make_trainer(lm, **config) -> Trainer:
    model = copy.deepcopy(lm.model).requires_grad_(True)
    return Trainer(model, TrainConfig(**config), CPU, lm.tokenizer.pad_token_id)


def make_engine(lm) -> ReferenceEngine:
    return ReferenceEngine(copy.deepcopy(lm.model).requires_grad_(False), lm.tokenizer)


def rollout(engine, prompts, seeds, *, max_new_tokens=16, **sampling) -> list[Trajectory]:
    """One single-turn trajectory per (prompt, seed)."""
    requests = [GenerateRequest(tuple(p), SamplingParams(max_new_tokens=max_new_tokens, seed=s, **sampling))
                for p, s in zip(prompts, seeds)]
    trajs = []
    for r, res in zip(requests, engine.generate_batch(requests)):
        traj = Trajectory(prompt_ids=list(r.input_ids))
        traj.append_model_tokens(res.output_ids, res.output_logprobs)
        trajs.append(traj)
    return trajs


def multi_turn(engine, tok, prompt, seed, *, trailing_env: list[int] | None = None, **sampling) -> Trajectory:
    """model turn, tool output (env tokens, loss mask 0), model turn; optionally env tokens at the end."""
    traj = Trajectory(prompt_ids=list(prompt))
    for turn in range(2):
        request = GenerateRequest(tuple(traj.tokens), SamplingParams(
            max_new_tokens=10, seed=seed + turn, ignore_eos=True, **sampling))
        (res,) = engine.generate_batch([request])
        traj.append_model_tokens(res.output_ids, res.output_logprobs)
        if turn == 0:
            traj.append_env_tokens(tok.encode(TOOL_OUTPUT))
    if trailing_env is not None:
        traj.append_env_tokens(trailing_env)
    return traj


def trainable_diff(trainer, trajs) -> torch.Tensor:
    """|trainer log-prob − rollout log-prob| over every trainable response token."""
    out = []
    for traj, lps in zip(trajs, trainer.logprobs_for(trajs)):
        assert len(lps) == traj.response_length
        mask = torch.tensor(traj.loss_mask, dtype=torch.bool)
        out.append((torch.tensor(lps) - torch.tensor(traj.rollout_logprobs))[mask].abs())
    return torch.cat(out)


def max_param_diff(a: torch.nn.Module, b: torch.nn.Module) -> float:
    return max(float((p - q).abs().max()) for p, q in zip(a.parameters(), b.parameters()))


# -- packing and log-prob agreement --------------------------------------------------------------
def test_pack_places_response_targets_masks_and_rollout_logprobs_after_the_prompt(lm, tok, prompts):
    engine = make_engine(lm)
    trajs = rollout(engine, prompts[:2], [1, 2], max_new_tokens=6)
    trajs.append(multi_turn(engine, tok, prompts[2], 3))
    batch = pack(trajs, [0.5, -0.5, 1.0], tok.pad_token_id, CPU)
    width = max(len(t.tokens) for t in trajs)
    assert tuple(batch.input_ids.shape) == (3, width)
    for i, t in enumerate(trajs):
        p, r = len(t.prompt_ids), t.response_length
        assert batch.input_ids[i, :p + r].tolist() == t.tokens
        assert batch.attention_mask[i].tolist() == [1] * (p + r) + [0] * (width - p - r)
        rows = batch.response_mask[i] > 0
        assert rows.nonzero()[:, 0].tolist() == list(range(p - 1, p - 1 + r))
        assert batch.targets[i][rows].tolist() == t.response_ids
        assert batch.loss_mask[i][rows].tolist() == [float(m) for m in t.loss_mask]
        assert float(batch.loss_mask[i][~rows].abs().sum()) == 0.0
        assert torch.allclose(batch.rollout_logprobs[i][rows], torch.tensor(t.rollout_logprobs))
    assert batch.advantages.tolist() == [0.5, -0.5, 1.0]


@pytest.mark.parametrize("sampling", [FULL, TRUNCATED], ids=["temperature1", "t0.7-topk20-topp0.9"])
def test_logprobs_for_equals_engine_rollout_logprobs(lm, prompts, sampling):
    engine, trainer = make_engine(lm), make_trainer(lm, micro_batch_size=3, **sampling)
    # different prompt and response lengths in one packed batch (some stop early at EOS)
    trajs = rollout(engine, prompts * 2, range(8), max_new_tokens=20, **sampling)
    assert len({t.response_length for t in trajs}) > 1 or len({len(t.tokens) for t in trajs}) > 1
    diff = trainable_diff(trainer, trajs)
    assert diff.numel() == sum(t.response_length for t in trajs)
    assert float(diff.mean()) <= 1e-6, f"mean |Δ| {float(diff.mean()):.3g}"
    assert float(diff.max()) <= 1e-5, f"max |Δ| {float(diff.max()):.3g}"


@pytest.mark.parametrize("sampling", [FULL, TRUNCATED], ids=["temperature1", "t0.7-topk20-topp0.9"])
def test_logprobs_for_equals_rollout_logprobs_around_environment_tokens(lm, tok, prompts, sampling):
    engine, trainer = make_engine(lm), make_trainer(lm, **sampling)
    trajs = [multi_turn(engine, tok, p, 100 + 10 * i, **sampling) for i, p in enumerate(prompts)]
    trajs.append(rollout(engine, [prompts[0]], [7], **sampling)[0])  # a single-turn one in the same batch
    for t in trajs[:-1]:
        env = len(tok.encode(TOOL_OUTPUT))
        assert t.loss_mask == [1] * 10 + [0] * env + [1] * 10
    diff = trainable_diff(trainer, trajs)
    assert diff.numel() == sum(t.num_trainable for t in trajs)
    assert float(diff.mean()) <= 1e-6 and float(diff.max()) <= 1e-5


# -- the policy update ---------------------------------------------------------------------------
def test_train_step_raises_the_logprob_of_the_rewarded_response(lm, prompts):
    engine, trainer = make_engine(lm), make_trainer(lm, lr=1e-3)
    trajs = rollout(engine, [prompts[0]] * 4, [11, 12, 13, 14], max_new_tokens=12, ignore_eos=True)
    for i, t in enumerate(trajs):
        t.reward, t.group = (1.0 if i == 0 else 0.0), 0
    before = [sum(lps) for lps in trainer.logprobs_for(trajs)]
    metrics = trainer.train_step(trajs)
    after = [sum(lps) for lps in trainer.logprobs_for(trajs)]
    assert metrics["advantage_abs_mean"] > 0
    assert after[0] > before[0] + 0.1, (before, after)
    assert sum(after[1:]) < sum(before[1:])  # the unrewarded answers lose probability


def test_gradients_and_update_do_not_depend_on_micro_batch_size(lm, tok, prompts):
    engine = make_engine(lm)
    trajs = rollout(engine, prompts * 2, range(20, 28), max_new_tokens=14)
    trajs[-1] = multi_turn(engine, tok, prompts[1], 50)
    for i, t in enumerate(trajs):
        t.group, t.reward = i % 2, float(i in (0, 3, 5))
    small, large = make_trainer(lm, micro_batch_size=1), make_trainer(lm, micro_batch_size=8)
    m_small, m_large = small.train_step(copy.deepcopy(trajs)), large.train_step(copy.deepcopy(trajs))
    for key in ("loss", "entropy", "grad_norm", "kl", "logprob_abs_diff_mean"):
        assert m_small[key] == pytest.approx(m_large[key], rel=1e-5, abs=1e-9), key
    covered = total = 0
    for (name, p), q in zip(small.model.named_parameters(), large.model.parameters()):
        # the accumulated (clipped) gradients agree up to float reordering, relative to their scale
        scale = float(q.grad.abs().max())
        assert float((p.grad - q.grad).abs().max()) <= 1e-5 * scale, name
        # AdamW's first step moves each weight by lr·g/(|g| + 1e-8): where |g| is near 1e-8 that
        # amplifies reordering noise up to ~lr, so weights are compared where the update is well-posed
        well_posed = q.grad.abs() >= 1e-7
        covered, total = covered + int(well_posed.sum()), total + q.numel()
        if well_posed.any():
            assert float((p - q).detach().abs()[well_posed].max()) <= 1e-6, name
        assert float((p - q).detach().abs().max()) <= 2 * small.config.lr, name
    assert covered >= 0.9 * total


def test_loss_ignores_rollout_logprobs_of_environment_tokens(lm, tok, prompts):
    engine = make_engine(lm)
    trajs = [multi_turn(engine, tok, p, 200 + i) for i, p in enumerate(prompts)]
    for i, t in enumerate(trajs):
        t.group, t.reward = 0, float(i % 2)
    corrupted = copy.deepcopy(trajs)
    for t in corrupted:
        t.rollout_logprobs = [lp if m else -5.0 for lp, m in zip(t.rollout_logprobs, t.loss_mask)]
    a, b = make_trainer(lm), make_trainer(lm)
    ma, mb = a.train_step(trajs), b.train_step(corrupted)
    for key in ("loss", "kl", "logprob_abs_diff_mean", "logprob_abs_diff_max", "trainable_tokens"):
        assert ma[key] == mb[key], key
    assert all(torch.equal(p, q) for p, q in zip(a.model.parameters(), b.model.parameters()))


def test_trailing_environment_tokens_get_no_gradient(lm, tok, prompts):
    """Tokens after the last model token influence nothing trainable: their ids must not matter."""
    engine = make_engine(lm)
    end = tok.encode(" the answer is 42")
    ends = (end, end[::-1])  # same length (same padding), different ids
    assert ends[0] != ends[1]
    runs = []
    for end in ends:
        trajs = [multi_turn(engine, tok, p, 300 + i, trailing_env=end) for i, p in enumerate(prompts)]
        for i, t in enumerate(trajs):
            t.group, t.reward = 0, float(i % 2)
        trainer = make_trainer(lm)
        runs.append((trainer, trainer.train_step(trajs)))
    (a, ma), (b, mb) = runs
    assert ma["loss"] == mb["loss"]
    assert all(torch.equal(p.grad, q.grad) for p, q in zip(a.model.parameters(), b.model.parameters()))
    assert all(torch.equal(p, q) for p, q in zip(a.model.parameters(), b.model.parameters()))


# -- reported alignment metrics ------------------------------------------------------------------
def _scored_trajs(lm, prompts, shift: float = 0.0) -> list[Trajectory]:
    trajs = rollout(make_engine(lm), prompts * 2, range(40, 48), max_new_tokens=16)
    for i, t in enumerate(trajs):
        t.group, t.reward = i % 4, float(i < 4)
        t.rollout_logprobs = [lp + shift for lp in t.rollout_logprobs]
    return trajs


def test_reported_logprob_diff_is_near_zero_for_engine_trajectories(lm, prompts):
    metrics = make_trainer(lm).train_step(_scored_trajs(lm, prompts))
    assert 0.0 <= metrics["logprob_abs_diff_mean"] <= 1e-5
    assert 0.0 <= metrics["logprob_abs_diff_max"] <= 1e-5
    assert metrics["trainable_tokens"] > 0


def test_reported_logprob_diff_is_large_when_rollout_logprobs_are_corrupted(lm, prompts):
    metrics = make_trainer(lm).train_step(_scored_trajs(lm, prompts, shift=-0.5))
    assert metrics["logprob_abs_diff_mean"] == pytest.approx(0.5, abs=1e-4)
    assert metrics["logprob_abs_diff_max"] == pytest.approx(0.5, abs=1e-4)


@pytest.mark.parametrize("shift", [-0.5, 0.25])
def test_mismatch_kl_is_k3_of_rollout_against_trainer_logprobs(lm, prompts, shift):
    kl = make_trainer(lm).train_step(_scored_trajs(lm, prompts, shift=shift))["kl"]
    # r = rollout − trainer ≈ shift on every token, k3 = exp(r) − r − 1
    assert kl == pytest.approx(float(k3(torch.tensor(0.0, dtype=torch.float64),
                                        torch.tensor(shift, dtype=torch.float64))), rel=1e-3)
    assert kl > 0


def test_mismatch_kl_is_nonnegative_and_near_zero_for_matching_logprobs(lm, prompts):
    kl = make_trainer(lm).train_step(_scored_trajs(lm, prompts))["kl"]
    assert 0.0 <= kl <= 1e-10


def test_kl_coef_keeps_a_frozen_reference_model_and_reports_ref_kl(lm, prompts):
    trainer = make_trainer(lm, kl_coef=0.1, lr=1e-3)
    assert trainer.ref_model is not None and trainer.ref_model is not trainer.model
    assert not any(p.requires_grad for p in trainer.ref_model.parameters())
    ref_sum = weights_checksum(trainer.ref_model.named_parameters())
    assert ref_sum == weights_checksum(trainer.model.named_parameters())
    trajs = _scored_trajs(lm, prompts)
    ref_kls = [trainer.train_step(trajs)["ref_kl"] for _ in range(3)]
    assert ref_kls[0] == pytest.approx(0.0, abs=1e-10)  # the policy is the reference at step one
    assert all(v >= 0.0 for v in ref_kls)
    assert ref_kls[-1] > 1e-6, ref_kls
    assert weights_checksum(trainer.ref_model.named_parameters()) == ref_sum
    assert weights_checksum(trainer.model.named_parameters()) != ref_sum


def test_without_kl_coef_there_is_no_reference_model_and_no_ref_kl(lm, prompts):
    trainer = make_trainer(lm)
    assert trainer.ref_model is None
    assert trainer.train_step(_scored_trajs(lm, prompts))["ref_kl"] is None


# -- determinism and weight sync through training ------------------------------------------------
@pytest.fixture
def deterministic_torch():
    threads, was = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was)
        torch.set_num_threads(threads)


def _train_run(lm, prompts, steps=2):
    torch.manual_seed(0)
    engine, trainer, sync = make_engine(lm), make_trainer(lm, micro_batch_size=3), ColocateSync()
    assert sync.push(trainer.model, engine).checksums_match
    record = []
    for step in range(steps):
        trajs = rollout(engine, prompts * 2, [1000 * step + i for i in range(8)], max_new_tokens=12)
        for i, t in enumerate(trajs):
            t.group = i % 4
            t.reward = float(sum(tok % 2 == 0 for tok in t.response_ids) > t.response_length / 2)
        metrics = trainer.train_step(trajs)
        trainer_sum = weights_checksum(trainer.model.named_parameters())
        assert engine.checksum() != trainer_sum  # the engine is stale until the push
        result = sync.push(trainer.model, engine)
        assert result.checksums_match and engine.checksum() == trainer_sum
        assert result.weight_version == engine.weight_version == step + 2
        record.append((metrics["loss"], metrics["kl"], metrics["grad_norm"],
                       [t.response_ids for t in trajs], trainer_sum))
    return record


def test_identical_setups_give_bitwise_equal_tokens_losses_and_weights(lm, prompts, deterministic_torch):
    first, second = _train_run(lm, prompts), _train_run(lm, prompts)
    assert first == second
    assert first[0][3] != first[1][3]  # the steps really sampled different data


# -- truncated sampling (top-k / top-p) in training ----------------------------------------------
def _on_policy_steps(lm, prompts, steps, **config):
    engine, trainer, sync = make_engine(lm), make_trainer(lm, micro_batch_size=3, **TRUNCATED, **config), ColocateSync()
    history = []
    for step in range(steps):
        trajs = rollout(engine, prompts * 2, [500 * step + i for i in range(8)], max_new_tokens=12, **TRUNCATED)
        for i, t in enumerate(trajs):
            t.group, t.reward = i % 4, float(i % 3 == 0)
        history.append(trainer.train_step(trajs))
        assert all(torch.isfinite(p).all() for p in trainer.model.parameters()), f"step {step}: {history}"
        assert sync.push(trainer.model, engine).checksums_match
    return trainer, history


def test_train_step_under_top_k_top_p_sampling_keeps_loss_gradients_and_weights_finite(lm, prompts):
    """Prompt and padding targets lie outside the truncated support (log-prob -inf); they carry no loss."""
    trainer, history = _on_policy_steps(lm, prompts, steps=2)
    for metrics in history:
        for key in ("loss", "grad_norm", "entropy", "ppo_kl", "kl", "logprob_abs_diff_max"):
            assert torch.isfinite(torch.tensor(metrics[key])), (key, metrics)
        assert metrics["logprob_abs_diff_max"] <= 1e-5
        assert metrics["grad_norm"] > 0
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_kl_penalty_stays_finite_under_top_k_top_p_sampling(lm, prompts):
    """Once policy and reference differ, their truncated supports differ: the KL must still be finite."""
    _, history = _on_policy_steps(lm, prompts, steps=3, kl_coef=0.1, lr=1e-3)
    for metrics in history:
        assert torch.isfinite(torch.tensor(metrics["ref_kl"])), history
        assert torch.isfinite(torch.tensor(metrics["loss"])), history
    assert history[-1]["ref_kl"] > 0
