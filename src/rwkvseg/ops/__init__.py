"""Operators: the Bi-WKV token mixer, token shifts, and sequence orders."""

from .bi_wkv import (
    IMPLEMENTATIONS,
    bi_wkv,
    bi_wkv_chunked,
    bi_wkv_ordered,
    bi_wkv_reference,
    check_inputs,
    triton_usable,
)
from .scan import (
    QUAD_SCAN_ORDERS,
    VIEWS,
    TokenOrder,
    apply_in_orders,
    check_orders,
    from_view,
    merge_windows,
    scan_2d,
    scan_order,
    split_windows,
    to_view,
    unscan_2d,
    view_order,
)
from .token_shift import SCAN_SHIFT_DIRECTIONS, bi_shift, bi_shift_hwt, q_shift

__all__ = [
    "IMPLEMENTATIONS",
    "QUAD_SCAN_ORDERS",
    "SCAN_SHIFT_DIRECTIONS",
    "VIEWS",
    "TokenOrder",
    "apply_in_orders",
    "bi_shift",
    "bi_shift_hwt",
    "bi_wkv",
    "bi_wkv_chunked",
    "bi_wkv_ordered",
    "bi_wkv_reference",
    "check_inputs",
    "check_orders",
    "from_view",
    "merge_windows",
    "q_shift",
    "scan_2d",
    "scan_order",
    "split_windows",
    "to_view",
    "triton_usable",
    "unscan_2d",
    "view_order",
]
