import math

import pytest
import torch
import torch.nn.functional as F

from headsurgeon import HeadsurgeonError, collaborative_loss


def _lse(v):
    m = max(v)
    return m + math.log(sum(math.exp(a - m) for a in v))


def _by_hand(zs, y, beta, T, t2):
    """Scalar reference with plain Python floats: one sample, H heads."""
    H, total = len(zs), 0.0
    for i, z in enumerate(zs):
        ce = _lse(z) - z[y]
        mean = [sum(zs[j][k] for j in range(H) if j != i) / (H - 1) for k in range(len(z))]
        q_l = [m / T for m in mean]
        q = [math.exp(a - _lse(q_l)) for a in q_l]
        logp = [a / T - _lse([b / T for b in z]) for a in z]
        soft = -sum(qk * lk for qk, lk in zip(q, logp))
        total += beta * ce + (1 - beta) * soft * (T * T if t2 else 1.0)
    return total


def test_two_heads_worked_by_hand():
    # Two heads, two classes, target 0, T = 1, beta = 1/2:
    # head 0: z=(0,0): CE = log 2; q = softmax(1,0) -> softCE = log 2 (its log-probs are both -log 2).
    # head 1: z=(1,0): CE = log(1+e^-1); q = softmax(0,0) = (1/2,1/2)
    #   softCE = -(1/2)(log p0 + log p1) = -(1/2)(-log(1+e^-1) - log(1+e)) = (1/2)(log(1+e^-1) + log(1+e)).
    z0, z1 = torch.tensor([[0.0, 0.0]], dtype=torch.float64), torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    y = torch.tensor([0])
    a, b = math.log(1 + math.exp(-1)), math.log(1 + math.e)
    want = 0.5 * (math.log(2) + math.log(2)) + 0.5 * (a + 0.5 * (a + b))
    got = collaborative_loss([z0, z1], y, beta=0.5, temperature=1.0)
    assert got.item() == pytest.approx(want, abs=1e-12)  # float64 against math: a few ulps of a loss of ~1.3
    # t2 leaves T = 1 unchanged
    assert collaborative_loss([z0, z1], y, beta=0.5, temperature=1.0, t2=True).item() == pytest.approx(want, abs=1e-12)


@pytest.mark.parametrize("heads,beta,T,t2", [(2, 0.5, 2.0, False), (3, 0.3, 3.0, True), (4, 0.7, 1.5, False)])
def test_matches_scalar_reference(heads, beta, T, t2):
    g = torch.Generator().manual_seed(heads)
    zs = [torch.randn(3, 5, generator=g, dtype=torch.float64) for _ in range(heads)]
    y = torch.tensor([0, 3, 4])
    want = sum(_by_hand([z[b].tolist() for z in zs], int(y[b]), beta, T, t2) for b in range(3)) / 3
    got = collaborative_loss(zs, y, beta=beta, temperature=T, t2=t2)
    assert got.item() == pytest.approx(want, abs=1e-12)  # float64 against float64: no slack for an epsilon


def test_one_head_is_cross_entropy_with_smoothing():
    z, y = torch.randn(4, 6), torch.tensor([1, 2, 3, 0])
    # exact: one head returns F.cross_entropy itself, the same call on the same input
    assert torch.equal(collaborative_loss([z], y), F.cross_entropy(z, y))
    assert torch.equal(collaborative_loss([z], y, label_smoothing=0.1), F.cross_entropy(z, y, label_smoothing=0.1))


def test_label_smoothing_applies_to_hard_term_only():
    zs, y = [torch.randn(4, 6, dtype=torch.float64) for _ in range(2)], torch.tensor([1, 2, 3, 0])
    d = collaborative_loss(zs, y, label_smoothing=0.1) - collaborative_loss(zs, y)
    hard = sum(F.cross_entropy(z, y, label_smoothing=0.1) - F.cross_entropy(z, y) for z in zs)
    assert d.item() == pytest.approx(0.5 * hard.item(), abs=1e-12)  # float64: a difference of losses of a few units


def test_gradient_soft_target_is_constant():
    # Analytic gradient of head i's loss w.r.t. z_i (q detached, batch mean over B):
    # beta (softmax(z_i) - onehot) / B + (1 - beta) (softmax(z_i / T) - q_i) / (T B) [* T^2]
    g = torch.Generator().manual_seed(0)
    zs = [torch.randn(2, 4, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    y = torch.tensor([2, 1])
    beta, T = 0.4, 2.0
    for t2 in (False, True):
        for z in zs:
            z.grad = None
        collaborative_loss(zs, y, beta=beta, temperature=T, t2=t2).backward()
        for i, z in enumerate(zs):
            others = torch.stack([zs[j].detach() for j in range(3) if j != i]).mean(0)
            q = F.softmax(others / T, 1)
            want = beta * (F.softmax(z.detach(), 1) - F.one_hot(y, 4)) / 2
            want = want + (1 - beta) * (T * T if t2 else 1.0) * (F.softmax(z.detach() / T, 1) - q) / (T * 2)
            assert torch.allclose(z.grad, want, atol=1e-10)


def test_gradient_matches_finite_differences_of_own_term():
    # z's gradient in the full loss must equal the gradient of head 0's own term with q_0 a constant
    # (the peers' terms read z only through their detached targets); that term is gradchecked.
    peers = [torch.randn(2, 3, dtype=torch.float64) for _ in range(2)]
    y = torch.tensor([0, 2])
    q = F.softmax(torch.stack(peers).mean(0) / 2.0, 1)

    def own(z):
        return 0.3 * F.cross_entropy(z, y) + 0.7 * 4.0 * -(q * F.log_softmax(z / 2.0, 1)).sum(1).mean()

    z = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(own, (z,))
    collaborative_loss([z, *peers], y, beta=0.3, temperature=2.0, t2=True).backward()
    want = torch.autograd.grad(own(z), z)[0]
    assert torch.allclose(z.grad, want, atol=1e-12)


def test_sum_over_heads_not_mean():
    z = torch.randn(4, 5, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3])
    # identical heads: q_i = softmax(z/T); each head contributes the same; the total is H times one head's
    one = 0.5 * F.cross_entropy(z, y) + 0.5 * -(F.softmax(z / 2, 1) * F.log_softmax(z / 2, 1)).sum(1).mean()
    # float64: q from (sum of the 4 copies - z) / 3 is z to a few ulps; the rest reorders a few sums
    assert collaborative_loss([z, z, z, z], y).item() == pytest.approx(4 * one.item(), rel=1e-12)


def test_bad_arguments():
    with pytest.raises(HeadsurgeonError, match="beta"):
        collaborative_loss([torch.zeros(1, 2)] * 2, torch.tensor([0]), beta=1.5)
    with pytest.raises(HeadsurgeonError, match="temperature"):
        collaborative_loss([torch.zeros(1, 2)] * 2, torch.tensor([0]), temperature=0)
