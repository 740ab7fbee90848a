import warnings

import pytest
import torch

from rwkvseg.ops import (
    QUAD_SCAN_ORDERS,
    SCAN_SHIFT_DIRECTIONS,
    TokenOrder,
    bi_shift,
    bi_shift_hwt,
    check_orders,
    flip_permutation,
    from_view,
    merge_windows,
    permutation_shift,
    q_shift,
    scan_2d,
    scan_order,
    split_windows,
    to_view,
    unscan_2d,
    view_order,
)


def test_q_shift_takes_the_four_neighbours():
    B, H, W, C = 2, 5, 7, 9  # C not a multiple of 4: the last group takes 3 channels
    x = torch.randn(B, H * W, C)
    grid = x.view(B, H, W, C)
    out = q_shift(x, (H, W)).view(B, H, W, C)
    for i in range(H):
        for j in range(W):
            zero = torch.zeros(B, 2)
            assert torch.equal(out[:, i, j, 0:2], grid[:, i, j - 1, 0:2] if j > 0 else zero)
            assert torch.equal(out[:, i, j, 2:4], grid[:, i, j + 1, 2:4] if j < W - 1 else zero)
            assert torch.equal(out[:, i, j, 4:6], grid[:, i - 1, j, 4:6] if i > 0 else zero)
            below = grid[:, i + 1, j, 6:9] if i < H - 1 else torch.zeros(B, 3)
            assert torch.equal(out[:, i, j, 6:9], below)


def test_q_shift_on_a_single_row_and_bad_grid():
    x = torch.randn(1, 4, 8)
    out = q_shift(x, (1, 4))
    assert torch.equal(out[..., 4:], torch.zeros(1, 4, 4))  # no upper or lower neighbours
    with pytest.raises(ValueError, match="grid"):
        q_shift(x, (3, 2))


