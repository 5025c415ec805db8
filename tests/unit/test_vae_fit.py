"""VAE fitting (mm.training.vae_fit): the loss falls, the saved checkpoint loads strictly and reproduces the
fitted encoder, the recomputed latent statistics normalise the data's latents, the written model JSON picks the
fit up, and the CLI rejects bad input; plus the WFVAE's differentiable posterior/decode helpers."""

import json
import os

import pytest
import torch

from mm.config_upstream import load_model_json
from mm.data.config import DataConfig
from mm.data.synthetic import write_dataset
from mm.models.wavelet import HaarWaveletTransform3D
from mm.models.wfvae import WFVAE, tiny_wfvae_config
from mm.training import vae_fit
from mm.training.vae_fit import FitConfig, run_fit, trainable_wfvae, video_batches

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STEPS = 24
FIT = FitConfig(steps=STEPS, batch_size=2, lr=3e-3, warmup_steps=2, log_every=8, seed=0)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    root = tmp_path_factory.mktemp("vae_fit")
    data_txt = write_dataset(str(root / "ds"), num=3, frames=9, height=32, width=32, seed=3)
    data = DataConfig(data_path=data_txt, num_frames=9, min_num_frames=9, max_height=32, max_width=32,
                      num_workers=0, use_text_processer=False)
    # the tiny preset's model JSON, moved: its relative text-encoder paths must survive the rebasing
    with open(os.path.join(ROOT, "examples/tiny/model.json"), encoding="utf-8") as f:
        doc = json.load(f)
    for key in ("text_encoder", "text_encoder_2"):
        doc[key]["from_pretrained"] = os.path.join("..", "te", key)
    doc["ae"]["from_pretrained"] = None  # a random init (seeded by FitConfig.seed)
    os.makedirs(root / "cfg")
    model_json = str(root / "cfg" / "model.json")
    with open(model_json, "w", encoding="utf-8") as f:
        json.dump(doc, f)
    out = str(root / "runs" / "fit")  # two levels below the JSON's parent: relative paths must change
    result = run_fit(model_json, data, out, FIT)
    return {"result": result, "out": out, "data": data, "model_json": model_json, "root": root}


def _clips(data: DataConfig) -> torch.Tensor:
    return torch.cat(list(video_batches(data, 1, seed=0, epochs=1)))  # [3, 3, 9, 32, 32], each clip once


def test_fit_lowers_reconstruction_loss(fitted):
    history = fitted["result"].history
    assert [r["step"] for r in history] == list(range(1, STEPS + 1))
    first = sum(r["recon"] for r in history[:3]) / 3
    last = sum(r["recon"] for r in history[-3:]) / 3
    assert last < 0.6 * first, (first, last)
    assert history[-1]["psnr"] > history[0]["psnr"] + 3.0
    assert all(r["kl"] >= 0 and r["grad_norm"] > 0 for r in history)
    # the schedule warms up, peaks at lr, then decays towards lr * min_lr_ratio
    lrs = [r["lr"] for r in history]
    assert lrs[0] == pytest.approx(FIT.lr / 2) and max(lrs) == pytest.approx(FIT.lr)
    assert lrs[-1] == pytest.approx(FIT.lr * FIT.min_lr_ratio)


def test_fit_log_and_files(fitted):
    out = fitted["out"]
    assert sorted(os.listdir(out)) == ["fit_log.json", "latent_stats.json", "model.json", "wfvae.ckpt"]
    with open(os.path.join(out, "fit_log.json"), encoding="utf-8") as f:
        log = json.load(f)
    assert log["history"] == fitted["result"].history
    assert log["fit"]["steps"] == STEPS and log["init"] is None
    assert log["final"]["num_clips"] == 3 and log["final"]["psnr"] == pytest.approx(fitted["result"].psnr)


