"""The online-distillation objectives against values computed by hand.

Two kinds of reference: the table of ``shared/research/objectives.md`` §10 (H=3, B=2, C=3, float64,
printed to 6 decimals; each row pins the loss *and* the Frobenius norm of dL/dz_h per head, so a
swapped KL direction, a missing T^2, a mean instead of a sum or a missing detach all change at least
one number), and scalar references written here with plain Python ``math`` (one sample at a time,
no torch), independent of the implementation.
"""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from headsurgeon import HeadsurgeonError, collaborative_loss
from headsurgeon import objectives as O

# §10 inputs: Z[h] is head h's [B=2, C=3] logits, y = [0, 1]
Z10 = [[[2.0, 1.0, 0.1], [0.5, 2.5, -1.0]],
       [[1.5, 0.2, 0.3], [0.0, 1.0, 1.0]],
       [[0.3, 1.8, -0.5], [1.2, 0.4, 2.0]]]
Y10 = [0, 1]
G10 = [[0.5, 0.3, 0.2], [0.2, 0.2, 0.6]]          # ONE gate output [B, H], a fixed stand-in for the gate
CE10 = [0.285104, 0.657720, 1.940857]               # §10 "CE per head"


def _z10():
    return torch.tensor(Z10, dtype=torch.float64, requires_grad=True)


def _norms(loss, Z):
    g = torch.autograd.grad(loss, Z, retain_graph=True)[0]
    return [g[h].norm().item() for h in range(g.shape[0])]


def _assert_row(loss, Z, want_loss, want_norms):
    """A §10 row, to its printed precision (6 decimals)."""
    assert loss.item() == pytest.approx(want_loss, abs=5e-7)
    assert _norms(loss, Z) == pytest.approx(want_norms, abs=5e-7)


# --- plain-Python scalar references (one sample; lists of floats) -----------------------------------

def _lse(v):
    m = max(v)
    return m + math.log(sum(math.exp(a - m) for a in v))


def _logsm(v, T=1.0):
    s = [a / T for a in v]
    lse = _lse(s)
    return [a - lse for a in s]


def _ce(z, y):
    return _lse(z) - z[y]


def _kl(student, teacher, T):
    """T^2 KL(softmax(teacher/T) || softmax(student/T)) for one sample."""
    lq, lp = _logsm(teacher, T), _logsm(student, T)
    return T * T * sum(math.exp(a) * (a - b) for a, b in zip(lq, lp))


def _batch(fn, Z, y):
    """Mean over the batch of a per-sample scalar reference fn([z_h[b] for h], y[b])."""
    B = len(y)
    return sum(fn([Z[h][b] for h in range(len(Z))], y[b]) for b in range(B)) / B


def _dml_ref(zs, y, T):
    H = len(zs)
    return sum(_ce(zs[i], y) + sum(_kl(zs[i], zs[j], T) for j in range(H) if j != i) / (H - 1) for i in range(H))


def _one_ref(zs, y, g, T):
    H, C = len(zs), len(zs[0])
    zt = [sum(g[i] * zs[i][c] for i in range(H)) for c in range(C)]
    return sum(_ce(z, y) for z in zs) + _ce(zt, y) + sum(_kl(z, zt, T) for z in zs)


def _kdcl_ref(zs, y, T):
    C = len(zs[0])
    zt = [min(z[c] - z[y] for z in zs) for c in range(C)]
    return sum(_ce(z, y) + _kl(z, zt, T) for z in zs)


def _rand(heads, B=3, C=5, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, C, generator=g, dtype=dtype) for _ in range(heads)]


# --- registry --------------------------------------------------------------------------------------

def test_registry_and_describe():
    assert set(O.OBJECTIVES) >= {"cl", "dml", "one", "kdcl"}
    for name, cls in O.OBJECTIVES.items():
        obj = O.get(name)
        assert isinstance(obj, cls) and obj.name == name
        d = obj.describe()
        assert d["name"] == name and json.loads(json.dumps(d)) == d
    assert O.get("one", temperature=4.0, ramp=80).describe() == {
        "name": "one", "temperature": 4.0, "ramp": 80, "eps": 0.0, "label_smoothing": 0.0}
    assert O.get("cl").describe() == {"name": "cl", "beta": 0.5, "temperature": 2.0, "t2": False,
                                      "label_smoothing": 0.0}
    # defaults: DML's paper T=1, ONE's official T=3
    assert O.get("dml").temperature == 1.0 and O.get("one").temperature == 3.0


