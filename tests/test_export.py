"""`soe export`: adapters that load with each family's standard diffusers / peft call and give the
outputs of soe's LoRA'd expert (alpha != r included), ComfyUI key naming, merged folders that load
with no LoRA machinery, and runs that start from existing LoRA files (`lora.init_from`)."""
import contextlib
import copy
import json

import pytest
import torch
from conftest import batch_for
from omegaconf import OmegaConf
from safetensors import safe_open

from soe.cli import main
from soe.interop.export import export_run, load_stitched
from soe.recipe.builders import build_stitcher
from soe.recipe.reading import merge_recipe
from soe.train.build import apply_training_setup
from soe.train.trained import export_trained

INJECT = {  # UniVerse-1's fusion on tiny experts (as tests/test_universe1.py)
    "b_to_a": dict(mode="attention_kv", tap="after_self_attn", targets=[
        dict(attention="attn1", mode="parallel", window=True, pre_norm="norm1", copy_from="attn2", cfg_mask=False),
        dict(attention="attn2", mode="concat", pre_norm="norm2", rope="complex", rope_query=True, copy_from="attn2")]),
    "a_to_b": dict(mode="attention_kv", tap="cross_attn_input", targets=[dict(attention="cross_attn", rope="cat", rope_theta=1e6)]),
}


def recipe(tmp_path, a="wan2.1", b="ace-step-1.5", lora_a=(4, 12.0), lora_b=(2, 2.0), stitch=None, **experts):
    def side(name, lora):
        e = {"name": name, "preset": "tiny", "train": "lora" if lora else "frozen", **experts.get(name, {})}
        if lora:
            e["lora"] = {"r": lora[0], "alpha": lora[1]}
        return e

    raw = {"name": "x", "run_dir": str(tmp_path / "run"), "experts": {"a": side(a, lora_a), "b": side(b, lora_b)},
           "stitch": stitch or {"pairs": "linear", "direction": "both"}, "data": {"seconds": 1.0},
           "sample": {"steps": 2, "decode": "synthetic_preview", "seconds": 1.0}}
    return merge_recipe(OmegaConf.create(raw))


def trained_run(cfg):
    """What `soe stitch` leaves behind (recipe.yaml + trained/), with non-zero LoRA and connector weights,
    and copies of the experts' models before LoRA (the 'fresh diffusers model' to load adapters into)."""
    torch.manual_seed(0)
    st = build_stitcher(cfg)
    bases = {s: copy.deepcopy(getattr(st, s).model) for s in ("a", "b")}
    apply_training_setup(st, cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in st.named_parameters():
            if p.requires_grad:  # LoRA B starts at zero, connectors' output layers too: make them matter
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    st.eval()
    run = cfg.run_dir
    export_trained(st, f"{run}/trained", {s: cfg.experts[s].train for s in ("a", "b")})
    OmegaConf.save(cfg, f"{run}/recipe.yaml", resolve=True)
    return st, bases


@contextlib.contextmanager
def model_swapped(expert, model):
    old = expert.model
    expert.model = model
    try:
        yield expert
    finally:
        expert.model = old


def outputs_match(expert, model, seed=0):
    batch = batch_for(expert, 2, 1.0, seed=seed)
    with torch.no_grad():
        ref = expert(batch)
        with model_swapped(expert, model.eval()) as e:
            got = e(batch)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    return ref


def test_diffusers_export_loads_with_wan_and_ace_step_15_standard_calls(tmp_path):
    from diffusers import WanPipeline
    from diffusers.schedulers import FlowMatchEulerDiscreteScheduler

    cfg = recipe(tmp_path)  # wan: r 4, alpha 12 (alpha != r); ace-step-1.5: r 2, alpha 2
    st, bases = trained_run(cfg)
    assert main(["export", cfg.run_dir, "--format", "diffusers", "--out", str(tmp_path / "out")]) == 0
    with safe_open(tmp_path / "out/lora_a/pytorch_lora_weights.safetensors", "pt") as f:
        assert all(k.startswith("transformer.blocks.") for k in f.keys())  # what load_lora_weights filters on
        assert json.loads(f.metadata()["lora_adapter_metadata"])["transformer.lora_alpha"] == 12.0

    wan = bases["a"]  # the pipeline's standard call, on a pipeline holding only the transformer
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=FlowMatchEulerDiscreteScheduler(), transformer=wan)
    pipe.load_lora_weights(tmp_path / "out/lora_a", adapter_name="exported")
    assert wan.peft_config["exported"].lora_alpha == 12.0 and wan.peft_config["exported"].r == 4
    ref = outputs_match(st.a, wan)
    with torch.no_grad(), model_swapped(st.a, copy.deepcopy(bases["a"])) as plain:
        plain.model.delete_adapters("exported")
        assert (plain(batch_for(st.a, 2, 1.0, seed=0)) - ref).abs().max() > 1e-3  # the adapter matters

    ace = bases["b"]
    ace.load_lora_adapter(str(tmp_path / "out/lora_b"), weight_name="pytorch_lora_weights.safetensors",
                          adapter_name="exported")  # default prefix "transformer"
    outputs_match(st.b, ace)


