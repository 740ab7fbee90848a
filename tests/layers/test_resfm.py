import itertools

import pytest
import torch

from rwkvseg.layers.resfm import ChannelResFM, ModalResFM, fm_interaction


def _pairwise(z: torch.Tensor, dim: int) -> torch.Tensor:
    fields = z.unbind(dim)
    return sum(a * b for a, b in itertools.combinations(fields, 2))


@pytest.mark.parametrize("fields", [2, 3, 4, 5])
def test_fm_interaction_is_the_sum_over_pairs(fields):
    z = torch.randn(2, fields, 3, 4, 5, dtype=torch.float64)
    torch.testing.assert_close(fm_interaction(z, dim=1), _pairwise(z, 1))


def test_fm_interaction_of_one_field_is_zero():
    assert torch.equal(fm_interaction(torch.randn(2, 1, 3, 4), dim=1), torch.zeros(2, 3, 4))


def test_modal_fm_term_is_the_explicit_sum_over_modality_pairs():
    torch.manual_seed(0)
    fm = ModalResFM(modalities=4, channels=3)
    x = torch.randn(2, 4, 5, 6, 7)
    z = fm.embed(x)  # [B, M*k, ...], channel f*k + j = channel j of modality f
    zf = [z[:, f * 3 : (f + 1) * 3] for f in range(4)]
    explicit = sum(zf[f] * zf[g] for f in range(4) for g in range(f + 1, 4))
    torch.testing.assert_close(fm.fm_term(z), explicit)
    torch.testing.assert_close(fm(x), z + fm.lift(explicit))
    assert fm(x).shape == (2, 12, 5, 6, 7)


def test_modal_embeddings_see_only_their_own_modality():
    torch.manual_seed(1)
    fm = ModalResFM(modalities=3, channels=2)
    x = torch.randn(1, 3, 4, 5, 6)
    y = x.clone()
    y[:, 1] += 1.0
    zx, zy = fm.embed(x), fm.embed(y)
    torch.testing.assert_close(zx[:, 0:2], zy[:, 0:2])
    torch.testing.assert_close(zx[:, 4:6], zy[:, 4:6])
    assert (zx[:, 2:4] - zy[:, 2:4]).abs().max() > 1e-3


def test_modal_fm_term_is_not_constant_at_init():
    torch.manual_seed(2)
    fm = ModalResFM(modalities=4, channels=2)
    x = torch.randn(1, 4, 8, 8, 8)
    term = fm.fm_term(fm.embed(x))
    # varies over voxels, per channel, and the residual it adds depends on the input
    assert term.flatten(2).std(dim=2).min() > 1e-2
    other = fm.fm_term(fm.embed(torch.randn(1, 4, 8, 8, 8)))
    assert (term - other).abs().mean() > 1e-2
    fm(x).square().mean().backward()
    assert fm.embed.weight.grad.abs().sum() > 0 and fm.lift.weight.grad.abs().sum() > 0


def test_modal_resfm_rejects_a_wrong_modality_count():
    with pytest.raises(ValueError, match="4 modalities"):
        ModalResFM(4, 2)(torch.randn(1, 3, 4, 4, 4))


def test_channel_resfm_reproduces_the_released_code():
    """The code's placement: its LayerNorm centres the fields, so the FM term is -C/2 until the norm trains."""
    torch.manual_seed(3)
    fm = ChannelResFM(8)
    x = torch.randn(2, 8, 4, 5, 6)
    term = fm.fm_term(x)
    torch.testing.assert_close(term, torch.full_like(term, -4.0), rtol=1e-3, atol=1e-3)
    out = fm(x)
    assert out.shape == x.shape
    out.square().mean().backward()
    assert fm.pre_norm.weight.grad.abs().sum() > 0
    with torch.no_grad():
        fm.pre_norm.weight.copy_(torch.linspace(0.5, 1.5, 8))
    assert fm.fm_term(x).std() > 1e-2