def test_registry_errors():
    with pytest.raises(HeadsurgeonError, match="unknown objective 'nope'.*cl, dml, kdcl, one"):
        O.get("nope")
    with pytest.raises(HeadsurgeonError, match="no parameter beta.*temperature"):
        O.get("dml", beta=0.5)
    with pytest.raises(HeadsurgeonError, match="temperature"):
        O.get("kdcl", temperature=0)
    with pytest.raises(HeadsurgeonError, match="beta"):
        O.get("cl", beta=1.5)
    with pytest.raises(HeadsurgeonError, match="ramp"):
        O.get("one", ramp=-1)
    with pytest.raises(HeadsurgeonError, match="registered twice"):
        O.register(O.DML)


# --- cl: bit for bit today's collaborative_loss ---------------------------------------------------

def _collaborative_loss_v0(logits, target, beta=0.5, temperature=2.0, t2=False, label_smoothing=0.0):
    """headsurgeon.loss.collaborative_loss as of commit ca9caa1, frozen here (validation omitted)."""
    logits = [z.to(torch.promote_types(z.dtype, torch.float32)) for z in logits]
    heads = len(logits)
    hard = [F.cross_entropy(z, target, label_smoothing=label_smoothing) for z in logits]
    if heads == 1:
        return hard[0]
    scale = temperature * temperature if t2 else 1.0
    total = torch.stack(logits).sum(0).detach()
    loss = logits[0].new_zeros(())
    for z, ce in zip(logits, hard):
        q = F.softmax((total - z.detach()) / (heads - 1) / temperature, dim=1)
        soft = -(q * F.log_softmax(z / temperature, dim=1)).sum(1).mean()
        loss = loss + beta * ce + (1.0 - beta) * scale * soft
    return loss


@pytest.mark.parametrize("heads,beta,T,t2,ls,dtype", [
    (1, 0.5, 2.0, False, 0.0, torch.float32), (1, 0.5, 2.0, False, 0.1, torch.float32),
    (2, 0.5, 2.0, False, 0.0, torch.float32), (3, 0.3, 3.0, True, 0.1, torch.float32),
    (4, 0.7, 1.5, False, 0.0, torch.float64), (4, 0.5, 2.0, True, 0.0, torch.bfloat16),
    (3, 0.5, 2.0, False, 0.0, torch.float16)])
def test_cl_is_collaborative_loss_bit_for_bit(heads, beta, T, t2, ls, dtype):
    y = torch.tensor([0, 3, 4])
    kw = dict(beta=beta, temperature=T, t2=t2, label_smoothing=ls)
    zs = [z.to(dtype).requires_grad_() for z in _rand(heads, seed=heads, dtype=torch.float32)]
    want = _collaborative_loss_v0(zs, y, **kw)
    want_g = torch.autograd.grad(want, zs)
    for got in (O.get("cl", **kw)(zs, y).loss, collaborative_loss(zs, y, **kw)):  # the same ops in this process: exact
        assert got.dtype == want.dtype and torch.equal(got, want)
        assert all(torch.equal(a, b) for a, b in zip(torch.autograd.grad(got, zs), want_g))


def test_cl_reference_row_and_terms():
    Z = _z10()
    out = O.get("cl", beta=0.5, temperature=2.0)(list(Z), torch.tensor(Y10))
    _assert_row(out.loss, Z, 3.266272, [0.097374, 0.217883, 0.461195])      # §10 "CL paper form"
    assert [h.item() for h in out.hard] == pytest.approx(CE10, abs=5e-7)
    # loss = sum_i beta hard_i + (1 - beta) soft_i; soft_i is the soft cross-entropy H(q_i, p_i), checked by hand
    mixed = sum(0.5 * h + 0.5 * s for h, s in zip(out.hard, out.soft))
    assert out.loss.item() == pytest.approx(mixed.item(), abs=1e-12)

    def soft_ref(zs, y, i, T=2.0):
        other = [sum(zs[j][c] for j in range(3) if j != i) / 2 for c in range(3)]
        lq, lp = _logsm(other, T), _logsm(zs[i], T)
        return -sum(math.exp(a) * b for a, b in zip(lq, lp))
    for i in range(3):
        assert out.soft[i].item() == pytest.approx(_batch(lambda zs, y: soft_ref(zs, y, i), Z10, Y10), abs=1e-12)
    # t2 scales the logged soft term too
    out2 = O.get("cl", temperature=2.0, t2=True)(list(Z), torch.tensor(Y10))
    assert [s.item() for s in out2.soft] == pytest.approx([4 * s.item() for s in out.soft], rel=1e-12)


