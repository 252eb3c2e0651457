"""smoe.bench: the MoE layer benchmark (`python -m smoe.bench`). See smoe.bench.layer.

Modules: layer (the run, tables, JSON, targets), system (the machine's peak, the allocator), peers
(the implementations timed against smoe), memory (peak RSS of a training step), breakdown (per-stage
times per backend), intensity (the arithmetic-intensity model and its plot)."""

from smoe.bench.layer import (
    QUICK_SHAPES,
    SHAPES,
    Result,
    Shape,
    check_targets,
    format_table,
    format_targets,
    layer_flops,
    main,
    parse_shapes,
    print_table,
    run_benchmark,
    write_json,
)

__all__ = [
    "QUICK_SHAPES",
    "SHAPES",
    "Result",
    "Shape",
    "check_targets",
    "format_table",
    "format_targets",
    "layer_flops",
    "main",
    "parse_shapes",
    "print_table",
    "run_benchmark",
    "write_json",
]
