"""Rollout routing replay (R3) end to end on tiny-moe: the engine records the experts every forwarded token
was routed to (in process and over SGLang's HTTP protocol), trajectories carry them, and the trainer
replays them, reporting its own route agreement and the train/rollout mismatch with and without replay.
Non-finite weights abort requests in the engine and skip updates in the trainer instead of raising.

Engine and trainer hold separate copies of the same weights, so every agreement checked here is between
two implementations: the engine's cached batched decode and the trainer's HF full forward.
"""

from __future__ import annotations

import contextlib

import asyncio
import base64
import copy
import random

import httpx
import pytest
import torch

from agentbench_npu.engines.http import EngineRequestError, HttpEngine
from agentbench_npu.engines.reference import ReferenceEngine
from agentbench_npu.engines.server import ServerThread
from agentbench_npu.episode import sample_into
from agentbench_npu.models.loading import load_model
from agentbench_npu.models.moe import RoutingError, moe_spec, routers, routing
from agentbench_npu.scenario import RolloutContext
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
# a skipped update still advances the schedule; torch warns about that order, as intended here
NO_OPTIMIZER_STEP = pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before:UserWarning")
MISMATCH_KEYS = ("logprob_abs_diff_mean", "logprob_abs_diff_mean_replay", "logprob_abs_diff_mean_no_replay",
                 "kl_replay", "kl_no_replay", "moe_route_agreement")


# -- fixtures and helpers ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lm():
    lm = load_model("tiny-moe")
    lm.model.eval().requires_grad_(False)  # the pristine weights: only ever deep-copied
    return lm


@pytest.fixture(scope="module")
def tok(lm):
    return lm.tokenizer


@pytest.fixture(scope="module")
def prompts(tok):
    out = [tuple(tok.encode(t)) for t in TEXTS]
    assert len({len(p) for p in out}) == len(out), "prompts must have different lengths"
    return out


def make_engine(lm, *, record: bool = True) -> ReferenceEngine:
    engine = ReferenceEngine(copy.deepcopy(lm.model).requires_grad_(False), lm.tokenizer, model_path=str(lm.path))
    engine.return_routed_experts = record
    return engine


@pytest.fixture(scope="module")
def engine(lm):
    """An fp32 engine that records every request's routes; tests here never change its weights."""
    return make_engine(lm)


@pytest.fixture(scope="module")
def bf16_engine(lm):
    engine = ReferenceEngine.create(lm.path, tokenizer=lm.tokenizer, dtype="bfloat16", device=CPU)
    engine.return_routed_experts = True
    return engine


def make_trainer(lm, **config) -> Trainer:
    model = copy.deepcopy(lm.model).requires_grad_(True)
    return Trainer(model, TrainConfig(**config), CPU, lm.tokenizer.pad_token_id)


def req(prompt, *, max_new_tokens=12, seed=0, routes=False, **sampling) -> GenerateRequest:
    return GenerateRequest(tuple(prompt), SamplingParams(max_new_tokens=max_new_tokens, seed=seed, **sampling),
                           return_routed_experts=routes)


def rollout(engine, prompts, seeds, *, max_new_tokens=12) -> list[Trajectory]:
    """One single-turn trajectory per (prompt, seed), carrying the engine's routes; rewards alternate per group."""
    requests = [req(p, seed=s, max_new_tokens=max_new_tokens) for p, s in zip(prompts, seeds)]
    trajs = []
    for i, (r, res) in enumerate(zip(requests, engine.generate_batch(requests))):
        traj = Trajectory(prompt_ids=list(r.input_ids), task_id=f"task-{i}", group=i % 4, reward=float(i < 4))
        traj.append_model_tokens(res.output_ids, res.output_logprobs, res.routed_experts)
        trajs.append(traj)
    return trajs


def multi_turn(engine, tok, prompt, seed, task_id="multi") -> Trajectory:
    """model turn, tool output (env tokens), model turn: the second turn's routes cover the whole history."""
    traj = Trajectory(prompt_ids=list(prompt), task_id=task_id, group=0, reward=1.0)
    for turn in range(2):
        (res,) = engine.generate_batch([req(traj.tokens, max_new_tokens=8, seed=seed + turn, ignore_eos=True)])
        traj.append_model_tokens(res.output_ids, res.output_logprobs, res.routed_experts)
        if turn == 0:
            traj.append_env_tokens(tok.encode(TOOL_OUTPUT))
    return traj


