"""DiffStyle diffusion anomalies (``swsa_store.synth.diffstyle``) and the ADM UNet (``.adm``).

Everything runs on CPU with tiny randomly initialised UNets: an ADM-style one (our
:class:`ADMUNet`, checked against OpenAI's original code from the ``guided-diffusion-sdk``
package) and a diffusers ``UNet2DModel``.
"""

from __future__ import annotations

import copy
import json
import math
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from swsa_store.synth import create_generator, list_generators
from swsa_store.synth.adm import (
    ADM_256_UNCOND,
    ADMConfig,
    ADMUNet,
    load_adm,
    load_diffusion_model,
    save_adm,
)
from swsa_store.synth.diffstyle import (
    DiffStyleGenerator,
    asyrp_generate,
    ddim_invert,
    ddim_timesteps,
    interpolate_h,
    preprocess,
)

STEPS = 6
SIZE = 16


@pytest.fixture(autouse=True)
def _one_thread():
    # tiny convolutions: threads only add overhead (and stall badly on a busy 2-core machine)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _randomise(module: torch.nn.Module, seed: int = 0, scale: float = 0.05) -> torch.nn.Module:
    """Perturb every parameter (ADM zero-initialises some output convolutions)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)
    return module.eval()


def tiny_adm(seed: int = 0, **overrides) -> ADMUNet:
    cfg = dict(image_size=SIZE, model_channels=32, out_channels=6, num_res_blocks=1, attention_ds=(2,),
               channel_mult=(1, 2), num_head_channels=16)
    cfg.update(overrides)
    torch.manual_seed(seed)
    return _randomise(ADMUNet(ADMConfig(**cfg)), seed)


def tiny_diffusers(seed: int = 0):
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    unet = UNet2DModel(sample_size=SIZE, in_channels=3, out_channels=3, layers_per_block=1,
                       block_out_channels=(16, 32), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8, attention_head_dim=8)
    return _randomise(unet, seed)


def seed_images(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (20 + i, 24, 3), dtype=np.uint8)) for i in range(n)]


def plain_ddim(eps_fn, alphas: np.ndarray, x0: torch.Tensor, ts, style_rows) -> torch.Tensor:
    """Independent plain DDIM (η = 0): invert x0 (at ts[0]) to ts[-1], then generate the rows
    ``style_rows`` of x_T back to ᾱ = 1 (batch shapes as the generator's, so bits can match)."""
    a = lambda t: 1.0 if t < 0 else float(alphas[t])  # noqa: E731
    x = x0
    with torch.no_grad():
        for t, t_next in zip(ts[:-1], ts[1:]):
            eps = eps_fn(x, torch.full((x.shape[0],), int(t), dtype=torch.long))
            x0_pred = (x - math.sqrt(1.0 - a(t)) * eps) / math.sqrt(a(t))
            x = math.sqrt(a(t_next)) * x0_pred + math.sqrt(1.0 - a(t_next)) * eps
        x = x[style_rows]
        for t, t_prev in zip(ts[::-1], list(ts[::-1][1:]) + [-1]):
            eps = eps_fn(x, torch.full((x.shape[0],), int(t), dtype=torch.long))
            x0_pred = (x - math.sqrt(1.0 - a(t)) * eps) / math.sqrt(a(t))
            x = math.sqrt(a(t_prev)) * x0_pred + math.sqrt(1.0 - a(t_prev)) * eps
    return x


def _style_content(gen: DiffStyleGenerator, n_style: int = 2, n_content: int = 2, seed: int = 0):
    images = seed_images(n_style + n_content, seed)
    return torch.stack([preprocess(im, gen.model.image_size) for im in images])


# ---------------------------------------------------------------------------------------------
# the ADM network against OpenAI's original implementation
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", [
    dict(use_scale_shift_norm=True, resblock_updown=True, use_new_attention_order=False, learn_sigma=True),
    dict(use_scale_shift_norm=False, resblock_updown=False, use_new_attention_order=True, learn_sigma=False),
])
def test_adm_matches_guided_diffusion_reference(variant):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        unet_mod = pytest.importorskip("guided_diffusion.unet")
    common = dict(image_size=32, model_channels=32, num_res_blocks=2, channel_mult=(1, 2, 2),
                  num_head_channels=16, use_scale_shift_norm=variant["use_scale_shift_norm"],
                  resblock_updown=variant["resblock_updown"],
                  use_new_attention_order=variant["use_new_attention_order"])
    out_ch = 6 if variant["learn_sigma"] else 3
    torch.manual_seed(1)
    reference = _randomise(unet_mod.UNetModel(in_channels=3, out_channels=out_ch, attention_resolutions=(2, 4),
                                              **common), seed=1)
    ours = ADMUNet(ADMConfig(out_channels=out_ch, attention_ds=(2, 4), **common)).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)  # same parameter names, no conversion
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([0, 417, 999])
    with torch.no_grad():
        expected, got = reference(x, t), ours(x, t)
    assert got.shape == (3, out_ch, 32, 32)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    # the h-space split is exactly one forward pass
    with torch.no_grad():
        h, ctx = ours.encode(x, t)
        assert torch.equal(ours.decode(h, ctx), got)
        assert h.shape == (3, 64, 8, 8)


