"""The dynamic-convolution model zoo: DDF-ResNet, RedNet and BiNet.

Each family is checked against what the authors' code computes (an independent unfold-based
computation of its operator), against the official checkpoint key formats
(``reference/official_implementations.md``) and against every paper-table row naming it.
Costs are measured on the meta device; forward passes use small inputs and one thread.
"""

import functools
import inspect
import math
import re

import pytest
import torch
import torch.nn.functional as F
import torchvision

from robustbench_dyn.errors import DynrobustError
from robustbench_dyn.models import Preprocessing, create_model, list_models, load_weights, model_config
from robustbench_dyn.models.binet import DDFBivolution, InvolutionBivolution, SpatialAugmentedKernelGeneration
from robustbench_dyn.models.ddf_resnet import DDFPack, FilterNorm
from robustbench_dyn.models.rednet import Involution
from robustbench_dyn.models.registry import _REGISTRY, _paper_table
from robustbench_dyn.profile import model_macs

DEPTHS = {26: [1, 2, 4, 1], 38: [2, 3, 5, 2], 50: [3, 4, 6, 3], 101: [3, 4, 23, 3]}
WIDTHS = [64, 128, 256, 512]


pytestmark = pytest.mark.usefixtures("one_thread")


def _on_meta(name, **options):
    """The model's architecture on the meta device (shapes only), built once per name and options;
    options equal to the builder's defaults are dropped, so equal models share one build."""
    defaults = {k: p.default for k, p in inspect.signature(_REGISTRY[name].builder).parameters.items()}
    return _built_on_meta(name, tuple(sorted((k, v) for k, v in options.items() if defaults.get(k) != v)))


@functools.lru_cache(maxsize=None)
def _built_on_meta(name, options):
    with torch.device("meta"):
        return _REGISTRY[name].builder(**dict(options)).eval()