@torch.no_grad()
def routes_of_full_forward(model, tokens) -> torch.Tensor:
    """The routes the HF full forward of `tokens` chooses, [len(tokens), layers, top_k]."""
    with routing(model, moe_spec(model), capture=True) as session:
        model(input_ids=torch.tensor([tokens]))
    return session.routes()


def poisoned(lm, expert: int, layer: int = 0) -> torch.nn.Module:
    """A copy of the model with one expert's weights NaN (the nan-expert fault)."""
    model = copy.deepcopy(lm.model)
    with torch.no_grad():
        for param in model.model.layers[layer].mlp.experts.parameters():  # fused [experts, ...] tensors
            param[expert].fill_(float("nan"))
    return model


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    """Equal parameters, NaN where the other has NaN."""
    return all(torch.equal(torch.isnan(p), torch.isnan(q)) and torch.equal(p.nan_to_num(), q.nan_to_num())
               for p, q in zip(a.parameters(), b.parameters()))


# -- the engine records routes -------------------------------------------------------------------
def test_each_result_carries_routes_of_its_prompt_and_output_but_the_last_token(lm, engine, prompts):
    requests = [req(p, seed=i) for i, p in enumerate(prompts)]
    for r, res in zip(requests, engine.generate_batch(requests)):
        tokens = list(r.input_ids) + list(res.output_ids)
        assert res.routed_experts.dtype == torch.int32
        assert tuple(res.routed_experts.shape) == (len(tokens) - 1, 2, 2)
        # exactly the experts the full forward of those tokens picks: prompt (prefill) and decode steps alike
        assert torch.equal(res.routed_experts, routes_of_full_forward(lm.model, tokens[:-1]))


def test_a_batch_of_different_prompt_lengths_gives_each_request_its_own_routes(engine, prompts):
    """Left padding is cut away: each request's routes are those it gets when generated alone."""
    requests = [req(p, seed=10 + i) for i, p in enumerate(prompts)]
    batched = engine.generate_batch(requests)
    for r, res in zip(requests, batched):
        (alone,) = engine.generate_batch([r])
        assert res.output_ids == alone.output_ids
        assert torch.equal(res.routed_experts, alone.routed_experts)
    assert len({res.routed_experts.shape[0] for res in batched}) == len(requests)


def test_only_requests_that_ask_get_routes_when_the_engine_flag_is_off(lm, prompts):
    engine = make_engine(lm, record=False)
    asking, silent = engine.generate_batch([req(prompts[0], seed=1, routes=True), req(prompts[1], seed=2)])
    assert tuple(asking.routed_experts.shape) == (len(prompts[0]) + len(asking.output_ids) - 1, 2, 2)
    assert silent.routed_experts is None
    plain = engine.generate_batch([req(prompts[0], seed=1), req(prompts[1], seed=2)])
    assert all(res.routed_experts is None for res in plain)
    assert plain == [asking, silent]  # recording changes no token and no log-prob


def test_a_request_that_generates_nothing_gets_the_routes_of_its_prompt_but_the_last_token(engine, prompts):
    (res,) = engine.generate_batch([req(prompts[2], max_new_tokens=0)])
    assert res.output_ids == ()
    assert tuple(res.routed_experts.shape) == (len(prompts[2]) - 1, 2, 2)


def test_sample_into_keeps_routes_only_when_the_engine_read_the_trajectorys_own_tokens(engine, tok, prompts):
    ctx = RolloutContext(engine=engine, tokenizer=tok, sampling=SamplingParams(), options={}, rng=random.Random(0))
    sampling = SamplingParams(seed=3, ignore_eos=True)
    traj, context = Trajectory(prompt_ids=list(prompts[0])), list(prompts[0])
    asyncio.run(sample_into(ctx, traj, context, sampling, budget=6))
    assert traj.routed_experts.shape[0] == len(traj.tokens) - 1
    assert "routed_experts_dropped" not in traj.metadata
    # the next turn reads a re-rendered history, not the trajectory's tokens: its routes are not this trajectory's
    context = list(prompts[1]) + context
    asyncio.run(sample_into(ctx, traj, context, sampling, budget=4))
    assert traj.routed_experts is None
    assert "differed" in traj.metadata["routed_experts_dropped"]
    assert traj.response_length == 6 + 4 and traj.loss_mask == [1] * 10  # the turn itself is kept


