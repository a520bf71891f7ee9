"""Hugging Face checkpoints in and out (minivit/hf.py, through models.load_pretrained): a folder written here with
transformers' names (mapped by this test's own table, not hf.py's) must give what the independent functional ViT of
test_vit.py computes from the official names; export -> load round-trips exactly; config.json mismatches are
one-line errors. With transformers installed, also against its ViTModel, both ways."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from minivit import hf
from minivit.tools import export_hf
from minivit.models import build_model, load_pretrained
from test_vit import functional_vit, randomize_, tiny_vit

pytestmark = pytest.mark.usefixtures("reference_kernels")

# tiny_vit(): D 48, 2 blocks, 3 heads, patch 8, 32 px; the config.json transformers writes for it
CONFIG = {"architectures": ["ViTModel"], "model_type": "vit", "hidden_size": 48, "num_hidden_layers": 2,
          "num_attention_heads": 3, "intermediate_size": 192, "hidden_act": "gelu", "layer_norm_eps": 1e-6,
          "image_size": 32, "patch_size": 8, "num_channels": 3, "qkv_bias": True}


def to_hf_names(sd, prefix=""):
    """Official names -> transformers' ViT names, written out by hand (FACTS.md), independently of hf.py."""
    D = sd["cls_token"].shape[-1]
    out = {"embeddings.cls_token": sd["cls_token"], "embeddings.position_embeddings": sd["pos_embed"],
           "layernorm.weight": sd["norm.weight"], "layernorm.bias": sd["norm.bias"]}
    for kind in ("weight", "bias"):
        out[f"embeddings.patch_embeddings.projection.{kind}"] = sd[f"patch_embed.proj.{kind}"]
        for i in range(len({k.split(".")[1] for k in sd if k.startswith("blocks.")})):
            layer, block = f"encoder.layer.{i}.", f"blocks.{i}."
            qkv = sd[block + f"attn.qkv.{kind}"]
            out[layer + f"attention.attention.query.{kind}"] = qkv[:D].clone()
            out[layer + f"attention.attention.key.{kind}"] = qkv[D:2 * D].clone()
            out[layer + f"attention.attention.value.{kind}"] = qkv[2 * D:].clone()
            out[layer + f"attention.output.dense.{kind}"] = sd[block + f"attn.proj.{kind}"]
            out[layer + f"layernorm_before.{kind}"] = sd[block + f"norm1.{kind}"]
            out[layer + f"layernorm_after.{kind}"] = sd[block + f"norm2.{kind}"]
            out[layer + f"intermediate.dense.{kind}"] = sd[block + f"mlp.fc1.{kind}"]
            out[layer + f"output.dense.{kind}"] = sd[block + f"mlp.fc2.{kind}"]
    return {prefix + k: v.contiguous() for k, v in out.items()}


