import pytest
import torch

import harma_fast
from harma_fast.metrics import count_above_ref, retrieval_ranks


def argsort_ranks(image, text, text_to_image):
    """The plain protocol: sort every row, ground truth first among equal scores, read positions."""
    s = (image.double() @ text.double().t()).tolist()
    n_img, n_txt = len(s), len(s[0])
    i2t, t2i = [], []
    for i in range(n_img):
        order = sorted(range(n_txt), key=lambda t: (-s[i][t], text_to_image[t] != i))
        i2t.append(min(pos for pos, t in enumerate(order) if text_to_image[t] == i))
    for t in range(n_txt):
        gt = text_to_image[t]
        order = sorted(range(n_img), key=lambda j: (-s[j][t], j != gt))
        t2i.append(order.index(gt))
    return torch.tensor(i2t), torch.tensor(t2i)


def gallery(gen, n_img=23, d=6, ties=True):
    caps = torch.randint(1, 8, (n_img,), generator=gen)  # 1-7 captions per image
    text_to_image = torch.repeat_interleave(torch.arange(n_img), caps)
    text_to_image = text_to_image[torch.randperm(len(text_to_image), generator=gen)]
    if ties:  # small integer features: many exactly equal scores
        image = torch.randint(-1, 2, (n_img, d), generator=gen).float()
        text = torch.randint(-1, 2, (len(text_to_image), d), generator=gen).float()
    else:
        image = torch.randn(n_img, d, generator=gen)
        text = image[text_to_image] + 1.2 * torch.randn(len(text_to_image), d, generator=gen)
    return image, text, text_to_image


@pytest.mark.parametrize("ties", [True, False])
@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=pytest.mark.interpreter)])
def test_ranks_equal_plain_argsort(gen, ties, backend):
    for _ in range(3):
        image, text, tti = gallery(gen, ties=ties)
        want_i2t, want_t2i = argsort_ranks(image, text, tti.tolist())
        got_i2t, got_t2i = retrieval_ranks(image, text, tti, backend=backend)
        assert torch.equal(got_i2t, want_i2t)
        assert torch.equal(got_t2i, want_t2i)


def test_metrics_values_and_keys(gen):
    image, text, tti = gallery(gen, ties=False)
    m = harma_fast.retrieval_metrics(image, text, tti)
    i2t, t2i = argsort_ranks(image, text, tti.tolist())
    assert list(m) == ["txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10", "r_mean"]
    for k in (1, 5, 10):
        assert m[f"txt_r{k}"] == pytest.approx(100 * (i2t < k).float().mean().item())
        assert m[f"img_r{k}"] == pytest.approx(100 * (t2i < k).float().mean().item())
    assert m["r_mean"] == pytest.approx(sum(v for k, v in m.items() if k != "r_mean") / 6)


def test_perfect_and_standard_layout():
    # RSITMD-style: 5 captions per image, consecutive
    image = torch.eye(8)
    text = torch.eye(8).repeat_interleave(5, 0)
    m = harma_fast.retrieval_metrics(image, text, torch.arange(8).repeat_interleave(5))
    assert all(v == 100.0 for v in m.values())


@pytest.mark.interpreter
@pytest.mark.parametrize("blocks", [(16, 16, 16, 4), (32, 64, 16, 4)])
def test_triton_count_ragged_tiles_bf16(gen, blocks):
    from harma_fast.kernels.retrieval_ranks import count_above
    image, text, tti = gallery(gen, n_img=41, d=24, ties=False)
    image, text = image.bfloat16(), text.bfloat16()
    want = count_above_ref(image, text, torch.arange(41), tti)
    got = count_above(image, text, torch.arange(41), tti, blocks=blocks)
    assert torch.equal(got, want)


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=pytest.mark.interpreter)])
def test_duplicates_of_the_ground_truth_are_ties(gen, backend):
    # RSICD-style data: the same caption under several images, the same image twice. A duplicate
    # scores exactly what the ground truth does and must not push it down; with the ground truth's
    # score summed in another order than the candidates' (elementwise vs a matrix product) about
    # half of these ties broke by rounding.
    n_img, d = 37, 96
    image = torch.randn(n_img, d, generator=gen)
    image[20:30] = image[:10]  # duplicated images, other owners
    tti = torch.arange(n_img).repeat_interleave(3)
    text = image[tti] + 0.7 * torch.randn(len(tti), d, generator=gen)
    text[1::3] = text[0::3][torch.randperm(n_img, generator=gen)]  # each caption also under another image
    want_i2t, want_t2i = argsort_ranks(image, text, tti.tolist())
    got_i2t, got_t2i = retrieval_ranks(image, text, tti, backend=backend)
    assert torch.equal(got_i2t, want_i2t)
    assert torch.equal(got_t2i, want_t2i)