def test_paper_config_and_schedule():
    cfg = ADM_256_UNCOND
    assert (cfg.image_size, cfg.model_channels, cfg.channel_mult, cfg.num_res_blocks) == (256, 256, (1, 1, 2, 2, 4, 4), 2)
    assert (cfg.attention_ds, cfg.num_head_channels, cfg.out_channels) == ((8, 16, 32), 64, 6)
    assert cfg.resblock_updown and cfg.use_scale_shift_norm and cfg.num_classes is None
    model = load_diffusion_model(tiny_adm())
    expected = np.cumprod(1.0 - np.linspace(1e-4, 0.02, 1000))
    np.testing.assert_allclose(model.alphas_cumprod, expected, rtol=1e-12)
    assert list(ddim_timesteps(50))[:3] == [0, 20, 41] and ddim_timesteps(50)[-1] == 999
    assert len(set(ddim_timesteps(50))) == 50
    with pytest.raises(ValueError, match="steps"):
        ddim_timesteps(1)


def test_diffusers_split_equals_forward():
    unet = tiny_diffusers()
    model = load_diffusion_model(unet)
    x = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([3, 900])
    with torch.no_grad():
        torch.testing.assert_close(model.eps(x, t), unet(x, t).sample, atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# the method
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["adm", "diffusers"])
@pytest.mark.parametrize("interpolation", ["linear", "slerp"])
def test_gamma_zero_is_plain_ddim_of_the_style_image(kind, interpolation):
    net = tiny_adm() if kind == "adm" else tiny_diffusers()
    gen = DiffStyleGenerator(net, steps=STEPS, t_edit=0, interpolation=interpolation, device="cpu", batch_size=4)
    gen.gamma = 0.0  # the generator refuses gamma=0 (a no-op); set it here to check the mechanics
    x = _style_content(gen)
    pairs = [(0, 2, 0), (1, 3, 0), (0, 3, 0)]
    out = torch.stack([t for _, t in gen.run_pairs({i: x[i] for i in range(4)}, pairs)])
    if kind == "adm":
        eps_fn = lambda xt, t: net(xt, t)[:, :3]  # noqa: E731 — the plain network forward
    else:
        eps_fn = lambda xt, t: net(xt, t).sample  # noqa: E731
    expected = plain_ddim(eps_fn, gen.model.alphas_cumprod, x, gen.timesteps, [0, 1, 0])
    assert torch.equal(out, expected)


