"""Backbone registry, offline weight resolution and loading — on small random models, no network."""

from __future__ import annotations

import hashlib
import json
import logging

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file

from swsa_store.models.backbones import (
    PAPER_BACKBONES,
    LoadedBackbone,
    PreprocessCfg,
    RandomWeightsWarning,
    WeightsLoadError,
    WeightsNotFoundError,
    WeightsSource,
    create_backbone,
    get_backbone_cfg,
    list_backbones,
    resolve_weights,
)
from swsa_store.registry import UnknownNameError

SIZE = 32
EXPECTED = {
    "resnet18": ("resnet18", "tv_in1k", "resnet", 512),
    "resnet34": ("resnet34", "tv_in1k", "resnet", 512),
    "resnet50": ("resnet50", "tv_in1k", "resnet", 2048),
    "resnet101": ("resnet101", "tv_in1k", "resnet", 2048),
    "resnet152": ("resnet152", "tv_in1k", "resnet", 2048),
    "vit_b_16": ("vit_base_patch16_224", "orig_in21k", "vit", 768),
    "vit_b_32": ("vit_base_patch32_224", "orig_in21k", "vit", 768),
    "vit_l_16": ("vit_large_patch16_224", "orig_in21k", "vit", 1024),
    "vit_l_32": ("vit_large_patch32_224", "orig_in21k", "vit", 1024),
    "vit_h_14": ("vit_huge_patch14_224", "orig_in21k", "vit", 1280),
}


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    """No network, empty caches, no weights directory: every test starts from nothing."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hf-cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-torch-home"))
    monkeypatch.delenv("SWSA_WEIGHTS_DIR", raising=False)
    monkeypatch.setattr(torch.hub, "_hub_dir", None)


def x_batch(seed=1, n=2, size=SIZE):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def random_backbone(name="resnet18", **kw) -> LoadedBackbone:
    with pytest.warns(RandomWeightsWarning):
        return create_backbone(name, weights="random", image_size=SIZE, **kw)


def trained_resnet18(seed=123):
    """A resnet18.tv_in1k whose weights differ from the random init (as 'real' weights would)."""
    torch.manual_seed(seed)
    model = timm.create_model("resnet18.tv_in1k", pretrained=False).eval()
    with torch.no_grad():  # make the BN statistics non-trivial too
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model


def features_of(model, x):
    import copy

    m = copy.deepcopy(model)
    m.reset_classifier(0)
    with torch.no_grad():
        return m.eval()(x)


def sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ------------------------------------------------------------------- registry & configs


def test_registry_lists_the_papers_ten_backbones_with_feature_dims():
    # the paper's ten, and the three EfficientNet-Lites defined by packaged weights (tests/test_real_weights.py)
    lites = ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"]
    assert sorted(list_backbones()) == sorted([*EXPECTED, *lites])
    assert set(PAPER_BACKBONES) == set(EXPECTED)
    for name, (arch, tag, family, dim) in EXPECTED.items():
        cfg = get_backbone_cfg(name)
        assert (cfg.timm_name, cfg.pretrained_tag, cfg.family, cfg.feature_dim) == (arch, tag, family, dim)
        assert timm.is_model(arch)
        assert f"{arch}.{tag}" in timm.list_pretrained(f"{arch}.*")
        assert cfg.pretrained_cfg().hf_hub_id == f"timm/{arch}.{tag}"


def test_feature_dims_of_built_models():
    rn = random_backbone("resnet18")
    assert rn.feature_dim == 512 and rn.cfg.feature_dim == 512
    assert rn.model(x_batch()).shape == (2, 512)
    vit = random_backbone("timm/vit_tiny_patch16_224")
    assert vit.cfg.family == "timm" and vit.cfg.timm_name == "vit_tiny_patch16_224"
    assert vit.cfg.pretrained_tag  # timm's default tag is recorded
    assert vit.feature_dim == 192 and vit.cfg.feature_dim == 192
    assert vit.model(x_batch()).shape == (2, 192)


def test_loaded_model_is_frozen_feature_extractor():
    bb = random_backbone("resnet18")
    assert not bb.model.training
    assert all(not p.requires_grad for p in bb.model.parameters())
    assert bb.n_params == sum(p.numel() for p in bb.model.parameters())
    assert bb.n_params == 11_176_512  # resnet18 without its fc


def test_unknown_name_lists_valid_names():
    with pytest.raises(UnknownNameError) as info:
        create_backbone("resnet19", weights="random")
    text = str(info.value)
    for name in EXPECTED:
        assert name in text
    assert "resnet18" in text and "timm/" in text
    with pytest.raises(UnknownNameError, match="resnet19"):
        create_backbone("timm/resnet19", weights="random")
    with pytest.raises(UnknownNameError, match="tv_in1k"):  # valid tags listed
        get_backbone_cfg("timm/resnet18.no_such_tag")


def test_configs_to_attrs_are_json():
    cfg = get_backbone_cfg("vit_h_14")
    pre = PreprocessCfg((3, 224, 224), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bicubic", 0.9, "center")
    src = WeightsSource("random")
    for obj in (cfg, pre, src):
        attrs = obj.to_attrs()
        assert json.loads(json.dumps(attrs)) == attrs
    assert pre.to_attrs()["input_size"] == [3, 224, 224]
    # provenance: a packaged file also records its package and version ("" otherwise)
    assert src.to_attrs() == {"kind": "random", "path": "", "sha256": "", "package": "", "package_version": ""}
    with pytest.raises(dataclasses_frozen_error()):
        cfg.name = "x"


def dataclasses_frozen_error():
    import dataclasses

    return dataclasses.FrozenInstanceError


# ------------------------------------------------------------------- random weights


def test_random_init_is_deterministic_and_loud(caplog):
    torch.manual_seed(999)
    before = torch.rand(1)
    torch.manual_seed(999)
    with caplog.at_level(logging.WARNING, logger="swsa_store.models.backbones"):
        a = random_backbone("resnet18")
    assert torch.rand(1) == before  # the caller's RNG is untouched
    assert any("RANDOM" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    b = random_backbone("resnet18")
    assert a.weights.kind == "random" and a.weights.path is None and a.weights.sha256 is None
    x = x_batch()
    with torch.no_grad():
        assert torch.equal(a.model(x), b.model(x))
    attrs = a.attrs()
    assert attrs["weights_kind"] == "random" and attrs["weights_sha256"] == ""
    assert json.loads(json.dumps(attrs)) == attrs


def test_random_vit_is_deterministic():
    a = random_backbone("timm/vit_tiny_patch16_224")
    b = random_backbone("timm/vit_tiny_patch16_224")
    x = x_batch()
    with torch.no_grad():
        assert torch.equal(a.model(x), b.model(x))


# ------------------------------------------------------------------- search order & failures


def test_auto_without_weights_raises_naming_locations(tmp_path):
    cfg = get_backbone_cfg("resnet18")
    with pytest.raises(WeightsNotFoundError) as info:
        resolve_weights(cfg)
    err = info.value
    assert isinstance(err, FileNotFoundError)
    text = str(err)
    assert "SWSA_WEIGHTS_DIR" in text and "random" in text
    assert "models--timm--resnet18.tv_in1k" in text  # the HF cache location
    assert "resnet18-f37072fd.pth" in text  # the torch hub cache location
    assert str(tmp_path / "empty-hf-cache") in text
    with pytest.raises(WeightsNotFoundError):
        create_backbone("resnet18", weights="auto", image_size=SIZE)
    # with a weights dir, its candidate files are listed too
    with pytest.raises(WeightsNotFoundError) as info:
        resolve_weights(cfg, weights_dir=tmp_path / "wd")
    assert str(tmp_path / "wd" / "resnet18.safetensors") in str(info.value)
    assert any("resnet18.tv_in1k" in t for t in info.value.tried)


def test_missing_explicit_path_is_clear(tmp_path):
    with pytest.raises(WeightsNotFoundError, match="nope.safetensors"):
        create_backbone("resnet18", weights=tmp_path / "nope.safetensors")
    empty = tmp_path / "emptydir"
    empty.mkdir()
    with pytest.raises(WeightsNotFoundError, match="model.safetensors"):
        create_backbone("resnet18", weights=empty)
    bad = tmp_path / "weights.npz"
    bad.write_bytes(b"x")
    with pytest.raises(ValueError, match="unsupported"):
        create_backbone("resnet18", weights=bad)


# ------------------------------------------------------------------- explicit files


def test_explicit_safetensors_and_wrapped_pth(tmp_path):
    ref = trained_resnet18()
    x = x_batch()
    expected = features_of(ref, x)

    st = tmp_path / "rn18.safetensors"
    save_file(ref.state_dict(), str(st))
    pth = tmp_path / "rn18.pth"
    torch.save({"state_dict": ref.state_dict(), "epoch": 3}, pth)
    model_wrapped = tmp_path / "rn18_model.pt"
    torch.save({"model": {f"module.{k}": v for k, v in ref.state_dict().items()}}, model_wrapped)

    for path in (st, pth, model_wrapped):
        bb = create_backbone("resnet18", weights=path, image_size=SIZE)
        assert bb.weights.kind == "file"
        assert bb.weights.path == str(path)
        assert bb.weights.sha256 == sha256(path)
        with torch.no_grad():
            torch.testing.assert_close(bb.model(x), expected, rtol=0, atol=0)
        attrs = bb.attrs()
        assert attrs["weights_sha256"] == sha256(path) and attrs["weights_kind"] == "file"
        assert attrs["feature_dim"] == 512 and attrs["timm_name"] == "resnet18"


def test_headless_checkpoint_is_accepted(tmp_path):
    """The state dict of a LoadedBackbone.model (no classifier) loads back."""
    ref = trained_resnet18()
    ref.reset_classifier(0)
    path = tmp_path / "headless.safetensors"
    save_file(ref.state_dict(), str(path))
    bb = create_backbone("resnet18", weights=path, image_size=SIZE)
    x = x_batch()
    with torch.no_grad():
        torch.testing.assert_close(bb.model(x), ref(x), rtol=0, atol=0)


def test_hf_style_directory(tmp_path):
    ref = trained_resnet18()
    folder = tmp_path / "hfdir"
    folder.mkdir()
    torch.save(ref.state_dict(), folder / "pytorch_model.bin")
    bb = create_backbone("resnet18", weights=folder, image_size=SIZE)
    assert bb.weights.kind == "directory"
    assert bb.weights.path == str(folder / "pytorch_model.bin")


def test_wrong_keys_give_clear_error_naming_the_file(tmp_path):
    ref = trained_resnet18()
    sd = {k.replace("layer1.", "stage1."): v for k, v in ref.state_dict().items()}
    path = tmp_path / "wrong_keys.safetensors"
    save_file(sd, str(path))
    with pytest.raises(WeightsLoadError) as info:
        create_backbone("resnet18", weights=path, image_size=SIZE)
    text = str(info.value)
    assert str(path) in text and "missing" in text and "unexpected" in text and "stage1." in text
    assert info.value.__cause__ is None  # not a bare torch stack trace

    # a checkpoint of another architecture: shape mismatches, same clear error
    other = tmp_path / "resnet34_as_18.safetensors"
    torch.manual_seed(0)
    save_file(timm.create_model("resnet34", num_classes=10).state_dict(), str(other))
    with pytest.raises(WeightsLoadError, match="resnet34_as_18.safetensors"):
        create_backbone("resnet18", weights=other, image_size=SIZE)

    # not a state dict at all
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsLoadError, match="junk.pth"):
        create_backbone("resnet18", weights=junk, image_size=SIZE)
    meta = tmp_path / "meta.pth"
    torch.save({"epoch": 3, "lr": 0.1}, meta)
    with pytest.raises(WeightsLoadError, match="not a state dict"):
        create_backbone("resnet18", weights=meta, image_size=SIZE)


def test_vit_checkpoint_loads_at_another_image_size(tmp_path):
    """A 224-px ViT checkpoint loads into a 32-px model (position embeddings resampled)."""
    torch.manual_seed(5)
    ref = timm.create_model("vit_tiny_patch16_224.augreg_in21k_ft_in1k", pretrained=False)
    path = tmp_path / "vit_tiny.safetensors"
    save_file(ref.state_dict(), str(path))
    bb = create_backbone("timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k", weights=path, image_size=SIZE)
    assert bb.weights.kind == "file"
    assert bb.model.pos_embed.shape[1] == 1 + (SIZE // 16) ** 2
    # the patch embedding was loaded as is
    torch.testing.assert_close(bb.model.patch_embed.proj.weight, ref.patch_embed.proj.weight)
    assert bb.model(x_batch()).shape == (2, 192)


# ------------------------------------------------------------------- weights dir & caches


@pytest.mark.parametrize("layout", ["name.safetensors", "name.pth", "arch_tag_dir", "hf_id_dir", "url_name"])
@pytest.mark.parametrize("via", ["argument", "env"])
def test_weights_dir_layouts(tmp_path, monkeypatch, layout, via):
    ref = trained_resnet18()
    wd = tmp_path / "weights"
    target = {
        "name.safetensors": wd / "resnet18.safetensors",
        "name.pth": wd / "resnet18.pth",
        "arch_tag_dir": wd / "resnet18.tv_in1k" / "model.safetensors",
        "hf_id_dir": wd / "timm" / "resnet18.tv_in1k" / "pytorch_model.bin",
        "url_name": wd / "resnet18-f37072fd.pth",
    }[layout]
    target.parent.mkdir(parents=True)
    if target.suffix == ".safetensors":
        save_file(ref.state_dict(), str(target))
    else:
        torch.save(ref.state_dict(), target)
    kwargs = {}
    if via == "argument":
        kwargs["weights_dir"] = wd
    else:
        monkeypatch.setenv("SWSA_WEIGHTS_DIR", str(wd))
    bb = create_backbone("resnet18", image_size=SIZE, **kwargs)
    assert bb.weights.kind == "directory"
    assert bb.weights.path == str(target)
    assert bb.weights.sha256 == sha256(target)
    x = x_batch()
    with torch.no_grad():
        torch.testing.assert_close(bb.model(x), features_of(ref, x), rtol=0, atol=0)


def test_hf_cache_found(tmp_path, monkeypatch):
    ref = trained_resnet18()
    cfg = get_backbone_cfg("resnet18")
    repo_id = cfg.pretrained_cfg().hf_hub_id
    assert repo_id == "timm/resnet18.tv_in1k"
    cache = tmp_path / "hf-cache"
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    save_file(ref.state_dict(), str(snap / "model.safetensors"))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))

    src = resolve_weights(cfg)
    assert src.kind == "hf-cache"
    assert src.path == str(snap / "model.safetensors")
    assert src.sha256 == sha256(snap / "model.safetensors")
    bb = create_backbone("resnet18", image_size=SIZE)
    assert bb.weights == src
    x = x_batch()
    with torch.no_grad():
        torch.testing.assert_close(bb.model(x), features_of(ref, x), rtol=0, atol=0)

    # HF_HOME/hub is used when HF_HUB_CACHE is unset
    monkeypatch.delenv("HF_HUB_CACHE")
    home = tmp_path / "hf-home"
    (home).mkdir()
    cache.rename(home / "hub")
    monkeypatch.setenv("HF_HOME", str(home))
    assert resolve_weights(cfg).kind == "hf-cache"


def test_torch_hub_cache_found(tmp_path, monkeypatch):
    ref = trained_resnet18()
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    checkpoints = tmp_path / "torch-home" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    path = checkpoints / "resnet18-f37072fd.pth"  # basename of pretrained_cfg.url
    torch.save(ref.state_dict(), path)
    bb = create_backbone("resnet18", image_size=SIZE)
    assert bb.weights.kind == "torch-cache"
    assert bb.weights.path == str(path) and bb.weights.sha256 == sha256(path)


def test_search_order(tmp_path, monkeypatch):
    """Explicit path > weights dir > HF cache > torch cache."""
    ref = trained_resnet18()
    sd = ref.state_dict()
    # torch cache
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    (tmp_path / "th" / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(sd, tmp_path / "th" / "hub" / "checkpoints" / "resnet18-f37072fd.pth")
    cfg = get_backbone_cfg("resnet18")
    assert resolve_weights(cfg).kind == "torch-cache"
    # HF cache beats it
    repo = tmp_path / "hf" / "models--timm--resnet18.tv_in1k"
    (repo / "snapshots" / "abc").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc")
    save_file(sd, str(repo / "snapshots" / "abc" / "model.safetensors"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    assert resolve_weights(cfg).kind == "hf-cache"
    # weights dir beats both
    (tmp_path / "wd").mkdir()
    save_file(sd, str(tmp_path / "wd" / "resnet18.safetensors"))
    monkeypatch.setenv("SWSA_WEIGHTS_DIR", str(tmp_path / "wd"))
    assert resolve_weights(cfg).kind == "directory"
    # explicit file beats everything; "random" is random
    save_file(sd, str(tmp_path / "explicit.safetensors"))
    assert resolve_weights(cfg, tmp_path / "explicit.safetensors").kind == "file"
    assert resolve_weights(cfg, "random") == WeightsSource("random")
    # allow_download only matters when nothing is local
    assert resolve_weights(cfg, allow_download=True).kind == "directory"


def test_allow_download_resolves_to_download_when_nothing_local():
    # resolve only: no network is touched by resolve_weights
    src = resolve_weights(get_backbone_cfg("vit_h_14"), allow_download=True)
    assert src == WeightsSource("download")


# ------------------------------------------------------------------- preprocessing


def test_preprocess_honours_image_size():
    bb = random_backbone("resnet18")
    assert bb.preprocess.input_size == (3, SIZE, SIZE)
    assert bb.preprocess.mean == pytest.approx((0.485, 0.456, 0.406))
    assert bb.preprocess.interpolation == "bilinear" and bb.preprocess.crop_pct == pytest.approx(0.875)
    img = Image.new("RGB", (50, 40), (120, 30, 200))
    t = bb.transform(img)
    assert t.shape == (3, SIZE, SIZE) and t.dtype == torch.float32
    with torch.no_grad():
        assert bb.model(t[None]).shape == (1, 512)
    assert bb.attrs()["preprocess"]["input_size"] == [3, SIZE, SIZE]

    vit = random_backbone("timm/vit_tiny_patch16_224")
    assert vit.preprocess.input_size == (3, SIZE, SIZE)
    assert vit.preprocess.mean == pytest.approx((0.5, 0.5, 0.5))
    assert vit.transform(img).shape == (3, SIZE, SIZE)

    default = get_backbone_cfg("vit_b_16").pretrained_cfg()
    assert default.input_size == (3, 224, 224)


def test_bad_image_size():
    with pytest.raises(ValueError, match="image_size"):
        create_backbone("resnet18", weights="random", image_size=0)


def test_download_only_when_allowed(monkeypatch):
    """allow_download=True goes through timm's pretrained loading (simulated: no network)."""
    calls = []
    real_create = timm.create_model

    def fake_create(name, pretrained=False, **kw):
        calls.append((name, pretrained))
        return real_create(name, pretrained=False, **kw)

    monkeypatch.setattr(timm, "create_model", fake_create)
    with pytest.raises(WeightsNotFoundError):
        create_backbone("resnet18", image_size=SIZE)
    assert calls == []
    bb = create_backbone("resnet18", image_size=SIZE, allow_download=True)
    assert calls == [("resnet18.tv_in1k", True)]
    assert bb.weights.kind == "download" and bb.weights.sha256 is None  # nothing landed in the caches


