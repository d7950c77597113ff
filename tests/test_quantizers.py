import pytest
import torch

from dfmpc import DfmpcError, quantize_weight, ternary_quantize, uniform_quantize
from dfmpc.quantizers import QuantizedTensor, asymmetric_quantize


def eq6_reference(w, k):
    """Paper Eq. (6) written literally, times max|w| to undo the dropped scale."""
    m = w.abs().max()
    q = 2 / (2**k - 1) * torch.round((2**k - 1) * (w / (2 * m) + 0.5)) - 1
    return m * q


def test_ternary_matches_eq3_eq4_by_hand():
    w = torch.tensor([[0.9, -0.1, 0.05, -1.2], [0.3, 0.0, -0.4, 0.2]])
    qt = ternary_quantize(w)
    delta = 0.7 * w.abs().mean()  # Eq. 4
    expected_codes = torch.where(w > delta, 1, torch.where(w < -delta, -1, 0))
    assert torch.equal(qt.codes.long(), expected_codes)
    alpha = w.abs()[w.abs() > delta].mean()
    assert torch.allclose(qt.scale, alpha)
    assert torch.allclose(qt.dequantize(), alpha * expected_codes)
    assert qt.weight_bits == 8 * 2


def test_ternary_threshold_is_0_7_times_mean_abs():
    """Eq. (4) pins the factor: E|w| = 1 here and |w| = 0.68, 0.72 sit on either side of Delta = 0.7, so any
    factor outside (0.68, 0.72) changes the codes or alpha (the hand example above accepts about 0.51-0.76)."""
    w = torch.tensor([0.68, -0.72, 0.2, 2.4])
    assert torch.isclose(w.abs().mean(), torch.tensor(1.0))
    qt = ternary_quantize(w)
    assert qt.codes.tolist() == [0, -1, 0, 1]
    assert torch.isclose(qt.scale, torch.tensor((0.72 + 2.4) / 2))
    assert ternary_quantize(w, threshold_factor=0.75).codes.tolist() == [0, 0, 0, 1]  # the test sees the factor


def test_ternary_per_channel_uses_channel_statistics():
    w = torch.randn(8, 4, 3, 3) * torch.logspace(-2, 0, 8).reshape(8, 1, 1, 1)
    qt = ternary_quantize(w, granularity="channel")
    assert qt.scale.shape == (8,)
    for j in range(8):
        ref = ternary_quantize(w[j : j + 1])
        assert torch.equal(qt.codes[j], ref.codes[0])
        assert torch.allclose(qt.scale[j], ref.scale)
    # per channel fits a weight with channels of very different magnitude better than per tensor
    err_c = (qt.dequantize() - w).norm()
    err_t = (ternary_quantize(w).dequantize() - w).norm()
    assert err_c < err_t


@pytest.mark.parametrize("k", range(3, 9))
def test_uniform_matches_eq6_literally(k):
    w = torch.randn(16, 8, 3, 3)
    qt = uniform_quantize(w, k)
    assert torch.allclose(qt.dequantize(), eq6_reference(w, k), atol=1e-6)
    assert int(qt.codes.min()) >= 0 and int(qt.codes.max()) <= 2**k - 1
    step = 2 * w.abs().max() / (2**k - 1)
    assert (qt.dequantize() - w).abs().max() <= step / 2 + 1e-6


def test_uniform_error_shrinks_with_bits():
    w = torch.randn(64, 64)
    errors = [(uniform_quantize(w, k).dequantize() - w).norm().item() for k in range(3, 9)]
    assert all(a > b for a, b in zip(errors, errors[1:]))


def test_quantize_weight_dispatches_2_bits_to_ternary():
    w = torch.randn(4, 4)
    assert quantize_weight(w, 2).is_ternary
    assert set(quantize_weight(w, 2).codes.unique().tolist()) <= {-1, 0, 1}
    assert quantize_weight(w, 6).bits == 6