def test_gamma_changes_output_only_through_steps_at_or_above_t_edit():
    gen = DiffStyleGenerator(tiny_adm(), steps=STEPS, device="cpu")
    model, ts = gen.model, gen.timesteps
    x = _style_content(gen)
    x_T, _ = ddim_invert(model, x[:2], ts, record_h=False)
    _, hs = ddim_invert(model, x[2:], ts)
    assert len(hs) == STEPS

    def run(gamma, t_edit, trajectory=None):
        cb = None if trajectory is None else (lambda k, t, xt: trajectory.append((t, xt.clone())))
        return asyrp_generate(model, x_T, ts, h_content=hs, gamma=gamma, t_edit=t_edit, callback=cb)

    plain = run(0.0, 0)
    assert not torch.allclose(run(0.7, 0), plain, atol=1e-4)
    assert torch.equal(run(0.7, 1000), plain)  # t_edit above every step: nothing changes
    t_edit = int(ts[STEPS // 2])
    trajectory: list = []
    edited = run(0.7, t_edit, trajectory)
    assert not torch.allclose(edited, plain, atol=1e-4)
    # the state after the last injected step (t == t_edit), continued with plain DDIM, gives the output
    t_last, x_last = next((t, xt) for t, xt in trajectory if t == t_edit)
    rest = [int(t) for t in ts if t < t_last]
    assert rest  # below t_edit there are plain steps
    a = lambda t: 1.0 if t < 0 else float(model.alphas_cumprod[t])  # noqa: E731
    xt = x_last
    with torch.no_grad():
        for t, t_prev in zip(rest[::-1], rest[::-1][1:] + [-1]):
            eps = model.eps(xt, torch.full((2,), t))
            x0_pred = (xt - math.sqrt(1.0 - a(t)) * eps) / math.sqrt(a(t))
            xt = math.sqrt(a(t_prev)) * x0_pred + math.sqrt(1.0 - a(t_prev)) * eps
    assert torch.equal(xt, edited)


def test_encoder_runs_once_per_step_and_decoder_twice_when_injecting():
    gen = DiffStyleGenerator(tiny_adm(), steps=STEPS, t_edit=int(ddim_timesteps(STEPS)[2]), device="cpu", batch_size=8)
    calls = {"encoder": 0, "middle": 0, "decoder": 0}
    model = gen.model
    hooks = [model.encoder_modules[0].register_forward_hook(lambda *a: calls.__setitem__("encoder", calls["encoder"] + 1)),
             model.module.middle_block.register_forward_hook(lambda *a: calls.__setitem__("middle", calls["middle"] + 1)),
             model.decoder_modules[0].register_forward_hook(lambda *a: calls.__setitem__("decoder", calls["decoder"] + 1))]
    try:
        out = gen.generate(seed_images(4), [1, 2, 3, 4], None, np.random.default_rng(0))
    finally:
        for h in hooks:
            h.remove()
    assert len(out) == 4
    n_inject = int((gen.timesteps >= gen.t_edit).sum())
    assert 0 < n_inject < STEPS
    # inversion (one batch of 4 images): S-1 full passes + one encoder-only pass at t = 999;
    # generation (one batch of 4 pairs): S encoder passes, S + n_inject decoder passes
    assert calls["encoder"] == calls["middle"] == (STEPS - 1 + 1) + STEPS
    assert calls["decoder"] == (STEPS - 1) + STEPS + n_inject


@pytest.mark.parametrize("interpolation", ["linear", "slerp"])
def test_batched_equals_one_by_one_and_deterministic(interpolation):
    net = tiny_adm()
    images, ids = seed_images(4), [7, 8, 9, 10]
    runs = {}
    # float64: a random network's DDIM round trip amplifies rounding (÷√ᾱ_999 ≈ ÷156 per step),
    # so batch-size-dependent float32 kernel rounding would hide the comparison
    for bs in (1, 3):
        gen = DiffStyleGenerator(copy.deepcopy(net), steps=STEPS, t_edit=200, interpolation=interpolation,
                                 device="cpu", batch_size=bs, dtype="float64")
        x = {i: preprocess(im, SIZE) for i, im in enumerate(images)}
        plan = gen.plan(4, None, np.random.default_rng(0))
        runs[bs] = torch.stack([t for _, t in gen.run_pairs(x, plan)])
    assert runs[1].dtype == torch.float64
    torch.testing.assert_close(runs[1], runs[3], atol=1e-9, rtol=1e-9)
    gen = DiffStyleGenerator(net, steps=STEPS, interpolation=interpolation, device="cpu", batch_size=4)
    first = gen.generate(images, ids, None, np.random.default_rng(3))
    second = gen.generate(images, ids, None, np.random.default_rng(3))
    assert [np.asarray(a.image).tobytes() for a in first] == [np.asarray(b.image).tobytes() for b in second]
    assert [a.params for a in first] == [b.params for b in second]


def test_pairs_are_the_style_content_cross_product_with_provenance():
    gen = DiffStyleGenerator(tiny_adm(), steps=STEPS, device="cpu")
    ids = [10, 11, 12, 13, 14]  # 2 style (10, 11) × 3 content (12, 13, 14)
    out = gen.generate(seed_images(5), ids, None, np.random.default_rng(0))
    assert len(out) == 2 * 3
    assert [o.parent_ids for o in out] == [(s, c) for s in (10, 11) for c in (12, 13, 14)]
    p = out[4].params
    assert (p["style_id"], p["content_id"], p["pair_index"]) == (11, 13, 4)
    assert (p["gamma"], p["t_edit"], p["steps"], p["interpolation"]) == (0.7, 400, STEPS, "linear")
    assert len(p["model_sha256"]) == 64 and p["model"]
    assert all(o.image.size == (SIZE, SIZE) and o.image.mode == "RGB" for o in out)
    json.dumps(p)
    # a subset, drawn with rng, when fewer are asked for; too many is an error
    sub = gen.plan(5, 3, np.random.default_rng(0))
    assert len(sub) == 3 and len(set(sub)) == 3
    with pytest.raises(ValueError, match=r"2 style × 3 content"):
        gen.resolve_count(5, 7)
    with pytest.raises(ValueError, match="at least 2 seed images"):
        gen.resolve_count(1, None)


def test_resume_skip_gives_the_same_images():
    gen = DiffStyleGenerator(tiny_adm(), steps=STEPS, device="cpu", batch_size=3)
    images, ids = seed_images(4), [1, 2, 3, 4]
    full = dict(gen.iter_generate(images, ids, None, np.random.default_rng(5)))
    rest = dict(gen.iter_generate(images, ids, None, np.random.default_rng(5), skip={0, 2}))
    assert sorted(rest) == [1, 3]
    for i in rest:
        assert np.asarray(rest[i].image).tobytes() == np.asarray(full[i].image).tobytes()
        assert rest[i].params == full[i].params


def test_interpolation_rules():
    g = torch.Generator().manual_seed(0)
    h, c = torch.randn(3, 8, 2, 2, generator=g), 5 * torch.randn(3, 8, 2, 2, generator=g)
    torch.testing.assert_close(interpolate_h(h, c, 0.7, "linear"), 0.3 * h + 0.7 * c)
    assert torch.equal(interpolate_h(h, c, 0.0, "linear"), h)
    torch.testing.assert_close(interpolate_h(h, c, 0.0, "slerp"), h)
    one = interpolate_h(h, c, 1.0, "slerp")  # the content's direction at h's norm
    norms = h.flatten(1).norm(dim=1)
    torch.testing.assert_close(one.flatten(1), c.flatten(1) / c.flatten(1).norm(dim=1, keepdim=True) * norms[:, None])
    mid = interpolate_h(h, c, 0.4, "slerp")
    torch.testing.assert_close(mid.flatten(1).norm(dim=1), norms)  # slerp keeps the norm
    torch.testing.assert_close(interpolate_h(h, h * 2, 0.5, "slerp"), h)  # parallel: no NaN
    with pytest.raises(ValueError, match="interpolation"):
        interpolate_h(h, c, 0.5, "cubic")


def test_quality_boosting_is_off_by_default_and_seeded():
    net = tiny_adm()
    images, ids = seed_images(4), [1, 2, 3, 4]
    plain = DiffStyleGenerator(net, steps=STEPS, device="cpu").generate(images, ids, None, np.random.default_rng(0))
    boosted = DiffStyleGenerator(net, steps=STEPS, t_boost=500, device="cpu")
    a = boosted.generate(images, ids, None, np.random.default_rng(0))
    b = boosted.generate(images, ids, None, np.random.default_rng(0))
    assert [np.asarray(x.image).tobytes() for x in a] == [np.asarray(x.image).tobytes() for x in b]
    assert [np.asarray(x.image).tobytes() for x in a] != [np.asarray(x.image).tobytes() for x in plain]


# ---------------------------------------------------------------------------------------------
# loading models
# ---------------------------------------------------------------------------------------------


def test_registered_and_argument_errors(tmp_path):
    assert "diffusion" in list_generators()
    with pytest.raises(FileNotFoundError) as info:
        create_generator("diffusion", model=str(tmp_path / "256x256_diffusion_uncond.pt"))
    message = str(info.value)
    assert "\n" not in message and str(tmp_path / "256x256_diffusion_uncond.pt") in message
    for kwargs, match in [({"gamma": 1.5}, "gamma"), ({"interpolation": "cubic"}, "interpolation"),
                          ({"t_edit": -1}, "t_edit"), ({"batch_size": 0}, "batch_size"), ({"steps": 1}, "steps")]:
        with pytest.raises(ValueError, match=match):
            DiffStyleGenerator(tiny_adm(), device="cpu", **kwargs)


def test_load_adm_file_and_raw_state_dict(tmp_path):
    net = tiny_adm()
    path = save_adm(net, tmp_path / "tiny.pt")
    model = load_adm(path)
    assert model.name == "tiny.pt" and len(model.sha256) == 64
    x = torch.randn(1, 3, SIZE, SIZE)
    with torch.no_grad():
        assert torch.equal(model.module(x, torch.tensor([5])), net(x, torch.tensor([5])))
    raw = tmp_path / "raw.pt"
    torch.save(net.state_dict(), raw)
    with pytest.raises(ValueError, match="does not match the ADM config"):
        load_adm(raw)  # assumed to be the 256x256 model: shapes differ, a clear error
    assert load_adm(raw, config=net.config).sha256 != model.sha256
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read diffusion model file"):
        load_adm(tmp_path / "bad.pt")


def test_diffusers_directory_path(tmp_path):
    from diffusers import DDIMScheduler

    unet = tiny_diffusers()
    unet.save_pretrained(tmp_path / "pipe" / "unet")
    DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.001, beta_end=0.012).save_pretrained(tmp_path / "pipe" / "scheduler")
    gen = create_generator("diffusion", model=str(tmp_path / "pipe"), steps=STEPS, device="cpu")
    assert gen.model.kind == "diffusers" and gen.model.image_size == SIZE
    expected = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.001, beta_end=0.012).alphas_cumprod.double().numpy()
    np.testing.assert_allclose(gen.model.alphas_cumprod, expected)
    out = gen.generate(seed_images(4), [1, 2, 3, 4], None, np.random.default_rng(0))
    assert len(out) == 4 and out[0].params["model_kind"] == "diffusers"
    with pytest.raises(FileNotFoundError, match="offline"):
        load_diffusion_model("nobody/no-such-model")