def test_cl_late_consensus_schedule():
    """beta 1 -> 0.1 over 10 epochs: beta_e = (1 - e/9) * 1 + (e/9) * 0.1, exactly the end points, held after;
    each epoch's loss is the constant-beta objective's at beta_e, bit for bit (the same ops)."""
    cl = O.get("cl", beta=1.0, beta_end=0.1, beta_epochs=10)
    want = {0: 1.0, 3: 0.7, 4: 0.6, 9: 0.1, 25: 0.1}
    Z, y = list(_z10()), torch.tensor(Y10)
    for e, b in want.items():
        cl.set_epoch(e)
        assert cl.beta_now == pytest.approx(b, abs=1e-15) and (e not in (0, 9, 25) or cl.beta_now == b)
        assert torch.equal(cl(Z, y).loss, O.get("cl", beta=cl.beta_now)(Z, y).loss)
    cl.set_epoch(0)
    assert torch.equal(cl(Z, y).loss, sum(O.get("cl")(Z, y).hard))  # beta 1: cross-entropy only
    assert cl.describe() == {"name": "cl", "beta": 1.0, "temperature": 2.0, "t2": False, "label_smoothing": 0.0,
                             "beta_end": 0.1, "beta_epochs": 10}
    assert O.get(**cl.describe()).describe() == cl.describe()
    one = O.get("cl", beta=0.2, beta_end=0.9, beta_epochs=1)  # a one-epoch schedule is already at its end
    assert one.beta_now == 0.9
    with pytest.raises(HeadsurgeonError, match="beta_end needs beta_epochs"):
        O.get("cl", beta_end=0.1)
    with pytest.raises(HeadsurgeonError, match=r"beta_end must be in \[0, 1\], got 1.5"):
        O.get("cl", beta_end=1.5, beta_epochs=3)


# --- dml -------------------------------------------------------------------------------------------

def test_dml_reference_rows():
    Z, y = _z10(), torch.tensor(Y10)
    # §10 "DML paper 1/(K-1)", T=1: the form (the official code's sum gives 7.009537)
    _assert_row(O.get("dml")(list(Z), y).loss, Z, 4.946609, [0.324912, 0.458555, 1.275163])
    # §10 "DML MCL-OKD (T=2, /(H-1))": T^2 applied at T != 1 (without it the loss would be lower)
    _assert_row(O.get("dml", temperature=2.0)(list(Z), y).loss, Z, 5.278480, [0.415581, 0.501295, 1.313302])
    # §10 "DML-TF per-head losses" sum the H-1 = 2 peer KLs: CE_i + 2 * soft_i
    out = O.get("dml")(list(Z), y)
    per = [(h + 2 * s).item() for h, s in zip(out.hard, out.soft)]
    assert per == pytest.approx([2.025970, 1.448107, 3.535460], abs=5e-7)
    assert [h.item() for h in out.hard] == pytest.approx(CE10, abs=5e-7)


@pytest.mark.parametrize("name,ref,seed,heads,T", [
    ("dml", _dml_ref, 10, 2, 1.0), ("dml", _dml_ref, 10, 3, 2.0), ("dml", _dml_ref, 10, 4, 3.0),
    ("kdcl", _kdcl_ref, 30, 2, 1.0), ("kdcl", _kdcl_ref, 30, 3, 3.0), ("kdcl", _kdcl_ref, 30, 4, 2.0)])
def test_label_objectives_match_plain_python(name, ref, seed, heads, T):
    zs, y = _rand(heads, seed=seed + heads), [0, 3, 4]
    want = _batch(lambda z, t: ref(z, t, T), [z.tolist() for z in zs], y)
    assert O.get(name, temperature=T)(zs, torch.tensor(y)).loss.item() == pytest.approx(want, abs=1e-12)


def test_dml_two_heads_by_hand():
    # z0 = (0, 0), z1 = (1, 0), y = 0, T = 1; s = sigmoid(1): p0 = (1/2, 1/2), p1 = (s, 1 - s)
    # head 0: CE = log 2,         KL(p1 || p0) = s log(2s) + (1-s) log(2(1-s))
    # head 1: CE = log(1 + e^-1), KL(p0 || p1) = 1/2 log(1/(2s)) + 1/2 log(1/(2(1-s)))
    s = 1 / (1 + math.exp(-1))
    want = (math.log(2) + s * math.log(2 * s) + (1 - s) * math.log(2 * (1 - s))
            + math.log(1 + math.exp(-1)) - 0.5 * math.log(2 * s) - 0.5 * math.log(2 * (1 - s)))
    f64 = torch.float64
    got = O.get("dml")([torch.tensor([[0.0, 0.0]], dtype=f64), torch.tensor([[1.0, 0.0]], dtype=f64)], torch.tensor([0]))
    assert got.loss.item() == pytest.approx(want, abs=1e-12)  # float64 against math: a few ulps of a loss of ~1


