"""SPEC §9's loss terms: each equals a value computed by hand on crafted tensors, and passes
gradcheck in float64 (lambda and the total's branch are values, so gradcheck sees them as constants)."""

import math

import pytest
import torch
from torch.autograd import gradcheck

from echox.train.losses import (ctc_loss, denoising_loss, echo_lambda, sequence_cross_entropy,
                                speech_to_text_loss, text_to_unit_loss, total_loss)

F64 = torch.float64


def test_cross_entropy_weighs_each_example_the_same():
    # Example 0: two targets; example 1: one target (its second position is padding).
    logits = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]],
                           [[0.0, 0.0, 3.0], [9.0, 9.0, 9.0]]], dtype=F64)
    targets = torch.tensor([[0, 2], [2, 1]])
    mask = torch.tensor([[True, True], [True, False]])
    first = -math.log(math.exp(2) / (math.exp(2) + 2))
    second = -math.log(1 / (2 + math.e))
    third = -math.log(math.exp(3) / (math.exp(3) + 2))
    expected = ((first + second) / 2 + third) / 2
    assert sequence_cross_entropy(logits, targets, mask).item() == pytest.approx(expected, rel=1e-12)


def test_ctc_on_two_frames_sums_the_three_alignments():
    # Vocabulary (blank=0, a=1); two frames; target "a": alignments aa, a_, _a.
    p = torch.tensor([[0.3, 0.7], [0.6, 0.4]], dtype=F64)  # [frames, vocab]
    log_probs = p.log()[:, None, :]  # [T, B=1, V]
    loss = ctc_loss(log_probs, torch.tensor([[1]]), torch.tensor([1]), blank=0)
    likelihood = p[0, 1] * p[1, 1] + p[0, 1] * p[1, 0] + p[0, 0] * p[1, 1]
    assert loss.item() == pytest.approx(-math.log(likelihood.item()), rel=1e-12)
    assert speech_to_text_loss(torch.tensor(2.0), loss).item() == pytest.approx(2 - 0.3 * math.log(likelihood.item()))


def test_ctc_blank_is_the_given_id():
    # With blank=1 the same probabilities score target "0" (class 0 is now the symbol).
    p = torch.tensor([[0.3, 0.7], [0.6, 0.4]], dtype=F64)
    loss = ctc_loss(p.log()[:, None, :], torch.tensor([[0]]), torch.tensor([1]), blank=1)
    likelihood = 0.3 * 0.6 + 0.3 * 0.4 + 0.7 * 0.6
    assert loss.item() == pytest.approx(-math.log(likelihood), rel=1e-12)


def test_denoising_is_the_batch_mean_of_per_example_sums():
    denoised = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[1.0, 1.0], [5.0, 5.0]]], dtype=F64)
    text = torch.tensor([[[1.0, 0.0], [1.0, 0.0]], [[-1.0, -1.0], [1.0, 0.0]]], dtype=F64)
    mask = torch.tensor([[True, True], [True, False]])
    # Example 0: cos 1 and 0 -> (0) + (1); example 1: cos -1 -> 2 (second slot is padding).
    assert denoising_loss(denoised, text, mask).item() == pytest.approx((1 + 2) / 2)


@pytest.mark.parametrize("echo, denoising, weight", [
    (2.0, 1.0, 0.2 * 2.0 / 1.0),  # L_den > 0.2 L_echo: scaled down to a fifth of L_echo
    (2.0, 0.3, 1.0),  # L_den <= 0.2 L_echo: weight 1
    (2.0, 0.4, 1.0),  # the boundary itself is not "greater"
])
def test_lambda_branches(echo, denoising, weight):
    value = echo_lambda(torch.tensor(echo, dtype=F64), torch.tensor(denoising, dtype=F64))
    assert value.item() == pytest.approx(weight)
    t2u = text_to_unit_loss(torch.tensor(echo), torch.tensor(denoising), value)
    assert t2u.item() == pytest.approx(echo + weight * denoising)


def test_lambda_carries_no_gradient():
    echo = torch.tensor(2.0, dtype=F64, requires_grad=True)
    denoising = torch.tensor(1.0, dtype=F64, requires_grad=True)
    text_to_unit_loss(echo, denoising, echo_lambda(echo, denoising)).backward()
    assert echo.grad.item() == 1.0  # d/dL_echo of L_echo + lambda L_den with lambda held fixed
    assert denoising.grad.item() == pytest.approx(0.4)


@pytest.mark.parametrize("s2t, expected", [(0.5, 0.2 * 0.5 + 2 * 3.0), (1.0, 1.0 + 3.0), (4.0, 4.0 + 3.0)])
def test_total_loss_branches(s2t, expected):
    assert total_loss(torch.tensor(s2t), torch.tensor(3.0)).item() == pytest.approx(expected)


def test_total_loss_branch_can_come_from_the_global_batch():
    # Locally L_S2T = 0.5, but the whole batch's is 2: the large-L_S2T branch applies.
    assert total_loss(torch.tensor(0.5), torch.tensor(3.0), torch.tensor(2.0)).item() == pytest.approx(3.5)


def test_gradcheck_every_term():
    gen = torch.Generator().manual_seed(0)

    def leaf(*shape):
        return torch.randn(*shape, generator=gen, dtype=F64).requires_grad_()

    mask = torch.tensor([[True, True, True], [True, True, False]])
    targets = torch.tensor([[0, 3, 1], [2, 2, 0]])
    assert gradcheck(lambda x: sequence_cross_entropy(x, targets, mask), (leaf(2, 3, 4),))
    ctc_targets, ctc_lengths = torch.tensor([[1, 2], [3, 0]]), torch.tensor([2, 1])
    assert gradcheck(lambda x: ctc_loss(x.log_softmax(-1), ctc_targets, ctc_lengths, blank=0), (leaf(5, 2, 4),))
    assert gradcheck(lambda a, b: denoising_loss(a, b, mask), (leaf(2, 3, 4), leaf(2, 3, 4)))

    for echo, den in ((2.0, 1.0), (2.0, 0.1)):  # the lambda = 0.2 L_echo / L_den branch, then lambda = 1
        # lambda is a value: gradcheck holds it fixed while it perturbs L_echo and L_den.
        weight = echo_lambda(torch.tensor(echo, dtype=F64), torch.tensor(den, dtype=F64))
        assert gradcheck(lambda e, d: text_to_unit_loss(e, d, weight),
                         (torch.tensor(echo, dtype=F64, requires_grad=True), torch.tensor(den, dtype=F64, requires_grad=True)))
    for s2t in (0.5, 3.0):  # both total branches
        assert gradcheck(total_loss, (torch.tensor(s2t, dtype=F64, requires_grad=True),
                                      torch.tensor(1.5, dtype=F64, requires_grad=True)))
