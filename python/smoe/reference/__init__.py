"""smoe.reference: readable pure-PyTorch versions of every smoe op and of the whole layer.

The ops (smoe.reference.ops) have the same names and semantics as smoe.functional and are the oracle
of the tests; `moe_layer` (smoe.reference.layer) is the whole MoE layer, written for students.
"""

from smoe.reference.layer import moe_layer  # noqa: F401
from smoe.reference.ops import *  # noqa: F401,F403
from smoe.reference.ops import __all__ as _ops_all

__all__ = list(_ops_all) + ["moe_layer"]