def test_training_checkpoint_with_namespace_loads(tmp_path):
    import argparse

    ref = trained_resnet18()
    path = tmp_path / "train_ckpt.pth.tar.pth"
    torch.save({"state_dict": ref.state_dict(), "args": argparse.Namespace(lr=0.1), "epoch": 9}, path)
    bb = create_backbone("resnet18", weights=path, image_size=SIZE)
    x = x_batch()
    with torch.no_grad():
        torch.testing.assert_close(bb.model(x), features_of(ref, x), rtol=0, atol=0)


def test_pixels_feature_source_needs_no_weights():
    from PIL import Image as PILImage

    from swsa_store.models.backbones import create_backbone

    backbone = create_backbone("pixels@4")
    assert backbone.weights.kind == "none" and backbone.n_params == 0 and backbone.feature_dim == 48
    image = PILImage.new("RGB", (32, 32), (255, 0, 51))
    features = backbone.model(backbone.transform(image)[None]).numpy()
    np.testing.assert_allclose(features.reshape(3, 16).mean(axis=1), [1.0, 0.0, 0.2], atol=1e-6)
    assert create_backbone("pixels").feature_dim == 768
    with pytest.raises(ValueError, match="'pixels' or 'pixels@N'"):
        create_backbone("pixels@big")
