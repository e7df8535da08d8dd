"""Mixture-of-experts routing on the real tiny-moe (Qwen3-MoE, 2 layers, 8 experts, top-2): finding the
routers, capturing their choice, replaying a recorded one (R3), the errors of routes that do not fit,
the per-step routing statistics, routes on a Trajectory, and SGLang's base64 wire format of routes.

The tiny model is untrained, so nothing here depends on what it says: every check compares the routes
and logits of one pass with those of another.
"""

from __future__ import annotations

import base64
import copy
import json
import math

import pytest
import torch

from agentbench_npu.engines.http import EngineRequestError, decode_routed_experts, result_from_sglang
from agentbench_npu.engines.server import encode_routed_experts
from agentbench_npu.models.loading import load_model
from agentbench_npu.models.moe import (MoeSpec, RoutingError, RoutingStats, model_is_moe, moe_spec, routers,
                                       routing)
from agentbench_npu.types import Trajectory, TrajectoryError

# two sequences of eight tokens: N = B*T = 16 routed tokens per pass
IDS = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12], [20, 21, 22, 23, 24, 25, 26, 27]])
N = IDS.numel()


@pytest.fixture(scope="module")
def lm():
    lm = load_model("tiny-moe")
    lm.model.eval().requires_grad_(False)  # the pristine weights: only ever read or deep-copied
    return lm


@pytest.fixture(scope="module")
def model(lm):
    return lm.model


@pytest.fixture(scope="module")
def spec(model):
    return moe_spec(model)


@pytest.fixture(scope="module")
def natural(model, spec):
    """The logits and the routes the routers choose themselves for IDS."""
    with torch.no_grad(), routing(model, spec, capture=True) as session:
        logits = model(input_ids=IDS).logits
    return logits, session.routes()


def everywhere(n: int = N) -> torch.Tensor:
    return torch.ones(n, dtype=torch.bool)


def shifted(routes: torch.Tensor, by: int = 1, experts: int = 8) -> torch.Tensor:
    return ((routes.long() + by) % experts).to(torch.int32)


def replayed(model, spec, recorded, use=None, **session):
    with torch.no_grad(), routing(model, spec, recorded=recorded, use=everywhere() if use is None else use,
                                  replay=True, capture=True, **session) as state:
        logits = model(input_ids=IDS).logits
    return logits, state.routes()


# -- finding the routers -------------------------------------------------------------------------
def test_moe_spec_of_tiny_moe_is_two_layers_of_eight_experts_routing_two(model, spec):
    assert spec == MoeSpec(num_layers=2, num_experts=8, top_k=2, moe_layers=(0, 1), norm_topk_prob=True)
    found = routers(model)
    assert [layer for layer, _ in found] == [0, 1]
    assert all(tuple(router.weight.shape) == (8, 128) for _, router in found)
    assert spec.to_dict() == {"num_layers": 2, "num_experts": 8, "top_k": 2, "moe_layers": [0, 1],
                              "norm_topk_prob": True}


def test_a_dense_model_has_no_moe_spec_and_no_routers():
    dense = load_model("tiny").model
    assert moe_spec(dense) is None
    assert routers(dense) == []


def test_model_is_moe_tells_tiny_models_apart_by_name():
    assert model_is_moe("tiny-moe") is True
    assert model_is_moe("tiny") is False


@pytest.mark.parametrize("config, expected", [
    ({"num_experts": 8, "num_experts_per_tok": 2}, True),  # Qwen3-MoE
    ({"num_local_experts": 8}, True),  # Mixtral
    ({"n_routed_experts": 64}, True),  # DeepSeek
    ({"text_config": {"num_experts": 4}}, True),  # a multimodal wrapper
    ({"num_experts": 0, "hidden_size": 128}, False),
    ({"hidden_size": 128}, False),
], ids=["num_experts", "num_local_experts", "n_routed_experts", "text_config", "zero_experts", "dense"])
def test_model_is_moe_reads_a_checkpoint_dirs_config_without_loading_it(tmp_path, config, expected):
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert model_is_moe(str(tmp_path)) is expected


def test_model_is_moe_is_false_for_a_dir_without_a_readable_config(tmp_path):
    assert model_is_moe(str(tmp_path)) is False
    (tmp_path / "config.json").write_text("{not json")
    assert model_is_moe(str(tmp_path)) is False
    assert model_is_moe(str(tmp_path / "missing")) is False


