"""Every bad input gets a clear error (type and message naming the argument), never a wrong answer."""
import pytest
import torch

import dml_kernels as dk

F = dk.functional
X = torch.randn(6, 4, dtype=torch.float64)
Y = torch.tensor([0, 0, 1, 1, 2, 2])


def ms(*args, **kwargs):
    return F.multi_similarity_loss(*args, backend="reference", **kwargs)


@pytest.mark.parametrize("bad, err, msg", [
    (torch.randn(6), ValueError, "embeddings must be 2-D"),
    (torch.randn(2, 3, 4), ValueError, "embeddings must be 2-D"),
    ([[1.0, 2.0]], TypeError, "embeddings must be a torch.Tensor"),
    (torch.ones(6, 4, dtype=torch.long), TypeError, "embeddings must be float"),
    (torch.randn(0, 4), ValueError, "embeddings is empty"),
    (torch.randn(6, 0), ValueError, "embedding size 0"),
])
def test_bad_embeddings(bad, err, msg):
    with pytest.raises(err, match=msg):
        ms(bad, Y[: len(bad)] if hasattr(bad, "__len__") and len(bad) else Y)


@pytest.mark.parametrize("bad, err, msg", [
    (torch.tensor([[0, 1, 0, 1, 0, 1]]), ValueError, "labels must be 1-D"),
    (torch.tensor([0.0, 0, 1, 1, 2, 2]), TypeError, "labels must be an integer tensor"),
    (torch.tensor([True, False, True, False, True, False]), TypeError, "labels must be an integer tensor"),
    (torch.tensor([0, 1, 2]), ValueError, "labels has length 3 but the embeddings have 6 rows"),
    ([0, 0, 1, 1, 2, 2], TypeError, "labels must be a torch.Tensor"),
])
def test_bad_labels(bad, err, msg):
    with pytest.raises(err, match=msg):
        ms(X, bad)


def test_labels_required():
    with pytest.raises(ValueError, match="labels is required"):
        ms(X, None)
    with pytest.raises(ValueError, match="labels is required"):
        F.proxy_anchor_loss(X, None, torch.randn(3, 4, dtype=torch.float64), backend="reference")


def test_ref_emb_without_ref_labels_and_vice_versa():
    with pytest.raises(ValueError, match="ref_emb was given without ref_labels"):
        ms(X, Y, None, X.clone())
    with pytest.raises(ValueError, match="ref_labels was given without ref_emb"):
        ms(X, Y, None, None, Y)


def test_ref_emb_shape_dtype():
    with pytest.raises(ValueError, match="ref_emb has embedding size 3"):
        ms(X, Y, None, torch.randn(5, 3, dtype=torch.float64), torch.zeros(5, dtype=torch.long))
    with pytest.raises(TypeError, match="ref_emb is torch.float32"):
        ms(X, Y, None, torch.randn(5, 4), torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="ref_labels has length 4"):
        ms(X, Y, None, torch.randn(5, 4, dtype=torch.float64), torch.zeros(4, dtype=torch.long))


def test_mixed_devices():
    meta = torch.empty(5, 4, dtype=torch.float64, device="meta")
    with pytest.raises(ValueError, match="ref_emb is on meta"):
        F.multi_similarity_loss(X, Y, None, meta, torch.zeros(5, dtype=torch.long), backend="reference",
                                check_inputs=False)
    with pytest.raises(ValueError, match="labels is on meta"):
        ms(X, torch.empty(6, dtype=torch.long, device="meta"))
    with pytest.raises(ValueError, match="proxies is on meta"):
        F.proxy_anchor_loss(X, Y, torch.empty(3, 4, dtype=torch.float64, device="meta"), backend="reference",
                            check_inputs=False)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_embeddings(value):
    x = X.clone()
    x[2, 1] = value
    with pytest.raises(ValueError, match="embeddings contains NaN or inf"):
        ms(x, Y)
    ref = X.clone()
    ref[0, 0] = value
    with pytest.raises(ValueError, match="ref_emb contains NaN or inf"):
        ms(X, Y, None, ref, Y.clone())
    with pytest.raises(ValueError, match="contains NaN or inf"):
        dk.losses.ProxyAnchorLoss(3, 4, backend="reference").double()(x, Y)


def test_non_finite_check_can_be_disabled():
    x = X.clone()
    x[2, 1] = float("nan")
    assert torch.isnan(F.multi_similarity_loss(x, Y, backend="reference", check_inputs=False))


@pytest.mark.parametrize("loss", ["ProxyNCALoss", "ProxyAnchorLoss"])
@pytest.mark.parametrize("labels", [torch.tensor([0, 1, 2, 3, 0, 1]), torch.tensor([0, 1, -1, 0, 1, 1])])
def test_proxy_labels_out_of_range(loss, labels):
    fn = getattr(dk.losses, loss)(3, 4, backend="reference").double()
    with pytest.raises(ValueError, match=r"labels must lie in \[0, num_classes=3\)"):
        fn(X, labels)


@pytest.mark.parametrize("loss", ["ProxyNCALoss", "ProxyAnchorLoss"])
def test_proxy_embedding_size_mismatch(loss):
    fn = getattr(dk.losses, loss)(3, 5, backend="reference").double()
    with pytest.raises(ValueError, match="embedding size 4 does not match the proxies' size 5"):
        fn(X, Y)