def test_diffusers_export_ace_step_v1_file_and_stable_audio_peft(tmp_path):
    from peft import PeftModel

    cfg = recipe(tmp_path, a="ace-step", b="stable-audio-open", lora_a=(4, 2.0), lora_b=(3, 6.0),
                 stitch={"pairs": "linear", "direction": "a_to_b"}, **{"ace-step": {"options": {"sample_rate": 25600}}})
    st, bases = trained_run(cfg)
    out = export_run(cfg.run_dir, "diffusers", tmp_path / "out")
    # ACE-Step v1's pipeline: <dir>/pytorch_lora_weights.safetensors, bare keys, load_lora_adapter(prefix=None)
    v1 = bases["a"]
    v1.load_lora_adapter(str(out / "lora_a/pytorch_lora_weights.safetensors"), adapter_name="ace_step_lora", prefix=None)
    assert v1.peft_config["ace_step_lora"].r == 4  # alpha 2 != r 4: folded into lora_B, since this call reads no alpha
    outputs_match(st.a, v1)
    # Stable Audio has no diffusers LoRA loader: peft's own format and call
    sa = PeftModel.from_pretrained(bases["b"], out / "lora_b")
    assert sa.peft_config["default"].lora_alpha == 6.0 and sa.peft_config["default"].r == 3
    outputs_match(st.b, sa.base_model.model)
    index = json.loads((out / "export.json").read_text())["adapters"]
    assert index["lora_b"]["file"] == "adapter_model.safetensors" and "PeftModel" in index["lora_b"]["load"]


def test_comfyui_export_follows_the_loader_naming_rules(tmp_path):
    """ComfyUI's loader (comfy/lora.py) maps `diffusion_model.<module>` of its Wan model (original Wan
    names) to `<module>.weight`, reads `<key>.lora_up.weight` / `.lora_down.weight` and `<key>.alpha`, and
    adds alpha / rank * up @ down. Checked here on the file, and independently through diffusers' own
    converter of non-diffusers Wan LoRAs, loaded into a fresh model."""
    from diffusers.loaders import WanLoraLoaderMixin

    cfg = recipe(tmp_path, lora_b=None)
    st, bases = trained_run(cfg)
    out = export_run(cfg.run_dir, "comfyui", tmp_path / "out")
    file = out / "lora_a_wan2.1.safetensors"
    with safe_open(file, "pt") as f:
        keys = set(f.keys())
        sd = {k: f.get_tensor(k) for k in keys}
    assert "diffusion_model.blocks.0.self_attn.q.lora_down.weight" in keys
    assert "diffusion_model.blocks.3.cross_attn.o.lora_up.weight" in keys
    assert "diffusion_model.blocks.1.ffn.0.alpha" in keys and "diffusion_model.blocks.1.ffn.2.lora_up.weight" in keys
    modules = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in keys}
    for m in modules:  # every module has down, up and a scalar alpha of 12, nothing else
        assert {f"{m}.lora_down.weight", f"{m}.lora_up.weight", f"{m}.alpha"} <= keys and sd[f"{m}.alpha"].item() == 12.0
    assert len(keys) == 3 * len(modules) == 3 * 4 * 10  # 4 blocks x (4 self + 4 cross attention + 2 ffn)
    # ComfyUI's arithmetic on one weight: W + alpha / rank * up @ down equals peft's merged weight
    q = st.a.model.blocks[0].attn1.to_q
    down, up = sd["diffusion_model.blocks.0.self_attn.q.lora_down.weight"], sd["diffusion_model.blocks.0.self_attn.q.lora_up.weight"]
    torch.testing.assert_close(q.base_layer.weight + 12.0 / down.shape[0] * up @ down,
                               q.base_layer.weight + q.get_delta_weight("soe"))
    converted = WanLoraLoaderMixin.lora_state_dict(str(file))
    wan = bases["a"]
    wan.load_lora_adapter(converted, adapter_name="comfy")
    outputs_match(st.a, wan)


