import math

import pytest
import torch
import torch.nn.functional as F

from t2sda.method.pull_loss import PrototypeBank, pull_loss, sample_index


def _clusters(num_classes=4, per_class=20, dim=8, noise=0.05, seed=0):
    gen = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(num_classes, dim, generator=gen), dim=1)
    label = torch.arange(num_classes).repeat_interleave(per_class)
    feats = centres[label] + noise * torch.randn(len(label), dim, generator=gen)
    return feats, label, centres


def _reference(query, query_label, key, key_label, t):
    """Direct per-query formula with all negatives, for comparison."""
    q, k = F.normalize(query, dim=1), F.normalize(key, dim=1)
    per_class = {}
    for c in query_label.unique().tolist():
        p = F.normalize(k[key_label == c].mean(0), dim=0)
        neg = k[key_label != c]
        losses = []
        for qi in q[query_label == c]:
            pos = torch.exp(qi @ p / t)
            losses.append(-torch.log(pos / (pos + torch.exp(neg @ qi / t).sum())))
        per_class[c] = torch.stack(losses).mean()
    return per_class


def test_matches_reference_formula():
    key, key_label, _ = _clusters(seed=1)
    query, query_label, _ = _clusters(seed=2, noise=0.3)
    got = pull_loss(query, query_label, key, key_label, temperature=0.3)
    ref = _reference(query, query_label, key, key_label, 0.3)
    assert got.item() == pytest.approx(torch.stack(list(ref.values())).mean().item(), rel=1e-5)


def test_class_weights_weight_the_class_losses():
    key, key_label, _ = _clusters(seed=1)
    query, query_label, _ = _clusters(seed=2, noise=0.3)
    w = torch.tensor([3.0, 1.0, 0.5, 0.0])
    got = pull_loss(query, query_label, key, key_label, temperature=0.3, class_weight=w)
    ref = _reference(query, query_label, key, key_label, 0.3)
    expected = sum(w[c] * v for c, v in ref.items()) / w.sum()
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)


def test_minimum_when_queries_sit_on_prototypes():
    # Orthonormal class prototypes: a query on its own prototype scores 1 against it and 0
    # against every other class, the best any unit vector can do.
    centres = torch.eye(4, 8)
    key_label = torch.arange(4).repeat_interleave(5)
    key = centres[key_label]
    on = pull_loss(centres[key_label], key_label, key, key_label, temperature=0.2)
    # 15 negatives at cosine 0, positive at cosine 1: log(1 + 15 e^{-1/0.2}).
    assert on.item() == pytest.approx(math.log1p(15 * math.exp(-5)), rel=1e-5)
    gen = torch.Generator().manual_seed(0)
    for scale in (0.05, 0.2, 1.0):
        moved = centres[key_label] + scale * torch.randn(20, 8, generator=gen)
        assert pull_loss(moved, key_label, key, key_label, temperature=0.2) > on
    wrong = pull_loss(centres[key_label].roll(5, 0), key_label, key, key_label, temperature=0.2)
    assert wrong.item() > 5


def test_gradient_reaches_query_not_key():
    key, key_label, _ = _clusters()
    key.requires_grad_(True)
    query = torch.randn(80, 8, requires_grad=True)
    pull_loss(query, key_label, key, key_label, temperature=0.2).backward()
    assert query.grad is not None and query.grad.abs().sum() > 0
    assert key.grad is None


def test_ignore_pixels_contribute_nothing():
    key, key_label, _ = _clusters()
    query, query_label, _ = _clusters(seed=3, noise=0.3)
    base = pull_loss(query, query_label, key, key_label, temperature=0.2)
    junk_q = torch.randn(30, 8) * 10
    junk_k = torch.randn(30, 8) * 10
    ignore = torch.full((30,), 255)
    with_junk = pull_loss(torch.cat([query, junk_q]), torch.cat([query_label, ignore]),
                          torch.cat([key, junk_k]), torch.cat([key_label, ignore]),
                          temperature=0.2)
    assert with_junk.item() == pytest.approx(base.item(), rel=1e-6)