def _shapes(model):
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _randomize_batchnorm(module, seed=0):
    """Non-trivial BN statistics and affine parameters, so eval-mode BN is part of what is compared."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=generator) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=generator) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=generator) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=generator) * 0.1)
    return module


def _bn(x, bn):
    return F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)


def _standardise_taps(filters, taps_dim):
    """(f - mean) / (unbiased std + 1e-10) over ``taps_dim``, written out (DDF paper Eq. 3)."""
    n = filters.shape[taps_dim]
    mean = filters.sum(taps_dim, keepdim=True) / n
    std = ((filters - mean) ** 2).sum(taps_dim, keepdim=True).div(n - 1).sqrt()
    return (filters - mean) / (std + 1e-10)


# ================================================================ DDF


def test_filter_norm_against_formula():
    torch.manual_seed(0)
    spatial = FilterNorm(1, 3, "spatial").double()
    x = torch.randn(2, 9, 4, 5, dtype=torch.float64)
    expected = _standardise_taps(x, 1) * math.sqrt(2) / 3  # calculate_gain('relu') / k
    assert torch.allclose(spatial(x), expected, atol=1e-12)
    assert not list(spatial.parameters()) and not list(spatial.buffers())  # no keys in a checkpoint

    channels = 512
    channel = FilterNorm(channels, 3, "channel").double()
    assert channel.std.shape == (channels * 9,)
    # initialised randn * sqrt(2) / k: the sample std of 4608 draws is within a few % of it
    assert abs(channel.std.std().item() / (math.sqrt(2) / 3) - 1) < 0.06
    x = torch.randn(2, channels * 9, 1, 1, dtype=torch.float64)
    per_channel = _standardise_taps(x.view(2, channels, 9), 2)
    expected = (per_channel * channel.std.view(channels, 9)).view(2, channels * 9, 1, 1)
    assert torch.allclose(channel(x), expected, atol=1e-12)


def _ddf_by_unfold(pack, x, context=None):
    """DDF module output from its weights: branches with F.conv2d, filtering with F.unfold."""
    b, c, h, w = x.shape
    k, s, d, head = pack.kernel_size, pack.stride, pack.dilation, pack.head
    conv = pack.spatial_branch[0]
    spatial = F.conv2d(x if context is None else context, conv.weight, conv.bias, stride=conv.stride)
    out_h, out_w = spatial.shape[-2:]
    spatial = _standardise_taps(spatial.view(b, head, k * k, out_h, out_w), 2) * math.sqrt(2) / k
    squeeze, excite = pack.channel_branch[1], pack.channel_branch[3]
    pooled = x.mean((2, 3), keepdim=True)
    channel = F.conv2d(F.relu(F.conv2d(pooled, squeeze.weight, squeeze.bias)), excite.weight, excite.bias)
    channel = _standardise_taps(channel.view(b, c, k * k), 2) * pack.channel_branch[4].std.view(c, k * k)
    columns = F.unfold(x, k, dilation=d, padding=d * (k - 1) // 2, stride=s).view(b, head, c // head, k * k, out_h, out_w)
    channel = channel.view(b, head, c // head, k * k, 1, 1)
    spatial = spatial.view(b, head, 1, k * k, out_h, out_w)
    taps = channel * spatial if pack.combine == "mul" else channel + spatial
    return (columns * taps).sum(3).view(b, c, out_h, out_w)


@pytest.mark.parametrize("stride,size,combine,dilation,head", [
    (1, (9, 7), "mul", 1, 1),
    (2, (10, 8), "mul", 1, 1),
    (2, (11, 9), "mul", 1, 1),   # odd sizes: ceil(H/2) rows, as a padded strided conv
    (1, (8, 8), "add", 2, 1),
    (2, (9, 12), "add", 1, 2),
])
def test_ddf_pack_against_unfold(stride, size, combine, dilation, head):
    torch.manual_seed(1)
    pack = DDFPack(32, kernel_size=3, stride=stride, dilation=dilation, head=head, combine=combine).double()
    x = torch.randn(2, 32, *size, dtype=torch.float64)
    out = pack(x)
    assert out.shape == (2, 32, math.ceil(size[0] / stride), math.ceil(size[1] / stride))
    assert torch.allclose(out, _ddf_by_unfold(pack, x), atol=1e-10)


def test_ddf_pack_keys_are_the_official_ones():
    # official_implementations.md: layer1.0.conv2 of DDF-ResNet-50 (width 64, squeeze 12)
    pack = DDFPack(64)
    assert _shapes(pack) == {
        "spatial_branch.0.weight": (9, 64, 1, 1), "spatial_branch.0.bias": (9,),
        "channel_branch.1.weight": (12, 64, 1, 1), "channel_branch.1.bias": (12,),
        "channel_branch.3.weight": (576, 12, 1, 1), "channel_branch.3.bias": (576,),
        "channel_branch.4.std": (576,),
    }


def _official_ddf_resnet_keys(layers):
    """The timm DDF-ResNet key set, built from the facts: torchvision's ResNet keys with each
    bottleneck's conv2.weight replaced by the DDFPack keys of its width."""
    with torch.device("meta"):
        base = torchvision.models.resnet.ResNet(torchvision.models.resnet.Bottleneck, layers)
    keys = {k: v for k, v in _shapes(base).items() if not re.fullmatch(r"layer\d\.\d+\.conv2\.weight", k)}
    for stage, blocks in enumerate(layers):
        c, mid = WIDTHS[stage], int(WIDTHS[stage] * 0.2)
        for i in range(blocks):
            p = f"layer{stage + 1}.{i}.conv2."
            keys.update({
                p + "spatial_branch.0.weight": (9, c, 1, 1), p + "spatial_branch.0.bias": (9,),
                p + "channel_branch.1.weight": (mid, c, 1, 1), p + "channel_branch.1.bias": (mid,),
                p + "channel_branch.3.weight": (9 * c, mid, 1, 1), p + "channel_branch.3.bias": (9 * c,),
                p + "channel_branch.4.std": (9 * c,),
            })
    return keys


@pytest.mark.parametrize("name,depth", [("ddf_mul_resnet50", 50), ("ddf_add_resnet101", 101), ("ddf_resnet38", 38)])
def test_ddf_resnet_state_dict_is_timm_official(name, depth):
    model = _on_meta(name)
    assert _shapes(model) == _official_ddf_resnet_keys(DEPTHS[depth])
    assert _shapes(model)["layer1.0.conv2.channel_branch.3.weight"] == (576, 12, 1, 1)


