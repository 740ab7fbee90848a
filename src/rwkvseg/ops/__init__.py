"""Operators: the Bi-WKV token mixer, token shifts, and sequence orders."""

from .bi_wkv import IMPLEMENTATIONS, bi_wkv, check_inputs, triton_usable
from .bi_wkv_chunked import bi_wkv_chunked
from .bi_wkv_reference import bi_wkv_reference
from .scan import (
    QUAD_SCAN_ORDERS,
    VIEWS,
    from_view,
    merge_windows,
    scan_2d,
    split_windows,
    to_view,
    unscan_2d,
)
from .token_shift import bi_shift, q_shift

__all__ = [
    "IMPLEMENTATIONS",
    "QUAD_SCAN_ORDERS",
    "VIEWS",
    "bi_shift",
    "bi_wkv",
    "bi_wkv_chunked",
    "bi_wkv_reference",
    "check_inputs",
    "from_view",
    "merge_windows",
    "q_shift",
    "scan_2d",
    "split_windows",
    "to_view",
    "triton_usable",
    "unscan_2d",
]
