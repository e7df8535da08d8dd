"""The reference engine against the HF forward of the same weights: log-probs, sampling, stops, weights.

The tiny model is untrained (near-uniform next-token distributions, gibberish text), which is fine
here: every check compares real numbers computed two ways, never the content of the text.
The recompute is `engines/sampling.py::sampling_logprobs` applied to HF full-forward logits (CPU fp32):
the one definition of the distribution the engine samples from.
"""

from __future__ import annotations

import asyncio
import copy
import re

import pytest
import torch

from agentbench_npu.engines.model_runner import HFRunner, Qwen3Runner
from agentbench_npu.engines.reference import ReferenceEngine
from agentbench_npu.engines.sampling import sampling_logprobs
from agentbench_npu.models import load_model
from agentbench_npu.sync import ColocateSync
from agentbench_npu.sync.checksum import weights_checksum
from agentbench_npu.types import GenerateRequest, GenerateResult, SamplingParams

TEXTS = [
    "What is 3 + 4?",
    "hi",
    "Compute 12 * 7 and put the final answer in boxed please, then print it",
    "<|im_start|>user\nprint the sum of 5 and 9<|im_end|>\n<|im_start|>assistant\n",
]
FULL = {"temperature": 1.0, "top_p": 1.0, "top_k": -1}
TRUNCATED = {"temperature": 0.7, "top_p": 0.9, "top_k": 20}


# -- fixtures and helpers ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lm():
    return load_model("tiny")


@pytest.fixture(scope="module")
def model(lm):
    """The HF module the recompute runs; never handed to an engine that changes weights."""
    return lm.model.eval()


@pytest.fixture(scope="module")
def tok(lm):
    return lm.tokenizer


@pytest.fixture(scope="module")
def prompts(tok):
    out = [tuple(tok.encode(t)) for t in TEXTS]
    assert len({len(p) for p in out}) == len(out), "prompts must have different lengths"
    return out


@pytest.fixture(scope="module")
def engine(model, tok):
    """A lean-runner engine over its own copy of the weights; tests here do not change them."""
    return ReferenceEngine(copy.deepcopy(model).requires_grad_(False), tok)


def fresh_engine(model, tok, **kw) -> ReferenceEngine:
    return ReferenceEngine(copy.deepcopy(model).requires_grad_(False), tok, **kw)


def req(prompt, **sampling) -> GenerateRequest:
    return GenerateRequest(tuple(prompt), SamplingParams(**sampling))


def one(engine, prompt, **sampling) -> GenerateResult:
    (result,) = engine.generate_batch([req(prompt, **sampling)])
    return result


@torch.no_grad()
def hf_logits(model, prompt, output) -> torch.Tensor:
    """Raw fp32 logits [len(output), V]: row t is the HF full forward's prediction of output[t]."""
    ids = torch.tensor([list(prompt) + list(output)])
    logits = model(input_ids=ids, use_cache=False).logits[0].float()
    p = len(prompt)
    return logits[p - 1:p - 1 + len(output)]


def hf_logprobs(model, prompt, output, temperature=1.0, top_p=1.0, top_k=-1) -> torch.Tensor:
    lp = sampling_logprobs(hf_logits(model, prompt, output), temperature, top_p, top_k)
    return lp.gather(-1, torch.tensor(list(output))[:, None])[:, 0]


