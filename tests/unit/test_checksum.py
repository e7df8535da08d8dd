"""Weight checksums: equal weights agree; any change a stale or corrupt sync could make disagrees."""

from __future__ import annotations

import pytest
import torch

from agentbench_npu.sync.checksum import tensor_digest, weights_checksum


def weights(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "embed.weight": torch.randn(16, 8, generator=g),
        "layers.0.mlp.weight": torch.randn(8, 8, generator=g),
        "norm.weight": torch.ones(8),
    }


def checksum(named: dict[str, torch.Tensor]) -> str:
    return weights_checksum(named.items())


def test_equal_weights_in_separate_tensors_give_equal_checksums():
    assert checksum(weights()) == checksum({k: v.clone() for k, v in weights().items()})


def test_the_order_tensors_come_in_does_not_matter():
    named = weights()
    assert weights_checksum(reversed(list(named.items()))) == checksum(named)


def test_a_checksum_is_a_short_hex_string():
    value = checksum(weights())
    assert len(value) == 16 and int(value, 16) >= 0


@pytest.mark.parametrize("bit", range(32))
def test_flipping_any_single_bit_of_a_float32_weight_changes_the_checksum(bit):
    named = weights()
    reference = checksum(named)
    flat = named["layers.0.mlp.weight"].view(torch.int32).view(-1)
    flat[13] ^= torch.tensor(1 << bit if bit < 31 else -(1 << 31), dtype=torch.int32)
    assert checksum(named) != reference


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64, torch.int8, torch.uint8])
def test_a_flipped_low_bit_is_caught_for_every_element_size(dtype):
    t = (torch.arange(64) % 100).to(dtype)
    reference = tensor_digest(t)
    bits = t.view({1: torch.uint8, 2: torch.int16, 8: torch.int64}[t.element_size()])
    bits[40] ^= 1
    assert tensor_digest(t) != reference


def test_swapping_two_elements_changes_the_checksum():
    named = weights()
    reference = checksum(named)
    flat = named["layers.0.mlp.weight"].view(-1)
    flat[[3, 50]] = flat[[50, 3]]
    assert checksum(named) != reference


def test_swapping_two_rows_changes_the_checksum():
    named = weights()
    reference = checksum(named)
    w = named["embed.weight"]
    w[[2, 9]] = w[[9, 2]]
    assert checksum(named) != reference


def test_renaming_a_tensor_changes_the_checksum():
    named = weights()
    renamed = dict(named)
    renamed["lm_head.weight"] = renamed.pop("embed.weight")
    assert checksum(renamed) != checksum(named)


def test_swapping_the_values_of_two_same_shaped_tensors_changes_the_checksum():
    a, b = torch.randn(4, 4, generator=torch.Generator().manual_seed(1)), torch.zeros(4, 4)
    assert weights_checksum([("q", a), ("k", b)]) != weights_checksum([("q", b), ("k", a)])


def test_changing_the_dtype_changes_the_checksum_even_when_the_bits_are_equal():
    zeros_f32, zeros_i32 = torch.zeros(8, dtype=torch.float32), torch.zeros(8, dtype=torch.int32)
    assert tensor_digest(zeros_f32) == tensor_digest(zeros_i32)  # same raw bits
    assert weights_checksum([("w", zeros_f32)]) != weights_checksum([("w", zeros_i32)])


def test_casting_to_another_precision_changes_the_checksum():
    named = weights()
    cast = {k: v.to(torch.bfloat16) for k, v in named.items()}
    assert checksum(cast) != checksum(named)


def test_a_reshaped_tensor_has_a_different_checksum():
    w = torch.arange(12, dtype=torch.float32)
    assert weights_checksum([("w", w.reshape(3, 4))]) != weights_checksum([("w", w.reshape(4, 3))])


def test_a_missing_tensor_changes_the_checksum():
    named = weights()
    fewer = dict(named)
    del fewer["norm.weight"]
    assert checksum(fewer) != checksum(named)


def test_a_non_contiguous_view_checksums_as_its_values():
    w = torch.randn(5, 7, generator=torch.Generator().manual_seed(2))
    assert tensor_digest(w.t()) == tensor_digest(w.t().contiguous())


def test_a_tensor_larger_than_one_chunk_is_fully_covered():
    w = torch.zeros((1 << 22) + 10)
    reference = tensor_digest(w)
    w[-1] = 1.0  # in the second chunk
    assert tensor_digest(w) != reference


def test_boolean_masks_are_checksummed_by_value():
    mask = torch.tensor([True, False, True])
    assert tensor_digest(mask) == tensor_digest(mask.clone())
    assert tensor_digest(mask) != tensor_digest(torch.tensor([True, True, False]))


def test_a_change_in_the_imaginary_part_of_a_complex_buffer_changes_the_checksum():
    # e.g. rotary `freqs_cis` buffers are complex; a stale imaginary part is a stale weight
    a = torch.tensor([1 + 2j, 3 + 4j], dtype=torch.complex64)
    b = torch.tensor([1 + 2j, 3 + 5j], dtype=torch.complex64)
    assert weights_checksum([("freqs_cis", a)]) != weights_checksum([("freqs_cis", b)])