def test_dml_peers_are_detached():
    # dL/dz_i = (softmax(z_i) - onehot)/B + T^2 (1/(H-1)) sum_{j!=i} (p_i - p_j)/(T B): only head i's own terms;
    # head j's KL toward p_i sends nothing into z_i. Without the detach each z_i would also get
    # -T (1/(H-1)) sum_j d KL(p_i||p_j)/dz_i, which is not zero here.
    H, B, C, T = 3, 2, 4, 2.0
    zs = [z.requires_grad_() for z in _rand(H, B, C, seed=3)]
    y = torch.tensor([2, 1])
    O.get("dml", temperature=T)(zs, y).loss.backward()
    for i, z in enumerate(zs):
        p = [F.softmax(zj.detach() / T, 1) for zj in zs]
        want = (F.softmax(z.detach(), 1) - F.one_hot(y, C)) / B
        want = want + T * T * sum(p[i] - p[j] for j in range(H) if j != i) / (H - 1) / (T * B)
        assert torch.allclose(z.grad, want, atol=1e-12)


# --- one -------------------------------------------------------------------------------------------

def test_one_reference_rows():
    Z, y, g = _z10(), torch.tensor(Y10), torch.tensor(G10, dtype=torch.float64)
    # §10 "ONE (official, w=1)", with the official eps = 1e-7 in the teacher probabilities
    out = O.get("one", eps=1e-7).from_weights(list(Z), y, g)
    _assert_row(out.loss, Z, 4.713195, [0.417225, 0.489414, 1.308464])
    # "ONE but teacher NOT detached" has the same loss but norms 0.329748, 0.531326, 1.441761: the row above
    # rejects that; so it does a missing T^2 (T=3) and a mean over heads
    # teacher z_e = [[1.51, 0.92, 0.04], [0.82, 0.94, 1.20]] (§10); its CE by hand
    assert out.extra["teacher_ce"].item() == pytest.approx(
        (_ce([1.51, 0.92, 0.04], 0) + _ce([0.82, 0.94, 1.20], 1)) / 2, abs=1e-12)
    assert [h.item() for h in out.hard] == pytest.approx(CE10, abs=5e-7)
    assert out.loss.item() == pytest.approx((sum(out.hard) + out.extra["teacher_ce"] + sum(out.soft)).item(), abs=1e-12)
    # §10 "ONE (official, epoch 0, w=e^-5)": the 80-epoch ramp at epoch index 0
    one = O.get("one", eps=1e-7, ramp=80)
    one.set_epoch(0)
    _assert_row(one.from_weights(list(Z), y, g).loss, Z, 3.758702, [0.391661, 0.542596, 1.014593])
    # eps = 0 (our default) moves the loss by 8.4e-6 (§8.4) and keeps the gradients to 6 decimals
    plain = O.get("one").from_weights(list(Z), y, g).loss
    assert out.loss.item() - plain.item() == pytest.approx(8.4e-6, abs=1e-7)
    assert _norms(plain, Z) == pytest.approx([0.417225, 0.489414, 1.308464], abs=5e-7)


def test_ramp_weight():
    assert O.ramp_weight(0, 80) == pytest.approx(math.exp(-5))
    assert O.ramp_weight(40, 80) == pytest.approx(0.286505, abs=5e-7)            # §1
    assert O.ramp_weight(80, 80) == O.ramp_weight(300, 80) == O.ramp_weight(0, 0) == 1.0
    one = O.get("one", ramp=80)
    assert one.soft_weight == pytest.approx(math.exp(-5))
    one.set_epoch(40)
    assert one.soft_weight == pytest.approx(0.286505, abs=5e-7)


@pytest.mark.parametrize("heads,T", [(2, 1.0), (3, 3.0), (4, 2.0)])
def test_one_matches_plain_python(heads, T):
    zs, y = _rand(heads, seed=20 + heads), [0, 3, 4]
    g = torch.softmax(torch.randn(3, heads, generator=torch.Generator().manual_seed(1), dtype=torch.float64), 1)
    want = sum(_one_ref([z[b].tolist() for z in zs], y[b], g[b].tolist(), T) for b in range(3)) / 3
    got = O.get("one", temperature=T).from_weights(zs, torch.tensor(y), g)
    assert got.loss.item() == pytest.approx(want, abs=1e-12)


