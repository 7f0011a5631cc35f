"""Tools for checking stick-breaking attention: the float64 oracle, the input regimes, the error measure and the
allocation probe (:mod:`sb_ref.testing.core`); the learners' exercise checks are built on them: lessons 00-04 in
:mod:`sb_ref.testing.checks`, each later lesson in its own module (:mod:`sb_ref.testing.lesson05` ...
:mod:`sb_ref.testing.lesson09`)."""
from .checks import (check_apply_remainder, check_attention_gradients, check_attention_numpy,
                     check_blocked_attention, check_blocked_memory, check_combine, check_gradcheck_attention,
                     check_layer_forward, check_log_sigmoids, check_repeat_kv, check_reverse_exclusive_cumsum,
                     check_sigmoid, check_stable_attention, check_stable_weights, check_weight_matrix,
                     check_weights_for_query)
from .core import REGIMES, LargestAllocation, make_inputs, oracle_attention, rel_err
from .lesson05 import (check_add_row_vector, check_long_reverse_cumsum, check_scaled_copy, check_tile_matmul,
                       check_tile_reverse_cumsum)
from .lesson06 import check_log_sigmoids_triton, check_sb_forward, check_sb_forward_memory
from .lesson07 import check_dkdv, check_dl_and_dz, check_dq, check_sb_attention
from .lesson08 import check_attention_flops, check_fast_forward, check_median_ms
from .lesson09 import check_evaluate, check_flip_flop_batch, check_rope, check_tiny_lm

__all__ = ["REGIMES", "LargestAllocation", "make_inputs", "oracle_attention", "rel_err",
           "check_sigmoid",
           "check_weights_for_query", "check_weight_matrix", "check_attention_numpy",
           "check_log_sigmoids", "check_reverse_exclusive_cumsum", "check_stable_weights", "check_stable_attention",
           "check_gradcheck_attention", "check_attention_gradients",
           "check_repeat_kv", "check_apply_remainder", "check_layer_forward",
           "check_combine", "check_blocked_attention", "check_blocked_memory",
           "check_scaled_copy", "check_add_row_vector", "check_tile_matmul", "check_tile_reverse_cumsum",
           "check_long_reverse_cumsum",
           "check_log_sigmoids_triton", "check_sb_forward", "check_sb_forward_memory",
           "check_dl_and_dz", "check_dq", "check_dkdv", "check_sb_attention",
           "check_attention_flops", "check_median_ms", "check_fast_forward",
           "check_flip_flop_batch", "check_rope", "check_tiny_lm", "check_evaluate"]