# -- capture and replay --------------------------------------------------------------------------
def test_capture_returns_int32_routes_of_every_token_layer_and_slot_with_valid_distinct_ids(natural):
    _, routes = natural
    assert routes.dtype == torch.int32
    assert tuple(routes.shape) == (N, 2, 2)
    assert int(routes.min()) >= 0 and int(routes.max()) < 8
    assert bool((routes[..., 0] != routes[..., 1]).all())  # top-2 picks two different experts
    assert len(torch.unique(routes)) > 2  # the untrained routers do spread the tokens


def test_capture_changes_nothing_the_model_computes(model, natural):
    logits, _ = natural
    with torch.no_grad():
        plain = model(input_ids=IDS).logits
    assert torch.equal(plain, logits)


def test_replaying_the_captured_routes_reproduces_the_logits_bitwise(model, spec, natural):
    logits, routes = natural
    again, used = replayed(model, spec, routes)
    assert torch.equal(used, routes)
    assert torch.equal(again, logits)


def test_replaying_other_experts_routes_through_them_and_changes_the_logits(model, spec, natural):
    logits, routes = natural
    other = shifted(routes)
    changed, used = replayed(model, spec, other)
    assert torch.equal(used, other)
    assert float((changed - logits).abs().max()) > 1e-3


def test_the_corrupt_option_replays_ids_shifted_by_that_much(model, spec, natural):
    _, routes = natural
    by_option, used = replayed(model, spec, routes, corrupt=3)
    by_hand, _ = replayed(model, spec, shifted(routes, 3))
    assert torch.equal(used, shifted(routes, 3))
    assert torch.equal(by_option, by_hand)


def test_rows_not_marked_in_use_keep_the_routers_own_choice(model, spec, natural):
    """The first sequence replays foreign routes, the second (use=False) routes by itself: the sequences
    do not attend to each other, so the second one's routes are exactly those of a plain pass."""
    logits, routes = natural
    use = torch.tensor([True] * 8 + [False] * 8)
    changed, used = replayed(model, spec, shifted(routes), use=use)
    assert torch.equal(used[:8], shifted(routes)[:8])
    assert torch.equal(used[8:], routes[8:])
    assert float((changed[0] - logits[0]).abs().max()) > 1e-3
    assert torch.allclose(changed[1], logits[1], atol=1e-5, rtol=0)


def test_gradients_of_a_replayed_pass_reach_every_router(lm, spec, natural):
    """R3 keeps the router in the graph: the replayed experts are weighted by the router's own probabilities."""
    _, routes = natural
    model = copy.deepcopy(lm.model).requires_grad_(True)
    with routing(model, spec, recorded=shifted(routes), use=everywhere(), replay=True):
        loss = torch.log_softmax(model(input_ids=IDS).logits, -1)[..., 0].sum()
    loss.backward()
    for layer, router in routers(model):
        assert router.weight.grad is not None, layer
        assert bool(torch.isfinite(router.weight.grad).all()), layer
        assert float(router.weight.grad.abs().sum()) > 0, layer


# -- routes that do not fit the pass ---------------------------------------------------------------
def test_more_recorded_rows_than_routed_tokens_is_a_routing_error_naming_both_counts(model, spec, natural):
    _, routes = natural
    extra = torch.cat([routes, routes[:1]])
    with pytest.raises(RoutingError, match=rf"routed {N} tokens, but {N + 1} recorded routes"):
        replayed(model, spec, extra, use=everywhere(N + 1))


@pytest.mark.parametrize("shape", [(N, 3, 2), (N, 1, 2), (N, 2, 1), (N, 2, 4)],
                         ids=["more_layers", "fewer_layers", "top1", "top4"])
def test_recorded_routes_of_another_layout_are_refused_before_the_pass(model, spec, shape):
    recorded = torch.zeros(shape, dtype=torch.int32)
    with pytest.raises(RoutingError, match=r"the model routes \[tokens, 2, 2\]"), \
            routing(model, spec, recorded=recorded, use=everywhere(), replay=True):
        pytest.fail("the session must not open")


def test_replay_without_recorded_routes_is_refused(model, spec):
    with pytest.raises(RoutingError, match="replay needs recorded routes"), routing(model, spec, replay=True):
        pass


