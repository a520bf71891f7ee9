"""Hugging Face's layout of a ViT, read and written (transformers' ViTModel: facebook/dino-vits8, dino-vitb16, ...).

Such a model is a folder with config.json (the hyper-parameters) and model.safetensors (the tensors). Its names map
one to one onto the official DINO names that minivit uses, except the attention input: Hugging Face keeps query,
key and value as three Linear layers where the official code has one `qkv` whose rows are q | k | v, so the three
weights are concatenated in that order (and split again on export):

    embeddings.cls_token / .position_embeddings          cls_token / pos_embed
    embeddings.patch_embeddings.projection.*             patch_embed.proj.*
    encoder.layer.{i}.attention.attention.{query,key,value}.*   -> cat -> blocks.{i}.attn.qkv.*
    encoder.layer.{i}.attention.output.dense.*           blocks.{i}.attn.proj.*
    encoder.layer.{i}.layernorm_before.* / layernorm_after.*     blocks.{i}.norm1.* / norm2.*
    encoder.layer.{i}.intermediate.dense.* / output.dense.*      blocks.{i}.mlp.fc1.* / fc2.*
    layernorm.*                                          norm.*
    classifier.* (ViTForImageClassification, whose other names start with `vit.`)   head.*

The `pooler` of a ViTModel (a tanh layer no DINO evaluation reads) is dropped. safetensors stores raw tensors with
a JSON header: loading it runs no code, unlike unpickling a .pth.

    model = build_model("vit_s8"); load_pretrained(model, "dino-vits8/")       # a folder from the Hub, or its file
    python -m minivit.tools.export_hf --arch vit_s8 --weights runs/dino/teacher_backbone.pth --output_dir runs/dino/hf
"""
import json
import os
import re

import torch
from safetensors.torch import load_file, save_file

from minivit import vit
from minivit.checkpoint import unwrap_model

# (Hugging Face name, ours), {i} = block index; each entry is a prefix of the tensor names
NAMES = [
    ("embeddings.cls_token", "cls_token"),
    ("embeddings.position_embeddings", "pos_embed"),
    ("embeddings.patch_embeddings.projection.", "patch_embed.proj."),
    ("encoder.layer.{i}.attention.output.dense.", "blocks.{i}.attn.proj."),
    ("encoder.layer.{i}.layernorm_before.", "blocks.{i}.norm1."),
    ("encoder.layer.{i}.layernorm_after.", "blocks.{i}.norm2."),
    ("encoder.layer.{i}.intermediate.dense.", "blocks.{i}.mlp.fc1."),
    ("encoder.layer.{i}.output.dense.", "blocks.{i}.mlp.fc2."),
    ("layernorm.", "norm."),
    ("classifier.", "head."),
]
QKV = "encoder.layer.{i}.attention.attention.{part}."  # part: query, key, value -> blocks.{i}.attn.qkv.
PARTS = ("query", "key", "value")  # the order of the official qkv rows
TRANSFORMERS_DEFAULT_EPS = 1e-12  # the LayerNorm eps the DINO conversions on the Hub carry (DINO trained with 1e-6)


def _pattern(name: str) -> re.Pattern:
    """A NAMES prefix with {i} -> a regex matching it at the start of a key, the block index as group 'i'."""
    return re.compile(re.escape(name).replace(re.escape("{i}"), r"(?P<i>\d+)"))


def _rename(key: str, table) -> str | None:
    """key renamed by the first (source, target) prefix pair of table that matches it; None if none does."""
    for source, target in table:
        m = _pattern(source).match(key)
        if m:
            return target.replace("{i}", m.groupdict().get("i") or "") + key[m.end():]
    return None


def is_hf_layout(state_dict: dict) -> bool:
    """True for Hugging Face ViT names (with or without the `vit.` prefix), False for the official/our names."""
    return any(k.removeprefix("vit.").startswith("embeddings.patch_embeddings.") for k in state_dict)