def perturbed_named(model, seed: int, scale: float = 0.05) -> list[tuple[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [
        (name, p.detach() + scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))
        for name, p in model.named_parameters()
    ]


# -- log-prob alignment --------------------------------------------------------------------------
@pytest.mark.parametrize("sampling", [FULL, TRUNCATED], ids=["temperature1", "t0.7-topk20-topp0.9"])
def test_rollout_logprobs_equal_hf_full_forward_recompute(engine, model, prompts, sampling):
    requests = [req(p, max_new_tokens=24, seed=100 * i + s, **sampling)
                for i, p in enumerate(prompts) for s in range(2)]
    results = engine.generate_batch(requests)
    diffs = []
    for r, res in zip(requests, results):
        assert len(res.output_ids) == len(res.output_logprobs) > 0
        recomputed = hf_logprobs(model, r.input_ids, res.output_ids, **sampling)
        assert torch.isfinite(recomputed).all(), "a sampled token lies outside the recomputed support"
        diffs.append((recomputed - torch.tensor(res.output_logprobs)).abs())
    diff = torch.cat(diffs)
    assert diff.numel() > 100
    assert float(diff.mean()) <= 1e-5, f"mean |Δ| {float(diff.mean()):.3g}"
    assert float(diff.max()) <= 1e-4, f"max |Δ| {float(diff.max()):.3g}"


@pytest.mark.parametrize("sampling", [FULL, TRUNCATED], ids=["temperature1", "t0.7-topk20-topp0.9"])
def test_lean_runner_and_hf_runner_give_same_tokens_and_logprobs(model, tok, prompts, sampling):
    weights = copy.deepcopy(model).requires_grad_(False)  # both engines read the very same weights
    lean = ReferenceEngine(weights, tok, lean=True)
    hf = ReferenceEngine(weights, tok, lean=False)
    assert isinstance(lean.runner, Qwen3Runner) and isinstance(hf.runner, HFRunner)
    requests = [req(p, max_new_tokens=20, seed=7 + i, **sampling) for i, p in enumerate(prompts)]
    for a, b in zip(lean.generate_batch(requests), hf.generate_batch(requests)):
        assert a.output_ids == b.output_ids
        assert a.finish_reason == b.finish_reason
        diff = (torch.tensor(a.output_logprobs) - torch.tensor(b.output_logprobs)).abs()
        assert float(diff.max()) <= 1e-5


# -- seeds and batching --------------------------------------------------------------------------
def test_seeded_request_gives_same_tokens_alone_and_in_a_batch_of_other_prompts(engine, prompts):
    target = req(prompts[0], max_new_tokens=24, seed=1234, ignore_eos=True, **TRUNCATED)
    alone = engine.generate_batch([target])[0]
    others = [
        req(prompts[1], max_new_tokens=5, seed=1, **FULL),
        req(prompts[2], max_new_tokens=30, temperature=0.0),
        req(prompts[3], max_new_tokens=12, seed=1234, **FULL),
    ]
    for batch in ([others[0], target, others[1]], [*others, target], [target, target]):
        for res in (r for r, q in zip(engine.generate_batch(batch), batch) if q is target):
            assert res.output_ids == alone.output_ids
            diff = (torch.tensor(res.output_logprobs) - torch.tensor(alone.output_logprobs)).abs()
            assert float(diff.max()) <= 1e-5


def test_same_seed_repeats_and_different_seeds_give_different_tokens(engine, prompts):
    requests = [req(prompts[2], max_new_tokens=16, ignore_eos=True, seed=s) for s in (5, 5, 6, 7)]
    a, b, c, d = engine.generate_batch(requests)
    assert a.output_ids == b.output_ids
    assert a.output_logprobs == b.output_logprobs
    assert len({a.output_ids, c.output_ids, d.output_ids}) == 3


# -- greedy and top-k ----------------------------------------------------------------------------
def test_greedy_decoding_is_argmax_of_hf_logits_at_every_step(engine, model, prompts):
    for prompt in prompts:
        res = one(engine, prompt, max_new_tokens=20, temperature=0.0, ignore_eos=True)
        assert len(res.output_ids) == 20
        logits = hf_logits(model, prompt, res.output_ids)
        assert logits.argmax(-1).tolist() == list(res.output_ids)
        # temperature 0 reports the log-probs of temperature 1 (engines/sampling.py)
        expected = torch.log_softmax(logits, -1).gather(-1, torch.tensor(res.output_ids)[:, None])[:, 0]
        assert torch.allclose(torch.tensor(res.output_logprobs), expected, atol=1e-5, rtol=0)


def test_top_k_1_sampling_equals_greedy_decoding(engine, prompts):
    for i, prompt in enumerate(prompts):
        greedy = one(engine, prompt, max_new_tokens=16, temperature=0.0, ignore_eos=True)
        top1 = one(engine, prompt, max_new_tokens=16, temperature=1.0, top_k=1, seed=99 + i, ignore_eos=True)
        assert top1.output_ids == greedy.output_ids
        assert all(lp == 0.0 for lp in top1.output_logprobs)  # a one-token support has probability 1


def test_top_k_samples_are_inside_the_top_k_of_recomputed_logits(engine, model, prompts):
    k = 5
    requests = [req(p, max_new_tokens=24, top_k=k, seed=s, ignore_eos=True) for p in prompts for s in range(4)]
    for r, res in zip(requests, engine.generate_batch(requests)):
        logits = hf_logits(model, r.input_ids, res.output_ids)
        top = logits.topk(k, dim=-1).indices
        assert (top == torch.tensor(res.output_ids)[:, None]).any(-1).all()
        # and the reported log-probs are those of the renormalised top-k distribution
        expected = hf_logprobs(model, r.input_ids, res.output_ids, top_k=k)
        assert float((expected - torch.tensor(res.output_logprobs)).abs().max()) <= 1e-4


# -- the sampled distribution --------------------------------------------------------------------
def _one_token_samples(engine, prompt, n: int, **sampling) -> torch.Tensor:
    requests = [req(prompt, max_new_tokens=1, ignore_eos=True, seed=10_000 + s, **sampling) for s in range(n)]
    # batches of 200: a request's tokens depend on its seed alone (tested above), and each request's
    # noise block is allocated up front, which makes one 2000-request batch needlessly slow
    results = [res for i in range(0, n, 200) for res in engine.generate_batch(requests[i:i + 200])]
    return torch.tensor([r.output_ids[0] for r in results])


@pytest.mark.parametrize("sampling", [
    {"temperature": 0.06},            # peaked: low temperature on this untrained model
    {"temperature": 0.7, "top_k": 8},    # eight tokens, none dominant
], ids=["t0.06", "t0.7-topk8"])
def test_sampling_frequencies_match_the_sampled_distribution(engine, model, prompts, sampling):
    n = 2000
    prompt = prompts[0]
    logits = hf_logits(model, prompt, [0])[0]  # the prediction after the prompt
    p = sampling_logprobs(logits, sampling["temperature"], 1.0, sampling.get("top_k", -1)).exp().double()
    # E[TV] of n multinomial draws is at most ½·Σ sqrt(p(1-p)/n) (Jensen); TV moves by at most 1/n per
    # draw, so P(TV > E[TV] + 0.05) <= exp(-2n·0.05²) = exp(-10) (McDiarmid). The bound 0.1 is safe when:
    expected_tv_bound = 0.5 * float((p * (1 - p) / n).sqrt().sum())
    assert expected_tv_bound <= 0.05, "precondition: the distribution must be peaked enough"
    tokens = _one_token_samples(engine, prompt, n, **sampling)
    freq = torch.bincount(tokens, minlength=p.numel()).double() / n
    assert float(freq[p == 0].sum()) == 0.0
    tv = 0.5 * float((freq - p).abs().sum())
    assert tv < 0.1, f"total variation {tv:.3f} (expected about {expected_tv_bound:.3f})"
    # a sharper check on the same draws: the mean log-prob of what was sampled estimates Σ p·log p
    # (minus the entropy) with standard error sd(log p)/sqrt(n); 5 standard errors (two-sided ≈ 6e-7
    # in the normal approximation) still catch a sampler whose temperature is off by 15% at t0.06
    logp = torch.log(p.clamp(min=1e-300))
    support = p > 0
    neg_entropy = float((p[support] * logp[support]).sum())
    stderr = float(((p[support] * (logp[support] - neg_entropy) ** 2).sum() / n).sqrt())
    mean = float(logp[tokens].mean())
    assert abs(mean - neg_entropy) < 5 * stderr, f"mean log p {mean:.4f}, expected {neg_entropy:.4f} ± {stderr:.4f}"


def test_full_vocabulary_sampling_passes_a_binned_chi_square_test(engine, model, prompts):
    """Temperature 1 over all 512 tokens (nearly uniform): bins of equal expected mass, χ² with 19 dof."""
    n, bins = 2000, 20
    prompt = prompts[1]
    tokens = _one_token_samples(engine, prompt, n, temperature=1.0)
    p = torch.softmax(hf_logits(model, prompt, [0])[0].double(), -1)
    order = torch.argsort(p, descending=True)
    bin_of = torch.empty_like(order)
    bin_of[order] = (torch.cumsum(p[order], 0) - p[order]).mul(bins).floor().long().clamp(max=bins - 1)
    expected = torch.zeros(bins, dtype=torch.float64).index_add_(0, bin_of, p) * n
    observed = torch.bincount(bin_of[tokens], minlength=bins).double()
    chi2 = float(((observed - expected) ** 2 / expected).sum())
    # P(χ²₁₉ > 60) ≈ 4e-6: a correct sampler essentially never fails; a wrong distribution does
    assert chi2 < 60.0, f"chi-square {chi2:.1f} over {bins} bins"


# -- stopping ------------------------------------------------------------------------------------
def test_stop_token_id_ends_generation_with_stop_reason_and_matched_id(engine, prompts):
    full = one(engine, prompts[0], max_new_tokens=24, seed=3, ignore_eos=True)
    ids = list(full.output_ids)
    cut = next(i for i in range(3, len(ids)) if ids[i] not in ids[:i])
    stopped = one(engine, prompts[0], max_new_tokens=24, seed=3, ignore_eos=True, stop_token_ids=(ids[cut],))
    assert stopped.finish_reason == "stop"
    assert stopped.matched_stop == ids[cut]
    assert list(stopped.output_ids) == ids[:cut + 1]  # the stop token itself is returned, as SGLang does
    assert stopped.output_logprobs == full.output_logprobs[:cut + 1]


def test_max_new_tokens_ends_generation_with_length_reason(engine, prompts):
    res = one(engine, prompts[2], max_new_tokens=7, seed=11, ignore_eos=True)
    assert res.finish_reason == "length"
    assert res.matched_stop is None
    assert len(res.output_ids) == len(res.output_logprobs) == 7
    assert res.prompt_tokens == len(prompts[2])
    zero = one(engine, prompts[2], max_new_tokens=0, seed=11)
    assert zero.finish_reason == "length" and zero.output_ids == ()


def _find_stop_string(engine, tok, prompt):
    """A 3-letter string the model emits under a fixed seed, at its first occurrence in the text."""
    specials = tok.all_special_tokens
    for seed in range(50):
        full = one(engine, prompt, max_new_tokens=40, seed=seed, ignore_eos=True)
        for m in re.finditer(r"[A-Za-z]{3,}", full.text):
            s, pos = m.group()[:3], m.start()
            if pos > 0 and full.text.find(s) == pos and not any(s in sp for sp in specials):
                return seed, full, s, pos
    raise AssertionError("the model never emitted three letters in a row")


def test_stop_string_ends_generation_and_is_trimmed_from_text(engine, tok, prompts):
    seed, full, s, pos = _find_stop_string(engine, tok, prompts[0])
    stopped = one(engine, prompts[0], max_new_tokens=40, seed=seed, ignore_eos=True, stop=("zzzzqqq", s))
    assert stopped.finish_reason == "stop"
    assert stopped.matched_stop == s
    assert stopped.text == full.text[:pos]
    assert s not in stopped.text
    n = len(stopped.output_ids)
    assert n < len(full.output_ids) and stopped.output_ids == full.output_ids[:n]
    assert s in tok.decode(stopped.output_ids)  # generation ran exactly until the string appeared
    assert s not in tok.decode(stopped.output_ids[:-1])


def test_ignore_eos_keeps_generating_past_the_eos_token(engine, prompts):
    requests = [req(prompts[1], max_new_tokens=48, seed=s) for s in range(100)]
    results = engine.generate_batch(requests)
    hit = next((r, res) for r, res in zip(requests, results)
               if res.finish_reason == "stop" and len(res.output_ids) < 40)
    r, stopped = hit
    assert stopped.matched_stop in engine.eos_ids
    assert stopped.output_ids[-1] == stopped.matched_stop
    kept = engine.generate_batch([GenerateRequest(r.input_ids, r.sampling.replace(ignore_eos=True))])[0]
    assert kept.finish_reason == "length"
    assert len(kept.output_ids) == 48
    assert kept.output_ids[:len(stopped.output_ids)] == stopped.output_ids


# -- async ---------------------------------------------------------------------------------------
def test_concurrent_generate_one_calls_return_what_one_generate_batch_returns(engine, prompts):
    requests = [req(p, max_new_tokens=12 + 3 * i, seed=40 + i, **(TRUNCATED if i % 2 else FULL))
                for i, p in enumerate(prompts * 2)]
    batch = engine.generate_batch(requests)

    async def concurrently():
        return await asyncio.gather(*(engine.generate_one(r.input_ids, r.sampling) for r in requests))

    gathered = asyncio.run(concurrently())
    assert len(gathered) == len(batch)
    for a, b in zip(gathered, batch):
        assert a.output_ids == b.output_ids
        assert a.finish_reason == b.finish_reason
        assert a.text == b.text
        assert float((torch.tensor(a.output_logprobs) - torch.tensor(b.output_logprobs)).abs().max()) <= 1e-5


def test_async_generate_splits_more_requests_than_max_batch_and_keeps_order(model, tok, prompts):
    small = fresh_engine(model, tok, max_batch=3)
    requests = [req(p, max_new_tokens=8, seed=60 + i) for i, p in enumerate(prompts * 2)]
    expected = small.generate_batch(requests)
    got = asyncio.run(small.generate(requests))
    assert [g.output_ids for g in got] == [e.output_ids for e in expected]


# -- weight updates ------------------------------------------------------------------------------
def test_update_weights_from_tensors_changes_outputs_checksum_and_weight_version(model, tok, prompts):
    eng = fresh_engine(model, tok)
    request = req(prompts[0], max_new_tokens=16, seed=5, ignore_eos=True)
    before, checksum, version = eng.generate_batch([request])[0], eng.checksum(), eng.weight_version
    named = perturbed_named(model, seed=1)
    assert eng.update_weights_from_tensors(named) == version + 1
    assert eng.weight_version == version + 1
    assert eng.checksum() != checksum
    assert eng.checksum() == weights_checksum(named)
    after = eng.generate_batch([request])[0]
    assert after.weight_version == version + 1
    assert after.output_ids != before.output_ids
    # the engine really decodes with the new weights: compare with the HF forward of a perturbed copy
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for (name, p), (_, new) in zip(reference.named_parameters(), named):
            p.copy_(new)
    recomputed = hf_logprobs(reference, request.input_ids, after.output_ids)
    assert float((recomputed - torch.tensor(after.output_logprobs)).abs().max()) <= 1e-4
    assert eng.update_weights_from_tensors(named, version=41) == 41 and eng.weight_version == 41


def test_update_weights_from_tensors_rejects_an_unknown_name(model, tok):
    eng = fresh_engine(model, tok)
    with pytest.raises(KeyError, match="no_such.weight"):
        eng.update_weights_from_tensors([("no_such.weight", torch.zeros(3))])


def test_update_weights_from_tensors_rejects_a_wrong_shape(model, tok):
    eng = fresh_engine(model, tok)
    name, p = next(iter(model.named_parameters()))
    with pytest.raises(ValueError, match="shape"):
        eng.update_weights_from_tensors([(name, torch.zeros(p.shape[0] + 1, *p.shape[1:]))])


@pytest.mark.parametrize("bad", ["unknown-name", "wrong-shape"])
def test_rejected_weight_update_leaves_weights_and_version_unchanged(model, tok, bad):
    """An update that raises must not leave a mix of old and new tensors under the old version."""
    eng = fresh_engine(model, tok)
    checksum, version = eng.checksum(), eng.weight_version
    named = perturbed_named(model, seed=2)
    name, tensor = named[-1]
    named[-1] = ("no_such.weight", tensor) if bad == "unknown-name" else (name, torch.zeros(tensor.numel() + 1))
    with pytest.raises((KeyError, ValueError)):
        eng.update_weights_from_tensors(named)
    assert eng.weight_version == version
    assert eng.checksum() == checksum


def test_update_weights_from_disk_loads_a_save_pretrained_dir(model, tok, prompts, tmp_path):
    eng = fresh_engine(model, tok)
    target = copy.deepcopy(model)
    with torch.no_grad():
        for (_, p), (_, new) in zip(target.named_parameters(), perturbed_named(model, seed=3)):
            p.copy_(new)
    target.save_pretrained(tmp_path, safe_serialization=True)
    version = eng.weight_version
    assert asyncio.run(eng.update_weights_from_disk(tmp_path)) == version + 1
    assert eng.checksum() == weights_checksum(target.named_parameters())
    assert asyncio.run(eng.weights_checksum()) == eng.checksum()
    assert asyncio.run(eng.model_info())["weight_version"] == version + 1
    requests = [req(p, max_new_tokens=12, seed=9) for p in prompts]
    got = eng.generate_batch(requests)
    want = fresh_engine(target, tok).generate_batch(requests)
    assert [g.output_ids for g in got] == [w.output_ids for w in want]


def test_update_weights_from_disk_without_safetensors_raises(model, tok, tmp_path):
    eng = fresh_engine(model, tok)
    with pytest.raises(FileNotFoundError):
        asyncio.run(eng.update_weights_from_disk(tmp_path))
    assert eng.weight_version == 0


# -- colocated weight sync -----------------------------------------------------------------------
def test_colocate_push_makes_engine_checksum_equal_trainer_checksum(model, tok, prompts):
    trainer_model = copy.deepcopy(model)
    eng = fresh_engine(model, tok)
    assert eng.checksum() == weights_checksum(trainer_model.named_parameters())
    with torch.no_grad():  # the trainer's weights change (as after an optimizer step)
        for (_, p), (_, new) in zip(trainer_model.named_parameters(), perturbed_named(model, seed=4, scale=0.01)):
            p.copy_(new)
    trainer_sum = weights_checksum(trainer_model.named_parameters())
    assert eng.checksum() != trainer_sum
    result = ColocateSync().push(trainer_model, eng)
    assert result.checksums_match
    assert result.trainer_checksum == result.engine_checksum == trainer_sum == eng.checksum()
    assert result.weight_version == eng.weight_version == 1
    assert result.tensors == len(list(trainer_model.parameters()))
    assert result.bytes == sum(p.numel() * p.element_size() for p in trainer_model.parameters())
    requests = [req(p, max_new_tokens=10, seed=21) for p in prompts]
    want = fresh_engine(trainer_model, tok).generate_batch(requests)
    assert [g.output_ids for g in eng.generate_batch(requests)] == [w.output_ids for w in want]


def test_colocate_push_to_a_bfloat16_engine_matches_the_checksum_of_the_cast_weights(model, tok):
    trainer_model = copy.deepcopy(model)
    eng = ReferenceEngine(copy.deepcopy(model).to(torch.bfloat16).requires_grad_(False), tok)
    with torch.no_grad():
        for (_, p), (_, new) in zip(trainer_model.named_parameters(), perturbed_named(model, seed=5, scale=0.01)):
            p.copy_(new)
    result = ColocateSync().push(trainer_model, eng)
    assert result.checksums_match
    cast = [(n, p.detach().to(torch.bfloat16)) for n, p in trainer_model.named_parameters()]
    assert eng.checksum() == weights_checksum(cast)
    assert result.trainer_checksum != weights_checksum(trainer_model.named_parameters())
