"""The router losses' caller-owned workspace (issue 13, SPEC B) and expert choice's own score gradient
(issue 8): byte formulas mirrored in Python equal the C++ queries; the backward takes grad_scores."""

from __future__ import annotations

import pytest
import smoe
import smoe.functional as F
import torch
from smoe import _core
from smoe import reference as ref
from smoe.ops import router_losses
from smoe.testing import assert_close

SIZES = [0, 1, 7, 255, 256, 257, 4096, 65535, 65536, 65537, 200_000, 10**7]


@pytest.mark.parametrize("E", [0, 1, 3, 64, 257])
def test_loss_workspace_bytes_equal_the_cpp_queries(E):
    lib = _core.lib()
    for T in SIZES:
        assert router_losses.load_balancing_loss_workspace_bytes(T, E) == lib.load_balancing_loss_workspace_bytes(
            T=T, E=E
        ), (T, E)
        assert router_losses.z_loss_workspace_bytes(T, E) == lib.z_loss_workspace_bytes(T=T, E=E), (T, E)


def test_loss_workspace_bytes_formula():
    # lb: align256(4E) + 4E * ceil(T / chunk), chunk 256 up to T = 65536; z: 8T
    assert router_losses.load_balancing_loss_workspace_bytes(1000, 8) == 256 + 32 * 4
    assert router_losses.load_balancing_loss_workspace_bytes(70_000, 8) == 256 + 32 * 256  # chunk 274, 256 blocks
    assert router_losses.z_loss_workspace_bytes(5, 3) == 40
    assert (
        router_losses.z_loss_workspace_bytes(0, 3) == 0 and router_losses.load_balancing_loss_workspace_bytes(5, 0) == 0
    )


BACKENDS = ["cpu", "simt"] if "simt" in smoe.BACKENDS else ["cpu"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("which", ["weights", "scores", "both"])
@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_expert_choice_backward_takes_grad_scores(backend, which, score_func):
    torch.manual_seed(0)
    logits0 = torch.randn(11, 4)
    gw, gs = torch.randn(11, 4), torch.randn(11, 4)
    grads = []
    for b in (backend, "reference"):
        logits = logits0.clone().requires_grad_()
        w, _tokens, _row_of, s = F.expert_choice(logits, capacity=3, score_func=score_func, backend=b)
        loss = (w * gw).sum() if which != "scores" else 0
        loss = loss + ((s * gs).sum() if which != "weights" else 0)
        loss.backward()
        grads.append(logits.grad)
    assert_close(grads[0], grads[1])


def test_expert_choice_backward_op_sums_both_gradients():
    torch.manual_seed(1)
    _w, _t, row_of, scores = F.expert_choice(torch.randn(9, 3), capacity=4, backend="cpu")
    gw, gs = torch.randn(9, 3), torch.randn(9, 3)
    op = torch.ops.smoe.expert_choice_backward
    both = op(scores, row_of, gw, gs, 4, "softmax", "cpu")
    assert_close(
        both, op(scores, row_of, gw, None, 4, "softmax", "cpu") + op(scores, row_of, None, gs, 4, "softmax", "cpu")
    )
    assert torch.equal(op(scores, row_of, None, None, 4, "softmax", "cpu"), torch.zeros(9, 3))


def test_expert_choice_backward_is_one_crossing(monkeypatch):
    _w, _t, row_of, scores = F.expert_choice(torch.randn(6, 3), capacity=2, backend="cpu")
    names = []
    real = _core.lib()

    class Spy:
        def __getattr__(self, name):
            names.append(name)
            return getattr(real, name)

    monkeypatch.setattr(_core, "lib", lambda: Spy())
    torch.ops.smoe.expert_choice_backward(scores, row_of, torch.randn(6, 3), torch.randn(6, 3), 2, "softmax", "cpu")
    assert names == ["expert_choice_backward"]  # no borrowed topk_gating_backward


@pytest.mark.parametrize("backend", BACKENDS)
def test_losses_with_workspace_match_reference(backend):
    torch.manual_seed(2)
    logits0 = torch.randn(300, 6)
    experts = torch.randint(0, 6, (300, 2), dtype=torch.int32)
    for fn, _args in (
        (lambda p, b: F.load_balancing_loss(p.softmax(-1), experts, backend=b), ()),
        (lambda p, b: F.z_loss(p, backend=b), ()),
    ):
        out = []
        for b in (backend, "reference"):
            logits = logits0.clone().requires_grad_()
            loss = fn(logits, b)
            loss.backward()
            out.append((loss.detach(), logits.grad))
        assert_close(out[0][0], out[1][0])
        assert_close(out[0][1], out[1][1])
    assert ref is not None


def test_backward_ops_called_directly_name_bad_arguments():
    ops = torch.ops.smoe
    scores, row_of = torch.rand(4, 3), torch.zeros(4, 3, dtype=torch.int32)
    with pytest.raises(ValueError, match="'score_func'.*'xyz'"):
        ops.expert_choice_backward(scores, row_of, scores, None, 2, "xyz", "cpu")
    with pytest.raises(ValueError, match="'capacity'"):
        ops.expert_choice_backward(scores, row_of, scores, None, 2**40, "softmax", "cpu")
    with pytest.raises(ValueError, match="'scores'.*2-D"):
        ops.expert_choice_backward(torch.rand(4), row_of, None, None, 2, "softmax", "cpu")
    with pytest.raises(ValueError, match="'group_score'"):
        ops.topk_gating_backward(scores, row_of[:, :1], None, scores, 1, "softmax", 1, 1, "xyz", False, 0.0, 1.0, "cpu")
    with pytest.raises(ValueError, match="'probs'.*2-D"):
        ops.load_balancing_loss(torch.rand(4), row_of, "cpu")