def test_replaying_minus_one_in_an_moe_layer_is_a_routing_error(model, spec, natural):
    _, routes = natural
    holes = routes.clone()
    holes[3, 1] = -1
    with pytest.raises(RoutingError, match="hold -1 in MoE layer"):
        replayed(model, spec, holes)


def test_a_layer_that_routes_twice_in_one_session_is_a_routing_error(model, spec):
    with pytest.raises(RoutingError, match="must route once per forward pass; layer 0: 2 times, layer 1: 2 times"), \
            torch.no_grad(), routing(model, spec, capture=True):
        model(input_ids=IDS)
        model(input_ids=IDS)


def test_a_session_in_which_no_layer_routed_is_a_routing_error(model, spec):
    with pytest.raises(RoutingError, match="once per forward pass; layer 0: 0 times"), \
            routing(model, spec, capture=True) as session:
        pass
    with pytest.raises(RoutingError, match="no MoE layer ran"):
        session.routes()


def test_hooks_are_removed_when_the_session_ends(model, spec, natural):
    _, routes = natural
    with pytest.raises(RoutingError):
        replayed(model, spec, torch.cat([routes, routes]), use=everywhere(2 * N))  # fails inside the pass
    with torch.no_grad():
        model(input_ids=IDS)  # no hook left behind to raise again
    assert all(not router._forward_hooks for _, router in routers(model))


def test_replay_without_a_use_mask_replays_every_row(model, spec, natural):
    logits, routes = natural
    with torch.no_grad(), routing(model, spec, recorded=routes, replay=True):
        again = model(input_ids=IDS).logits
    assert torch.equal(again, logits)


# -- routing statistics ----------------------------------------------------------------------------
def stats_of(loads: dict[int, list[int]], **counts) -> RoutingStats:
    return RoutingStats(num_experts=8, top_k=2, load={k: torch.tensor(v) for k, v in loads.items()}, **counts)


def test_total_collapse_scores_load_imbalance_one_and_counts_the_dead_experts():
    summary = stats_of({0: [50, 50, 0, 0, 0, 0, 0, 0]}).summary()
    assert summary["moe_load_imbalance"] == pytest.approx(1.0)
    assert summary["moe_load_cv"] == pytest.approx(math.sqrt(8 / 2 - 1))
    assert summary["moe_dead_experts"] == 6
    assert summary["moe_dead_fraction"] == pytest.approx(6 / 8)
    assert summary["moe_load_max_min"] == math.inf


def test_uniform_load_scores_zero_imbalance_and_no_dead_expert():
    summary = stats_of({0: [5] * 8, 1: [5] * 8}).summary()
    assert summary["moe_load_imbalance"] == 0.0
    assert summary["moe_load_max_min"] == 1.0
    assert summary["moe_dead_experts"] == 0 and summary["moe_dead_fraction"] == 0.0
    assert summary["moe_expert_load"] == {"0": [5] * 8, "1": [5] * 8}


def test_the_worst_layer_decides_the_imbalance_and_dead_experts_add_up_over_layers():
    summary = stats_of({0: [5] * 8, 1: [40, 40, 0, 0, 0, 0, 0, 0]}).summary()
    assert summary["moe_load_imbalance"] == pytest.approx(1.0)
    assert summary["moe_dead_experts"] == 6
    assert summary["moe_dead_fraction"] == pytest.approx(6 / 16)


def test_agreement_entropy_and_nonfinite_counts_are_reported_as_given():
    summary = stats_of({0: [5] * 8}, agree=3, compared=4, entropy_sum=6.0, entropy_count=3,
                       nonfinite_router_logits=2).summary()
    assert summary["moe_route_agreement"] == 0.75
    assert summary["moe_router_entropy"] == 2.0
    assert summary["moe_router_entropy_max"] == pytest.approx(math.log(8))
    assert summary["moe_nonfinite_router_logits"] == 2
    assert stats_of({0: [5] * 8}).summary()["moe_route_agreement"] is None  # nothing compared


