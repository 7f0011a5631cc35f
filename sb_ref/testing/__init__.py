"""Tools for checking stick-breaking attention: the float64 oracle, the input regimes, the error measure and the
allocation probe (:mod:`sb_ref.testing.core`); the learners' exercise checks are built on them."""
from .checks import (check_apply_remainder, check_attention_gradients, check_attention_numpy,
                     check_blocked_attention, check_blocked_memory, check_combine, check_gradcheck_attention,
                     check_layer_forward, check_log_sigmoids, check_repeat_kv, check_reverse_exclusive_cumsum,
                     check_sigmoid, check_stable_attention, check_stable_weights, check_weight_matrix,
                     check_weights_for_query)
from .core import REGIMES, LargestAllocation, make_inputs, oracle_attention, rel_err

__all__ = ["REGIMES", "LargestAllocation", "make_inputs", "oracle_attention", "rel_err",
           "check_sigmoid",
           "check_weights_for_query", "check_weight_matrix", "check_attention_numpy",
           "check_log_sigmoids", "check_reverse_exclusive_cumsum", "check_stable_weights", "check_stable_attention",
           "check_gradcheck_attention", "check_attention_gradients",
           "check_repeat_kv", "check_apply_remainder", "check_layer_forward",
           "check_combine", "check_blocked_attention", "check_blocked_memory"]