# -- the trainer replays them ----------------------------------------------------------------------
def test_fp32_replay_matches_the_engines_logprobs_and_agrees_with_every_route(lm, engine, tok, prompts):
    trajs = rollout(engine, prompts * 2, range(20, 28))
    trajs.append(multi_turn(engine, tok, prompts[0], 40))
    metrics = make_trainer(lm, routing_replay=True).train_step(trajs)
    assert metrics["moe_routing_replay"] is True and metrics["moe_routes_recorded"] is True
    assert metrics["moe_route_agreement"] == 1.0
    assert 0.0 <= metrics["logprob_abs_diff_mean"] < 1e-5
    assert metrics["logprob_abs_diff_mean_replay"] == metrics["logprob_abs_diff_mean"]
    assert 0.0 <= metrics["logprob_abs_diff_mean_no_replay"] < 1e-5  # same weights, same routes either way
    assert metrics["trainable_tokens"] == sum(t.num_trainable for t in trajs)
    assert metrics["skipped_updates"] == 0 and metrics["grad_norm"] > 0
    assert metrics["moe_nonfinite_router_logits"] == 0


def test_routing_metrics_do_not_depend_on_the_micro_batch_size(lm, engine, prompts):
    trajs = rollout(engine, prompts * 2, range(50, 58))
    small = make_trainer(lm, routing_replay=True, micro_batch_size=1).train_step(copy.deepcopy(trajs))
    large = make_trainer(lm, routing_replay=True, micro_batch_size=16).train_step(copy.deepcopy(trajs))
    for key in MISMATCH_KEYS:
        assert small[key] == pytest.approx(large[key], abs=1e-6), key
    assert small["moe_expert_load"] == large["moe_expert_load"]
    assert small["loss"] == pytest.approx(large["loss"], rel=1e-5, abs=1e-9)


@pytest.fixture(scope="module")
def bf16_trajs(bf16_engine, prompts):
    """Rollouts of a bf16 engine: enough tokens that some of its routes differ from the fp32 trainer's."""
    return rollout(bf16_engine, prompts * 4, range(100, 116), max_new_tokens=24)


def test_replay_lowers_the_mismatch_of_a_bf16_engine_against_an_fp32_trainer(lm, bf16_trajs):
    metrics = make_trainer(lm, routing_replay=True).train_step(copy.deepcopy(bf16_trajs))
    assert 0.0 < metrics["moe_route_agreement"] < 1.0  # the precisions route some tokens differently
    assert metrics["logprob_abs_diff_mean_replay"] < metrics["logprob_abs_diff_mean_no_replay"]
    assert metrics["kl_replay"] < metrics["kl_no_replay"]
    assert metrics["logprob_abs_diff_mean"] == metrics["logprob_abs_diff_mean_replay"]


def test_both_ways_of_the_mismatch_are_measured_on_the_weights_before_the_update(lm, bf16_trajs):
    """The replay trainer's no-replay number is what a trainer without replay reports, and vice versa:
    neither is taken after the step's optimizer update (which a zero learning rate would not make)."""
    on = make_trainer(lm, routing_replay=True).train_step(copy.deepcopy(bf16_trajs))
    off = make_trainer(lm, routing_replay=False).train_step(copy.deepcopy(bf16_trajs))
    frozen = make_trainer(lm, routing_replay=True, lr=0.0).train_step(copy.deepcopy(bf16_trajs))
    assert off["moe_routing_replay"] is False
    assert off["logprob_abs_diff_mean"] == off["logprob_abs_diff_mean_no_replay"]
    for key in ("logprob_abs_diff_mean_replay", "logprob_abs_diff_mean_no_replay", "kl_replay", "kl_no_replay"):
        assert on[key] == pytest.approx(off[key], rel=1e-9, abs=1e-12), key
        assert on[key] == pytest.approx(frozen[key], rel=1e-9, abs=1e-12), key
    assert on["grad_norm"] > 0


def test_replay_refuses_a_trajectory_with_trainable_tokens_but_no_routes(lm, engine, prompts):
    trajs = rollout(engine, prompts, range(4))
    trajs[2].routed_experts = None
    trainer = make_trainer(lm, routing_replay=True)
    before = copy.deepcopy(trainer.model)
    with pytest.raises(RoutingError, match="first: task task-2"):
        trainer.train_step(trajs)
    assert same_weights(trainer.model, before)