def test_one_gate_gets_only_the_teacher_ce_gradient():
    torch.manual_seed(0)
    H, B, C, D = 3, 4, 5, 6
    one = O.get("one")
    gate = one.make_modules(D, H)
    assert isinstance(gate, O.OneGate) and one.feature_source == "fork" and not one.needs_mean_logits
    with torch.no_grad():                         # away from the zero init, so the gate is not symmetric
        gate.fc.weight.normal_()
        gate.fc.bias.normal_()
    gate.double()                                 # float64 throughout: both sides of each check within 1e-12
    feats = torch.randn(B, D, 3, 3, dtype=torch.float64)
    zs = [torch.randn(B, C, dtype=torch.float64, requires_grad=True) for _ in range(H)]
    y = torch.tensor([0, 1, 2, 3])
    params = list(gate.parameters())
    got = torch.autograd.grad(one(zs, y, feats, gate).loss, params)
    # the gate's gradient is exactly that of CE(y, z_t) alone: the KL does not reach it
    w = gate(feats).double()
    want = torch.autograd.grad(F.cross_entropy(sum(w[:, i:i + 1] * z for i, z in enumerate(zs)), y), params)
    for a, b in zip(got, want):
        assert a.abs().sum() > 1e-3                      # CE(y, z_t) does reach the gate
        assert torch.allclose(a, b, rtol=0, atol=1e-12)
    # and the KL sends nothing into the teacher's heads: dL/dz_i = own CE + g_i * d CE(z_t)/dz_t + own KL
    out = one(zs, y, feats, gate)
    grads = torch.autograd.grad(out.loss, zs)
    zt = sum(w[:, i:i + 1] * z for i, z in enumerate(zs)).detach()
    q = F.softmax(zt / 3, 1)
    for i, z in enumerate(zs):
        want = (F.softmax(z.detach(), 1) - F.one_hot(y, C)) / B
        want = want + w[:, i:i + 1].detach() * (F.softmax(zt, 1) - F.one_hot(y, C)) / B
        want = want + 9 * (F.softmax(z.detach() / 3, 1) - q) / (3 * B)
        assert torch.allclose(grads[i], want, rtol=0, atol=1e-12)


def test_one_gate_pools_every_layout():
    gate = O.OneGate(4, 3)
    # exact: exp(0) = 1 and a sum of 3 leave one rounding of 1 / 3, as in the float32 literal
    assert torch.equal(gate(torch.randn(2, 4)), torch.full((2, 3), 1 / 3))        # zero init: the plain average
    with torch.no_grad():
        gate.fc.weight.normal_()
    gate.double()  # float64: the layouts' means of 30 values sum in other orders, a few ulps, far below 1e-12
    x = torch.randn(2, 4, 5, 6, dtype=torch.float64)                             # NCHW
    want = F.softmax(gate.fc(x.mean((2, 3))), 1)
    for feats in (x, x.permute(0, 2, 3, 1), x.flatten(2).transpose(1, 2), x.mean((2, 3))):  # NHWC, NLC, 2-D
        assert torch.allclose(gate(feats), want, rtol=0, atol=1e-12)
    assert torch.allclose(want.sum(1), torch.ones(2, dtype=torch.float64), rtol=0, atol=1e-12)
    with pytest.raises(HeadsurgeonError, match="OneGate"):
        gate(torch.randn(2, 7, 5, 6))
    with pytest.raises(HeadsurgeonError, match="features"):
        O.get("one")([torch.randn(2, 3)] * 2, torch.tensor([0, 1]))
    with pytest.raises(HeadsurgeonError, match=r"\[B, H\]"):
        O.get("one").from_weights([torch.randn(2, 3)] * 2, torch.tensor([0, 1]), torch.ones(2, 3))
    assert O.get("one").make_modules(4, 1) is None
    assert all(O.get(n).make_modules(4, 3, 10) is None for n in ("cl", "dml", "kdcl"))


# --- kdcl ------------------------------------------------------------------------------------------

def test_kdcl_reference_rows():
    Z, y = _z10(), torch.tensor(Y10)
    kdcl = O.get("kdcl")
    # teacher by hand: per class min over heads of z_h,c - z_h,y
    t = kdcl.teacher(list(Z), y)
    assert torch.allclose(t, torch.tensor([[0.0, -1.3, -1.9], [-2.0, 0.0, -3.5]], dtype=t.dtype), rtol=0, atol=1e-12)
    # §10 "KDCL-MinLogit (T=3)"; the mean-logit teacher would give 3.722392, no detach other norms
    _assert_row(kdcl(list(Z), y).loss, Z, 4.809989, [0.264829, 0.807864, 1.472377])


