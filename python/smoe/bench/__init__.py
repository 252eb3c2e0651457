"""smoe.bench: the MoE layer benchmark (`python -m smoe.bench`). See smoe.bench.layer."""

from smoe.bench.layer import (QUICK_SHAPES, SHAPES, Result, Shape, format_table, layer_flops, main,
                              parse_shapes, print_table, run_benchmark, write_json)

__all__ = ["QUICK_SHAPES", "SHAPES", "Result", "Shape", "format_table", "layer_flops", "main",
           "parse_shapes", "print_table", "run_benchmark", "write_json"]