def test_a_trajectory_whose_routes_cover_more_than_its_tokens_is_refused_naming_it(lm, engine, prompts):
    trajs = rollout(engine, prompts, range(4))
    trajs[1].routed_experts = torch.cat([trajs[1].routed_experts, trajs[1].routed_experts[:2]])
    with pytest.raises(RoutingError, match="task task-1: recorded routes"):
        make_trainer(lm, routing_replay=True).train_step(trajs)


def test_routing_replay_on_a_dense_model_is_refused_at_construction():
    dense = load_model("tiny")
    with pytest.raises(RoutingError, match="needs a mixture-of-experts model.*is dense"):
        Trainer(dense.model, TrainConfig(routing_replay=True), CPU, dense.tokenizer.pad_token_id)


# -- non-finite weights -----------------------------------------------------------------------------
def test_an_engine_with_a_nan_expert_aborts_its_requests_instead_of_raising(lm, prompts):
    engine = ReferenceEngine(poisoned(lm, expert=0).requires_grad_(False), lm.tokenizer)
    engine.return_routed_experts = True
    requests = [req(p, seed=i) for i, p in enumerate(prompts)]
    results = engine.generate_batch(requests)
    # every prompt sends some token to expert 0 of layer 0, so every row's logits are NaN from the start
    assert [res.finish_reason for res in results] == ["abort"] * len(prompts)
    for r, res in zip(requests, results):
        assert res.output_ids == () and res.output_logprobs == ()
        assert tuple(res.routed_experts.shape) == (len(r.input_ids) - 1, 2, 2)


@pytest.fixture(scope="module")
def pad_expert(lm, tok):
    """The expert the padding token goes to in layer 0: poisoning it poisons every padded position."""
    return int(routes_of_full_forward(lm.model, [tok.pad_token_id])[0, 0, 0])


@pytest.fixture(scope="module")
def clear_prompt(lm, pad_expert):
    """A two-token prompt none of whose tokens the clean model routes to `pad_expert` in layer 0."""
    candidates = torch.tensor([(a, b) for a in range(1, 32) for b in range(1, 32)])
    with torch.no_grad(), routing(lm.model, moe_spec(lm.model), capture=True) as session:
        lm.model(input_ids=candidates)  # the rows do not attend to each other
    hits = (session.routes()[:, 0] == pad_expert).any(-1).view(len(candidates), 2).any(-1)
    assert not bool(hits.all()), f"no two-token prompt avoids expert {pad_expert}"
    return tuple(candidates[int((~hits).nonzero()[0, 0])].tolist())


def test_a_request_clear_of_the_nan_expert_finishes_normally(lm, engine, pad_expert, clear_prompt):
    nan_engine = ReferenceEngine(poisoned(lm, pad_expert).requires_grad_(False), lm.tokenizer)
    (res,) = nan_engine.generate_batch([req(clear_prompt, max_new_tokens=3, ignore_eos=True)])
    (clean,) = engine.generate_batch([req(clear_prompt, max_new_tokens=3, ignore_eos=True)])
    assert not bool((clean.routed_experts[:2, 0] == pad_expert).any())
    assert res.finish_reason == "length"
    assert res.output_ids == clean.output_ids


def test_a_request_clear_of_the_nan_expert_is_not_aborted_by_its_batch_mates_padding(lm, pad_expert,
                                                                                    clear_prompt):
    nan_engine = ReferenceEngine(poisoned(lm, pad_expert).requires_grad_(False), lm.tokenizer)
    longer = req(range(100, 106), max_new_tokens=3, ignore_eos=True)  # left-pads clear_prompt with 4 pad tokens
    batched, _ = nan_engine.generate_batch([req(clear_prompt, max_new_tokens=3, ignore_eos=True), longer])
    assert batched.finish_reason == "length"
    # the control: without zeroing the padding's hidden states, the NaN reaches the request through attention
    nan_engine._padding_kept_finite = lambda pad: contextlib.nullcontext()
    unguarded, _ = nan_engine.generate_batch([req(clear_prompt, max_new_tokens=3, ignore_eos=True), longer])
    assert unguarded.finish_reason == "abort"


@NO_OPTIMIZER_STEP
def test_a_nan_loss_skips_the_optimizer_step_and_leaves_the_weights_alone(lm, engine, prompts):
    trajs = rollout(engine, prompts * 2, range(60, 68))
    model = poisoned(lm, expert=0).requires_grad_(True)
    trainer = Trainer(model, TrainConfig(routing_replay=True), CPU, lm.tokenizer.pad_token_id)
    before = copy.deepcopy(model)
    metrics = trainer.train_step(trajs)
    assert metrics["skipped_updates"] == 1
    assert metrics["nonfinite_loss"] >= 1 and metrics["nonfinite_logprobs"] > 0
    assert metrics["moe_nonfinite_router_logits"] > 0  # layer 1's routers read NaN hidden states
    assert same_weights(model, before)
    assert not trainer.optimizer.state  # no Adam moment was ever taken