def test_all_zero_channel_gives_zero_not_nan():
    w = torch.randn(4, 3, 3, 3)
    w[1] = 0
    for qt in (ternary_quantize(w, "channel"), uniform_quantize(w, 4, "channel"), ternary_quantize(torch.zeros(3, 3))):
        deq = qt.dequantize()
        assert torch.isfinite(deq).all()
    assert (ternary_quantize(w, "channel").dequantize()[1] == 0).all()
    assert (uniform_quantize(w, 4, "channel").dequantize()[1] == 0).all()


@pytest.mark.parametrize("bits", [1, 9, 0, -2, 2.5, True])
def test_bits_out_of_range_raise(bits):
    with pytest.raises(DfmpcError, match="bits"):
        quantize_weight(torch.randn(3, 3), bits)


def test_nan_weights_and_bad_granularity_raise():
    w = torch.randn(3, 3)
    w[0, 0] = float("nan")
    with pytest.raises(DfmpcError, match="NaN"):
        ternary_quantize(w)
    with pytest.raises(DfmpcError, match="granularity"):
        uniform_quantize(torch.randn(3, 3), 4, granularity="row")


# ------------------------------------------------------------------ searches a chunk of rows at a time

@pytest.mark.parametrize("rows, columns, elements", [(7, 3, 6), (7, 3, 1), (5, 100, 1000), (1, 10, 10**9), (0, 4, 8)])
def test_row_chunks_cover_every_row_once_in_order_within_the_budget(rows, columns, elements):
    from dfmpc.numerics import row_chunks

    chunks = row_chunks(rows, columns, elements)
    assert [r for c in chunks for r in range(rows)[c]] == list(range(rows))
    assert all(c.stop - c.start >= 1 and ((c.stop - c.start) * columns <= elements or c.stop - c.start == 1)
               for c in chunks)


def test_the_searches_give_the_same_bits_one_row_at_a_time_and_all_at_once(monkeypatch):
    """The clipping, ternary and correlated-ternary searches run on chunks of rows (numerics.row_chunks) for the
    cache; every row is its own problem, so chunks of one row and one chunk of all rows give identical results."""
    from dfmpc import numerics
    from dfmpc.clipping import mse_optimal_ternary, mse_optimal_uniform
    from dfmpc.methods.dfmpc_plus import correlated_ternary

    torch.manual_seed(0)
    w = torch.randn(24, 8, 3, 3) * torch.rand(24, 1, 1, 1)
    v = torch.rand(8, 3, 3)

    def searches():
        return [mse_optimal_uniform(w, 4, weights=v), mse_optimal_uniform(w, 3, criterion="cosine"),
                mse_optimal_ternary(w, weights=v), correlated_ternary(w, 0.5, torch.rand(24, 8))]

    results = {}
    for elements in (1, 10**12):
        monkeypatch.setattr(numerics, "ROW_CHUNK_ELEMENTS", elements)
        torch.manual_seed(1)
        results[elements] = searches()
    for one_row, all_rows in zip(results[1], results[10**12]):
        assert torch.equal(one_row.codes, all_rows.codes) and torch.equal(one_row.scale, all_rows.scale)


def test_the_searches_without_weights_give_the_bits_of_all_ones_weights():
    """Without weights the searches leave v = 1 out of their products (fewer passes, issue 20 item 4); multiplying
    by 1 is exact, so codes, scales and dfmpc+'s channel gains equal those of explicit all-ones weights, bit for bit.
    Real-valued, tied and zero weights (a zero row, repeated magnitudes) are in the tensor."""
    from dfmpc.clipping import asymmetric_codes, mse_optimal_ternary, mse_optimal_uniform
    from dfmpc.methods.dfmpc_plus import channel_gain

    torch.manual_seed(0)
    w = torch.randn(16, 8, 3, 3) * torch.rand(16, 1, 1, 1)
    w[3] = 0
    w[5, :, 0, 0] = 0.25
    w[5, :, 1, 1] = -0.25
    ones = torch.ones(8, 3, 3)
    pairs = [(mse_optimal_uniform(w, 4), mse_optimal_uniform(w, 4, weights=ones)),
             (mse_optimal_uniform(w, 3, criterion="cosine"), mse_optimal_uniform(w, 3, weights=ones, criterion="cosine")),
             (mse_optimal_ternary(w), mse_optimal_ternary(w, weights=ones)),
             (mse_optimal_ternary(w, "tensor"), mse_optimal_ternary(w, "tensor", weights=ones)),
             (asymmetric_codes(w, 4), asymmetric_codes(w, 4, ones))]
    for unweighted, weighted in pairs:
        assert torch.equal(unweighted.codes, weighted.codes) and torch.equal(unweighted.scale, weighted.scale)
    w_q = pairs[2][0].dequantize()
    for key, value in channel_gain(w, w_q, None).items():
        assert torch.equal(value, channel_gain(w, w_q, ones.expand_as(w))[key]), key