def test_adding_stats_sums_loads_per_layer_and_every_count():
    total = stats_of({0: [1] * 8}, agree=1, compared=2, entropy_sum=1.0, entropy_count=1)
    total.add(stats_of({0: [2] * 8, 1: [3] * 8}, agree=2, compared=2, entropy_sum=2.0, entropy_count=3,
                       nonfinite_router_logits=1))
    assert {k: v.tolist() for k, v in total.load.items()} == {0: [3] * 8, 1: [3] * 8}
    assert (total.agree, total.compared, total.entropy_sum, total.entropy_count,
            total.nonfinite_router_logits) == (3, 4, 3.0, 4, 1)


def test_a_pass_counts_only_valid_tokens_and_agrees_fully_with_its_own_routes(model, spec, natural):
    _, routes = natural
    valid = torch.tensor([True] * 5 + [False] * 3 + [True] * 8)  # the first sequence's last three are padding
    with torch.no_grad(), routing(model, spec, recorded=routes, use=everywhere(), valid=valid) as own:
        model(input_ids=IDS)
    summary = own.stats.summary()
    assert [sum(load) for load in summary["moe_expert_load"].values()] == [13 * 2, 13 * 2]
    assert summary["moe_route_agreement"] == 1.0 and own.stats.compared == 13 * 2
    assert 0.0 < summary["moe_router_entropy"] <= math.log(8)
    assert summary["moe_nonfinite_router_logits"] == 0


def test_a_pass_compared_with_other_routes_agrees_nowhere(model, spec, natural):
    _, routes = natural
    with torch.no_grad(), routing(model, spec, recorded=shifted(routes), use=everywhere(),
                                  valid=everywhere()) as other:
        model(input_ids=IDS)
    assert other.stats.summary()["moe_route_agreement"] == 0.0


def test_no_statistics_are_kept_without_a_valid_mask(model, spec):
    with torch.no_grad(), routing(model, spec, capture=True) as session:
        model(input_ids=IDS)
    assert session.stats is None


# -- routes on a trajectory ------------------------------------------------------------------------
def routes_of(rows: int, fill: int = 0) -> torch.Tensor:
    return torch.full((rows, 2, 2), fill, dtype=torch.int32)


def test_routes_must_cover_every_token_but_the_newest_one():
    traj = Trajectory(prompt_ids=[1, 2, 3])
    with pytest.raises(TrajectoryError, match="routed experts cover 5 tokens.*must cover 4"):
        traj.append_model_tokens([7, 8], [-0.1, -0.2], routes_of(5))
    with pytest.raises(TrajectoryError, match="must cover 4"):
        traj.append_model_tokens([7, 8], [-0.1, -0.2], routes_of(2))  # the prompt's rows alone
    assert (traj.response_ids, traj.loss_mask, traj.rollout_logprobs, traj.routed_experts) == ([], [], [], None)
    routes = routes_of(4)
    traj.append_model_tokens([7, 8], [-0.1, -0.2], routes)
    assert traj.routed_experts is routes
    assert traj.response_ids == [7, 8]


def test_the_newest_model_turns_routes_replace_the_earlier_ones():
    traj = Trajectory(prompt_ids=[1, 2, 3])
    traj.append_model_tokens([7, 8], [-0.1, -0.2], routes_of(4, fill=1))
    traj.append_env_tokens([9, 10, 11])
    assert tuple(traj.routed_experts.shape) == (4, 2, 2)  # observations bring no routes
    with pytest.raises(TrajectoryError, match="must cover 8"):
        traj.append_model_tokens([12], [-0.3], routes_of(4))
    traj.append_model_tokens([12], [-0.3], routes_of(8, fill=2))
    assert tuple(traj.routed_experts.shape) == (8, 2, 2)
    assert bool((traj.routed_experts == 2).all())
    assert len(traj.tokens) - 1 == traj.routed_experts.shape[0]


def test_a_later_model_turn_without_routes_drops_the_stale_ones_rather_than_cover_part_of_the_tokens():
    traj = Trajectory(prompt_ids=[1, 2, 3])
    traj.append_model_tokens([7, 8], [-0.1, -0.2], routes_of(4))
    traj.append_model_tokens([9], [-0.3])
    assert traj.routed_experts is None
    assert "without routed experts" in traj.metadata["routed_experts_dropped"]


def test_a_turn_that_produced_no_token_still_takes_routes_of_the_tokens_it_read():
    traj = Trajectory(prompt_ids=[1, 2, 3])
    traj.append_model_tokens([], [], routes_of(2))  # say, aborted before its first token
    assert traj.response_length == 0 and tuple(traj.routed_experts.shape) == (2, 2, 2)