def write_hf_folder(folder, tensors, config=CONFIG):
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_hf_folder_gives_the_functional_vit_of_the_official_names(tmp_path):
    source = randomize_(tiny_vit(), seed=1).state_dict()
    folder = write_hf_folder(tmp_path / "dino-vit-tiny", to_hf_names(source))
    model = tiny_vit().eval()
    report = load_pretrained(model, folder)
    assert report.loaded == len(source) and report.dropped == [] and report.notes == []
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    ref, ref_attn, _ = functional_vit(source, x, patch_size=8, num_heads=3)
    torch.testing.assert_close(model(x).double(), ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(model.get_last_selfattention(x).double(), ref_attn, atol=1e-5, rtol=1e-4)


def test_vit_prefix_pooler_and_the_bare_file(tmp_path):
    """ViTForImageClassification-style `vit.` names and a ViTModel's pooler; the .safetensors path itself works
    (config.json beside it is still checked), and DINO's Hub configs carry transformers' eps 1e-12: a note."""
    source = randomize_(tiny_vit(), seed=3).state_dict()
    tensors = {**to_hf_names(source, prefix="vit."), "pooler.dense.weight": torch.zeros(48, 48),
               "pooler.dense.bias": torch.zeros(48)}
    folder = write_hf_folder(tmp_path / "hub", tensors, {**CONFIG, "layer_norm_eps": 1e-12, "image_size": 224})
    model = tiny_vit()
    report = load_pretrained(model, folder / "model.safetensors")
    assert [d.split()[0] for d in sorted(report.dropped)] == ["pooler.dense.bias", "pooler.dense.weight"]
    assert "layer_norm_eps 1e-12" in str(report) and "\n" not in str(report)
    for key, value in source.items():
        assert torch.equal(model.state_dict()[key], value), key


def test_export_then_load_round_trips_exactly(tmp_path):
    for num_classes in (0, 5):  # ViTModel names, then ViTForImageClassification's (vit. prefix, classifier)
        source = randomize_(tiny_vit(num_classes=num_classes), seed=4).eval()
        folder = hf.export_hf(source, tmp_path / f"export{num_classes}")
        tensors = load_file(f"{folder}/model.safetensors")
        config = json.loads(open(f"{folder}/config.json").read())
        if num_classes:
            assert config["architectures"] == ["ViTForImageClassification"] and len(config["id2label"]) == 5
            assert {"classifier.weight", "vit.embeddings.cls_token"} <= set(tensors)
        else:
            assert set(tensors) == set(to_hf_names(source.state_dict()))
            assert all(torch.equal(tensors[k], v) for k, v in to_hf_names(source.state_dict()).items())
            assert {k: config[k] for k in CONFIG} == CONFIG
        model = tiny_vit(num_classes=num_classes).eval()
        load_pretrained(model, folder)
        x = torch.randn(2, 3, 40, 24)  # another size than the table's: positions interpolated alike
        assert torch.equal(model(x), source(x))


def test_export_command_line(tmp_path):
    source = randomize_(build_model("vit_ti16", patch_size=8), seed=5).eval()
    torch.save(source.state_dict(), tmp_path / "backbone.pth")
    export_hf.main(["--arch", "vit_ti16", "--patch_size", "8", "--weights", str(tmp_path / "backbone.pth"),
                   "--output_dir", str(tmp_path / "out")])
    model = build_model("vit_ti16", patch_size=8).eval()
    load_pretrained(model, tmp_path / "out")
    x = torch.randn(1, 3, 32, 32)
    assert torch.equal(model(x), source(x))


@pytest.mark.parametrize("change, message", [
    ({"hidden_size": 64}, "hidden_size 64 vs the model's embed_dim 48"),
    ({"num_attention_heads": 6}, "num_attention_heads 6 vs the model's num_heads 3"),
    ({"patch_size": 16, "num_hidden_layers": 12}, "num_hidden_layers 12 vs the model's depth 2; patch_size 16"),
    ({"layer_norm_eps": 1e-5}, "layer_norm_eps 1e-05 vs the model's 1e-06"),
    ({"hidden_act": "gelu_new"}, "hidden_act 'gelu_new' vs the model's hidden_act 'gelu'"),
    ({"model_type": "dinov2"}, "only transformers' plain ViT"),
    ({"hidden_size": 384, "num_attention_heads": 6, "num_hidden_layers": 12},
     "(that is --arch vit_s16 --patch_size 8)"),
])
def test_config_mismatch_is_a_one_line_error(tmp_path, change, message):
    folder = write_hf_folder(tmp_path / "m", to_hf_names(tiny_vit().state_dict()), {**CONFIG, **change})
    with pytest.raises(ValueError) as e:
        load_pretrained(tiny_vit(), folder)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_missing_files_and_wrong_models(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no model.safetensors in .*empty"):
        load_pretrained(tiny_vit(), tmp_path / "empty")
    folder = write_hf_folder(tmp_path / "noconfig", to_hf_names(tiny_vit().state_dict()))
    (folder / "config.json").unlink()
    with pytest.raises(ValueError, match="no config.json in"):
        load_pretrained(tiny_vit(), folder)
    folder = write_hf_folder(tmp_path / "vit", to_hf_names(tiny_vit().state_dict()))
    with pytest.raises(ValueError, match="need a ViT, the model is ResNet"):
        load_pretrained(build_model("resnet18"), folder)
    # our own names in a .safetensors file load as a plain state dict (no config needed)
    save_file(tiny_vit().state_dict(), tmp_path / "teacher_backbone.safetensors")
    assert load_pretrained(tiny_vit(), tmp_path / "teacher_backbone.safetensors").loaded == 30


def test_against_transformers_vitmodel_both_ways(tmp_path):
    transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install "
                                       "transformers: it needs no torch of its own); the functional-ViT test above "
                                       "covers the mapping")
    torch.manual_seed(0)
    theirs = transformers.ViTModel(transformers.ViTConfig(**{k: v for k, v in CONFIG.items()
                                                              if k not in ("architectures", "model_type")}))
    with torch.no_grad():
        for p in theirs.parameters():
            p.normal_(0, 0.2)
    theirs.eval().save_pretrained(tmp_path / "theirs")
    ours = tiny_vit().eval()
    report = load_pretrained(ours, tmp_path / "theirs")
    assert report.loaded == 30 and len(report.dropped) == 2  # + the pooler
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = theirs(pixel_values=x)
    torch.testing.assert_close(ours(x), out.last_hidden_state[:, 0], atol=1e-5, rtol=1e-5)
    # and back: our export read by ViTModel.from_pretrained
    back = transformers.ViTModel.from_pretrained(hf.export_hf(ours, tmp_path / "ours"), add_pooling_layer=False)
    with torch.no_grad():
        torch.testing.assert_close(back.eval()(pixel_values=x).last_hidden_state[:, 0], ours(x), atol=1e-5,
                                   rtol=1e-5)