def released_shift(x, size):
    """U-RWKV's released token shift as its code spells it, on tokens [B, H*W, C]: the map's lower half flipped
    upside down under the upper half, then the (batch, column) pairs as rows of tokens read top to bottom."""
    B, _, C = x.shape
    H, W = size
    grid = x.transpose(1, 2).reshape(B, C, H, W).permute(0, 2, 3, 1)  # [B, H, W, C]
    stacked = torch.cat([grid[:, : H // 2], grid[:, H // 2 :].flip(1)], dim=1)
    return stacked.permute(0, 2, 1, 3).reshape(B * W, H, C).reshape(B, W * H, C)


def test_flip_permutation_is_the_released_codes_shift():
    assert flip_permutation((4, 4)).tolist() == [0, 4, 12, 8, 1, 5, 13, 9, 2, 6, 14, 10, 3, 7, 15, 11]
    for size in [(4, 4), (5, 7), (7, 5), (1, 6), (6, 1), (16, 16)]:
        n = size[0] * size[1]
        assert sorted(flip_permutation(size).tolist()) == list(range(n))  # a permutation of the tokens
        x = torch.randn(2, n, 3)
        assert torch.equal(permutation_shift(x, size), released_shift(x, size))
    with pytest.raises(ValueError, match="grid"):
        permutation_shift(torch.randn(1, 6, 2), (4, 2))


def test_bi_shift():
    x = torch.arange(2 * 5 * 8, dtype=torch.float32).view(2, 5, 8)
    out = bi_shift(x)
    assert torch.equal(out[:, 1:, :2], x[:, :-1, :2])
    assert torch.equal(out[:, 0, :2], torch.zeros(2, 2))
    assert torch.equal(out[:, :-1, 2:], x[:, 1:, 2:])
    assert torch.equal(out[:, -1, 2:], torch.zeros(2, 6))


@pytest.mark.parametrize("order", QUAD_SCAN_ORDERS)
def test_scan_orders_are_exactly_inverted(order):
    x = torch.randn(2, 3, 5, 7)
    s = scan_2d(x, order)
    assert s.shape == (2, 35, 3)
    assert torch.equal(unscan_2d(s, order, (5, 7)), x)


def test_scan_order_definitions():
    H, W = 3, 4
    index = torch.arange(H * W, dtype=torch.float32).view(1, 1, H, W)  # value = row * W + col
    first = {order: scan_2d(index, order)[0, :, 0].long().tolist() for order in QUAD_SCAN_ORDERS}
    assert first["rows"] == list(range(12))
    assert first["rows_reversed"][:4] == [3, 2, 1, 0]
    assert first["cols"][:3] == [0, 4, 8]
    assert first["cols_reversed"][:3] == [8, 4, 0]
    assert first["cols_reversed"][3:6] == [9, 5, 1]
    with pytest.raises(ValueError, match="scan order"):
        scan_2d(index, "diagonal")


@pytest.mark.parametrize("view", ["thw", "hwt"])
def test_views_are_exactly_inverted(view):
    x = torch.randn(2, 3, 5, 6, 7)
    s = to_view(x, view)
    assert s.shape == (2, 5 * 6 * 7, 3)
    assert torch.equal(from_view(s, view, (5, 6, 7)), x)


@pytest.mark.parametrize("size", [(6, 7), (5, 6, 7)])
def test_row_major_tokens_of_a_channels_last_map_are_a_free_view(size):
    """A channels-last map is stored as its row-major tokens [B, N, C]: the tokens are then a contiguous view (no
    copy before the projections, as there is one of a contiguous map), and contiguous tokens mapped back are a
    channels-last map."""
    x = torch.randn(2, 3, *size)
    layout = torch.channels_last if len(size) == 2 else torch.channels_last_3d
    to_tokens = (lambda m: scan_2d(m, "rows")) if len(size) == 2 else (lambda m: to_view(m, "thw"))
    to_map = (lambda s: unscan_2d(s, "rows", size)) if len(size) == 2 else (lambda s: from_view(s, "thw", size))
    assert not to_tokens(x).is_contiguous()
    x_cl = x.contiguous(memory_format=layout)
    tokens = to_tokens(x_cl)
    assert tokens.is_contiguous() and tokens.data_ptr() == x_cl.data_ptr() and torch.equal(tokens, to_tokens(x))
    back = to_map(tokens)
    assert back.is_contiguous(memory_format=layout) and back.data_ptr() == x_cl.data_ptr() and torch.equal(back, x)


def test_view_orders():
    T, H, W = 3, 2, 4
    t, h, w = torch.meshgrid(torch.arange(T), torch.arange(H), torch.arange(W), indexing="ij")
    coords = torch.stack([t, h, w]).float()[None]  # [1, 3, T, H, W]: channels hold (t, h, w)
    a = to_view(coords, "thw")[0].long()
    b = to_view(coords, "hwt")[0].long()
    assert a[:2].tolist() == [[0, 0, 0], [0, 0, 1]]  # in-slice neighbours adjacent
    assert b[:4].tolist() == [
        [0, 0, 0],
        [1, 0, 0],
        [2, 0, 0],
        [0, 0, 1],
    ]  # same voxel in the next slice adjacent


@pytest.mark.parametrize(("T", "size"), [(16, 8), (13, 4), (3, 8), (8, 1)])
def test_windows_split_and_merge(T, size):
    x = torch.randn(2, 3, T, 4, 5)
    full, tail = split_windows(x, size)
    n = T // size
    if n:
        assert full.shape == (2 * n, 3, size, 4, 5)
        assert torch.equal(full[1 * n + (n - 1)], x[1, :, (n - 1) * size : n * size])  # sample 1, last window
    else:
        assert full is None
    if T % size:
        assert torch.equal(tail, x[:, :, n * size :])
    else:
        assert tail is None
    assert torch.equal(merge_windows(full, tail, batch=2), x)
    with pytest.raises(ValueError, match="window size"):
        split_windows(x, 0)


@pytest.mark.parametrize("size", [(5, 7), (1, 4), (6, 1), (4, 4)])
@pytest.mark.parametrize("order", QUAD_SCAN_ORDERS)
def test_scan_orders_as_token_orders(order, size):
    x = torch.randn(2, 3, *size)
    tokens = x.flatten(2).transpose(1, 2)  # row-major [B, H*W, C]
    token_order = scan_order(order, size)
    token_order.check(size[0] * size[1])
    assert torch.equal(tokens[:, token_order.indices(size[0] * size[1])], scan_2d(x, order))


@pytest.mark.parametrize("size", [(3, 5, 7), (1, 4, 2), (4, 1, 1), (2, 3, 1)])
@pytest.mark.parametrize("view", ["thw", "hwt"])
def test_views_as_token_orders(view, size):
    x = torch.randn(2, 3, *size)
    n = size[0] * size[1] * size[2]
    token_order = view_order(view, size)
    token_order.check(n)
    assert torch.equal(to_view(x, "thw")[:, token_order.indices(n)], to_view(x, view))


@pytest.mark.parametrize(
    "bad",
    [
        TokenOrder(4, 1, 1),  # both steps 1: tokens visited twice
        TokenOrder(5, 1, 5),  # inner does not divide 12
        TokenOrder(4, -1, 4),  # reversed rows must start at the row's end
        TokenOrder(3, 4, 1, 1),  # a start where none is needed
        TokenOrder(0, 1, 1),
    ],
)
def test_token_order_check_rejects_what_is_not_a_permutation(bad):
    with pytest.raises(ValueError, match="TokenOrder"):
        bad.check(12)


def test_check_orders_raises_like_check_on_every_call():
    # the cache keeps passed checks only: a bad order raises TokenOrder.check's error each time
    good = tuple(scan_order(o, (3, 4)) for o in QUAD_SCAN_ORDERS)
    check_orders(good, 12)
    check_orders(good, 12)  # a cache hit
    for bad in (TokenOrder(4, 1, 1), TokenOrder(4, -1, 4)):
        with pytest.raises(ValueError) as expected:
            bad.check(12)
        for _ in range(2):
            with pytest.raises(ValueError) as got:
                check_orders((*good, bad), 12)
            assert str(got.value) == str(expected.value)
    with pytest.raises(ValueError, match="divide the 10 tokens"):
        check_orders(good, 10)  # the same orders over another token count are checked again


def test_check_orders_traces_without_the_cache():
    # dynamo warns about every lru_cache wrapper it traces; compiled layers call check_orders on each trace
    orders = tuple(scan_order(o, (3, 4)) for o in QUAD_SCAN_ORDERS)

    @torch.compile(backend="eager", fullgraph=True)
    def checked(x):
        check_orders(orders, x.shape[1])
        return x + 1

    torch._dynamo.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(checked(torch.zeros(2, 12)), torch.ones(2, 12))


def test_token_order_check_accepts_exactly_the_permutations():
    # every (inner, steps, start) in a small range passes check() exactly when indices() is a permutation
    n = 12
    for inner in (1, 2, 3, 4, 6, 12):
        for inner_step in (-6, -4, -3, -2, -1, 1, 2, 3, 4, 6):
            for outer_step in (-6, -4, -3, -1, 1, 2, 3, 4, 6, 12):
                for start in range(n):
                    order = TokenOrder(inner, inner_step, outer_step, start)
                    is_permutation = sorted(order.indices(n).tolist()) == list(range(n))
                    try:
                        order.check(n)
                        passed = True
                    except ValueError:
                        passed = False
                    assert passed == is_permutation, order
                    if passed:  # read is the gather of indices(), write its inverse
                        x = torch.randn(2, n, 3)
                        assert torch.equal(order.read(x), x[:, order.indices(n)])
                        assert torch.equal(order.write(order.read(x)), x)


@pytest.mark.parametrize("order", QUAD_SCAN_ORDERS)
def test_q_shift_on_the_map_with_turned_directions_is_the_shift_of_the_scan(order):
    # a scanned sequence read as its own grid (W x H for the column orders), shifted, equals the map shifted
    # with the order's directions and then scanned
    H, W = 5, 6
    x = torch.randn(2, 8, H, W)
    grid = (H, W) if order.startswith("rows") else (W, H)
    scan_frame = q_shift(scan_2d(x, order), grid)
    tokens = x.flatten(2).transpose(1, 2)
    map_frame = q_shift(tokens, (H, W), SCAN_SHIFT_DIRECTIONS[order])
    assert torch.equal(map_frame[:, scan_order(order, (H, W)).indices(H * W)], scan_frame)
    with pytest.raises(ValueError, match="direction"):
        q_shift(tokens, (H, W), ("left", "right", "up", "diagonal"))


@pytest.mark.parametrize("size", [(3, 4, 5), (1, 2, 3), (4, 1, 1), (2, 3, 2)])
def test_bi_shift_hwt_is_the_shift_along_the_second_view(size):
    n = size[0] * size[1] * size[2]
    x = torch.randn(2, n, 9)
    hwt = to_view(from_view(x, "thw", size), "hwt")
    expected = to_view(from_view(bi_shift(hwt), "hwt", size), "thw")
    assert torch.equal(bi_shift_hwt(x, size), expected)
    with pytest.raises(ValueError, match="window"):
        bi_shift_hwt(x, (size[0] + 1, size[1], size[2]))