def test_kdcl_teacher_is_detached():
    # dL/dz_i = (softmax(z_i) - onehot)/B + T^2 (p_i - q)/(T B): the teacher (built from every head) sends nothing back
    H, B, C, T = 3, 2, 4, 3.0
    zs = [z.requires_grad_() for z in _rand(H, B, C, seed=4)]
    y = torch.tensor([2, 1])
    O.get("kdcl", temperature=T)(zs, y).loss.backward()
    q = F.softmax(O.KDCL().teacher([z.detach() for z in zs], y) / T, 1)
    for z in zs:
        want = (F.softmax(z.detach(), 1) - F.one_hot(y, C)) / B + T * (F.softmax(z.detach() / T, 1) - q) / B
        assert torch.allclose(z.grad, want, atol=1e-12)


# --- pcl -------------------------------------------------------------------------------------------

ZPE10 = [[2.2, 0.5, -0.3], [0.1, 2.0, 0.6]]                                     # §10 peer-ensemble logits
ZM10 = [[[1.8, 0.9, 0.0], [0.4, 2.0, -0.5]], [[1.2, 0.4, 0.2], [0.1, 1.2, 0.8]],
        [[0.6, 1.5, -0.3], [0.9, 0.8, 1.5]]]                                     # §10 temporal-mean logits


def _pcl_ref(zs, y, zpe, zm, T):
    H = len(zs)
    return _ce(zpe, y) + sum(_ce(zs[j], y) + _kl(zs[j], zpe, T)
                             + sum(_kl(zs[j], zm[l], T) for l in range(H) if l != j) / (H - 1) for j in range(H))


def test_pcl_reference_row():
    Z, y = _z10(), torch.tensor(Y10)
    zpe, zm = torch.tensor(ZPE10, dtype=torch.float64), list(torch.tensor(ZM10, dtype=torch.float64))
    out = O.get("pcl").from_teachers(list(Z), y, zpe, zm)
    _assert_row(out.loss, Z, 6.250397, [0.608596, 0.736190, 1.852032])           # §10 "PCL (T=3, w=1)"
    want = sum(_pcl_ref([Z10[h][b] for h in range(3)], Y10[b], ZPE10[b], [ZM10[h][b] for h in range(3)], 3.0)
               for b in range(2)) / 2
    assert out.loss.item() == pytest.approx(want, abs=1e-12)
    assert out.extra["teacher_ce"].item() == pytest.approx((_ce(ZPE10[0], 0) + _ce(ZPE10[1], 1)) / 2, abs=1e-12)


def test_pcl_teachers_are_detached():
    torch.manual_seed(0)
    H, B, C, D = 3, 4, 5, 6
    pcl = O.get("pcl")
    ens = pcl.make_modules(D, H, C)
    assert isinstance(ens, O.PeerEnsemble) and pcl.feature_source == "heads" and pcl.needs_mean_logits
    ens.double()  # float64: the two gradients of CE(y, z_pe) agree to a few ulps, far below 1e-12
    f64 = dict(dtype=torch.float64)
    feats = [torch.randn(B, D, 2, 2, **f64) for _ in range(H)]
    zs = [torch.randn(B, C, requires_grad=True, **f64) for _ in range(H)]
    means = [torch.randn(B, C, requires_grad=True, **f64) for _ in range(H)]
    y = torch.tensor([0, 1, 2, 3])
    params = list(ens.parameters())
    out = pcl(zs, y, feats, ens, means)
    got = torch.autograd.grad(out.loss, params + means, allow_unused=True)
    assert all(g is None for g in got[len(params):])                     # nothing flows into the EMA logits
    want = torch.autograd.grad(F.cross_entropy(ens(feats), y), params)   # the ensemble learns from CE(y, z_pe) only
    for a, b in zip(got, want):
        assert a.abs().sum() > 1e-3 and torch.allclose(a, b, rtol=0, atol=1e-12)
    with pytest.raises(HeadsurgeonError, match="num_classes"):
        pcl.make_modules(D, H)
    with pytest.raises(HeadsurgeonError, match="temporal-mean"):
        pcl(zs, y, feats, ens)
    assert pcl.make_modules(D, 1, C) is None


# --- every objective -------------------------------------------------------------------------------

def _call(name, zs, y, **kw):
    """Every objective called the trainer's way; ONE and PCL with a fixed random module on fixed features."""
    obj = O.get(name, **kw)
    H, (B, C) = len(zs), zs[0].shape
    dtype = torch.promote_types(zs[0].dtype, torch.float32)
    extra = obj.make_modules(4, H, C)
    if extra is not None:
        extra = extra.to(dtype)
        with torch.no_grad():
            extra.fc.weight.copy_(torch.randn(extra.fc.weight.shape, generator=torch.Generator().manual_seed(5)))
            extra.fc.bias.zero_()
    feats = torch.linspace(-1, 1, B * 4 * 9, dtype=dtype).view(-1, 4, 3, 3)
    if obj.feature_source == "heads":
        feats = [feats * (i + 1) for i in range(H)]
    means = [torch.linspace(-2, 2, B * C, dtype=dtype).view(B, C)] * H
    return obj(zs, y, feats if obj.feature_source else None, extra, means if obj.needs_mean_logits else None)