def test_checkpoint_loads_strictly_and_reproduces_encode(fitted):
    path = os.path.join(fitted["out"], "wfvae.ckpt")
    raw = torch.load(path, map_location="cpu", weights_only=True)
    assert set(raw) == {"state_dict"} and set(raw["state_dict"]) == {"gen_model"}  # the released layout
    vae = fitted["result"].vae
    loaded = WFVAE.from_upstream(tiny_wfvae_config(), checkpoint=path)  # strict keys and shapes
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())  # frozen as ever
    for key, value in vae.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    x = _clips(fitted["data"])
    # the loaded model tiles in time (exact up to float reassociation), the fitted copy does not
    torch.testing.assert_close(loaded.encode(x), vae.encode(x), rtol=0, atol=1e-5)
    torch.testing.assert_close(loaded.decode(loaded.encode(x)), vae.decode(vae.encode(x)), rtol=0, atol=1e-5)


def test_haar_kernels_stay_fixed(fitted):
    vae = fitted["result"].vae
    reference = trainable_wfvae(tiny_wfvae_config(), seed=1)
    for (name, module), ref in zip(vae.named_modules(), reference.modules()):
        if isinstance(module, HaarWaveletTransform3D):
            for p, q in zip(module.parameters(), ref.parameters()):
                assert not p.requires_grad and torch.equal(p, q), name
    trainable = [p for p in reference.parameters() if p.requires_grad]
    assert trainable and reference.training and not reference.use_tiling


def test_latent_stats_normalise_the_data(fitted):
    with open(os.path.join(fitted["out"], "latent_stats.json"), encoding="utf-8") as f:
        stats = json.load(f)
    assert set(stats) == {"scale", "shift"} and len(stats["scale"]) == len(stats["shift"]) == 32
    assert stats == {"scale": fitted["result"].scale, "shift": fitted["result"].shift}
    ae = {**tiny_wfvae_config(), **stats}
    vae = WFVAE.from_upstream(ae, checkpoint=os.path.join(fitted["out"], "wfvae.ckpt"))
    z = vae.encode(_clips(fitted["data"])).double()  # [3, 32, 2, 4, 4]
    per_channel = z.transpose(0, 1).reshape(32, -1)
    torch.testing.assert_close(per_channel.mean(dim=1), torch.zeros(32, dtype=torch.float64), rtol=0, atol=1e-4)
    torch.testing.assert_close(per_channel.std(dim=1, unbiased=False), torch.ones(32, dtype=torch.float64),
                               rtol=1e-4, atol=0)
    # the released constants do not normalise a freshly fitted VAE
    released = WFVAE.from_upstream(tiny_wfvae_config(), checkpoint=os.path.join(fitted["out"], "wfvae.ckpt"))
    off = released.encode(_clips(fitted["data"])).double().transpose(0, 1).reshape(32, -1)
    assert (off.std(dim=1, unbiased=False) - 1).abs().max() > 0.1


def test_written_model_json_picks_the_fit_up(fitted):
    original = load_model_json(fitted["model_json"])
    spec = load_model_json(os.path.join(fitted["out"], "model.json"))
    assert spec.ae_checkpoint == os.path.join(os.path.realpath(fitted["out"]), "wfvae.ckpt")
    cfg = spec.vae_config()
    assert list(cfg.scale) == fitted["result"].scale and list(cfg.shift) == fitted["result"].shift
    # relative paths of the other blocks still name the same files after the move
    assert spec.text.t5 == original.text.t5 and spec.text.clip == original.text.clip
    assert spec.predictor == original.predictor


def test_init_from_checkpoint_continues_the_fit(fitted, tmp_path):
    out = str(tmp_path / "again")
    fit = FitConfig(steps=1, batch_size=2, lr=1e-9, warmup_steps=0, stats_clips=1)
    result = run_fit(fitted["model_json"], fitted["data"], out, fit, init=os.path.join(fitted["out"], "wfvae.ckpt"))
    assert result.history[0]["recon"] < fitted["result"].history[0]["recon"] * 0.8  # starts from the fit
    assert result.history[0]["step"] == 1 and len(result.history) == 1


# ------------------------------------------------------------------ WFVAE helpers used by the fit