def hf_to_minivit(state_dict: dict) -> tuple[dict, list[str]]:
    """Hugging Face ViT names -> official names: ({name: tensor}, [dropped keys with the reason]).

    query/key/value (D, D) and (D,) are concatenated into qkv (3D, D) and (3D,), rows q | k | v. Keys that are
    neither mapped nor known (a pooler) are kept under their own name, so that load_pretrained reports them."""
    sd = {k.removeprefix("vit."): v for k, v in state_dict.items()}
    out, dropped = {}, []
    qkv = re.compile(r"encoder\.layer\.(\d+)\.attention\.attention\.(query|key|value)\.(weight|bias)$")
    for key, value in sd.items():
        m = qkv.match(key)
        if key.startswith("pooler."):
            dropped.append(f"{key} (Hugging Face pooler: not part of the DINO backbone)")
        elif m:
            i, part, kind = m.groups()
            if part == "query":
                parts = [sd.get(QKV.format(i=i, part=p) + kind) for p in PARTS]
                if any(p is None for p in parts):
                    raise ValueError(f"{key} without its key/value: a truncated file?")
                out[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat(parts, dim=0)  # (3D, D) or (3D,)
        else:
            out[_rename(key, NAMES) or key] = value
    return out, dropped


def minivit_to_hf(state_dict: dict) -> dict:
    """Official names -> Hugging Face ViT names (the inverse of hf_to_minivit): qkv (3D, ...) split into query, key,
    value; with a `head` the ViTForImageClassification names (`vit.` prefix, `classifier`), else ViTModel's."""
    prefix = "vit." if "head.weight" in state_dict else ""
    out = {}
    for key, value in state_dict.items():
        m = re.match(r"blocks\.(\d+)\.attn\.qkv\.(weight|bias)$", key)
        if m:
            for part, chunk in zip(PARTS, value.chunk(3, dim=0)):  # rows q | k | v
                out[prefix + QKV.format(i=m[1], part=part) + m[2]] = chunk.contiguous()
            continue
        name = _rename(key, [(ours, theirs) for theirs, ours in NAMES])
        if name is None:
            raise ValueError(f"{key} has no Hugging Face name: is this a minivit ViT state_dict?")
        out[name if name.startswith("classifier.") else prefix + name] = value.contiguous()
    return out


def hf_config(model) -> dict:
    """config.json of transformers' ViTConfig for a minivit VisionTransformer (what ViTModel.from_pretrained reads)."""
    blk = model.blocks[0]
    cfg = {
        "architectures": ["ViTForImageClassification" if model.config.num_classes else "ViTModel"],
        "model_type": "vit",
        "hidden_size": model.embed_dim,
        "num_hidden_layers": len(model.blocks),
        "num_attention_heads": model.num_heads,
        "intermediate_size": blk.mlp.fc1.out_features,
        "hidden_act": "gelu",  # transformers' "gelu" is the exact erf form, as nn.GELU()
        "layer_norm_eps": model.norm.eps,
        "image_size": model.patch_embed.img_size,
        "patch_size": model.patch_size,
        "num_channels": model.patch_embed.proj.in_channels,
        "qkv_bias": blk.attn.qkv.bias is not None,
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "initializer_range": 0.02,
        "encoder_stride": model.patch_size,
    }
    if model.config.num_classes:
        cfg["id2label"] = {str(c): f"LABEL_{c}" for c in range(model.config.num_classes)}
        cfg["label2id"] = {f"LABEL_{c}": c for c in range(model.config.num_classes)}
    return cfg


def _suggest_arch(cfg: dict) -> str:
    """The ARCHS name whose shape matches a config.json, for error messages ('' if none)."""
    want = (cfg.get("hidden_size"), cfg.get("num_hidden_layers"), cfg.get("num_attention_heads"))
    with torch.device("meta"):  # shapes only
        for name, factory in vit.ARCHS.items():
            m = factory()
            if (m.embed_dim, len(m.blocks), m.num_heads) == want:
                patch = "" if m.patch_size == cfg.get("patch_size") else f" --patch_size {cfg.get('patch_size')}"
                return f" (that is --arch {name}{patch})"
    return ""


def check_config(cfg: dict, model) -> list[str]:
    """Compare a Hugging Face config.json with a minivit ViT: ValueError naming every mismatch on one line; returns
    notes on accepted differences. image_size may differ (load_pretrained resizes the position table)."""
    if not isinstance(model, vit.VisionTransformer):
        raise ValueError(f"Hugging Face ViT weights need a ViT, the model is {type(model).__name__}: "
                         "build one with a vit_* arch")
    if cfg.get("model_type", "vit") != "vit":
        raise ValueError(f"config.json model_type {cfg['model_type']!r}: only transformers' plain ViT ('vit') "
                         "maps onto minivit")
    blk = model.blocks[0]
    expected = {  # config.json key -> (the model's value, its name here)
        "hidden_size": (model.embed_dim, "embed_dim"),
        "num_hidden_layers": (len(model.blocks), "depth"),
        "num_attention_heads": (model.num_heads, "num_heads"),
        "patch_size": (model.patch_size, "patch_size"),
        "intermediate_size": (blk.mlp.fc1.out_features, "MLP width"),
        "num_channels": (model.patch_embed.proj.in_channels, "in_chans"),
        "qkv_bias": (blk.attn.qkv.bias is not None, "qkv_bias"),
        "hidden_act": ("gelu", "hidden_act"),  # transformers' "gelu" is the exact (erf) GELU, as nn.GELU()
    }
    wrong = [f"{key} {cfg[key]!r} vs the model's {name} {mine!r}"
             for key, (mine, name) in expected.items() if key in cfg and cfg[key] != mine]
    eps, notes = cfg.get("layer_norm_eps", model.norm.eps), []
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise ValueError(f"config.json layer_norm_eps {eps!r} is not a number; fix the file (DINO's is 1e-06)")
    if eps == TRANSFORMERS_DEFAULT_EPS and eps != model.norm.eps:
        notes.append(f"config.json layer_norm_eps {eps:g} is transformers' default, which the DINO conversions "
                     f"carry; kept the model's {model.norm.eps:g} (the official DINO value)")
    elif eps != model.norm.eps:
        wrong.append(f"layer_norm_eps {eps:g} vs the model's {model.norm.eps:g}")
    if wrong:
        raise ValueError(f"config.json does not fit the model: {'; '.join(wrong)}; build the model the checkpoint "
                         f"describes{_suggest_arch(cfg)}")
    return notes


def read_config(path) -> dict:
    """A config.json -> dict; ValueError naming the file when it is not a JSON object (the parser's own message
    names only a line and a column)."""
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); fix the file or download the model folder again") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{path} holds a JSON {type(cfg).__name__}, not the object of a Hugging Face config; fix "
                         "the file or download the model folder again")
    return cfg