@NO_OPTIMIZER_STEP
def test_a_step_whose_requests_all_aborted_trains_nothing(lm, prompts):
    engine = ReferenceEngine(poisoned(lm, expert=0).requires_grad_(False), lm.tokenizer)
    engine.return_routed_experts = True
    trajs = rollout(engine, prompts, range(4))
    assert all(t.response_length == 0 for t in trajs)
    trainer = make_trainer(lm, routing_replay=True)
    before = copy.deepcopy(trainer.model)
    metrics = trainer.train_step(trajs)
    assert metrics["trainable_tokens"] == 0
    assert metrics["skipped_updates"] >= 1
    assert same_weights(trainer.model, before)


# -- over HTTP -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(lm):
    """Our engine server over an fp32 engine whose own flag is off: only requests that ask get routes."""
    with ServerThread(make_engine(lm, record=False)) as running:
        yield running


def over_http(url, requests, **client_options):
    async def run():
        client = HttpEngine(url, **client_options)
        try:
            return await client.generate(requests)
        finally:
            await client.aclose()

    return asyncio.run(run())


@pytest.mark.parametrize("shape", [None, (2, 2)], ids=["shape_from_model_info", "shape_given"])
def test_http_routes_equal_the_in_process_engines_for_the_same_request_and_seed(engine, server, prompts, shape):
    requests = [req(p, seed=7 + i) for i, p in enumerate(prompts[:3])]
    remote = over_http(server.url, requests, return_routed_experts=True, routes_shape=shape)
    local = engine.generate_batch(requests)
    for r, there, here in zip(requests, remote, local):
        assert there.output_ids == here.output_ids
        assert tuple(there.routed_experts.shape) == (len(r.input_ids) + len(there.output_ids) - 1, 2, 2)
        assert torch.equal(there.routed_experts, here.routed_experts)


def test_http_without_the_flag_gets_no_routes(server, prompts):
    (res,) = over_http(server.url, [req(prompts[0])])
    assert res.routed_experts is None


def test_the_server_sends_routes_as_base64_int32_in_meta_info(server, prompts):
    body = {"input_ids": list(prompts[1]), "sampling_params": {"max_new_tokens": 5, "sampling_seed": 1},
            "return_logprob": True, "return_routed_experts": True}
    data = httpx.post(f"{server.url}/generate", json=body, timeout=120).json()
    meta = data["meta_info"]
    raw = base64.b64decode(meta["routed_experts"])
    assert len(raw) == 4 * (meta["prompt_tokens"] + meta["completion_tokens"] - 1) * 2 * 2
    plain = httpx.post(f"{server.url}/generate", json={**body, "return_routed_experts": False}, timeout=120).json()
    assert "routed_experts" not in plain["meta_info"]


def test_http_routes_of_a_one_token_prompt_that_generates_nothing_are_empty(server):
    (res,) = over_http(server.url, [req((5,), max_new_tokens=0)], return_routed_experts=True, routes_shape=(2, 2))
    assert tuple(res.routed_experts.shape) == (0, 2, 2)


@pytest.fixture(scope="module")
def dense_server():
    dense = load_model("tiny")
    with ServerThread(ReferenceEngine(dense.model, dense.tokenizer)) as running:
        yield running


def test_a_dense_models_server_refuses_return_routed_experts_with_http_400(dense_server):
    with pytest.raises(EngineRequestError, match=r"HTTP 400.*return_routed_experts.*dense"):
        over_http(dense_server.url, [req((5, 6, 7))], return_routed_experts=True, routes_shape=(2, 2))


def test_routes_from_a_server_that_describes_no_experts_need_an_explicit_shape(dense_server):
    with pytest.raises(EngineRequestError, match="does not describe its experts.*routes_shape"):
        over_http(dense_server.url, [req((5, 6, 7))], return_routed_experts=True)


def test_routers_of_the_engines_model_are_hooked_only_while_a_request_runs(engine, prompts):
    engine.generate_batch([req(prompts[0], max_new_tokens=2)])
    assert all(not router._forward_hooks for _, router in routers(engine.model))
