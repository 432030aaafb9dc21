"""An adapter folder is checked before it is served: finite weights within a bound that a
trained LoRA never comes near, so a corrupted file is refused instead of served."""

from __future__ import annotations

import json
import random
import struct

import pytest
import torch
from conftest import write_random_adapter
from safetensors.torch import load_file, save_file

from rlhf_demo.modeling.adapters import ADAPTER_WEIGHTS, MAX_ABS_WEIGHT, AdapterError, check_adapter_folder


def flip_exponent_bits(path, flips: int, seed: int) -> None:
    """Flip the top exponent bit of ``flips`` random float32 weights in place, as failing
    storage might: a weight w becomes w * 2**128 (or the reverse)."""
    raw = bytearray(path.read_bytes())
    header_len = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + header_len])
    start = 8 + header_len
    offsets = [
        start + o for k, v in header.items() if k != "__metadata__" for o in range(v["data_offsets"][0], v["data_offsets"][1], 4)
    ]
    for offset in random.Random(seed).sample(offsets, flips):
        raw[offset + 3] ^= 0x40  # little-endian: bit 30 of the float is in the last byte
    path.write_bytes(bytes(raw))


def test_a_trained_adapter_passes(tiny_loaded, settings):
    folder = write_random_adapter(tiny_loaded, settings, "v1", seed=1)
    assert check_adapter_folder(folder)


def test_bit_flipped_weights_are_refused(tiny_loaded, settings):
    folder = write_random_adapter(tiny_loaded, settings, "v1", seed=1)
    flip_exponent_bits(folder / ADAPTER_WEIGHTS, flips=64, seed=0)
    largest = max(t.abs().max().item() for t in load_file(folder / ADAPTER_WEIGHTS).values())
    assert largest > 1e30  # still finite: the old NaN/inf check let it through
    with pytest.raises(AdapterError, match="bound"):
        check_adapter_folder(folder)


@pytest.mark.parametrize("value", [1e30, -2 * MAX_ABS_WEIGHT])
def test_uniformly_huge_weights_are_refused(tiny_loaded, settings, value):
    folder = write_random_adapter(tiny_loaded, settings, "v1", seed=1)
    tensors = load_file(folder / ADAPTER_WEIGHTS)
    save_file({k: torch.full_like(t, value) for k, t in tensors.items()}, folder / ADAPTER_WEIGHTS)
    with pytest.raises(AdapterError, match="bound"):
        check_adapter_folder(folder)