# -- SGLang's wire format ------------------------------------------------------------------------------
def test_encoded_routes_decode_to_the_same_int32_tensor(natural):
    _, routes = natural
    encoded = encode_routed_experts(routes)
    assert base64.b64decode(encoded) == routes.numpy().tobytes()  # base64 of int32, row-major
    decoded = decode_routed_experts(encoded, N, 2, 2)
    assert decoded.dtype == torch.int32
    assert torch.equal(decoded, routes)


def test_encoding_casts_to_int32_and_keeps_minus_one():
    routes = torch.tensor([[[-1, -1], [3, 4]]], dtype=torch.int64)
    assert torch.equal(decode_routed_experts(encode_routed_experts(routes), 1, 2, 2), routes.to(torch.int32))


def test_a_wrong_number_of_decoded_ids_names_the_counts():
    encoded = encode_routed_experts(routes_of(3))
    with pytest.raises(EngineRequestError, match=r"returned 12 routed-expert ids; 4 tokens .* x 2 layers x "
                                                 r"top-2 make 16"):
        decode_routed_experts(encoded, 4, 2, 2)


def test_routes_that_are_not_base64_are_an_engine_request_error():
    with pytest.raises(EngineRequestError, match="not base64"):
        decode_routed_experts("not base64!", 1, 2, 2)


def test_routes_of_zero_tokens_decode_to_an_empty_tensor():
    encoded = encode_routed_experts(routes_of(0))
    assert encoded == ""
    assert tuple(decode_routed_experts(encoded, 0, 2, 2).shape) == (0, 2, 2)


def sglang_response(routes: torch.Tensor | None, prompt_tokens: int, output: list[int]) -> dict:
    meta = {"prompt_tokens": prompt_tokens, "completion_tokens": len(output), "finish_reason": {"type": "length"},
            "output_token_logprobs": [[-0.5, t, None] for t in output]}
    if routes is not None:
        meta["routed_experts"] = encode_routed_experts(routes)
    return {"text": "", "meta_info": meta}


def test_a_generate_response_yields_routes_of_prompt_plus_output_minus_one_tokens():
    routes = torch.arange(6 * 2 * 2, dtype=torch.int32).view(6, 2, 2) % 8
    result = result_from_sglang(sglang_response(routes, 4, [10, 11, 12]), 4, 0, routes_shape=(2, 2))
    assert result.output_ids == (10, 11, 12)
    assert torch.equal(result.routed_experts, routes)


def test_a_generate_response_is_read_without_routes_when_none_were_asked_for():
    routes = routes_of(6)
    assert result_from_sglang(sglang_response(routes, 4, [10, 11, 12]), 4, 0).routed_experts is None


def test_routes_asked_for_but_not_sent_are_an_error_naming_sglangs_flag():
    with pytest.raises(EngineRequestError, match="sent none.*--enable-return-routed-experts"):
        result_from_sglang(sglang_response(None, 4, [10, 11, 12]), 4, 0, (2, 2))


def test_a_generate_response_with_routes_of_the_wrong_length_is_an_engine_request_error():
    with pytest.raises(EngineRequestError, match="3 tokens"):
        result_from_sglang(sglang_response(routes_of(5), 1, [10, 11, 12]), 1, 0, routes_shape=(2, 2))


def test_replay_refuses_a_router_that_does_not_weight_by_softmax(model, spec):
    """A sigmoid-scored router (DeepSeek-V3 style) would get wrong weights from replay: refused, not run."""
    def sigmoid_weights(_module, _args, out):
        logits, _, indices = out
        return logits, torch.sigmoid(logits.float()).gather(-1, indices).to(logits.dtype), indices

    handles = [router.register_forward_hook(sigmoid_weights) for _, router in routers(model)]
    try:
        with torch.no_grad(), routing(model, spec, capture=True) as session:
            model(input_ids=IDS)
        with pytest.raises(RoutingError, match="does not weight its experts by a softmax"):
            with torch.no_grad(), routing(model, spec, recorded=session.routes(), replay=True):
                model(input_ids=IDS)
    finally:
        for handle in handles:
            handle.remove()