def test_ddf_resnet_official_parameter_counts_and_variants():
    # official_implementations.md: 16.84M (R50), 28.15M (R101), mul and add alike
    for name, millions in [("ddf_mul_resnet50", 16.84), ("ddf_add_resnet50", 16.84), ("ddf_resnet50", 16.84),
                           ("ddf_mul_resnet101", 28.15), ("ddf_add_resnet101", 28.15), ("ddf_resnet101", 28.15)]:
        assert round(sum(p.numel() for p in _on_meta(name).parameters()) / 1e6, 2) == millions, name
    combines = {name: {m.combine for m in _on_meta(name).modules() if isinstance(m, DDFPack)}
                for name in ["ddf_mul_resnet50", "ddf_add_resnet101", "ddf_resnet50", "ddf_resnet101", "ddf_resnet38"]}
    assert combines == {"ddf_mul_resnet50": {"mul"}, "ddf_add_resnet101": {"add"}, "ddf_resnet50": {"mul"},
                        "ddf_resnet101": {"mul"}, "ddf_resnet38": {"mul"}}
    strides = [m.stride for m in _on_meta("ddf_resnet50").modules() if isinstance(m, DDFPack)]
    assert strides == [1, 1, 1, 2, 1, 1, 1, 2, 1, 1, 1, 1, 1, 2, 1, 1]  # stride on the 3x3 (timm/torchvision)


# ================================================================ RedNet


