"""train_uas.py: parameter counts, official weight layouts and weight-loading errors, LoRA through
lora_linear, training-step invariants, metrics, pinned mmaction sampling/crops through the Dataset
(common.video clip reader) and end-to-end runs. Reduced Swin3D configs only, except for the parameter
count test (which builds the full Swin-B, no forward pass)."""
import argparse
import copy
import json
import re
import warnings

import numpy as np
import pytest
import torch

import train_uas as U
from common import video
from common.checkpoint import CheckpointError

SMALL = dict(embed_dim=16, depths=[2, 2], num_heads=[2, 4], window_size=[2, 4, 4], drop_path=0.1)


def small_model(num_classes=5, seed=0):
    torch.manual_seed(seed)
    return U.VideoSwin(num_classes, **SMALL)


def small_input(b=2, seed=1):
    return torch.randn(b, 3, 8, 32, 32, generator=torch.Generator().manual_seed(seed))


def randomize_lora(model, std=0.1, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * std)


# ---------------------------------------------------------------- parameter counts (spec §3.6)

def test_exact_parameter_counts_full_swin_b():
    m = U.VideoSwin(103)  # full Swin-B, no forward
    assert len(m.state_dict()) == 353  # 329 parameters + 24 relative-position index buffers
    U.set_trainable(m, "probe")
    c = U.count_params(m)
    assert c["trainable"] == 105_575 and c["frozen"] == 87_638_984
    U.set_trainable(m, "full")
    assert U.count_params(m)["trainable"] == 87_744_559
    U.add_lora(m)  # rank 32, q and v of all 24 blocks
    U.set_trainable(m, "lora")
    c = U.count_params(m)
    assert c["lora"] == 1_540_096 and c["trainable"] == 1_645_671
    per_stage = {}
    for n, p in m.named_parameters():
        if ".lora_" in n:
            per_stage[n.split(".")[1]] = per_stage.get(n.split(".")[1], 0) + p.numel()
    assert per_stage == {"0": 32_768, "2": 65_536, "4": 1_179_648, "6": 262_144}
    for nc, expected in ((12, 12_300), (7, 7_175)):
        m.head = torch.nn.Linear(1024, nc)
        U.set_trainable(m, "probe")
        assert U.count_params(m)["trainable"] == expected


def test_print_params_needs_no_data(capsys):
    U.main(["--mode", "lora", "--num-classes", "7", "--print-params", "--embed-dim", "16", "--depths", "2,2",
            "--num-heads", "2,4", "--lora-rank", "4"])
    out = capsys.readouterr().out
    # head 16*2*7 + 7 = 231; adapters 4 r (2*16 + 2*32) = 1536
    assert "trainable 1,767" in out and "lora 1,536" in out


# ---------------------------------------------------------------- Video-Swin key mapping (spec §3.2)

def test_key_mapping_examples():
    c = U.convert_video_swin_key
    assert c("backbone.patch_embed.proj.weight") == "patch_embed.proj.weight"
    assert c("backbone.norm.bias") == "norm.bias"
    assert c("backbone.layers.2.blocks.17.norm1.weight") == "features.4.17.norm1.weight"
    assert c("backbone.layers.0.blocks.1.attn.relative_position_index") == "features.0.1.attn.relative_position_index"
    assert c("backbone.layers.3.blocks.0.mlp.fc1.weight") == "features.6.0.mlp.0.weight"
    assert c("backbone.layers.3.blocks.0.mlp.fc2.bias") == "features.6.0.mlp.3.bias"
    assert c("backbone.layers.1.downsample.reduction.weight") == "features.3.reduction.weight"
    assert c("backbone.layers.2.downsample.norm.weight") == "features.5.norm.weight"
    assert c("cls_head.fc_cls.weight") == "head.weight"
    assert c("backbone.layers.2.blocks.3.attn.lora_q.lora_A.weight") == "features.4.3.attn.lora_A_q"
    assert c("backbone.layers.0.blocks.0.attn.lora_v.lora_B.weight") == "features.0.0.attn.lora_B_v"
    assert c("backbone.something_else") is None
    # mmaction2 1.x names the final norm after the last stage (norm3 for Swin-B)
    assert c("backbone.norm3.weight", last_stage=3) == "norm.weight"
    assert c("backbone.norm3.weight") is None and c("backbone.norm0.weight", last_stage=3) is None


def video_swin_state(model, depths=SMALL["depths"]):
    """A randomly initialised state dict in the ORIGINAL Video-Swin layout, written by hand from the
    spec's table (independent of the converter under test)."""
    sd = {}
    g = torch.Generator().manual_seed(7)
    own = model.state_dict()
    for k, v in own.items():
        rnd = v.clone() if v.dtype == torch.long else torch.randn(v.shape, generator=g)
        sd[k] = rnd
    out = {"backbone.patch_embed.proj.weight": sd["patch_embed.proj.weight"],
           "backbone.patch_embed.proj.bias": sd["patch_embed.proj.bias"],
           "backbone.patch_embed.norm.weight": sd["patch_embed.norm.weight"],
           "backbone.patch_embed.norm.bias": sd["patch_embed.norm.bias"],
           "backbone.norm.weight": sd["norm.weight"], "backbone.norm.bias": sd["norm.bias"],
           "cls_head.fc_cls.weight": sd["head.weight"], "cls_head.fc_cls.bias": sd["head.bias"]}
    for i, d in enumerate(depths):
        for j in range(d):
            tv, vs = f"features.{2 * i}.{j}.", f"backbone.layers.{i}.blocks.{j}."
            for a, b in (("norm1", "norm1"), ("norm2", "norm2"), ("attn.qkv", "attn.qkv"),
                         ("attn.proj", "attn.proj"), ("mlp.0", "mlp.fc1"), ("mlp.3", "mlp.fc2")):
                for p in ("weight", "bias"):
                    out[vs + b + "." + p] = sd[tv + a + "." + p]
            out[vs + "attn.relative_position_bias_table"] = sd[tv + "attn.relative_position_bias_table"]
            out[vs + "attn.relative_position_index"] = sd[tv + "attn.relative_position_index"]
        if i < len(depths) - 1:
            out[f"backbone.layers.{i}.downsample.reduction.weight"] = sd[f"features.{2 * i + 1}.reduction.weight"]
            out[f"backbone.layers.{i}.downsample.norm.weight"] = sd[f"features.{2 * i + 1}.norm.weight"]
            out[f"backbone.layers.{i}.downsample.norm.bias"] = sd[f"features.{2 * i + 1}.norm.bias"]
    assert len(out) == len(own)
    return out, sd