@pytest.mark.interpreter
def test_triton_count_takes_any_labels_and_gallery_order(gen):
    # count_above's labels need not be 0..N-1 (negative, sparse ids), the gallery need not be
    # grouped by owner (shuffled captions), and an empty gallery counts nothing, as the reference
    from harma_fast.kernels.retrieval_ranks import count_above
    image, text, tti = gallery(gen, n_img=29, d=20, ties=True)
    sparse = torch.randperm(1000, generator=gen)[:29] * 10 ** 9 - 5 * 10 ** 11  # negative and huge ids
    labels, owners = sparse, sparse[tti]
    for q, g, lab, own in ((image, text, labels, owners), (text, image, owners, labels)):
        want = count_above_ref(q, g, lab, own)
        assert torch.equal(count_above(q, g, lab, own, blocks=(16, 16, 16, 4)), want)
    empty = torch.zeros(0, 20)
    assert torch.equal(count_above(image, empty, labels, labels[:0]), torch.zeros(29, dtype=torch.long))
    assert torch.equal(count_above_ref(image, empty, labels, labels[:0]), torch.zeros(29, dtype=torch.long))


@pytest.mark.interpreter
def test_triton_count_promotes_mixed_dtypes(gen):
    # bf16 queries against an fp32 gallery: the gallery must not be rounded to bf16
    from harma_fast.kernels.retrieval_ranks import count_above
    image, text, tti = gallery(gen, n_img=19, d=20, ties=False)
    queries, labels = image.bfloat16(), torch.arange(19)
    got = count_above(queries, text, labels, tti, blocks=(16, 16, 16, 4))
    assert torch.equal(got, count_above(queries.float(), text, labels, tti, blocks=(16, 16, 16, 4)))
    assert torch.equal(got, count_above_ref(queries, text, labels, tti))


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=pytest.mark.interpreter)])
def test_float64_features_are_scored_in_float64(gen, backend):
    # image 1 beats caption 0's own image 0 by 7e-10, which float32 rounds to a tie (a hit)
    image = torch.tensor([[1.0, 0.0], [1.0, 1e-9]], dtype=torch.float64)
    text = torch.stack([torch.tensor([1.0, 1.0], dtype=torch.float64) / 2 ** 0.5, image[1]])
    s = text @ image.t()
    assert s[0, 1] > s[0, 0] and s[0, 1].float() == s[0, 0].float()
    m = harma_fast.retrieval_metrics(image, text, [0, 1], backend=backend)
    assert m["img_r1"] == 50.0
    # many such near-ties: the ranks of the float64 scores
    base = torch.randn(1, 8, generator=gen, dtype=torch.float64)
    image = base + 1e-9 * torch.randn(17, 8, generator=gen, dtype=torch.float64)
    tti = torch.arange(17).repeat(2)
    text = base + 1e-9 * torch.randn(34, 8, generator=gen, dtype=torch.float64)
    got_i2t, got_t2i = retrieval_ranks(image, text, tti, backend=backend)
    want_i2t, want_t2i = argsort_ranks(image, text, tti.tolist())
    assert torch.equal(got_i2t, want_i2t) and torch.equal(got_t2i, want_t2i)


