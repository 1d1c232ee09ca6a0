"""The random rules draw the same numbers for a seed whatever device the batch lives on.

On the loss route the rules run inside the actor workers on CUDA tensors with the CPU generator of
`tip_verl.verl_ext.rng`, and CUDA's kernels refuse a generator of another device. No device type
available without an accelerator reproduces that refusal: `torch.rand(..., generator=cpu_generator,
device="meta")` runs, but the meta kernel ignores the generator, and CPU-only torch builds no other
device's generator. So these tests check what makes the CUDA call safe instead: the draw consumes the
CPU generator, so it happens on the CPU, for a batch on the meta device too (a draw made on the
tensors' device leaves the generator untouched), and it equals the draw of a fresh generator with the
same seed. Where CUDA is present, the last test compares the keys on both devices directly.
"""

import pytest
import torch

from tip_verl.core.selection import SELECTION_RULES, SelectionInputs, rules_reading

SHAPE = (3, 8)
SEED = 7
RANDOM_RULES = rules_reading("random")


def inputs_on(device):
    generator = torch.Generator().manual_seed(SEED)
    mask = torch.ones(SHAPE, dtype=torch.bool, device=device)
    entropy = torch.linspace(0.1, 2.0, SHAPE[0] * SHAPE[1]).reshape(SHAPE).to(device)
    divergence = torch.linspace(2.0, 0.0, SHAPE[0] * SHAPE[1]).reshape(SHAPE).to(device)
    return SelectionInputs(mask, entropy, divergence, 0.98, generator)


def fresh_draw():
    return torch.rand(SHAPE, generator=torch.Generator().manual_seed(SEED))


@pytest.mark.parametrize("rule", RANDOM_RULES)
def test_draw_consumes_the_cpu_generator_for_a_batch_on_another_device(rule):
    inputs = inputs_on("meta")
    keys = SELECTION_RULES[rule](inputs)
    assert keys.device.type == "meta" and tuple(keys.shape) == SHAPE
    after_cpu_draw = torch.Generator().manual_seed(SEED)
    torch.rand(SHAPE, generator=after_cpu_draw)
    assert torch.equal(inputs.generator.get_state(), after_cpu_draw.get_state())


def test_random_keys_are_a_fresh_generators_draw():
    assert torch.equal(SELECTION_RULES["random"](inputs_on("cpu")), fresh_draw())


def test_entropy_sample_keys_are_log_entropy_plus_gumbel_of_a_fresh_draw():
    inputs = inputs_on("cpu")
    gumbel = -torch.log(-torch.log(fresh_draw()))
    assert torch.allclose(SELECTION_RULES["entropy_sample"](inputs), torch.log(inputs.entropy) + gumbel)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("rule", RANDOM_RULES)
def test_same_keys_on_cuda_as_on_cpu(rule):
    on_cuda = SELECTION_RULES[rule](inputs_on("cuda"))
    assert on_cuda.device.type == "cuda"
    assert torch.allclose(on_cuda.cpu(), SELECTION_RULES[rule](inputs_on("cpu")))