def to_video_swin(state):
    """torchvision keys -> Video-Swin release layout (the inverse of U.convert_video_swin)."""
    out = {}
    for k, v in state.items():
        if k.startswith("head."):
            out["cls_head.fc_cls." + k[5:]] = v
            continue
        m = re.match(r"^features\.(\d+)\.(.+)$", k)
        if not m:
            out["backbone." + k] = v
            continue
        si, rest = int(m.group(1)), m.group(2)
        if si % 2 == 1:
            out[f"backbone.layers.{si // 2}.downsample.{rest}"] = v
            continue
        j, rest = rest.split(".", 1)
        lm = re.match(r"^attn\.lora_([AB])_([qv])$", rest)
        if lm:
            rest = f"attn.lora_{lm.group(2)}.lora_{lm.group(1)}.weight"
        elif rest.startswith("mlp.0."):
            rest = "mlp.fc1." + rest[6:]
        elif rest.startswith("mlp.3."):
            rest = "mlp.fc2." + rest[6:]
        out[f"backbone.layers.{si // 2}.blocks.{j}.{rest}"] = v
    return out


def test_key_mapping_round_trip_and_load(tmp_path):
    model = small_model()
    vs, expected = video_swin_state(model)
    conv = U.convert_video_swin(vs)
    assert set(conv) == set(expected)
    assert all(torch.equal(conv[k], expected[k]) for k in conv)  # pure rename, nothing reshaped
    assert to_video_swin(conv).keys() == vs.keys()  # inverse mapping
    # an mmaction file {state_dict, meta} loads into the model; the eval forward equals a direct load
    path = tmp_path / "video_swin.pth"
    torch.save({"state_dict": vs, "meta": {"epoch": 30}}, path)
    a = small_model(seed=11)
    U.load_pretrained(a, path)
    b = small_model(seed=12)
    b.load_state_dict(expected)
    x = small_input()
    assert torch.equal(a.eval()(x), b.eval()(x))
    # convert-weights CLI writes the torchvision-key file; torchvision format loads as-is
    out = tmp_path / "tv.pth"
    U.main(["convert-weights", str(path), str(out)])
    tv = torch.load(out, weights_only=True)
    assert set(tv) == set(expected)
    c = small_model(seed=13)
    U.load_pretrained(c, out)
    assert torch.equal(c.eval()(x), b(x))


def test_bad_weights_errors(tmp_path):
    model = small_model()
    # another model (wider): error names the key and both shapes
    other = U.VideoSwin(5, **{**SMALL, "embed_dim": 32})
    p = tmp_path / "other.pth"
    torch.save(other.state_dict(), p)
    with pytest.raises(CheckpointError, match=r"patch_embed\.proj\.weight: file \(32, 3, 2, 4, 4\) vs model \(16, 3, 2, 4, 4\)"):
        U.load_pretrained(model, p)
    # nothing matches
    p2 = tmp_path / "junk.pth"
    torch.save({"encoder.weight": torch.zeros(3)}, p2)
    with pytest.raises(CheckpointError, match="no key matches"):
        U.load_pretrained(model, p2)
    # not a state dict; missing file
    p3 = tmp_path / "list.pth"
    torch.save([1, 2], p3)
    with pytest.raises(CheckpointError, match="expected a state_dict"):
        U.load_pretrained(model, p3)
    with pytest.raises(CheckpointError, match="file not found"):
        U.load_pretrained(model, tmp_path / "absent.pth")
    # a missing backbone key is an error naming it (no flag needed); --allow-partial-weights loads the rest
    sd = small_model(seed=3).state_dict()
    del sd["features.2.0.mlp.0.weight"]
    p4 = tmp_path / "partial.pth"
    torch.save(sd, p4)
    with pytest.raises(CheckpointError, match=r"1 backbone keys missing \[features\.2\.0\.mlp\.0\.weight\].*"
                                              r"--allow-partial-weights"):
        U.load_pretrained(small_model(), p4)
    m = small_model()
    before = m.features[2][0].mlp[0].weight.clone()
    _, missing, unexpected = U.load_pretrained(m, p4, allow_partial=True)
    assert missing == ["features.2.0.mlp.0.weight"] and unexpected == []
    assert torch.equal(m.features[2][0].mlp[0].weight, before)  # kept its init
    assert torch.equal(m.features[2][0].mlp[3].weight, sd["features.2.0.mlp.3.weight"])
    # an unexpected key is an error too; LoRA adapters in a probe model say which mode wants them
    torch.save({**small_model().state_dict(), "features.0.0.attn.lora_A_q": torch.zeros(4, 16)}, p4)
    with pytest.raises(CheckpointError, match=r"1 unexpected keys \[features\.0\.0\.attn\.lora_A_q\].*--mode lora"):
        U.load_pretrained(small_model(), p4)
    # a pretrained head for another class count is discarded (new task); the backbone loads
    p5 = tmp_path / "k400.pth"
    src = small_model(num_classes=400, seed=5)
    torch.save(src.state_dict(), p5)
    m = small_model(num_classes=5, seed=6)
    head_before = m.head.weight.clone()
    U.load_pretrained(m, p5)
    assert torch.equal(m.head.weight, head_before)
    assert torch.equal(m.features[2][1].attn.qkv.weight, src.features[2][1].attn.qkv.weight)