def test_prototypes_replace_key_means_for_classes_with_keys():
    key, key_label, centres = _clusters()
    query, query_label, _ = _clusters(seed=4, noise=0.2)
    only_some = key_label < 3  # class 3 has queries but no keys: it does not count
    protos = torch.zeros(4, 8)
    protos[:2] = centres[:2]  # class 2 has keys but no prototype: its key mean is the positive
    protos[3] = centres[3]
    got = pull_loss(query, query_label, key[only_some], key_label[only_some], temperature=0.2,
                    prototypes=protos)
    q = F.normalize(query, dim=1)
    k = F.normalize(key[only_some], dim=1)
    k_label = key_label[only_some]
    ref = []
    for c in (0, 1, 2):
        pos = centres[c] if c < 2 else F.normalize(k[k_label == 2].mean(0), dim=0)
        logits = torch.cat([(q[query_label == c] @ pos)[:, None],
                            q[query_label == c] @ k[k_label != c].T], 1) / 0.2
        ref.append((torch.logsumexp(logits, 1) - logits[:, 0]).mean())
    assert got.item() == pytest.approx(torch.stack(ref).mean().item(), rel=1e-5)
    # Prototypes as keys (negatives=prototypes in the step) cover classes missing from a batch.
    as_keys = pull_loss(query, query_label, centres, torch.arange(4), temperature=0.2,
                        prototypes=centres)
    logits = q @ centres.T / 0.2  # softmax over the 4 prototypes, the own class as target
    per_query = torch.logsumexp(logits, 1) - logits.gather(1, query_label[:, None]).squeeze(1)
    expected = torch.stack([per_query[query_label == c].mean() for c in range(4)]).mean()
    assert as_keys.item() == pytest.approx(expected.item(), rel=1e-5)


def test_no_qualifying_class_gives_graph_connected_zero():
    query = torch.randn(5, 8, requires_grad=True)
    loss = pull_loss(query, torch.full((5,), 255), torch.randn(6, 8), torch.zeros(6).long(),
                     temperature=0.2)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(query.grad, torch.zeros_like(query))  # connected, and pulls nothing


def test_sampling_bounds_and_expectation():
    key, key_label, _ = _clusters(per_class=200)
    query, query_label, _ = _clusters(per_class=200, seed=5, noise=0.3)
    full = pull_loss(query, query_label, key, key_label, temperature=0.5).item()
    torch.manual_seed(0)
    sampled = [pull_loss(query, query_label, key, key_label, temperature=0.5, num_queries=50,
                         num_negatives=100).item() for _ in range(20)]
    # Fewer negatives lower the loss by about log(all / sampled) at most; it stays finite and
    # close to the full loss after that correction.
    correction = math.log(600 / 100)
    mean = sum(sampled) / len(sampled)
    assert full - correction - 0.5 < mean < full + 0.1


def test_sample_index_balanced():
    label = torch.zeros(2, 8, 8, dtype=torch.long)
    label[:, :2, :2] = 1  # 8 pixels of class 1 vs 104 of background
    label[:, 7] = 255
    label = label.reshape(-1)
    index = sample_index(label, per_class=8)
    assert len(index) == 16 and len(set(index.tolist())) == 16
    assert (label[index] == 0).sum() == 8 and (label[index] == 1).sum() == 8
    uniform = sample_index(label, per_class=8, balanced=False)
    assert len(uniform) == 16 and 255 not in label[uniform].tolist()
    assert len(sample_index(label, per_class=None)) == 112


def test_prototype_bank_ema():
    bank = PrototypeBank(3, 2, momentum=0.5)
    bank.update(torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 0, 255]))
    assert bank.seen.tolist() == [True, False, False]
    assert torch.allclose(bank.get()[0], torch.tensor([1.0, 0.0]))
    bank.update(torch.tensor([[0.0, 1.0]]), torch.tensor([0]))
    expected = F.normalize(torch.tensor([0.5, 0.5]), dim=0)
    assert torch.allclose(bank.get()[0], expected, atol=1e-6)
    assert bank.get()[1].abs().sum() == 0


def test_default_path_on_ungrouped_labels_matches_plain_loop():
    """num_queries=None with labels not sorted by class (issue 11 §4: was an IndexError)."""
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(40, 8, generator=g), torch.randn(30, 8, generator=g)
    ql, kl = torch.randint(0, 4, (40,), generator=g), torch.randint(0, 4, (30,), generator=g)
    got = pull_loss(q, ql, k, kl, temperature=0.2)
    qn, kn = F.normalize(q, dim=1), F.normalize(k, dim=1)
    per_class = {}
    for i in range(len(q)):
        c = int(ql[i])
        pos = F.normalize(kn[kl == c].sum(0), dim=0)
        logits = torch.cat([(qn[i] @ pos)[None], kn[kl != c] @ qn[i]]) / 0.2
        per_class.setdefault(c, []).append(float(torch.logsumexp(logits, 0) - logits[0]))
    want = sum(sum(v) / len(v) for v in per_class.values()) / len(per_class)
    assert got.item() == pytest.approx(want, rel=1e-5)