# ---------------------------------------------------------------------------------------------
# end to end through the store
# ---------------------------------------------------------------------------------------------


def test_synthesize_end_to_end_and_resume_per_pair(tmp_path, monkeypatch):
    from swsa_store import open_store
    from swsa_store.catalog import catalog_dataset
    from swsa_store.synthesize import synthesize

    store = tmp_path / "s.h5"
    catalog_dataset(store, "digits", image_dir=tmp_path / "digits", image_size=16, n_seed=4)
    model_path = save_adm(tiny_adm(), tmp_path / "tiny_adm.pt")
    with open_store(store) as s:
        task_ids = [int(t) for t in s.tasks()["task_id"][:2]]
    kwargs = dict(model=str(model_path), steps=4, device="cpu", batch_size=3, task_ids=task_ids, progress=False)

    # interrupt the first run after 3 images (rows are committed as they come)
    import swsa_store.synth.diffstyle as ds

    real_postprocess, made = ds.postprocess, []

    def failing_postprocess(x):
        if len(made) == 3:
            raise KeyboardInterrupt
        made.append(1)
        return real_postprocess(x)

    monkeypatch.setattr(ds, "postprocess", failing_postprocess)
    with pytest.raises(KeyboardInterrupt):
        synthesize(store, "diffusion", commit_every_s=0.0, **kwargs)
    monkeypatch.setattr(ds, "postprocess", real_postprocess)
    with open_store(store) as s:
        assert (s.images()["kind"] == "diffusion").sum() == 3

    summary = synthesize(store, "diffusion", **kwargs)
    assert summary == {"source": "diffusion", "tasks_done": 2, "tasks_skipped": 0, "images": 2 * 4 - 3,
                       "skipped_images": 0}
    with open_store(store) as s:
        images = s.images()
    rows = images[images["kind"] == "diffusion"]
    assert len(rows) == 2 * (2 * 2)  # per task |style| × |content| = 2 × 2
    for task_id, group in rows.groupby("task_id"):
        assert sorted(group["source_index"]) == [0, 1, 2, 3]
        params = [json.loads(p) for p in group.sort_values("source_index")["params"]]
        parents = [tuple(json.loads(p)) for p in group.sort_values("source_index")["parent_ids"]]
        assert [(p["style_id"], p["content_id"]) for p in params] == parents
        assert {p["generator"] for p in params} == {"diffusion"}
        assert {(p["gamma"], p["t_edit"], p["steps"], p["model"]) for p in params} == {(0.7, 400, 4, "tiny_adm.pt")}
    # the resumed images equal an uninterrupted run's
    fresh = tmp_path / "fresh.h5"
    catalog_dataset(fresh, "digits", image_dir=tmp_path / "digits", image_size=16, n_seed=4)
    synthesize(fresh, "diffusion", **kwargs)
    with open_store(fresh) as s:
        fresh_rows = s.images()
    fresh_rows = fresh_rows[fresh_rows["kind"] == "diffusion"]
    key = ["task_id", "source_index"]
    assert list(rows.sort_values(key)["sha256"]) == list(fresh_rows.sort_values(key)["sha256"])
    # a third run has nothing left to do
    assert synthesize(store, "diffusion", **kwargs)["tasks_skipped"] == 2