TINY4 = dict(embed_dim=8, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2], window_size=[2, 2, 2], drop_path=0.1)


def test_official_weight_layouts_give_identical_logits(tmp_path):
    """One tiny 4-stage Swin3D written in every official layout: each loads with no missing or
    unexpected key and gives the same eval logits as a direct load_state_dict."""
    torch.manual_seed(0)
    vs, expected = video_swin_state(U.VideoSwin(5, **TINY4), depths=TINY4["depths"])
    mm1 = {("backbone.norm3." + k[len("backbone.norm."):] if k.startswith("backbone.norm.") else k): v
           for k, v in vs.items()}  # mmaction2 1.x: the final norm of stage 3 is `norm3`
    assert "backbone.norm3.weight" in mm1 and "backbone.norm.weight" not in mm1
    layouts = {
        "torchvision_swin3d.pth": expected,  # torchvision swin3d_b state_dict keys
        "video_swin_release.pth": {"meta": {"epoch": 30, "config": "swin_base_patch244_window877"}, "state_dict": vs},
        "mmaction2_1x.pth": {"meta": {"epoch": 30, "mmengine_version": "0.10.4"}, "state_dict": mm1},
        "ddp_model.pth": {"model": {"module." + k: v for k, v in expected.items()}},
    }
    ref = U.VideoSwin(5, **TINY4).eval()
    ref.load_state_dict(expected)
    x = small_input()
    y = ref(x)
    for name, obj in layouts.items():
        torch.save(obj, tmp_path / name)
        torch.manual_seed(1)
        m = U.VideoSwin(5, **TINY4)
        loaded, missing, unexpected = U.load_pretrained(m, tmp_path / name)
        assert (loaded, missing, unexpected) == (len(expected), [], []), name
        assert torch.equal(m.eval()(x), y), name
    # convert-weights writes the same torchvision-key tensors from the mmaction2 1.x file
    U.main(["convert-weights", str(tmp_path / "mmaction2_1x.pth"), str(tmp_path / "tv.pth")])
    tv = torch.load(tmp_path / "tv.pth", weights_only=True)
    assert tv.keys() == expected.keys() and all(torch.equal(tv[k], expected[k]) for k in tv)
    # an mmaction2 1.x file with more out_indices (norm0 too): norm0 has no counterpart -> unexpected
    torch.save({"state_dict": {**mm1, "backbone.norm0.weight": torch.ones(8), "backbone.norm0.bias": torch.ones(8)}},
               tmp_path / "mm1_norm0.pth")
    with pytest.raises(CheckpointError, match=r"2 unexpected keys \[backbone\.norm0\.bias, backbone\.norm0\.weight\]"):
        U.load_pretrained(U.VideoSwin(5, **TINY4), tmp_path / "mm1_norm0.pth")


def test_weights_with_numpy_meta_load_and_code_is_refused(tmp_path, capsys):
    """mmaction checkpoints carry numpy objects in `meta`: they load with weights_only (allow-listed
    in common.checkpoint). A file whose pickle calls a function is refused and the call never runs;
    other globals need --trust-checkpoint, and convert-weights turns such a file into a safe one."""
    vs, expected = video_swin_state(small_model())
    meta = {"epoch": np.int64(30), "iter": np.int32(7), "lr": np.float64(3e-4), "mean": np.array([123.675, 116.28]),
            "dtype": np.dtype("float32")}
    torch.save({"state_dict": vs, "meta": meta}, tmp_path / "numpy_meta.pth")
    m = small_model(seed=4)
    assert U.load_pretrained(m, tmp_path / "numpy_meta.pth")[1:] == ([], [])
    assert torch.equal(m.norm.weight, expected["norm.weight"])

    marker = tmp_path / "payload_ran"
    torch.save({"state_dict": vs, "meta": {"hook": Payload(str(marker))}}, tmp_path / "payload.pth")
    with pytest.raises(CheckpointError, match=r"payload\.pth.*refused.*io\.open"):
        U.load_pretrained(small_model(), tmp_path / "payload.pth")
    torch.save({"model": {}, "epoch": Payload(str(marker))}, tmp_path / "resume_payload.pth")  # --resume / --eval-only
    with pytest.raises(CheckpointError, match=r"resume_payload\.pth.*refused.*io\.open"):
        U.load_training_state(tmp_path / "resume_payload.pth", small_model())
    assert not marker.exists()

    from fractions import Fraction  # harmless, but not on the allow-list
    torch.save({"state_dict": vs, "meta": {"ratio": Fraction(1, 3)}}, tmp_path / "odd_meta.pth")
    with pytest.raises(CheckpointError, match=r"odd_meta\.pth.*fractions\.Fraction.*--trust-checkpoint"):
        U.load_pretrained(small_model(), tmp_path / "odd_meta.pth")
    with pytest.raises(CheckpointError, match="fractions.Fraction"):
        U.main(["convert-weights", str(tmp_path / "odd_meta.pth"), str(tmp_path / "odd_tv.pth")])
    U.main(["convert-weights", "--trust-checkpoint", str(tmp_path / "odd_meta.pth"), str(tmp_path / "odd_tv.pth")])
    assert U.load_pretrained(small_model(), tmp_path / "odd_tv.pth")[1:] == ([], [])