def test_posterior_helpers_match_encode_decode_and_carry_gradients():
    vae = trainable_wfvae(tiny_wfvae_config(), seed=0)
    x = torch.rand(2, 3, 9, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    mean, logvar = vae.encode_posterior(x)
    assert mean.shape == logvar.shape == (2, 32, 2, 2, 2) and mean.requires_grad
    assert float(logvar.detach().min()) >= -30 and float(logvar.detach().max()) <= 20
    torch.testing.assert_close(vae.encode(x), vae.normalise_latents(mean.detach()))
    sample = vae.encode(x, sample=True, generator=torch.Generator().manual_seed(7))
    expected = vae.sample_posterior(mean.detach(), logvar.detach(), torch.Generator().manual_seed(7))
    torch.testing.assert_close(sample, vae.normalise_latents(expected))
    video = vae.decode_latents(mean)
    assert video.shape == x.shape and video.requires_grad
    torch.testing.assert_close(vae.decode(vae.encode(x)), video.detach(), rtol=0, atol=1e-5)
    video.square().mean().backward()
    assert vae.encoder.conv_out.conv.weight.grad is not None and vae.decoder.conv_in.conv.weight.grad is not None


# ------------------------------------------------------------------ configuration and CLI errors


@pytest.mark.parametrize("kwargs, match", [
    ({"steps": 0}, "steps must be an int >= 1, got 0"),
    ({"batch_size": 0}, "batch_size must be an int >= 1"),
    ({"lr": 0.0}, "lr must be a finite number > 0"),
    ({"lr": float("nan")}, "lr must be a finite number"),
    ({"kl_weight": -1.0}, "kl_weight must be a finite number >= 0"),
    ({"min_lr_ratio": 2.0}, r"min_lr_ratio must be a finite number in \[0, 1\]"),
    ({"warmup_steps": -1}, "warmup_steps must be an int >= 0"),
    ({"seed": -1}, "seed must be an int >= 0"),
])
def test_fit_config_rejects(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FitConfig(**kwargs)


def _cli(args, capsys):
    with pytest.raises(SystemExit) as exc:
        vae_fit.main(args)
    return exc.value.code, capsys.readouterr()


def test_cli_help_documents_every_flag(capsys):
    code, out = _cli(["--help"], capsys)
    assert code == 0
    for flag in ("--mm-model", "--mm-data", "--out", "--steps", "--batch-size", "--lr", "--warmup-steps",
                 "--weight-decay", "--grad-clip", "--kl-weight", "--seed", "--init", "--device", "--log-every",
                 "--stats-clips"):
        assert flag in out.out, flag


def test_cli_errors(tmp_path, capsys):
    model = os.path.join(ROOT, "examples/tiny/model.json")
    data = os.path.join(ROOT, "examples/tiny/data.json")
    base = ["--out", str(tmp_path / "out")]
    code, out = _cli(["--mm-model", str(tmp_path / "nope.json"), "--mm-data", data, *base], capsys)
    assert code == 2 and "--mm-model" in out.err and "does not exist" in out.err
    code, out = _cli(["--mm-model", model, "--mm-data", str(tmp_path / "nope.json"), *base], capsys)
    assert code == 2 and "--mm-data" in out.err and "does not exist" in out.err
    code, out = _cli(["--mm-model", model, "--mm-data", data, "--init", str(tmp_path / "x.ckpt"), *base], capsys)
    assert code == 2 and "--init" in out.err and "does not exist" in out.err
    code, out = _cli(["--mm-model", model, "--mm-data", data, "--steps", "0", *base], capsys)
    assert code == 2 and "steps must be an int >= 1, got 0" in out.err
    code, out = _cli(["--mm-model", model, "--mm-data", data, "--lr", "-1", *base], capsys)
    assert code == 2 and "lr must be a finite number > 0" in out.err
    code, out = _cli(["--mm-model", model, "--mm-data", data], capsys)
    assert code == 2 and "--out" in out.err
    assert not (tmp_path / "out").exists()