def test_comfyui_export_refuses_families_comfyui_names_differently(tmp_path, capsys):
    cfg = recipe(tmp_path, lora_a=None)  # only ace-step-1.5 trained a LoRA
    trained_run(cfg)
    assert main(["export", cfg.run_dir, "--format", "comfyui", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "expert 'ace-step-1.5' (experts.b) has no ComfyUI naming" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_merged_export_equals_the_unmerged_stitch_and_has_no_lora(tmp_path):
    cfg = recipe(tmp_path, b="ace-step", stitch={"pairs": "identity", "depth": {"mode": "insert_interpolated", "every": 1},
                                                 "inject": INJECT, "connector": {"init": "trunc_normal"}},
                 **{"ace-step": {"options": {"sample_rate": 25600}}})
    st, _ = trained_run(cfg)
    out = export_run(cfg.run_dir, "merged", tmp_path / "merged")
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "expert_a", "expert_b", "recipe.yaml", "stitch.safetensors"]  # + the model card
    with safe_open(out / "stitch.safetensors", "pt") as f:
        kinds = {k.split(".")[0] + "." + k.split(".")[1] for k in f.keys()}
    assert {"connectors.a_to_b", "connectors.b_to_a", "fusion.inserted", "fusion.kv"} <= kinds, kinds
    loaded = load_stitched(out)
    assert not any("lora" in n for n, _ in loaded.named_parameters())
    ba, bb = batch_for(st.a, 2, 1.0, seed=5), batch_for(st.b, 2, 1.0, seed=6)
    with torch.no_grad():
        ref, got = st(ba, bb), loaded(ba, bb)
    for r, g in zip(ref, got):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_generate_loads_a_merged_folder(tmp_path):
    from safetensors.torch import save_file

    cfg = recipe(tmp_path)
    st, _ = trained_run(cfg)
    out = export_run(cfg.run_dir, "merged", tmp_path / "merged")
    g = torch.Generator().manual_seed(0)  # experts with real weights take precomputed conditioning
    save_file({f"{s}/{k}": v.contiguous() for s in ("a", "b") for k, v in getattr(st, s).conditioning(1, 1.0, g).items()},
              tmp_path / "cond.safetensors")
    argv = ["generate", str(out / "recipe.yaml"), f"ckpt={out}", f"out={tmp_path / 's'}", "steps=2", f"conditions={tmp_path / 'cond.safetensors'}"]
    assert main(argv) == 0
    assert (tmp_path / "s" / "sample_00.mp4").is_file()


def test_export_bad_inputs_are_one_line(tmp_path, capsys):
    assert main(["export", str(tmp_path), "--format", "diffusers"]) == 2
    assert "is not a run folder" in capsys.readouterr().err
    cfg = recipe(tmp_path)
    trained_run(cfg)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("keep")
    assert main(["export", cfg.run_dir, "--format", "diffusers", "--out", str(tmp_path / "taken")]) == 2
    assert "already exists" in capsys.readouterr().err and (tmp_path / "taken" / "x").read_text() == "keep"


@pytest.mark.parametrize("fmt", ["diffusers", "comfyui"])
def test_a_run_starts_from_exported_lora_files(tmp_path, fmt):
    """`experts.a.lora.init_from` (a community Wan LoRA, diffusers or ComfyUI format): the new run's
    expert starts as the LoRA'd expert the file came from, with its rank and alpha."""
    cfg = recipe(tmp_path, lora_b=None)
    st, _ = trained_run(cfg)
    out = export_run(cfg.run_dir, fmt, tmp_path / "out")
    src = out / ("lora_a" if fmt == "diffusers" else "lora_a_wan2.1.safetensors")
    cfg2 = recipe(tmp_path / "second", lora_a=(8, 8.0), lora_b=None)  # r/alpha of the file win
    cfg2.experts.a.lora.init_from = str(src)
    torch.manual_seed(0)
    st2 = build_stitcher(cfg2)
    apply_training_setup(st2, cfg2)
    assert st2.a.model.peft_config["soe"].r == 4 and st2.a.model.peft_config["soe"].lora_alpha == 12.0
    trainable = {n for n, p in st2.a.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    outputs_match(st.a, st2.a.model.eval())


def test_init_from_a_lora_of_another_model_fails_in_one_line(tmp_path, capsys):
    cfg = recipe(tmp_path, lora_a=None)  # ace-step-1.5 LoRA ...
    trained_run(cfg)
    out = export_run(cfg.run_dir, "diffusers", tmp_path / "out")
    argv = ["inspect", "demo", f"experts.a.lora.init_from={out / 'lora_b'}"]  # ... into wan2.1
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "experts.a.lora.init_from:" in err and "does not have" in err and len(err.strip().splitlines()) == 1