def _involution_by_unfold(inv, x, source=None):
    """Involution output from its weights: kernel generation with F.conv2d/F.batch_norm on
    ``source`` (default: x, average-pooled at stride > 1), application with F.unfold."""
    b, c, h, w = x.shape
    k, s, g = inv.kernel_size, inv.stride, inv.groups
    if source is None:
        source = F.avg_pool2d(x, s, s, ceil_mode=True) if s > 1 else x
    hidden = F.relu(_bn(F.conv2d(source, inv.conv1.conv.weight), inv.conv1.bn))
    kernel = F.conv2d(hidden, inv.conv2.conv.weight, inv.conv2.conv.bias)
    out_h, out_w = kernel.shape[-2:]
    columns = F.unfold(x, k, padding=(k - 1) // 2, stride=s).view(b, g, c // g, k * k, out_h, out_w)
    return (kernel.view(b, g, 1, k * k, out_h, out_w) * columns).sum(3).view(b, c, out_h, out_w)


@pytest.mark.parametrize("channels,kernel_size,stride,size", [
    (32, 3, 1, (9, 7)), (64, 7, 1, (8, 8)), (64, 7, 2, (10, 12)), (32, 7, 2, (11, 9))])
def test_involution_against_unfold(channels, kernel_size, stride, size):
    torch.manual_seed(2)
    inv = _randomize_batchnorm(Involution(channels, kernel_size, stride)).double().eval()
    x = torch.randn(2, channels, *size, dtype=torch.float64)
    out = inv(x)
    assert out.shape == (2, channels, math.ceil(size[0] / stride), math.ceil(size[1] / stride))
    assert torch.allclose(out, _involution_by_unfold(inv, x), atol=1e-10)
    if stride > 1 and size[0] % stride == 0 and size[1] % stride == 0:
        # even sizes: the official floor AvgPool2d(stride, stride) gives the same kernels
        assert torch.allclose(out, _involution_by_unfold(inv, x, F.avg_pool2d(x, stride, stride)), atol=1e-10)


def _mmcls_rednet_keys(layers):
    """The mmcls RedNet checkpoint key set (``backbone.``/``head.`` prefixes), built from the facts:
    ConvModule = .conv (+ .bn when it has a norm; bias only without norm), involution = conv1
    (ConvModule with BN) + conv2 (ConvModule without norm), mmcls Bottleneck bn1/bn2/bn3, downsample.0/1."""
    keys = {}

    def bn(prefix, n):
        keys.update({prefix + "weight": (n,), prefix + "bias": (n,), prefix + "running_mean": (n,),
                     prefix + "running_var": (n,), prefix + "num_batches_tracked": ()})

    def involution(prefix, c, k):
        keys[prefix + "conv1.conv.weight"] = (c // 4, c, 1, 1)
        bn(prefix + "conv1.bn.", c // 4)
        keys[prefix + "conv2.conv.weight"] = (k * k * c // 16, c // 4, 1, 1)
        keys[prefix + "conv2.conv.bias"] = (k * k * c // 16,)

    keys["backbone.stem.0.conv.weight"] = (32, 3, 3, 3)
    bn("backbone.stem.0.bn.", 32)
    involution("backbone.stem.1.", 32, 3)
    bn("backbone.stem.2.", 32)
    keys["backbone.stem.4.conv.weight"] = (64, 32, 3, 3)
    bn("backbone.stem.4.bn.", 64)
    inplanes = 64
    for stage, blocks in enumerate(layers):
        c = WIDTHS[stage]
        for i in range(blocks):
            p = f"backbone.layer{stage + 1}.{i}."
            keys[p + "conv1.weight"] = (c, inplanes, 1, 1)
            bn(p + "bn1.", c)
            involution(p + "conv2.", c, 7)
            bn(p + "bn2.", c)
            keys[p + "conv3.weight"] = (4 * c, c, 1, 1)
            bn(p + "bn3.", 4 * c)
            if i == 0:
                keys[p + "downsample.0.weight"] = (4 * c, inplanes, 1, 1)
                bn(p + "downsample.1.", 4 * c)
            inplanes = 4 * c
    keys["head.fc.weight"] = (1000, 2048)
    keys["head.fc.bias"] = (1000,)
    return keys


def _as_mmcls(state):
    return {("head." + k if k.startswith("fc.") else "backbone." + k): v for k, v in state.items()}


@pytest.mark.parametrize("depth", [26, 50, 101])
def test_rednet_state_dict_is_mmcls_official(depth):
    model = _on_meta(f"rednet{depth}")
    assert _shapes(model) == {k.replace("backbone.", "", 1).replace("head.fc.", "fc.", 1): v
                              for k, v in _mmcls_rednet_keys(DEPTHS[depth]).items()}
    mmcls = {k: tuple(v.shape) for k, v in _as_mmcls(model.state_dict()).items()}
    # the examples in official_implementations.md
    assert mmcls["backbone.stem.0.conv.weight"] == (32, 3, 3, 3)
    assert mmcls["backbone.stem.1.conv1.conv.weight"] == (8, 32, 1, 1)
    assert mmcls["backbone.stem.1.conv2.conv.weight"] == (18, 8, 1, 1) and "backbone.stem.1.conv2.conv.bias" in mmcls
    assert mmcls["backbone.stem.4.conv.weight"] == (64, 32, 3, 3)
    assert mmcls["backbone.layer1.0.conv2.conv1.conv.weight"] == (16, 64, 1, 1)
    assert mmcls["backbone.layer1.0.conv2.conv2.conv.weight"] == (196, 16, 1, 1)
    assert "backbone.stem.0.conv.bias" not in mmcls and "backbone.stem.0.bn.weight" in mmcls


def test_rednet_official_parameter_counts_and_zero_init():
    for depth, millions in [(26, 9.23), (38, 12.39), (50, 15.54), (101, 25.65)]:
        assert round(sum(p.numel() for p in _on_meta(f"rednet{depth}").parameters()) / 1e6, 2) == millions
    model = create_model("rednet26")
    bn3 = [m.bn3.weight for m in model.modules() if hasattr(m, "bn3")]
    assert len(bn3) == 8 and all(torch.count_nonzero(w) == 0 for w in bn3)  # zero_init_residual (mmcls)
    assert torch.count_nonzero(create_model("rednet26", zero_init_residual=False).layer1[0].bn3.weight) > 0


# ================================================================ BiNet


def _bivolution_by_hand(module, x):
    """Bi-volution output from its weights, independent of its forward: SAKG context with F.conv2d,
    the dynamic op with F.unfold (via the helpers above), plus the static group convolution."""
    dw = module.context.depthwise
    attention = module.context.attention[1]
    context = F.conv2d(x, dw.weight, dw.bias, stride=dw.stride, padding=dw.padding, dilation=dw.dilation,
                       groups=x.shape[1])
    context = context * torch.sigmoid(F.conv2d(x.mean((2, 3), keepdim=True), attention.weight, attention.bias))
    if isinstance(module, InvolutionBivolution):
        source = F.relu(_bn(F.conv2d(context, module.pointwise.conv.weight), module.pointwise.bn))
        out = _involution_by_unfold(module, x, source)
    else:
        out = _ddf_by_unfold(module, x, context)
    if module.static_branch is not None:
        static = module.static_branch
        out = out + F.conv2d(x, static.weight, stride=static.stride, padding=static.padding, groups=static.groups)
    return out


@pytest.mark.parametrize("kind,stride,size,sakg,dilation,dual", [
    ("dc", 1, (9, 7), 3, 1, True), ("dc", 2, (10, 12), 5, 1, True), ("dc", 2, (11, 9), 3, 2, False),
    ("dcca", 1, (9, 7), 3, 1, True), ("dcca", 2, (10, 12), 7, 1, True), ("dcca", 2, (11, 9), 3, 2, False)])
def test_bivolution_against_independent_computation(kind, stride, size, sakg, dilation, dual):
    torch.manual_seed(3)
    cls = InvolutionBivolution if kind == "dc" else DDFBivolution
    module = cls(64, stride=stride, dual_branch=dual, sakg_kernel_size=sakg, sakg_dilation=dilation)
    module = _randomize_batchnorm(module).double().eval()
    x = torch.randn(2, 64, *size, dtype=torch.float64)
    out = module(x)
    assert out.shape == (2, 64, math.ceil(size[0] / stride), math.ceil(size[1] / stride))
    assert torch.allclose(out, _bivolution_by_hand(module, x), atol=1e-10)
    if dual:  # the static branch matters: without it the output differs by exactly g(x)
        static = module.static_branch
        module.static_branch = None
        assert not torch.allclose(out, module(x))
        module.static_branch = static


def test_bivolution_without_sakg_is_the_base_operator():
    torch.manual_seed(4)
    x = torch.randn(2, 64, 10, 10, dtype=torch.float64)
    dc = _randomize_batchnorm(InvolutionBivolution(64, stride=2, dual_branch=False, sakg_kernel_size=1)).double().eval()
    assert dc.context is None and torch.allclose(dc(x), _involution_by_unfold(dc, x), atol=1e-10)
    dcca = DDFBivolution(64, stride=2, dual_branch=False, sakg_kernel_size=1).double()
    assert dcca.context is None and torch.allclose(dcca(x), _ddf_by_unfold(dcca, x), atol=1e-10)


@pytest.mark.parametrize("depth", [38, 50])
def test_binet_structure(depth):
    for kind in ("dc", "dcca"):
        model = _on_meta(f"binet{depth}_{kind}")
        blocks = [b for layer in (model.layer1, model.layer2, model.layer3, model.layer4) for b in layer]
        assert len(blocks) == sum(DEPTHS[depth])
        for block in blocks:
            op, width = block.conv2, block.bn2.num_features
            stride = 2 if block.downsample is not None and block.downsample[0].stride == (2, 2) else 1
            assert isinstance(op, InvolutionBivolution if kind == "dc" else DDFBivolution)
            assert isinstance(op.context, SpatialAugmentedKernelGeneration)
            assert op.context.depthwise.kernel_size == (3, 3) and op.context.depthwise.dilation == (1, 1)
            assert op.context.depthwise.stride == (stride, stride) and op.context.depthwise.groups == width
            assert op.context.attention[1].in_channels == op.context.attention[1].out_channels == width
            static = op.static_branch
            if kind == "dc":
                assert op.kernel_size == 7 and static.kernel_size == (1, 1) and static.groups == width // 16
                assert op.pointwise.conv.out_channels == width // 2 and op.conv1.conv.in_channels == width // 2
                assert not hasattr(op, "avgpool")  # the strided depthwise conv replaces it
            else:
                assert op.kernel_size == 3 and static.kernel_size == (3, 3) and static.groups == width // 32
                assert op.spatial_branch[0].stride == (1, 1)  # the context is already strided
            assert static.stride == (stride, stride) and static.bias is None
        # the stem: RedNet's for dc, ResNet's for dc-ca
        assert hasattr(model, "stem") == (kind == "dc") and hasattr(model, "conv1") == (kind == "dcca")


def test_binet_ablation_options():
    # Table 4 "1x1" = the base model: exactly RedNet-50's / DDF-ResNet-50's parameters
    assert _shapes(_on_meta("binet50_dc", dual_branch=False, sakg_kernel_size=1)) == _shapes(_on_meta("rednet50"))
    assert _shapes(_on_meta("binet50_dcca", dual_branch=False, sakg_kernel_size=1)) == _shapes(_on_meta("ddf_resnet50"))
    # Table 3 "dual-branch only": the base plus one static conv per block
    dual_only = _shapes(_on_meta("binet50_dc", dual_branch=True, sakg_kernel_size=1))
    extra = set(dual_only) - set(_shapes(_on_meta("rednet50")))
    assert extra == {f"layer{s + 1}.{i}.conv2.static_branch.weight" for s, n in enumerate(DEPTHS[50]) for i in range(n)}
    dilated = _on_meta("binet50_dcca", dual_branch=False, sakg_kernel_size=3, sakg_dilation=2)
    dw = dilated.layer3[0].conv2.context.depthwise
    assert dw.dilation == (2, 2) and dw.padding == (2, 2) and dilated.layer3[0].conv2.static_branch is None
    assert _on_meta("binet50_dc", sakg_kernel_size=7).layer1[0].conv2.context.depthwise.kernel_size == (7, 7)


@pytest.mark.parametrize("options,message", [
    (dict(sakg_kernel_size=4), "sakg_kernel_size must be one of"),
    (dict(sakg_kernel_size=1, sakg_dilation=2), "needs sakg_kernel_size > 1"),
    (dict(sakg_dilation=0), "positive integer"),
    (dict(dual_branch="yes"), "True or False"),
    (dict(depth=50), "does not take 'depth'"),
])
def test_bad_binet_options_are_clear_errors(options, message):
    with pytest.raises(DynrobustError, match=message):
        create_model("binet50_dc", **options)


def test_unknown_options_on_the_other_families():
    with pytest.raises(DynrobustError, match="does not take 'sakg_kernel_size'"):
        create_model("rednet50", sakg_kernel_size=3)
    with pytest.raises(DynrobustError, match="does not take 'combine'"):
        create_model("ddf_resnet50", combine="add")


def test_aliases_and_configs():
    for depth in (38, 50, 101):
        alias, full = model_config(f"binet{depth}"), model_config(f"binet{depth}_dcca")
        assert alias.paper_rows == full.paper_rows and alias.paper_rows
        assert alias.preprocessing == full.preprocessing
    assert _shapes(_on_meta("binet50")) == _shapes(_on_meta("binet50_dcca"))
    bicubic = Preprocessing(resize=256, crop=224, interpolation="bicubic")
    bilinear = Preprocessing(resize=256, crop=224, interpolation="bilinear")
    for name in list_models("ddf_*") + list_models("binet*_dcca") + ["binet38", "binet50", "binet101"]:
        assert model_config(name).preprocessing == bicubic, name
    for name in list_models("rednet*") + list_models("binet*_dc"):
        assert model_config(name).preprocessing == bilinear, name
    assert {model_config(n).family for n in list_models("ddf_*")} == {"ddf"}
    assert {model_config(n).family for n in list_models("rednet*")} == {"rednet"}
    assert {model_config(n).family for n in list_models("binet*")} == {"binet"}
    # the mul models are the ones the papers tabulate; the add ones have other top-1s
    assert model_config("ddf_mul_resnet50").paper_rows == model_config("ddf_resnet50").paper_rows
    assert model_config("ddf_add_resnet50").paper_rows == ()


# ================================================================ paper tables


def _row_options(row):
    match = re.fullmatch(r"SAKG (\d)x\d( dilation (\d))? \(no dual branch\)", row.variant)
    if match:
        return dict(dual_branch=False, sakg_kernel_size=int(match.group(1)), sakg_dilation=int(match.group(3) or 1))
    match = re.fullmatch(r"squeeze ratio ([\d.]+)", row.variant)
    if match:
        return dict(se_ratio=float(match.group(1)))
    assert row.variant in ("", "dual-branch + SAKG"), row.variant
    return {}


ZOO_ROWS = [row for row in _paper_table() if row.model.startswith(("ddf", "rednet", "binet")) and row.model in _REGISTRY]


_MACS = {}


def _row_cost(row):
    """(parameters in M, MACs at 224x224 in G) of the row's model, built with the row's options."""
    model = _on_meta(row.model, **_row_options(row))
    if id(model) not in _MACS:
        _MACS[id(model)] = model_macs(model, 224, device="meta") / 1e9
    return sum(p.numel() for p in model.parameters()) / 1e6, _MACS[id(model)]


# Rows no construction can meet (docs/models.md, "Rows no reading reproduces"), with our measured value.
UNREACHABLE = {
    ("binet38_dc", "dual-branch + SAKG", "params"): 13.72,
    ("binet50_dcca", "SAKG 5x5 (no dual branch)", "gmacs"): 2.315,
    ("binet50_dcca", "SAKG 7x7 (no dual branch)", "gmacs"): 2.348,
}


def test_every_zoo_row_is_covered():
    assert {row.model for row in ZOO_ROWS} == {
        "rednet26", "rednet38", "rednet50", "rednet101", "ddf_resnet38", "ddf_resnet50", "ddf_resnet101",
        "binet38_dc", "binet50_dc", "binet101_dc", "binet38_dcca", "binet50_dcca", "binet101_dcca"}
    assert sum(row.variant.startswith("SAKG") for row in ZOO_ROWS) == 10  # Table 4
    # the one paper row of the zoo's names that is not registered: DDF-ResNet-18 (docs/models.md)
    assert {row.model for row in _paper_table() if row.model.startswith(("ddf", "rednet", "binet"))} - set(
        _REGISTRY) == {"ddf_resnet18"}


@pytest.mark.parametrize("row", ZOO_ROWS, ids=lambda r: f"{r.model}[{r.variant or 'main'}]-{r.source.split()[-1]}")
def test_paper_row_params_and_macs(row):
    params, gmacs = _row_cost(row)
    for what, measured, paper, tolerance in [("params", params, row.params_m, 0.02), ("gmacs", gmacs, row.gmacs, 0.05)]:
        documented = UNREACHABLE.get((row.model, row.variant, what))
        if documented is None:
            assert abs(measured - paper) / paper < tolerance, f"{row.model} {row.variant}: {what} {measured:.3f} vs {paper}"
        else:  # a known, documented deviation: the model stays what docs/models.md says
            assert abs(measured - paper) / paper >= tolerance
            assert abs(measured - documented) / documented < 0.005, f"{what} {measured:.3f}, documented {documented}"


def test_unreachable_rows_are_inconsistent_in_the_paper():
    """Why the UNREACHABLE rows cannot be met, from the paper's own numbers (docs/models.md)."""
    rows = {(r.model, r.variant): r for r in _paper_table()}
    # binet38_dc vs binet50_dc: any Bi-volution adds a cost f_s >= 0 per block of stage s over
    # RedNet. Within 2%, R38 (2,3,5,2 blocks) may add at most 13.2*1.02 - 12.39 and R50 (3,4,6,3)
    # at least 17.6*0.98 - 15.54; but R50's blocks are R38's plus one per stage, at most half of
    # R38's (2,3,5,2) >= 2*(1,1,1,1), so R50 adds at most 1.5x what R38 adds.
    rednet38, rednet50 = (sum(p.numel() for p in _on_meta(n).parameters()) / 1e6 for n in ("rednet38", "rednet50"))
    most_38 = rows[("binet38_dc", "dual-branch + SAKG")].params_m * 1.02 - rednet38
    least_50 = rows[("binet50_dc", "dual-branch + SAKG")].params_m * 0.98 - rednet50
    assert 1.5 * most_38 < least_50
    # binet50_dcca SAKG 3x3 -> 7x7: the paper adds 0.1M (rounded: < 0.2M) and 0.3G (> 0.2G), a ratio
    # of > 1000 MACs per added parameter. A Delta x Delta per-channel filter adds one MAC per output
    # pixel per parameter: over DDF-ResNet-50's 3x3 layers that averages sum(c*H*W)/sum(c) pixels.
    pixels = sum(n * c * (56 // 2 ** s) ** 2 for s, (n, c) in enumerate(zip(DEPTHS[50], WIDTHS)))
    channels = sum(n * c for n, c in zip(DEPTHS[50], WIDTHS))
    three, seven = rows[("binet50_dcca", "SAKG 3x3 (no dual branch)")], rows[("binet50_dcca", "SAKG 7x7 (no dual branch)")]
    paper_ratio_at_least = (seven.gmacs - three.gmacs - 0.1) * 1e9 / ((seven.params_m - three.params_m + 0.1) * 1e6)
    assert pixels / channels < 400 and paper_ratio_at_least > 900


# ================================================================ checkpoints


def _source(name, seed=0, **options):
    """A model with random weights, random BN affine parameters (the zero-initialised last BNs would
    hide the residual branches) and BN statistics measured on a batch, an input and its output.

    Measured statistics keep activations O(1) as in a trained model: with arbitrary statistics the
    second-order involution squares their scale block after block and float32 overflows."""
    torch.manual_seed(seed)
    model = _randomize_batchnorm(create_model(name, **options), seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # a cumulative average: one batch gives its own statistics
    with torch.no_grad():
        model.train()(torch.randn(4, 3, 64, 64))
        model.eval()
        x = torch.randn(2, 3, 64, 64)
        y = model(x)
    assert torch.isfinite(y).all() and y.std() > 0
    return model, x, y


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def ddf_source():
    return _source("ddf_resnet38", 5)


@pytest.fixture(scope="module")
def rednet_source():
    return _source("rednet26", 6)


@pytest.mark.parametrize("wrapped", [False, True])
def test_ddf_timm_checkpoint_round_trip(tmp_path, ddf_source, wrapped):
    model, x, y = ddf_source
    state = _state(model)
    path = tmp_path / ("model_best.pth.tar" if wrapped else "ddf_resnet38.pth")
    ema = {k: v * 0.5 if v.is_floating_point() else v for k, v in state.items()}
    torch.save({"epoch": 119, "arch": "ddf_mul_resnet38", "state_dict": state, "state_dict_ema": ema} if wrapped
               else state, path)
    with torch.no_grad():
        assert not torch.equal(create_model("ddf_resnet38")(x), y)
        assert torch.equal(create_model("ddf_resnet38", weights=path)(x), y)


def test_rednet_mmcls_checkpoint_round_trip(tmp_path, rednet_source):
    model, x, y = rednet_source
    path = tmp_path / "rednet26-4e2a2aef.pth"
    meta = {"mmcls_version": "0.12.0", "epoch": 130, "CLASSES": ["tench", "goldfish"]}
    torch.save({"meta": meta, "state_dict": _as_mmcls(_state(model))}, path)
    with torch.no_grad():
        assert not torch.equal(create_model("rednet26")(x), y)
        assert torch.equal(create_model("rednet26", weights=path)(x), y)


@pytest.mark.parametrize("name", ["binet26_dc", "binet26_dcca"])
def test_binet_checkpoint_round_trip(tmp_path, name):
    model, x, y = _source(name, 7)
    path = tmp_path / f"{name}.pth"
    torch.save({"state_dict": _state(model)}, path)
    with torch.no_grad():
        assert torch.equal(create_model(name, weights=path)(x), y)


def test_checkpoint_of_another_family_is_a_clear_error(tmp_path, ddf_source, rednet_source):
    ddf_path, rednet_path = tmp_path / "ddf.pth", tmp_path / "rednet.pth"
    torch.save({"state_dict": _state(ddf_source[0])}, ddf_path)
    torch.save({"meta": {}, "state_dict": _as_mmcls(_state(rednet_source[0]))}, rednet_path)
    with pytest.raises(DynrobustError, match=r"does not fit model rednet38[\s\S]*missing keys[\s\S]*unexpected keys"):
        create_model("rednet38", weights=ddf_path)
    with pytest.raises(DynrobustError, match=r"does not fit model ddf_resnet38[\s\S]*unexpected key"):
        create_model("ddf_resnet38", weights=rednet_path)
    # RedNet-26 weights lack Bi-volution's SAKG and static branches
    binet = create_model("binet26_dc")
    with pytest.raises(DynrobustError, match=r"missing key[\s\S]*conv2\.(context|pointwise|static_branch)"):
        load_weights(binet, rednet_path)
