"""Label-to-mask-set mapping, the Hungarian matcher and the set criterion (paper Eq. 1): costs, assignment,
loss terms, gradients, memory and DDP averaging."""

import itertools

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torchvision.ops import generalized_box_iou

from scripts.loss import (
    TERM_NAMES,
    HungarianMatcher,
    LabelToMaskSetd,
    MaskSAMLoss,
    SetCriterion,
    assign,
    batch_targets,
    downsample_label_maps,
    label_to_slices,
    slice_targets,
)

AUX_STRIDES = (1, 2, 4)  # finest aux head at full resolution, then H/2 and H/4


def blocky_label(batch, depth, height, width, num_classes, generator, block=4):
    """(B, 1, H, W, D) float label made of random blocks, so slices hold several classes of varying size."""
    coarse = torch.randint(0, num_classes, (batch, 1, height // block, width // block, depth), generator=generator)
    return F.interpolate(coarse.float(), size=(height, width, depth), mode="nearest")


def random_prediction(batch, depth, queries, num_classes, height, width, generator, requires_grad=False):
    def leaf(tensor):
        return tensor.requires_grad_(requires_grad)

    def random_boxes():
        corners = torch.rand(batch, depth, queries, 2, 2, generator=generator).sort(dim=-2).values  # x1<x2, y1<y2
        return torch.stack([corners[..., 0, 0], corners[..., 0, 1], corners[..., 1, 0], corners[..., 1, 1]], -1)

    return {
        "pred_logits": leaf(torch.randn(batch, depth, queries, num_classes + 1, generator=generator)),
        "pred_masks": leaf(torch.randn(batch, depth, queries, height, width, generator=generator)),
        "aux_masks": [
            leaf(torch.randn(batch, depth, queries, height // s, width // s, generator=generator)) for s in AUX_STRIDES
        ],
        "aux_boxes": leaf(random_boxes()),
        "prompt_boxes": leaf(random_boxes()),
    }


def perfect_prediction(label, queries, num_classes, generator, confidence=20.0):
    """Each target gets a random distinct query with its class, ±confidence mask logits and its exact box."""
    batch, _, height, width, depth = label.shape
    label_maps = label_to_slices(label.long())  # (S, H, W)
    num_slices = len(label_maps)
    class_logits = torch.zeros(num_slices, queries, num_classes + 1)
    class_logits[..., num_classes] = confidence  # unmatched queries: confidently "no object"
    masks = torch.full((num_slices, queries, height, width), -confidence)
    aux = [torch.full((num_slices, queries, height // s, width // s), -confidence) for s in AUX_STRIDES]
    coarse_maps = [downsample_label_maps(label_maps, level.shape[-2:]) for level in aux]
    boxes = torch.tensor([0.0, 0.0, 1.0, 1.0]).repeat(num_slices, queries, 1)
    for s, label_map in enumerate(label_maps):
        targets = slice_targets(label_map)
        owners = torch.randperm(queries, generator=generator)[: len(targets.classes)]
        for query, cls, mask, box in zip(owners, targets.classes, targets.masks, targets.boxes):
            class_logits[s, query] = 0.0
            class_logits[s, query, cls] = confidence
            masks[s, query] = torch.where(mask, confidence, -confidence)
            for level, level_map in zip(aux, coarse_maps):
                level[s, query] = torch.where(level_map[s] == cls, confidence, -confidence)
            boxes[s, query] = box

    def unfold(tensor):
        return tensor.reshape(batch, depth, *tensor.shape[1:])

    return {
        "pred_logits": unfold(class_logits),
        "pred_masks": unfold(masks),
        "aux_masks": [unfold(level) for level in aux],
        "aux_boxes": unfold(boxes),
        "prompt_boxes": unfold(boxes),
    }


def permute_queries(pred, order):
    return {
        "pred_logits": pred["pred_logits"][:, :, order],
        "pred_masks": pred["pred_masks"][:, :, order],
        "aux_masks": [level[:, :, order] for level in pred["aux_masks"]],
        "aux_boxes": pred["aux_boxes"][:, :, order],
        "prompt_boxes": pred["prompt_boxes"][:, :, order],
    }


# ---------------------------------------------------------------- matcher


def reference_cost(matcher, pred_slices, targets, pixels, s, n, t):
    """Cost of one (query, target) pair computed directly from the definitions."""
    class_logits, masks, aux, boxes = pred_slices
    cls = targets.classes[s, t]
    target_mask = (targets.label_maps[s].flatten()[pixels[s]] == cls).float()

    def bce_dice(logits):
        bce = F.binary_cross_entropy_with_logits(logits, target_mask)
        probs = logits.sigmoid()
        dice = 1 - (2 * (probs * target_mask).sum() + 1) / (probs.sum() + target_mask.sum() + 1)
        return bce, dice

    final_bce, final_dice = bce_dice(masks[s, n].flatten()[pixels[s]])
    aux_bce, aux_dice = bce_dice(aux[s, n].flatten()[pixels[s]])
    box, target_box = boxes[s, n], targets.boxes[s, t]
    giou = generalized_box_iou(box[None], target_box[None])[0, 0]
    return (
        -matcher.cost_class * class_logits[s, n].softmax(-1)[cls]
        + matcher.cost_mask_bce * final_bce
        + matcher.cost_mask_dice * final_dice
        + matcher.cost_aux_bce * aux_bce
        + matcher.cost_aux_dice * aux_dice
        + matcher.cost_box_l1 * (box - target_box).abs().sum()
        + matcher.cost_box_giou * (1 - giou)
    )


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matcher_cost_and_assignment_match_brute_force(seed):
    gen = torch.Generator().manual_seed(seed)
    batch, depth, queries, num_classes, size = 2, 2, 5, 4, 12
    label = blocky_label(batch, depth, size, size, num_classes, gen)
    label[0, ..., 0] = 0  # a background-only slice (one target)
    pred = random_prediction(batch, depth, queries, num_classes, size, size, gen)
    pred_slices = (
        pred["pred_logits"].flatten(0, 1),
        pred["pred_masks"].flatten(0, 1),
        pred["aux_masks"][0].flatten(0, 1),
        pred["prompt_boxes"].flatten(0, 1),
    )
    targets = batch_targets(label, num_classes)
    pixels = torch.randint(size * size, (batch * depth, 50), generator=gen)
    matcher = HungarianMatcher()

    costs = matcher.cost_matrix(*pred_slices, targets, pixels)
    for s, count in enumerate(targets.counts.tolist()):
        for n, t in itertools.product(range(queries), range(count)):
            expected = reference_cost(matcher, pred_slices, targets, pixels, s, n, t)
            assert costs[s, n, t].item() == pytest.approx(expected.item(), abs=1e-5)

    matches = assign(costs, targets.counts)
    for s, ((query_idx, target_idx), count) in enumerate(zip(matches, targets.counts.tolist())):
        assert target_idx.tolist() == list(range(count))  # every target matched once, in target order
        assert len(set(query_idx.tolist())) == count  # to distinct queries
        brute_force = min(
            sum(costs[s, q, t].item() for t, q in enumerate(chosen))
            for chosen in itertools.permutations(range(queries), count)
        )
        assert costs[s, query_idx, target_idx].sum().item() == pytest.approx(brute_force, abs=1e-5)


def test_matcher_forward_is_reproducible_and_needs_enough_queries():
    gen = torch.Generator().manual_seed(3)
    label = blocky_label(1, 3, 16, 16, 4, gen)
    pred = random_prediction(1, 3, 6, 4, 16, 16, gen)
    args = (
        pred["pred_logits"].flatten(0, 1),
        pred["pred_masks"].flatten(0, 1),
        pred["aux_masks"][0].flatten(0, 1),
        pred["aux_boxes"].flatten(0, 1),
        batch_targets(label, 4),
    )
    matcher = HungarianMatcher(num_points=64, max_chunk_elements=6 * 64)  # one slice per chunk
    first = matcher(*args, generator=torch.Generator().manual_seed(0))
    second = matcher(*args, generator=torch.Generator().manual_seed(0))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, second))

    with pytest.raises(ValueError, match="5 targets .* only 4 queries"):
        assign(torch.zeros(1, 4, 5), torch.tensor([5]))


# ---------------------------------------------------------------- criterion


def test_perfect_prediction_gives_near_zero_loss_far_below_random():
    gen = torch.Generator().manual_seed(0)
    batch, depth, queries, num_classes, size = 2, 3, 7, 5, 32
    label = blocky_label(batch, depth, size, size, num_classes, gen)
    label[1, ..., 2] = 0  # background-only slice: trains background + no-object
    loss_fn = MaskSAMLoss(num_classes, num_points=256, seed=0)

    perfect_pred = perfect_prediction(label, queries, num_classes, gen)
    perfect = loss_fn(perfect_pred, label)
    perfect_terms = loss_fn.criterion(perfect_pred, label)
    random = loss_fn(random_prediction(batch, depth, queries, num_classes, size, size, gen), label)

    assert perfect.item() < 1e-3, perfect_terms
    assert random.item() > 1.0
    assert tuple(perfect_terms) == TERM_NAMES
    assert all(value.item() < 1e-3 for value in perfect_terms.values()), perfect_terms


def test_permuting_queries_leaves_loss_unchanged():
    gen = torch.Generator().manual_seed(1)
    batch, depth, queries, num_classes, size = 2, 2, 6, 4, 24
    label = blocky_label(batch, depth, size, size, num_classes, gen)
    pred = random_prediction(batch, depth, queries, num_classes, size, size, gen)
    order = torch.randperm(queries, generator=gen)

    criterion = MaskSAMLoss(num_classes, num_points=128, seed=7).criterion
    terms = criterion(pred, label)
    loss = criterion.weighted_sum(terms)
    permuted_criterion = MaskSAMLoss(num_classes, num_points=128, seed=7).criterion
    permuted_terms = permuted_criterion(permute_queries(pred, order), label)
    permuted = permuted_criterion.weighted_sum(permuted_terms)

    assert permuted.item() == pytest.approx(loss.item(), rel=1e-5)
    for name in TERM_NAMES:
        assert permuted_terms[name].item() == pytest.approx(terms[name].item(), rel=1e-5, abs=1e-7)
    # The check has teeth: a different pixel sample does change the loss.
    assert MaskSAMLoss(num_classes, num_points=128, seed=8)(pred, label).item() != pytest.approx(loss.item(), rel=1e-5)


@pytest.mark.parametrize("deep_supervision", [True, False])
def test_gradients_reach_every_prediction(deep_supervision):
    gen = torch.Generator().manual_seed(2)
    label = blocky_label(1, 2, 16, 16, 3, gen)
    pred = random_prediction(1, 2, 5, 3, 16, 16, gen, requires_grad=True)
    loss = MaskSAMLoss(3, num_points=64, deep_supervision=deep_supervision, seed=0)(pred, label)
    loss.backward()

    supervised = [pred["pred_logits"], pred["pred_masks"], pred["prompt_boxes"], pred["aux_masks"][0]]
    if deep_supervision:
        supervised += pred["aux_masks"][1:]
    for tensor in supervised:
        assert tensor.grad is not None and tensor.grad.abs().sum() > 0 and torch.isfinite(tensor.grad).all()
    if not deep_supervision:
        assert all(level.grad is None for level in pred["aux_masks"][1:])
    assert pred["aux_boxes"].grad is None  # box_loss_on="prompt" (default) supervises the box prompt


def test_deep_supervision_weights_split_the_aux_term():
    gen = torch.Generator().manual_seed(4)
    label = blocky_label(1, 2, 16, 16, 3, gen)
    pred = random_prediction(1, 2, 5, 3, 16, 16, gen)

    def aux_bce(**kwargs):
        return MaskSAMLoss(3, num_points=64, seed=0, **kwargs).criterion(pred, label)["loss_aux_bce"].item()

    per_level = [aux_bce(deep_supervision_weights=w) for w in ((1, 0, 0), (0, 1, 0), (0, 0, 1))]
    assert aux_bce() == pytest.approx(4 / 7 * per_level[0] + 2 / 7 * per_level[1] + 1 / 7 * per_level[2], rel=1e-5)
    assert aux_bce(deep_supervision=False) == pytest.approx(per_level[0], rel=1e-5)


def test_metatensor_float_label_and_autocast_give_float32_loss():
    gen = torch.Generator().manual_seed(5)
    label = blocky_label(1, 2, 16, 16, 3, gen)
    pred = random_prediction(1, 2, 4, 3, 16, 16, gen)
    reference = MaskSAMLoss(3, num_points=64, seed=0)(pred, label.long())

    noisy = MetaTensor(label + 0.01 * torch.randn(label.shape, generator=gen))  # resampling residue
    half_pred = {
        "pred_logits": pred["pred_logits"].bfloat16(),
        "pred_masks": pred["pred_masks"].bfloat16(),
        "aux_masks": [level.bfloat16() for level in pred["aux_masks"]],
        "aux_boxes": pred["aux_boxes"].bfloat16(),
        "prompt_boxes": pred["prompt_boxes"].bfloat16(),
    }
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = MaskSAMLoss(3, num_points=64, seed=0)(half_pred, noisy)
    assert loss.dtype == torch.float32 and not isinstance(loss, MetaTensor)
    assert loss.item() == pytest.approx(reference.item(), rel=0.05)  # bf16 inputs, same matching and pixels


@pytest.mark.parametrize("bad_value", [4, -1, 7.0])
def test_label_value_outside_classes_is_a_clear_error(bad_value):
    gen = torch.Generator().manual_seed(6)
    label = blocky_label(1, 2, 16, 16, 4, gen)
    label[0, 0, 3, 5, 1] = bad_value
    pred = random_prediction(1, 2, 6, 4, 16, 16, gen)
    shown = str(int(bad_value))
    with pytest.raises(ValueError, match=rf"\[{shown}\].*K=4"):
        MaskSAMLoss(4)(pred, label)
    with pytest.raises(ValueError, match=rf"\[{shown}\].*K=4"):
        LabelToMaskSetd("label", num_classes=4)({"label": label[0]})


def test_ce_is_the_class_weighted_mean_over_queries():
    """Mask2Former / the release: F.cross_entropy with class weights (no object 0.1), reduction mean, i.e.
    sum_q w_q CE_q / sum_q w_q over every query — not divided by the number of targets."""
    gen = torch.Generator().manual_seed(8)
    batch, depth, queries, num_classes, size = 1, 2, 6, 4, 16
    label = blocky_label(batch, depth, size, size, num_classes, gen)
    pred = perfect_prediction(label, queries, num_classes, gen)
    # Perfect masks and boxes fix the matching; the class logits are random.
    matched_class = pred["pred_logits"].argmax(-1)  # (B, D, N): the target class, K = no object
    pred["pred_logits"] = torch.randn(pred["pred_logits"].shape, generator=gen)
    terms = MaskSAMLoss(num_classes, num_points=256, seed=0).criterion(pred, label)

    logits, target = pred["pred_logits"].reshape(-1, num_classes + 1), matched_class.reshape(-1)
    per_query = F.cross_entropy(logits, target, reduction="none")
    weight = torch.where(target == num_classes, 0.1, 1.0)
    expected = (weight * per_query).sum() / weight.sum()
    assert terms["loss_ce"].item() == pytest.approx(expected.item(), rel=1e-5)
    num_targets = int((target < num_classes).sum())
    per_target = (weight * per_query).sum() / num_targets  # the earlier normalisation differs
    assert abs(per_target.item() - expected.item()) > 0.05


def test_num_points_reaches_matcher_and_every_mask_term(monkeypatch):
    import scripts.loss.criterion as criterion

    sampled = []
    original = criterion.uncertain_pixels

    def recording(logit_maps, rows, num_points, *args, **kwargs):
        sampled.append(num_points)
        return original(logit_maps, rows, num_points, *args, **kwargs)

    monkeypatch.setattr(criterion, "uncertain_pixels", recording)
    gen = torch.Generator().manual_seed(9)
    label = blocky_label(1, 2, 16, 16, 3, gen)
    loss_fn = MaskSAMLoss(3, num_points=321, seed=0)
    loss_fn(random_prediction(1, 2, 4, 3, 16, 16, gen), label)
    assert loss_fn.criterion.matcher.num_points == 321
    assert sampled == [321] * 4  # final masks + 3 deep-supervision levels
    assert MaskSAMLoss(3).criterion.num_points == 112 * 112  # Mask2Former's default
    with pytest.raises(ValueError, match="num_points"):
        MaskSAMLoss(3, num_points=0)


def test_set_criterion_takes_an_injected_matcher_and_weight_dict():
    """MaskSAMLoss builds SetCriterion from the config ids; the criterion returns the unweighted terms and the
    loss is their sum weighted by the injected weight dict."""
    gen = torch.Generator().manual_seed(11)
    label = blocky_label(1, 2, 16, 16, 3, gen)
    pred = random_prediction(1, 2, 5, 3, 16, 16, gen)
    weights = dict(zip(TERM_NAMES, (0.7, 1.2, 1.5, 0.5, 0.3, 0.5, 0.9)))
    matcher = HungarianMatcher(*[weights[name] for name in TERM_NAMES], num_points=64)
    criterion = SetCriterion(3, matcher, weights, num_points=64, seed=0)
    terms = criterion(pred, label)
    assert tuple(terms) == TERM_NAMES
    expected = sum(weights[name] * terms[name].item() for name in TERM_NAMES)
    assert criterion.weighted_sum(terms).item() == pytest.approx(expected, rel=1e-6)
    config_ids = {f"weight_{name[len('loss_'):]}": weight for name, weight in weights.items()}
    built = MaskSAMLoss(3, num_points=64, seed=0, **config_ids)
    assert built.criterion.weight_dict == weights
    assert built(pred, label).item() == pytest.approx(expected, rel=1e-6)  # same seed: same sample, same matching
    with pytest.raises(ValueError, match="weight_dict must weigh exactly the terms"):
        SetCriterion(3, matcher, {name: 1.0 for name in TERM_NAMES[:-1]})


def test_box_loss_on_switch_chooses_the_supervised_box():
    gen = torch.Generator().manual_seed(10)
    label = blocky_label(1, 2, 16, 16, 3, gen)
    pred = perfect_prediction(label, 5, 3, gen)  # aux (learnable) boxes exact
    pred["prompt_boxes"] = (pred["aux_boxes"] * 0.8).requires_grad_(True)  # the prompt is off by 20 %
    pred["aux_boxes"].requires_grad_(True)

    def box_terms(box_loss_on):
        criterion = MaskSAMLoss(3, num_points=256, seed=0, box_loss_on=box_loss_on).criterion
        terms = criterion(pred, label)
        criterion.weighted_sum(terms).backward()
        return terms["loss_box_l1"].item(), terms["loss_box_giou"].item()

    assert max(box_terms("learnable")) < 1e-6
    assert pred["prompt_boxes"].grad is None and pred["aux_boxes"].grad is not None
    l1, giou = box_terms("prompt")  # default: the release supervises the box prompt (MaskAvgBBox)
    assert l1 > 0.05 and giou > 0.05
    assert pred["prompt_boxes"].grad.abs().sum() > 0
    assert MaskSAMLoss(3).criterion.box_key == "prompt_boxes"
    with pytest.raises(ValueError, match="box_loss_on"):
        MaskSAMLoss(3, box_loss_on="average")
    without = {k: v for k, v in pred.items() if k != "prompt_boxes"}
    with pytest.raises(ValueError, match="'prompt_boxes', which is missing"):
        MaskSAMLoss(3)(without, label)


class _TwoRankWorld:
    """Stands in for an initialised 2-process group whose other rank holds ``other_count`` targets (the real
    gloo all_reduce runs in tests/test_bundle.py's multi-GPU training test)."""

    def __init__(self, other_count):
        self.other_count, self.reduced = other_count, []

    def all_reduce(self, tensor):
        self.reduced.append(tensor.item())
        tensor += self.other_count


def test_target_count_is_averaged_over_ddp_ranks(monkeypatch):
    """Mask and box terms are divided by the target count summed over ranks / world size, at least 1
    (Mask2Former's num_masks); CE, a mean over queries, does not depend on it."""
    import scripts.loss.criterion as criterion
    from scripts.loss.criterion import mean_target_count

    gen = torch.Generator().manual_seed(20)
    label = blocky_label(1, 2, 16, 16, 3, gen)
    pred = random_prediction(1, 2, 5, 3, 16, 16, gen)
    single = MaskSAMLoss(3, num_points=64, seed=0).criterion(pred, label)  # one process: divided by its own count
    own_count = int(batch_targets(label, 3).counts.sum())
    assert mean_target_count(0, torch.device("cpu")) == 1.0

    world = _TwoRankWorld(other_count=3 * own_count)
    monkeypatch.setattr(criterion.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(criterion.dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(criterion.dist, "all_reduce", world.all_reduce)
    two_ranks = MaskSAMLoss(3, num_points=64, seed=0).criterion(pred, label)
    assert world.reduced == [own_count]  # this rank's count entered the sum
    rescale = own_count / ((own_count + 3 * own_count) / 2)  # = 1/2
    for name in TERM_NAMES:
        expected = single[name].item() * (1.0 if name == "loss_ce" else rescale)
        assert two_ranks[name].item() == pytest.approx(expected, rel=1e-5, abs=1e-7), name
    world.other_count = 0
    assert mean_target_count(1, torch.device("cpu")) == 1.0  # (1 + 0) / 2 clamped to 1


# ---------------------------------------------------------------- memory (Synapse-sized)


class LargestAllocation(TorchDispatchMode):
    """Records the element count of every tensor an op allocates (views and in-place results excluded)."""

    def __init__(self):
        super().__init__()
        self.sizes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        input_storages = {
            t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)
        }
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in input_storages:
                self.sizes.append((t.numel(), str(func)))
        return out


def test_synapse_sized_loss_never_builds_a_queries_by_targets_by_pixels_tensor():
    gen = torch.Generator().manual_seed(0)
    batch, depth, queries, num_classes, size = 2, 26, 24, 9, 256
    # Worst case: all 9 classes in every slice (vertical stripes shifted per slice), so T = 9 everywhere.
    columns = torch.arange(size)[None, :, None] + torch.arange(depth)[None, None, :]
    label = ((columns * num_classes) // size % num_classes).expand(size, size, depth)[None, None].float()
    label = label.repeat(batch, 1, 1, 1, 1)
    pred = random_prediction(batch, depth, queries, num_classes, size, size, gen, requires_grad=True)
    num_targets = num_classes
    naive = queries * num_targets * size * size  # one slice's dense (N, T, H, W) cost volume

    recorder = LargestAllocation()
    with recorder:
        loss = MaskSAMLoss(num_classes, seed=0)(pred, label)
        loss.backward()

    input_sizes = {pred["pred_masks"].numel()} | {level.numel() for level in pred["aux_masks"]}
    largest = max(recorder.sizes)
    intermediates = [entry for entry in recorder.sizes if entry[0] not in input_sizes]  # not gradient buffers
    largest_intermediate = max(intermediates)
    print(f"largest intermediate {largest_intermediate}, naive N*T*H*W {naive}, largest overall {largest}")
    assert largest_intermediate[0] < naive / 2
    assert largest[0] <= pred["pred_masks"].numel()  # nothing beyond the input-sized gradient of the masks
    grad = pred["pred_masks"].grad
    assert torch.isfinite(loss) and torch.isfinite(grad).all() and grad.abs().sum() > 0


# ---------------------------------------------------------------- real ACDC labels


def test_mapping_on_acdc_labels(acdc_dir):
    files = sorted((acdc_dir / "labelsTr").glob("*.nii.gz"))[:3]
    assert len(files) == 3
    transform = LabelToMaskSetd(keys="label", num_classes=4)
    for path in files:
        label = torch.as_tensor(np.asarray(nib.load(str(path)).dataobj))[None]  # (1, H, W, D)
        height, width, depth = label.shape[1:]
        mask_sets = transform({"label": label})["label_mask_set"]
        assert len(mask_sets) == depth
        for d, (classes, masks, boxes) in enumerate(mask_sets):
            assert set(classes.tolist()) <= {0, 1, 2, 3} and 0 in classes.tolist()
            assert torch.equal(masks.sum(0), torch.ones(height, width, dtype=torch.long))  # a partition
            assert torch.equal(masks, label[0, :, :, d][None] == classes[:, None, None])
            for mask, (x1, y1, x2, y2) in zip(masks, boxes.tolist()):
                rows, cols = torch.nonzero(mask, as_tuple=True)
                # Pixel-edge convention, in pixel units (tolerance for float32 boxes): every mask pixel
                # [c, c + 1) x [r, r + 1) lies inside the box, and the box is tight.
                left, top, right, bottom = x1 * width, y1 * height, x2 * width, y2 * height
                tol = 1e-3
                assert left <= cols.min() + tol and cols.max() + 1 <= right + tol
                assert top <= rows.min() + tol and rows.max() + 1 <= bottom + tol
                assert abs(left - cols.min()) < tol and abs(right - cols.max() - 1) < tol
                assert abs(top - rows.min()) < tol and abs(bottom - rows.max() - 1) < tol


def test_loss_runs_on_acdc_labels(acdc_dir):
    path = sorted((acdc_dir / "labelsTr").glob("*.nii.gz"))[0]
    volume = torch.as_tensor(np.asarray(nib.load(str(path)).dataobj))
    depth = min(4, volume.shape[-1])
    label = MetaTensor(volume[None, None, :, :, :depth].float())  # (1, 1, H, W, D) like a MONAI batch
    height, width = volume.shape[:2]
    pred = random_prediction(1, depth, 8, 4, height - height % 4, width - width % 4, torch.Generator().manual_seed(0))
    label = label[:, :, : height - height % 4, : width - width % 4]
    criterion = MaskSAMLoss(4, num_points=1024, seed=0).criterion
    terms = criterion(pred, label)
    loss = criterion.weighted_sum(terms)
    assert torch.isfinite(loss) and loss.item() > 0
    assert all(torch.isfinite(value) for value in terms.values())