@pytest.mark.parametrize("loss", ["ProxyNCALoss", "ProxyAnchorLoss", "NPairsLoss"])
def test_ref_emb_not_supported(loss):
    fn = getattr(dk.losses, loss)(*((3, 4) if "Proxy" in loss else ()), backend="reference").double()
    with pytest.raises(ValueError, match="does not support ref_emb"):
        fn(X, Y, None, X.clone(), Y.clone())


def test_lifted_ref_emb_on_a_fused_backend_is_unsupported():
    """LiftedStructureLoss with ref_emb runs on the reference (tests/test_pml_compat.py); a fused backend named
    explicitly says it has no reference-set form."""
    with pytest.raises(dk.Unsupported, match="no reference-set form"):
        dk.losses.LiftedStructureLoss(backend="cpu")(X.float(), Y, None, X.float().clone(), Y.clone())


@pytest.mark.parametrize("distance", ["manhattan", "cos", 3])
def test_unsupported_distance_string(distance):
    with pytest.raises(ValueError, match="not supported"):
        dk.losses.MultiSimilarityLoss(distance=distance, backend="reference")(X, Y)


def test_distance_objects_the_engines_cannot_express_run_on_the_reference_only():
    pd = pytest.importorskip("pytorch_metric_learning.distances")
    for obj in (pd.LpDistance(p=1), pd.LpDistance(power=3), pd.SNRDistance(), pd.CosineSimilarity(power=2)):
        dk.losses.ContrastiveLoss(distance=obj, backend="reference")(X, Y)
        with pytest.raises(dk.Unsupported, match="reference backend only"):
            dk.losses.ContrastiveLoss(distance=obj, backend="triton")(X, Y)
    with pytest.raises(ValueError, match="distance"):
        dk.losses.ContrastiveLoss(distance=object(), backend="reference")(X, Y)


@pytest.mark.parametrize("bad, msg", [
    ((torch.tensor([0]), torch.tensor([1])), "3-tuple"),
    ((torch.tensor([0, 1]), torch.tensor([1]), torch.tensor([2, 3])), "different lengths"),
    ((torch.tensor([0.0]), torch.tensor([1]), torch.tensor([2])), "must be a 1-D integer tensor"),
    ((torch.tensor([0]), torch.tensor([9]), torch.tensor([2])), r"indices outside \[0, 6\)"),
    ((torch.tensor([-1]), torch.tensor([1]), torch.tensor([2])), r"indices outside \[0, 6\)"),
])
def test_bad_indices_tuple(bad, msg):
    with pytest.raises((ValueError, TypeError), match=msg):
        dk.losses.ContrastiveLoss(backend="reference")(X, Y, bad)


def test_pair_both_positive_and_negative():
    a = torch.tensor([0, 0])
    with pytest.raises(ValueError, match="both positive and negative"):
        ms(X, Y, (a, torch.tensor([1, 2]), a, torch.tensor([1, 3])))


def test_epsilon_and_indices_tuple_are_exclusive():
    with pytest.raises(ValueError, match="either epsilon"):
        ms(X, Y, (torch.tensor([0]), torch.tensor([1]), torch.tensor([2])), epsilon=0.1)


def test_packed_mask_shape_checked():
    mask = dk.PackedPairMask.from_dense(torch.ones(6, 5, dtype=torch.bool), torch.zeros(6, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="expected"):
        ms(X, Y, mask)


def test_unknown_and_bad_kwargs():
    with pytest.raises(TypeError, match="unexpected keyword argument 'alhpa'"):
        dk.losses.MultiSimilarityLoss(alhpa=2)
    with pytest.raises(TypeError, match="must be a reducer"):  # reducer= is supported; a non-reducer is not
        dk.losses.MultiSimilarityLoss(reducer=object())


def test_unknown_backend():
    with pytest.raises(dk.BackendUnavailable, match="unknown backend 'fast'"):
        F.multi_similarity_loss(X, Y, backend="fast")


def test_backend_unavailable_says_why():
    with pytest.raises(dk.BackendUnavailable, match="needs CUDA tensors"):
        F.multi_similarity_loss(X, Y, backend="cuda")


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="temperature must be positive"):
        dk.losses.ProxyNCAPlusPlusLoss(3, 4, temperature=0)
    with pytest.raises(ValueError, match="num_classes and embedding_size must be positive"):
        dk.losses.ProxyAnchorLoss(0, 4)
    with pytest.raises(ValueError, match="type_of_triplets"):
        dk.miners.TripletMarginMiner(type_of_triplets="medium")
    with pytest.raises(ValueError, match="mining must be None or 'batch_hard'"):
        dk.losses.TripletMarginLoss(mining="semihard", backend="reference")(X, Y)
    with pytest.raises(ValueError, match="triplets_per_anchor"):
        dk.losses.TripletMarginLoss(triplets_per_anchor=-5, backend="reference")(X, Y)
    with pytest.raises(ValueError, match="exclude_positive=True needs at least 2 classes"):
        dk.losses.ProxyNCALoss(1, 4, exclude_positive=True, backend="reference").double()(X, torch.zeros(6).long())