NAMES = ["cl", "dml", "one", "kdcl", "pcl"]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("ls", [0.0, 0.1])
def test_one_head_is_cross_entropy(name, ls):
    z, y = torch.randn(4, 6), torch.tensor([1, 2, 3, 0])
    out = _call(name, [z], y, label_smoothing=ls)
    assert torch.equal(out.loss, F.cross_entropy(z, y, label_smoothing=ls))  # one head returns that call: exact
    assert len(out.hard) == len(out.soft) == 1 and out.soft[0].item() == 0.0


@pytest.mark.parametrize("name", NAMES)
def test_one_hot_soft_targets_equal_index_targets(name):
    zs = [z.requires_grad_() for z in _rand(3, B=4, C=5, seed=7)]
    y = torch.tensor([0, 3, 4, 1])
    for ls in (0.0, 0.1):
        a = _call(name, zs, y, label_smoothing=ls)
        b = _call(name, zs, F.one_hot(y, 5).double(), label_smoothing=ls)
        assert torch.allclose(a.loss, b.loss, rtol=0, atol=1e-12)
        for ga, gb in zip(torch.autograd.grad(a.loss, zs), torch.autograd.grad(b.loss, zs)):
            assert torch.allclose(ga, gb, rtol=0, atol=1e-12)
        for ta, tb in zip(a.hard + a.soft, b.hard + b.soft):
            assert torch.allclose(ta, tb, rtol=0, atol=1e-12)
    # float32 soft targets with float64 logits are cast, not rejected
    assert torch.allclose(_call(name, zs, F.one_hot(y, 5).float()).loss, _call(name, zs, y).loss, atol=1e-12)


@pytest.mark.parametrize("name", NAMES)
def test_mixed_soft_targets(name):
    # a mixup target lam * onehot(a) + (1 - lam) * onehot(b): each hard term is lam CE(a) + (1 - lam) CE(b)
    zs = _rand(3, B=4, C=5, seed=8)
    a, b, lam = torch.tensor([0, 3, 4, 1]), torch.tensor([2, 2, 0, 4]), 0.7
    soft = lam * F.one_hot(a, 5).double() + (1 - lam) * F.one_hot(b, 5).double()
    out = _call(name, zs, soft)
    for z, h in zip(zs, out.hard):
        assert h.item() == pytest.approx(lam * F.cross_entropy(z, a).item() + (1 - lam) * F.cross_entropy(z, b).item(),
                                         abs=1e-12)
    if name == "kdcl":   # its teacher re-references each head at the expected target logit
        want = torch.stack([z - (lam * z.gather(1, a[:, None]) + (1 - lam) * z.gather(1, b[:, None])) for z in zs])
        assert torch.allclose(O.KDCL().teacher(zs, soft), want.min(0).values, atol=1e-12)
    with pytest.raises(HeadsurgeonError, match="soft targets"):
        _call(name, zs, soft[:, :4])


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_logits_are_promoted(name, dtype):
    zs = [z.to(dtype) for z in _rand(3, B=4, C=5, seed=9, dtype=torch.float32)]
    y = torch.tensor([0, 3, 4, 1])
    half = _call(name, [z.requires_grad_() for z in zs], y)
    full = _call(name, [z.float() for z in zs], y)
    assert half.loss.dtype == torch.float32 and torch.equal(half.loss, full.loss)  # the same float32 inputs and ops
    half.loss.backward()                                      # gradients flow back into the half-precision logits
    assert all(z.grad is not None and z.grad.dtype == dtype for z in zs)


def test_one_gate_weights_in_half_precision_are_promoted():
    zs, y = _rand(3, B=2, C=3, seed=2, dtype=torch.float32), torch.tensor([0, 1])
    g = torch.tensor(G10, dtype=torch.bfloat16)
    got = O.get("one").from_weights(zs, y, g)
    assert got.loss.dtype == torch.float32
    assert torch.equal(got.loss, O.get("one").from_weights(zs, y, g.float()).loss)  # the same float32 inputs and ops