# ------------------------------------------------------------------------------ the asymmetric (min/max) grid

@pytest.mark.parametrize("bits", [3, 4, 8])
def test_asymmetric_quantize_picks_the_nearest_level_of_a_min_max_grid_that_holds_zero(bits):
    """Brute force: every weight's value is the nearest of the 2^k levels step * (c - zero_point) of its channel;
    the levels span the channel's range (up to half a step, the integer zero point moves them) and zero is one."""
    torch.manual_seed(bits)
    w = torch.randn(12, 5, 3, 3) * torch.rand(12, 1, 1, 1) + 0.05 * torch.randn(12, 1, 1, 1)
    q = asymmetric_quantize(w, bits)
    n = 2**bits - 1
    levels = q.scale.double()[:, None] * (torch.arange(n + 1, dtype=torch.float64)[None, :] - q.zero_point.double()[:, None])
    rows = w.double().reshape(12, -1)
    nearest = levels.gather(1, (rows[:, :, None] - levels[:, None, :]).abs().argmin(2))
    torch.testing.assert_close(q.dequantize().double().reshape(12, -1), nearest, rtol=0, atol=1e-6)
    assert (levels[:, :1] <= rows.min(1, keepdim=True).values + q.scale.double()[:, None] / 2 + 1e-7).all()
    assert (levels[:, -1:] >= rows.max(1, keepdim=True).values - q.scale.double()[:, None] / 2 - 1e-7).all()
    assert ((levels == 0).sum(1) == 1).all()  # zero is a level where the range holds zero
    assert q.weight_bits + q.scale_bits + q.zero_point_bits == w.numel() * bits + 12 * 32 + 12 * 16


def test_a_channel_too_narrow_for_an_int16_zero_point_is_widened_to_hold_zero():
    w = torch.randn(3, 4, 3, 3)
    w[1] = 0.5  # constant: the reference's step would be 1e-12 and its zero point -5e11
    w[2] = 2.0 + 1e-6 * torch.randn(4, 3, 3)
    q = asymmetric_quantize(w, 4)
    assert q.zero_point.abs().max() <= 2**15 - 1 and q.zero_point[1:].tolist() == [0, 0]
    assert torch.allclose(q.dequantize()[1:], w[1:], atol=0.07)  # half a step of [0, 2] at 4 bits
    assert torch.equal(q.dequantize()[1], w[1])  # a constant channel's value is a level


def test_a_zero_point_belongs_to_k_bit_per_channel_codes():
    q = asymmetric_quantize(torch.randn(4, 3), 4)
    for bad in [dict(bits=2), dict(granularity="tensor"), dict(zero_point=torch.zeros(3, dtype=torch.int16))]:
        with pytest.raises(DfmpcError, match="a zero point belongs to a k-bit"):
            QuantizedTensor(**{"codes": q.codes, "scale": q.scale, "bits": 4, "granularity": "channel",
                               "zero_point": q.zero_point, **bad})
    with pytest.raises(DfmpcError, match="for 3- to 8-bit weights"):
        asymmetric_quantize(torch.randn(4, 3), 2)