def test_metrics_errors(gen):
    image, text, tti = gallery(gen, n_img=5)
    with pytest.raises(ValueError, match="one image index per caption"):
        harma_fast.retrieval_metrics(image, text, tti[:-1])
    with pytest.raises(ValueError, match=r"images \[4\] have no caption"):
        harma_fast.retrieval_metrics(image, text[tti != 4], tti[tti != 4])
    with pytest.raises(ValueError, match="outside"):
        harma_fast.retrieval_metrics(image, text, tti + 10)
    bad = image.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="image_features has NaN"):
        harma_fast.retrieval_metrics(bad, text, tti)


def test_recalls_are_exact_percentages():
    # 23 hits of 40 is 57.5 %, not the float32 mean's 57.4999988
    from harma_fast.metrics import recalls_from_ranks
    i2t = torch.tensor([0] * 23 + [20] * 17)
    t2i = torch.tensor([0] * 7 + [3] * 2 + [50] * 1)
    m = recalls_from_ranks(i2t, t2i)
    assert m["txt_r1"] == 57.5 and m["txt_r10"] == 57.5
    assert m["img_r1"] == 70.0 and m["img_r5"] == 90.0 and m["img_r10"] == 90.0
    assert m["r_mean"] == (57.5 * 3 + 70.0 + 90.0 * 2) / 6


def test_metrics_input_errors_name_the_problem(gen):
    from harma_fast.errors import ConfigError
    image, text, tti = gallery(gen, n_img=5, ties=False)
    with pytest.raises(ConfigError, match="non-empty gallery; got 0 images and 0 captions"):
        harma_fast.retrieval_metrics(image[:0], text[:0], tti[:0])
    with pytest.raises(ConfigError, match="non-empty gallery; got 5 images and 0 captions"):
        harma_fast.retrieval_metrics(image, text[:0], tti[:0])
    fractional = tti.double()
    fractional[2] += 0.5
    with pytest.raises(ConfigError, match=r"integer image indices; captions \[2\] have non-integer values"):
        harma_fast.retrieval_metrics(image, text, fractional)
    with pytest.raises(ConfigError, match="integer image indices, got dtype torch.bool"):
        harma_fast.retrieval_metrics(image, text, tti > 2)
    # integral floats are indices all the same
    assert harma_fast.retrieval_metrics(image, text, tti.double()) == harma_fast.retrieval_metrics(image, text, tti)
    for name, values in (("image_features", image), ("text_features", text)):
        for bad_value in (float("nan"), float("inf")):
            bad = values.clone()
            bad[3, 1] = bad_value
            args = (bad, text) if name == "image_features" else (image, bad)
            with pytest.raises(ConfigError, match=name + r" has NaN/Inf values \(rows \[3\]\)"):
                harma_fast.retrieval_metrics(*args, tti)


def test_features_that_cannot_rank_are_refused_not_scored_100(gen):
    # ties favour the ground truth: identical features (a zeroed projection, a constant tower) read
    # R@1 = 100 everywhere, a broken model scored perfect
    from harma_fast.errors import ConfigError
    image, text, tti = gallery(gen, n_img=5, ties=False)
    for name, args in (("image_features", (torch.ones_like(image), text)),
                       ("text_features", (image, text[:1].expand_as(text).clone())),
                       ("image_features", (torch.zeros_like(image), text))):
        with pytest.raises(ConfigError, match=name + r" .*(same vector|all zeros)"):
            harma_fast.retrieval_metrics(*args, tti)
    one_zero = image.clone()
    one_zero[2] = 0
    with pytest.raises(ConfigError, match=r"image_features rows \[2\] are all zeros"):
        harma_fast.retrieval_metrics(one_zero, text, tti)
    # one image and its captions is a real (if tiny) gallery: a single row is never "all the same"
    assert harma_fast.retrieval_metrics(image[:1], text[tti == 0], tti[tti == 0])["r_mean"] == 100.0


def test_triton_count_refuses_features_of_different_widths(gen):
    # the kernel reads both sides with the queries' width: a narrower gallery was read past its
    # rows (out of bounds on a GPU) where the reference's matmul raises
    pytest.importorskip("triton")
    from harma_fast.kernels.retrieval_ranks import count_above
    q, gal = torch.randn(5, 32, generator=gen), torch.randn(7, 16, generator=gen)
    with pytest.raises(ValueError, match="width"):
        count_above(q, gal, torch.arange(5), torch.arange(7))