def is_hf_path(path) -> bool:
    """A folder (Hugging Face model folder) or a .safetensors file: what read_hf reads."""
    return isinstance(path, (str, os.PathLike)) and (os.path.isdir(path) or str(path).endswith(".safetensors"))


def read_hf(path, model) -> tuple[dict, list[str], list[str]]:
    """A Hugging Face folder (config.json + model.safetensors) or a .safetensors file -> (state_dict in the
    official names, dropped keys with the reason, notes on accepted differences). config.json, in the folder or
    beside the file, is checked against `model` (check_config). A .safetensors file in our own names
    (teacher_backbone.safetensors) is returned as is."""
    folder, file = (path, os.path.join(path, "model.safetensors")) if os.path.isdir(path) else \
        (os.path.dirname(os.path.abspath(path)), path)
    if not os.path.isfile(file):
        hint = " (sharded checkpoints, model.safetensors.index.json, are not supported)" \
            if os.path.isfile(file + ".index.json") else ""
        raise ValueError(f"no model.safetensors in {str(path)!r}{hint}: pass a Hugging Face model folder or its "
                         ".safetensors file")
    try:
        sd = load_file(file, device="cpu")
    except Exception as e:  # safetensors' own error type for a truncated or foreign file, OSError, ...
        raise ValueError(f"{file} is not a readable safetensors file ({type(e).__name__}: {e}); download or "
                         "export it again") from None
    if not is_hf_layout(sd):
        return sd, [], []
    config = os.path.join(folder, "config.json")
    notes = []
    if os.path.isfile(config):
        notes = check_config(read_config(config), model)
    elif os.path.isdir(path):
        raise ValueError(f"no config.json in {str(path)!r}: a Hugging Face model folder holds config.json and "
                         "model.safetensors")
    sd, dropped = hf_to_minivit(sd)
    return sd, dropped, notes


def export_hf(model, folder) -> str:
    """Write `model` (a minivit ViT) as a Hugging Face model folder: config.json + model.safetensors, which
    transformers' ViTModel.from_pretrained (or ViTForImageClassification, with a head) and load_pretrained read.
    Returns the folder."""
    model = unwrap_model(model)
    if not isinstance(model, vit.VisionTransformer):
        raise ValueError(f"only a ViT has a Hugging Face ViT layout, the model is {type(model).__name__}")
    os.makedirs(folder, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    save_file(minivit_to_hf(state), os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(hf_config(model), f, indent=2)
    return folder