@pytest.mark.parametrize("name", NAMES)
def test_logged_terms_are_detached_and_sum_over_heads(name):
    zs = [z.requires_grad_() for z in _rand(4, seed=11)]
    y = torch.tensor([0, 3, 4])
    out = _call(name, zs, y)
    assert len(out.hard) == len(out.soft) == 4
    assert not any(t.requires_grad for t in [*out.hard, *out.soft, *out.extra.values()])
    log = out.log()
    assert json.loads(json.dumps(log)) == log and len(log["hard"]) == 4
    # four identical heads: the loss is H times one head's (a sum over heads, not a mean)
    same = _call(name, [zs[0]] * 4, y)
    one_head = same.loss.item() - sum(v.item() for v in same.extra.values())
    w = 0.5 if name == "cl" else 1.0
    assert one_head == pytest.approx(4 * (w * same.hard[0] + w * same.soft[0]).item(), rel=1e-12)
    assert same.hard[0].item() == pytest.approx(F.cross_entropy(zs[0], y).item(), abs=1e-12)


# --- label smoothing and the ramp with several heads, on the §10 inputs ------------------------------

ZE10 = [[1.51, 0.92, 0.04], [0.82, 0.94, 1.20]]                                  # §10 ONE teacher, from G10 by hand


def _on_ref10(obj):
    """``obj`` on the §10 inputs: ONE with the fixed gate output G10, PCL with ZPE10 and ZM10."""
    Z, y = _z10(), torch.tensor(Y10)
    if obj.name == "one":
        return obj.from_weights(list(Z), y, torch.tensor(G10, dtype=torch.float64))
    if obj.name == "pcl":
        return obj.from_teachers(list(Z), y, torch.tensor(ZPE10, dtype=torch.float64),
                                 list(torch.tensor(ZM10, dtype=torch.float64)))
    return obj(list(Z), y)


def _ce_ls(z, y, eps):
    """CE against (1 - eps) onehot(y) + eps / C for one sample: (1 - eps) CE + eps (lse(z) - mean(z))."""
    return (1 - eps) * _ce(z, y) + eps * (_lse(z) - sum(z) / len(z))


@pytest.mark.parametrize("name", NAMES)
def test_label_smoothing_by_hand_with_several_heads(name):
    """Smoothing enters every CE against the labels (each head's; ONE's and PCL's teacher's) and nothing else:
    the one-head test cannot see this (it takes a separate path), nor can index-vs-one-hot (both smooth alike)."""
    plain, smooth = _on_ref10(O.get(name)), _on_ref10(O.get(name, label_smoothing=0.1))
    want = [_batch(lambda zs, t: _ce_ls(zs[h], t, 0.1), Z10, Y10) for h in range(3)]
    assert [h.item() for h in smooth.hard] == pytest.approx(want, abs=1e-10)
    assert [s.item() for s in smooth.soft] == pytest.approx([s.item() for s in plain.soft], abs=1e-12)
    d_teacher = 0.0
    teacher = {"one": ZE10, "pcl": ZPE10}.get(name)
    if teacher is not None:
        t_ls = sum(_ce_ls(teacher[b], Y10[b], 0.1) for b in range(2)) / 2
        assert smooth.extra["teacher_ce"].item() == pytest.approx(t_ls, abs=1e-10)
        d_teacher = t_ls - sum(_ce(teacher[b], Y10[b]) for b in range(2)) / 2
    beta = 0.5 if name == "cl" else 1.0
    d_hard = sum(want) - sum(_batch(lambda zs, t: _ce(zs[h], t), Z10, Y10) for h in range(3))
    assert smooth.loss.item() - plain.loss.item() == pytest.approx(beta * d_hard + d_teacher, abs=1e-10)


@pytest.mark.parametrize("name", ["dml", "one", "kdcl", "pcl"])
def test_ramp_weighs_every_distillation_term(name):
    """At epoch e of an 80-epoch ramp the loss is the w = 1 loss (its rows are checked above) less
    (1 - w(e)) times the unweighted soft terms, w(e) = exp(-5 (1 - e/80)^2) by hand; the logged soft terms
    stay unweighted. Only ONE's epoch-0 row was checked before: an objective that ignored w passed."""
    full = _on_ref10(O.get(name))
    soft = sum(s.item() for s in full.soft)
    assert soft > 0.1
    for epoch in (0, 40, 80, 200):
        obj = O.get(name, ramp=80)
        obj.set_epoch(epoch)
        out = _on_ref10(obj)
        w = math.exp(-5 * (1 - min(epoch, 80) / 80) ** 2)
        assert [s.item() for s in out.soft] == pytest.approx([s.item() for s in full.soft], abs=1e-12)
        assert out.loss.item() == pytest.approx(full.loss.item() - (1 - w) * soft, abs=1e-10), epoch
