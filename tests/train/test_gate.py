"""train/gate.py: hand-made features, a loop reference, no-target positions, no gradient."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from train.gate import GATE_MODES, fuse, gate_weights


def _one_position(vectors, student, seen=None):
    """K hand-made teacher tokens at one position: -> adapted (K,1,1,D), student (1,1,D), seen."""
    a = torch.tensor(vectors, dtype=torch.float32).reshape(len(vectors), 1, 1, -1)
    u = torch.tensor(student, dtype=torch.float32).reshape(1, 1, -1)
    s = torch.ones(len(vectors), 1, 1, dtype=torch.bool) if seen is None else \
        torch.tensor(seen).reshape(len(vectors), 1, 1)
    return a, u, s


def _reference(student, adapted, seen, mode, tau):
    """Straight transcription of docs/method.md with Python loops (the spec, not the fast path)."""
    k_n, b_n, p_n, _ = adapted.shape
    w = torch.zeros(k_n, b_n, p_n)
    for b in range(b_n):
        for p in range(p_n):
            ks = [k for k in range(k_n) if seen[k, b, p]]
            if not ks:
                continue
            logits = []
            for k in ks:
                s = F.cosine_similarity(student[b, p], adapted[k, b, p], dim=0).item()
                others = [F.cosine_similarity(adapted[k, b, p], adapted[j, b, p], dim=0).item()
                          for j in ks if j != k]
                c = sum(others) / len(others) if others else 0.0
                logits.append({"uniform": 0.0, "affinity": s, "agreement": c, "consensus": s + c}[mode])
            e = [math.exp((x - max(logits)) / tau) for x in logits]
            for k, v in zip(ks, e):
                w[k, b, p] = v / sum(e)
    return w


def test_uniform_gives_equal_weights_over_the_teachers_that_saw():
    a, u, _ = _one_position([[1, 0, 0], [0, 1, 0], [5, 5, 1]], [1, 2, 3])
    w = gate_weights(student=u, adapted=a, seen=torch.ones(3, 1, 1, dtype=torch.bool), mode="uniform")
    assert torch.allclose(w.flatten(), torch.full((3,), 1 / 3))
    seen = torch.tensor([True, False, True]).reshape(3, 1, 1)
    w = gate_weights(student=u, adapted=a, seen=seen, mode="uniform")
    assert torch.allclose(w.flatten(), torch.tensor([0.5, 0.0, 0.5]))


def test_agreement_two_agreeing_teachers_outweigh_an_outlier():
    # teachers 0 and 1 agree (cos 1), teacher 2 is orthogonal to both
    a, u, seen = _one_position([[1, 0, 0], [2, 0, 0], [0, 1, 0]], [0, 1, 0])
    w = gate_weights(student=u, adapted=a, seen=seen, mode="agreement", tau=0.1).flatten()
    # c = (1+0)/2, (1+0)/2, (0+0)/2 -> softmax([5, 5, 0])
    e5 = math.exp(5.0)
    assert torch.allclose(w, torch.tensor([e5, e5, 1.0]) / (2 * e5 + 1), atol=1e-6)
    assert w[0] > 0.49 and w[2] < 0.01   # even though the student agrees with the outlier


def test_affinity_the_teacher_closest_to_the_student_wins():
    a, u, seen = _one_position([[1, 0, 0], [2, 0, 0], [0, 1, 0]], [0.1, 1, 0])
    w = gate_weights(student=u, adapted=a, seen=seen, mode="affinity", tau=0.1).flatten()
    assert w.argmax() == 2 and w[2] > 0.99
    assert torch.allclose(w[0], w[1])   # same direction, same affinity


def test_consensus_adds_affinity_and_agreement_logits():
    # student slightly closer to the outlier; agreement favours the pair
    a, u, seen = _one_position([[1, 0, 0], [1, 0.2, 0], [0, 1, 0]], [0.6, 1, 0])
    w = {m: gate_weights(student=u, adapted=a, seen=seen, mode=m, tau=0.1).flatten()
         for m in ("affinity", "agreement", "consensus")}
    assert w["affinity"].argmax() == 2 and w["agreement"].argmax() != 2
    assert w["consensus"].argmax() != 2      # agreement outweighs the affinity gap here
    log = lambda t: torch.log(t[0] / t[2])
    # log-ratios of softmax weights add: consensus = affinity + agreement
    assert torch.allclose(log(w["consensus"]), log(w["affinity"]) + log(w["agreement"]), atol=1e-4)


@pytest.mark.parametrize("mode", GATE_MODES)
def test_vectorised_gate_equals_the_loop_reference_on_random_masks(mode):
    g = torch.Generator().manual_seed(1)
    k, b, p, d = 3, 2, 9, 5
    adapted = torch.randn(k, b, p, d, generator=g)
    student = torch.randn(b, p, d, generator=g)
    seen = torch.rand(k, b, p, generator=g) < 0.5
    seen[:, 0, 0] = False                 # nobody
    seen[:, 0, 1] = torch.tensor([False, True, False])   # exactly one
    w = gate_weights(student=student, adapted=adapted, seen=seen, mode=mode, tau=0.1)
    assert torch.allclose(w, _reference(student, adapted, seen, mode, 0.1), atol=1e-5)


@pytest.mark.parametrize("mode", GATE_MODES)
def test_a_position_seen_by_one_teacher_gets_weight_one_and_unseen_positions_none(mode):
    a, u, _ = _one_position([[1, 0, 0], [0, 1, 0], [0, 0, 1]], [1, 1, 1])
    a = a.expand(3, 1, 2, 3).clone()
    u = u.expand(1, 2, 3)
    seen = torch.tensor([[[False, False]], [[True, False]], [[False, False]]])   # (K,1,2)
    w = gate_weights(student=u, adapted=a, seen=seen, mode=mode)
    assert torch.equal(w[:, 0, 0], torch.tensor([0.0, 1.0, 0.0]))
    assert torch.equal(w[:, 0, 1], torch.zeros(3)) and torch.isfinite(w).all()
    y = fuse(adapted=a, weights=w)
    assert torch.equal(y[0, 0], a[1, 0, 0]) and torch.equal(y[0, 1], torch.zeros(3))


def test_no_gradient_flows_through_the_weights_only_through_the_tokens():
    g = torch.Generator().manual_seed(2)
    adapted = torch.randn(3, 2, 4, 6, generator=g, requires_grad=True)
    student = torch.randn(2, 4, 6, generator=g, requires_grad=True)
    seen = torch.ones(3, 2, 4, dtype=torch.bool)
    w = gate_weights(student=student, adapted=adapted, seen=seen, mode="consensus")
    assert not w.requires_grad
    fuse(adapted=adapted, weights=w).sum().backward()
    assert student.grad is None
    # d(sum y)/d a_k = w_k exactly: the weights are constants to autograd
    assert torch.allclose(adapted.grad, w.unsqueeze(-1).expand_as(adapted))


def test_bad_mode_and_shapes_are_refused():
    a, u, seen = _one_position([[1, 0], [0, 1]], [1, 1])
    with pytest.raises(ValueError, match="'softmax'"):
        gate_weights(student=u, adapted=a, seen=seen, mode="softmax")
    with pytest.raises(ValueError, match="shapes disagree"):
        gate_weights(student=u, adapted=a, seen=seen[:1], mode="uniform")