class Payload:
    """Pickles as a call to open(path, "w"): a file that would create `path` when unpickled unsafely."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_cli_real_data_needs_weights_or_from_scratch(tmp_path, capsys):
    from common import config as config_lib
    with pytest.raises(SystemExit) as e:
        config_lib.run_main(U.main, ["--dataset", "mammalnet", "--data-root", str(tmp_path),
                                     "--output-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "\n" not in err
    assert err.startswith("error: no --weights given") and "--from-scratch" in err
    with pytest.raises(SystemExit):  # --from-scratch gets past the weights check to the data
        config_lib.run_main(U.main, ["--dataset", "mammalnet", "--data-root", str(tmp_path), "--from-scratch",
                                     "--output-dir", str(tmp_path / "out")])
    assert "mammalnet/train_base.txt" in capsys.readouterr().err


def test_training_checkpoint_for_other_class_count_is_an_error(tmp_path):
    args = argparse.Namespace(mode="probe", num_classes=7, weights="pretrained.pth")
    m7 = small_model(num_classes=7)
    U.set_trainable(m7, "probe")
    opt = torch.optim.AdamW([p for p in m7.parameters() if p.requires_grad])
    U.save_training_state(tmp_path / "c.pth", m7, opt, None, 1, 10, None, args)
    # with --weights the checkpoint holds only the trainable tensors (the backbone comes from the file)
    assert set(torch.load(tmp_path / "c.pth", weights_only=True)["model"]) == {"head.weight", "head.bias"}
    m5 = small_model(num_classes=5)
    U.set_trainable(m5, "probe")
    with pytest.raises(CheckpointError, match=r"head\.weight: checkpoint \(7, 32\) vs model \(5, 32\)"):
        U.load_training_state(tmp_path / "c.pth", m5)


# ---------------------------------------------------------------- LoRA (spec §3.4-3.5, §9)

def test_lora_zero_init_equals_base_and_ab_change_output():
    base = small_model().eval()
    x = small_input()
    y0 = base.forward_features(x)  # pooled features: the head is N(0, 0.01^2), too small to compare logits
    for init in ("standard", "intended"):
        lora = U.add_lora(copy.deepcopy(base), rank=4, init=init).eval()
        U.set_trainable(lora, "lora")
        assert torch.equal(lora.forward_features(x), y0)  # B = 0
    blk = lora.features[2][1].attn
    with torch.no_grad():
        blk.lora_B_q.normal_(std=0.1)
    y1 = lora.forward_features(x)
    assert (y1 - y0).abs().max() > 1e-4
    with torch.no_grad():
        blk.lora_B_q.zero_()
        blk.lora_B_v.normal_(std=0.1)
    y2 = lora.forward_features(x)
    assert (y2 - y0).abs().max() > 1e-4 and (y2 - y1).abs().max() > 1e-4
    with torch.no_grad():
        blk.lora_A_v.mul_(2.0)
    assert (lora.forward_features(x) - y2).abs().max() > 1e-4
    # official init: B != 0 from the start
    off = U.add_lora(copy.deepcopy(base), rank=4, init="official").eval()
    assert all(p.abs().sum() > 0 for n, p in off.named_parameters() if "lora_B" in n)


def test_lora_enters_through_lora_linear(monkeypatch):
    model = U.add_lora(small_model(), rank=4)
    U.set_trainable(model, "lora")
    calls = []
    real = U.ops.lora_linear
    monkeypatch.setattr(U.ops, "lora_linear", lambda *a: calls.append(a[0].shape) or real(*a))
    model(small_input())
    assert len(calls) == sum(SMALL["depths"])  # one per attention block
    # qkv.weight as a module: a forward hook would never fire (torchvision passes the tensor)
    fired = []
    for _, blk in U.attention_blocks(model):
        blk.attn.qkv.register_forward_hook(lambda *a: fired.append(1))
    model(small_input())
    assert not fired


def test_fused_weight_and_merged_agree_with_matching_grads():
    torch.manual_seed(0)
    model = U.add_lora(small_model(), rank=4).eval()
    randomize_lora(model)
    U.set_trainable(model, "lora")
    x = small_input()
    y_fused = model(x)
    y_fused.square().sum().backward()
    g_fused = {n: p.grad.clone() for n, p in model.named_parameters() if ".lora_" in n}
    model.zero_grad()
    for _, blk in U.attention_blocks(model):
        blk.attn.impl = "weight"
    y_weight = model(x)
    y_weight.square().sum().backward()
    assert (y_fused - y_weight).abs().max() < 1e-5
    for n, p in model.named_parameters():
        if ".lora_" in n:
            torch.testing.assert_close(p.grad, g_fused[n], rtol=1e-4, atol=1e-6)
            assert p.grad.abs().sum() > 0  # B != 0, so every adapter (A too) gets a gradient
    merged = U.merge_lora(copy.deepcopy(model)).eval()
    assert not any(".lora_" in k for k in merged.state_dict())
    assert set(merged.state_dict()) == set(small_model().state_dict())  # plain torchvision keys
    assert (merged(x) - y_fused).abs().max() < 1e-5
    # W_eff = W + s [BqAq; 0; BvAv]: k rows unchanged
    a = model.features[0][0].attn
    m = merged.features[0][0].attn
    c = a.qkv.in_features
    assert torch.equal(m.qkv.weight[c:2 * c], a.qkv.weight[c:2 * c])
    torch.testing.assert_close(m.qkv.weight[:c] - a.qkv.weight[:c], a.lora_B_q @ a.lora_A_q)


def make_args(mode, **kw):
    d = dict(mode=mode, lr=1e-2, backbone_lr_mult=0.1, wd=0.05, official_paramwise=False, epochs=2,
             warmup_epochs=0.5, warmup_ratio=0.1, sched_by="epoch", accum_steps=1, amp_dtype="fp16",
             use_amp=False, lp_backbone_mode="eval", num_classes=5)
    d.update(kw)
    return argparse.Namespace(**d)


def one_step(model, args):
    opt = U.build_optimizer(model, args)
    env = argparse.Namespace(device=torch.device("cpu"))
    batch = (small_input(4), torch.tensor([0, 1, 2, 3]), torch.arange(4))
    U.train_one_epoch(model, [(batch, 0)], opt, None, args, env, 0, 0, 1)
    return opt


def test_probe_step_leaves_backbone_unchanged():
    model = small_model()
    U.set_trainable(model, "probe")
    before = copy.deepcopy(model.state_dict())
    opt = one_step(model, make_args("probe"))
    assert [g["name"] for g in opt.param_groups] == ["head"]
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"head.weight", "head.bias"}


def test_lora_step_changes_only_adapters_and_head():
    model = U.add_lora(small_model(), rank=4)
    U.set_trainable(model, "lora")
    before = copy.deepcopy(model.state_dict())
    opt = one_step(model, make_args("lora"))
    groups = {g["name"]: g for g in opt.param_groups}
    assert set(groups) == {"head", "backbone"}
    assert groups["backbone"]["lr_mult"] == 0.1  # LoRA at lr x 0.1 (spec §5)
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    # B starts at 0, so A's gradient is exactly 0 at step 0; AdamW weight decay still moves A
    assert changed == {k for k in before if ".lora_" in k or k.startswith("head.")}


def test_lr_schedule_warmup_and_cosine():
    a = make_args("probe", epochs=30, warmup_epochs=2.5)
    n = 10  # loader iterations per epoch
    assert U.lr_factor(0, n, a) == pytest.approx(0.1)
    assert U.lr_factor(12, n, a) == pytest.approx(0.5 * (1 + np.cos(np.pi / 30)) * (1 - (1 - 12 / 25) * 0.9))
    assert U.lr_factor(25, n, a) == pytest.approx(0.5 * (1 + np.cos(2 * np.pi / 30)))
    assert U.lr_factor(299, n, a) == pytest.approx(0.5 * (1 + np.cos(29 * np.pi / 30)))


# ---------------------------------------------------------------- metrics (spec §6)

def test_metrics_against_hand_values():
    scores = torch.tensor([[0.7, 0.2, 0.1], [0.6, 0.3, 0.1], [0.2, 0.5, 0.3], [0.1, 0.3, 0.6]])
    labels = torch.tensor([0, 1, 1, 0])
    m = U.compute_metrics(scores, labels, 3)
    # class 0: ranking by score 0.7(+) 0.6(-) 0.2(-) 0.1(+) -> AP = (1/1 + 2/4)/2 = 0.75
    # class 1: ranking 0.5(+) 0.3(+) 0.3(-) 0.2(-) (stable ties: index 1 before 3) -> AP = 1
    # class 2: no positives -> dropped
    assert m["mAP"] == pytest.approx(0.875)
    assert m["top1"] == pytest.approx(0.5)  # preds 0,0,1,2
    assert m["top5"] == pytest.approx(1.0)
    assert m["mean_class"] == pytest.approx(0.5)  # class 0: 1/2, class 1: 1/2
    # mmaction quirk: union of GT and predicted labels, predicted-but-absent class 2 scores 0
    assert U.compute_metrics(scores, labels, 3, "mmaction")["mean_class"] == pytest.approx(1 / 3)


# ---------------------------------------------------------------- data (spec §2)

def test_read_list_last_whitespace_and_label_checks(tmp_path):
    f = tmp_path / "l.txt"
    f.write_text("abseiling/a b_000001.mp4 3\n\nx/y.mp4 0\n")
    assert U.read_list(f, 4) == [("abseiling/a b_000001.mp4", 3), ("x/y.mp4", 0)]
    with pytest.raises(ValueError, match=r"l\.txt:1: label 3 out of range \[0, 3\)"):
        U.read_list(f, 3)
    f.write_text("no_label.mp4\n")
    with pytest.raises(ValueError, match="expected '<relative/path.mp4> <label>'"):
        U.read_list(f, 3)


def test_sample_frames_matches_mmaction():
    # ChimpBehave 20-frame clip, L=32: tau=1 -> 0..19 then 0..11; tau=2 -> 0,2,..,18 repeated
    assert U.clip_indices(0, 20, 32, 1).tolist() == list(range(20)) + list(range(12))
    assert U.clip_indices(0, 20, 32, 2).tolist() == list(range(0, 20, 2)) * 3 + [0, 2]
    assert U.sample_offsets(20, 32, 2, train=False, num_clips=4) == [0, 0, 0, 0]
    # F=300, S=64, K=4: g = 237/4, o_k = floor(k g + g/2)
    g = 237 / 4
    assert U.sample_offsets(300, 32, 2, train=False, num_clips=4) == [int(k * g + g / 2) for k in range(4)]
    rng = np.random.default_rng(0)
    offs = [U.sample_offsets(100, 32, 2, train=True, rng=rng)[0] for _ in range(300)]
    assert min(offs) >= 0 and max(offs) <= 36 and len(set(offs)) > 20
    assert U.sample_offsets(50, 32, 2, train=True, rng=rng) == [0]


def test_sample_frames_pinned_offsets():
    """Pinned mmaction SampleFrames offsets (L=32): test K=4 at tau=2, one centre clip at tau=1."""
    pins = {20: [0, 0, 0, 0], 63: [0, 0, 0, 0], 64: [0, 0, 0, 0], 65: [0, 0, 1, 1], 100: [4, 13, 23, 32],
            300: [29, 88, 148, 207], 1000: [117, 351, 585, 819]}
    centre = {20: 0, 63: 16, 64: 16, 65: 17, 100: 34, 300: 134, 1000: 484}
    for n, offs in pins.items():
        assert U.sample_offsets(n, 32, 2, train=False, num_clips=4) == offs
        assert U.sample_offsets(n, 32, 1, train=False, num_clips=1) == [centre[n]]
    rng = np.random.default_rng(0)
    assert [U.sample_offsets(300, 32, 2, train=True, rng=rng)[0] for _ in range(6)] == [201, 150, 121, 63, 72, 9]
    assert U.clip_indices(5, 40, 32, 2).tolist() == list(range(5, 40, 2)) + list(range(1, 28, 2))


def write_coded_video(path, frames, h, w):
    """A lossless (FFV1, RGB) video whose pixels say where they come from: R = 8 x frame index,
    G = x, B = y. Decoded clips can then be read back into frame indices and crop boxes."""
    import av
    with av.open(str(path), "w") as c:
        s = c.add_stream("ffv1", rate=10)
        s.width, s.height, s.pix_fmt = w, h, "bgr0"
        for t in range(frames):
            img = np.zeros((h, w, 3), np.uint8)
            img[..., 0], img[..., 1], img[..., 2] = 8 * t, np.arange(w)[None], np.arange(h)[:, None]
            for p in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


def read_coded_view(view, h, w):
    """(C,T,H,W) normalised view of an h x w coded video -> (frame indices, (y0, x0, ch, cw) box,
    flipped). The box is the one whose bilinear resize of the G/B ramps matches the view within
    half a grey level (output column j samples x0 + (j + 0.5) cw / n - 0.5, clamped to the box)."""
    px = (view * torch.tensor(U.STD).view(3, 1, 1, 1) + torch.tensor(U.MEAN).view(3, 1, 1, 1)).double()
    frames = [int(round(float(f) / 8)) for f in px[0, :, 0, 0]]
    x, y = px[1, 0, 0, :], px[2, 0, :, 0]
    flipped = bool(x[-1] < x[0])

    def box(line, size):
        j, v = np.arange(line.numel()), line.numpy()
        err, x0, cw = min((np.abs(v - (x0 + np.clip((j + 0.5) * cw / len(j) - 0.5, 0, cw - 1))).max(), x0, cw)
                          for cw in range(1, size + 1) for x0 in range(size - cw + 1))
        assert err <= 0.51, f"no crop box explains the view (best error {err})"
        return x0, cw

    (x0, cw), (y0, ch) = box(x.flip(0) if flipped else x, w), box(y, h)
    return frames, (y0, x0, ch, cw), flipped


@pytest.fixture(scope="module")
def coded_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("uas_coded")
    write_coded_video(root / "a.mkv", 20, 24, 40)   # F=20 > S=16
    write_coded_video(root / "b.mkv", 12, 24, 40)   # F=12 < S: the loop wrap, identical test clips
    write_coded_video(root / "c.mkv", 20, 40, 24)   # portrait: ThreeCrop along the height
    (root / "l.txt").write_text("a.mkv 0\nb.mkv 1\nc.mkv 2\n")
    return root


CODED = dict(clip_len=8, frame_interval=2, short_side=24, crop_size=24, test_short_side=24, seed=0)
# (epoch, index) -> (frame indices, RandomResizedCrop box (y0, x0, h, w) on the 24x40 frame, flipped)
TRAIN_PINS = {
    (0, 0): ([4, 6, 8, 10, 12, 14, 16, 18], (3, 1, 20, 16), False),
    (0, 1): ([0, 2, 4, 6, 8, 10, 0, 2], (2, 11, 22, 21), True),
    (0, 2): ([1, 3, 5, 7, 9, 11, 13, 15], (13, 1, 20, 23), False),
    (1, 0): ([2, 4, 6, 8, 10, 12, 14, 16], (2, 3, 22, 26), True),
    (1, 1): ([0, 2, 4, 6, 8, 10, 0, 2], (7, 7, 15, 19), False),
    (1, 2): ([2, 4, 6, 8, 10, 12, 14, 16], (22, 4, 16, 20), True),
}


def test_dataset_pinned_train_indices_boxes_and_flips(coded_data):
    ds = U.VideoListDataset(coded_data, coded_data / "l.txt", 3, "train", **CODED)
    for (epoch, index), pin in TRAIN_PINS.items():
        ds.epoch = epoch
        clip, label, idx = ds[index]
        assert clip.shape == (3, 8, 24, 24) and (label, idx) == (index, index)
        assert read_coded_view(clip, *((24, 40) if index < 2 else (40, 24))) == pin, (epoch, index)


def test_dataset_pinned_val_and_test_views(coded_data):
    val = U.VideoListDataset(coded_data, coded_data / "l.txt", 3, "val", **CODED)
    centre = [([2, 4, 6, 8, 10, 12, 14, 16], (0, 8, 24, 24)), ([0, 2, 4, 6, 8, 10, 0, 2], (0, 8, 24, 24)),
              ([2, 4, 6, 8, 10, 12, 14, 16], (8, 0, 24, 24))]
    for i, (frames, box) in enumerate(centre):
        views = val[i][0]
        assert views.shape == (1, 3, 8, 24, 24)
        assert read_coded_view(views[0], *((24, 40) if i < 2 else (40, 24))) == (frames, box, False)
    test = U.VideoListDataset(coded_data, coded_data / "l.txt", 3, "test", test_clips=2, test_crops=3, **CODED)
    clips = {0: [[1, 3, 5, 7, 9, 11, 13, 15], [3, 5, 7, 9, 11, 13, 15, 17]],   # o_k = floor(k g + g/2), g = 5/2
             1: [[0, 2, 4, 6, 8, 10, 0, 2]] * 2, 2: [[1, 3, 5, 7, 9, 11, 13, 15], [3, 5, 7, 9, 11, 13, 15, 17]]}
    crops = {0: [(0, 0), (0, 8), (0, 16)], 1: [(0, 0), (0, 8), (0, 16)], 2: [(0, 0), (8, 0), (16, 0)]}
    for i in range(3):
        views = test[i][0]
        assert views.shape == (6, 3, 8, 24, 24)
        got = [read_coded_view(v, *((24, 40) if i < 2 else (40, 24))) for v in views]
        for k in range(2):  # clip k: its 3 crops (ThreeCrop at short side = crop: the whole short side)
            per_clip = got[3 * k:3 * k + 3]
            assert all(g[0] == clips[i][k] and not g[2] for g in per_clip)
            assert sorted(g[1][:2] for g in per_clip) == crops[i] and all(g[1][2:] == (24, 24) for g in per_clip)


def test_mmaction_transforms_in_common_video():
    """The mmaction semantics UAS uses from common.video (uint8 until the final normalise)."""
    clip = torch.from_numpy(np.stack([np.broadcast_to(np.arange(41, dtype=np.uint8)[None, :, None], (24, 41, 3))] * 2))
    # ThreeCrop at short side = crop: mmaction's order (start, end, middle); end at 2 * ((41 - 24) // 2) = 16
    crops = video.mmaction_three_crop(clip, 24)
    assert [int(c[0, 0, 0, 0]) for c in crops] == [0, 16, 8] and all(c.shape == (2, 24, 24, 3) for c in crops)
    portrait = video.mmaction_three_crop(clip.transpose(1, 2), 24)
    assert [int(c[0, 0, 0, 0]) for c in portrait] == [0, 16, 8]  # along the height
    with pytest.raises(ValueError, match="smaller than crop 32"):
        video.mmaction_three_crop(clip, 32)
    # resize: bilinear with half-pixel centres, no antialias (cv2 INTER_LINEAR), back to uint8
    noise = torch.randint(0, 256, (2, 24, 41, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    small = video.mmaction_resize(noise, (8, 13))
    assert small.dtype == torch.uint8 and small.shape == (2, 8, 13, 3)
    ref = torch.nn.functional.interpolate(noise.permute(0, 3, 1, 2).float(), size=(8, 13), mode="bilinear",
                                          align_corners=False).round().permute(0, 2, 3, 1)
    assert torch.equal(small.float(), ref)
    assert not torch.equal(small, video.resize(noise, (8, 13)))  # the torchvision-style resize antialiases
    assert video.mmaction_resize(noise, (24, 41)) is noise
    # RandomResizedCrop: one box per clip, resized to size x size; the centre square after 10 misses
    out = video.mmaction_random_resized_crop(clip, 16, rng=np.random.default_rng(0))
    assert out.shape == (2, 16, 16, 3) and torch.equal(out[0], out[1])
    assert video.random_resized_box(24, 41, scale=(2.0, 3.0), rng=np.random.default_rng(0)) == (0, 8, 24, 24)
    # mmaction Normalize in 0-255 units, NCTHW
    mean, std = torch.tensor(U.MEAN).view(3, 1, 1, 1), torch.tensor(U.STD).view(3, 1, 1, 1)
    y = U.normalize(noise)
    assert y.shape == (3, 2, 24, 41) and torch.allclose(y, (noise.permute(3, 0, 1, 2).float() - mean) / std, atol=1e-5)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    from common.data.uas_synth import make_dataset
    root = tmp_path_factory.mktemp("uas_synth")
    return make_dataset(root, num_classes=3, per_class=3, frames=8, size=32, seed=0, corrupt=1)


def test_dataset_views_and_corrupt_skip(tiny_data):
    kw = dict(clip_len=4, frame_interval=2, short_side=36, crop_size=32, test_short_side=32)
    train = U.VideoListDataset(tiny_data["root"], tiny_data["train"], 3, "train", **kw)
    assert len(train) == 10 and train.class_histogram() == [4, 3, 3]
    clip, label, idx = train[0]
    assert clip.shape == (3, 4, 32, 32) and clip.dtype == torch.float32 and label == 0
    with pytest.warns(UserWarning, match="corrupt_0.mp4"):
        assert train[9] is None
    (batch, skipped) = video.collate_skip_none([train[0], None, train[1]])
    assert batch[0].shape == (2, 3, 4, 32, 32) and skipped == 1
    strict = U.VideoListDataset(tiny_data["root"], tiny_data["train"], 3, "train", strict=True, **kw)
    with pytest.raises(video.VideoDecodeError, match="corrupt_0.mp4"):
        strict[9]
    test = U.VideoListDataset(tiny_data["root"], tiny_data["test"], 3, "test", test_clips=2, test_crops=3, **kw)
    views, _, _ = test[0]
    assert views.shape == (6, 3, 4, 32, 32)
    assert not torch.equal(views[0], views[2])  # ThreeCrop on a 32x40 frame: left vs right crop


def test_train_end_to_end_tiny(tiny_data, tmp_path):
    """The real train() path on generated PyAV files: LoRA, 1 epoch, outputs written, bad file counted."""
    out = tmp_path / "run"
    flags = ["--dataset", "custom", "--train-root", tiny_data["root"], "--val-root", tiny_data["root"],
             "--train-list", tiny_data["train"], "--val-list", tiny_data["val"], "--test-list", tiny_data["test"],
             "--num-classes", "3", "--output-dir", str(out), "--mode", "lora", "--from-scratch", "--epochs", "1",
             "--batch-size", "5", "--accum-steps", "1", "--workers", "0", "--device", "cpu", "--clip-len", "4",
             "--frame-interval", "1", "--short-side", "32", "--crop-size", "32", "--test-short-side", "32",
             "--test-clips", "1", "--test-crops", "3", "--views-per-forward", "3", "--embed-dim", "16",
             "--depths", "2,2", "--num-heads", "2,4", "--window-size", "2,4,4", "--lora-rank", "4",
             "--merge-lora", "--val-every", "1"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = U.main(flags)
    assert res["n_videos"] == 3 and res["views"] == 3 and 0 <= res["top1"] <= 1
    rec = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert rec[0]["skipped_videos"] == 1 and "val_top1" in rec[0]
    for f in ("config.yaml", "checkpoint.pth", "best.pth", "results.json", "test_scores.npy", "test_preds.csv",
              "trainable_params.txt", "model_merged.pth", "plots/confusion.png", "plots/per_class_accuracy.png"):
        assert (out / f).is_file(), f
    ck = torch.load(out / "checkpoint.pth", weights_only=True)
    # --from-scratch: the frozen backbone cannot come from --weights, so the checkpoint holds everything
    assert any(".lora_" in k for k in ck["model"]) and "features.0.0.attn.qkv.weight" in ck["model"]
    assert int((out / "trainable_params.txt").read_text().split()[0]) == res["trainable_params"]
    # the resolved config.yaml reloads through --config (flag names only, lists kept)
    from common import config as config_lib
    again = config_lib.parse_args(U.get_parser(), ["--config", str(out / "config.yaml")])
    assert again.depths == [2, 2] and again.window_size == [2, 4, 4] and again.train_list == tiny_data["train"]
    merged = torch.load(out / "model_merged.pth", weights_only=True)
    assert "features.0.0.attn.qkv.weight" in merged and not any("lora" in k for k in merged)


def test_k700diff_list_from_annotation_csv(tmp_path, tiny_data):
    csv_path = tmp_path / "validate.csv"
    csv_path.write_text("label,youtube_id,time_start,time_end,split\n"
                        "arresting,abc,10,20,validate\n"
                        "abseiling,zzz,0,10,validate\n"          # a K600 class: dropped
                        "waxing armpits,def,5,15,validate\n"
                        "\"bouncing ball (not juggling)\",ghi,0,10,validate\n")
    root = tmp_path / "val"
    for rel in ("arresting/abc_000010_000020.mp4", "bouncing ball (not juggling)/ghi_000000_000010.mp4"):
        (root / rel).parent.mkdir(parents=True)
        (root / rel).write_bytes(b"x")
    n, missing = U.make_k700diff_list(csv_path, root, tmp_path / "k700_diff_val.txt")
    assert n == 2 and missing == ["waxing armpits/def_000005_000015.mp4"]
    items = U.read_list(tmp_path / "k700_diff_val.txt", 103)
    assert items == [("arresting/abc_000010_000020.mp4", 0), ("bouncing ball (not juggling)/ghi_000000_000010.mp4", 5)]
    assert U.K700_DIFF_CLASSES[102] == "waxing armpits" and len(set(U.K700_DIFF_CLASSES)) == 103


def test_resume_continues_exactly(tiny_data, tmp_path):
    base = ["--dataset", "custom", "--train-root", tiny_data["root"], "--val-root", tiny_data["root"],
            "--train-list", tiny_data["train"], "--val-list", tiny_data["val"], "--test-list", tiny_data["test"],
            "--num-classes", "3", "--mode", "lora", "--from-scratch", "--batch-size", "4", "--accum-steps", "1",
            "--workers", "0", "--device", "cpu", "--clip-len", "4", "--short-side", "32", "--crop-size", "32",
            "--test-short-side", "32", "--test-clips", "1", "--test-crops", "1", "--embed-dim", "16",
            "--depths", "1,1", "--num-heads", "2,4", "--window-size", "2,4,4", "--lora-rank", "2", "--lr", "1e-2",
            "--warmup-epochs", "0.5"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        U.main(base + ["--output-dir", str(tmp_path / "a"), "--epochs", "2"])
        U.main(base + ["--output-dir", str(tmp_path / "b"), "--epochs", "1"])
        U.main(base + ["--output-dir", str(tmp_path / "b"), "--epochs", "2", "--resume", "auto"])
    a = torch.load(tmp_path / "a" / "checkpoint.pth", weights_only=True)
    b = torch.load(tmp_path / "b" / "checkpoint.pth", weights_only=True)
    assert a["epoch"] == b["epoch"] == 2 and a["step"] == b["step"]
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


def test_uas_lora_checkpoint_adapters_load(tmp_path):
    """A UAS LoRA checkpoint in the Video-Swin layout (…attn.lora_q.lora_A.weight) restores the adapters."""
    src = U.add_lora(small_model(), rank=4)
    randomize_lora(src)
    vs = to_video_swin(src.state_dict())
    assert "backbone.layers.1.blocks.1.attn.lora_v.lora_B.weight" in vs
    torch.save({"state_dict": vs}, tmp_path / "uas_lora.pth")
    dst = U.add_lora(small_model(seed=9), rank=4)
    U.load_pretrained(dst, tmp_path / "uas_lora.pth")
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v), k
    wrong_rank = U.add_lora(small_model(seed=9), rank=8)
    with pytest.raises(CheckpointError, match=r"lora_A_q: file \(4, 16\) vs model \(8, 16\)"):
        U.load_pretrained(wrong_rank, tmp_path / "uas_lora.pth")
