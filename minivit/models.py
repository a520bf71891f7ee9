"""The model registry and the pretrained-weight loader shared by the training and evaluation scripts.

    model = build_model("vit_s16", img_size=224, drop_path_rate=0.1)  # DINO's ViT-S/16 student
    model = build_model("resnet18", num_classes=10, small_stem=True)  # a CIFAR baseline
    print(load_pretrained(model, "dino_deitsmall16_pretrain.pth"))    # official or our own DINO files

load_pretrained reads every layout the DINO project produces (full training checkpoints with student/teacher,
DDP `module.` prefixes, `backbone.` prefixes, released backbone-only files, torchvision/timm state dicts) and
Hugging Face ViT folders (minivit/hf.py: facebook/dino-vits8 and friends, config.json + model.safetensors), maps
the names onto the model, and then loads with strict=True: whatever does not fit is an error, except the few
differences that are expected and are reported instead (see load_pretrained).
"""
import math
import os
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from minivit import checkpoint, cli, hf, resnet, vit

# arch string -> factory: the ViTs of vit.ARCHS ("/16" in ViT-S/16 is the patch size), then the ResNets
ARCHS = {
    **vit.ARCHS,
    "resnet18": resnet.resnet18,
    "resnet34": resnet.resnet34,
    "resnet50": resnet.resnet50,
    "resnet101": resnet.resnet101,
    "resnet152": resnet.resnet152,
}
# options each family takes besides num_classes; passing another family's option is an error, not ignored.
# patch_size overrides the arch's patch for small images (e.g. 16-px digits with patch 4: 16 tokens, not 1).
OPTIONS = {"vit": ("img_size", "patch_size", "drop_path_rate"), "resnet": ("small_stem", "zero_init_residual")}

# how load_pretrained maps file names onto model names
PREFIXES = ("module.", "_orig_mod.", "backbone.")  # added by DDP, torch.compile and DINO's MultiCropWrapper
DINO_HEAD = ("head.mlp.", "head.last_layer.")  # DINO's projection head (DINO sec. 3.1): not part of a backbone
# nn.utils.weight_norm (the official DINO files) and nn.utils.parametrizations.weight_norm name g and v differently
WEIGHT_NORM = ((".weight_g", ".parametrizations.weight.original0"), (".weight_v", ".parametrizations.weight.original1"))


def arch_family(arch: str) -> str:
    """'vit' or 'resnet' for an ARCHS name; ValueError listing the valid names otherwise."""
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose one of: {', '.join(ARCHS)}")
    return "vit" if arch.startswith("vit_") else "resnet"


def patch_size(arch: str) -> int:
    """The patch side in pixels of an ARCHS name (16 for vit_s16, 14 for vit_h14); 1 for a ResNet, whose input
    only needs to be large enough. Known before building the model, so flags can be checked first."""
    return ARCHS[arch].keywords["patch_size"] if arch_family(arch) == "vit" else 1


def build_model(arch: str, num_classes: int = 0, **kwargs) -> torch.nn.Module:
    """A freshly initialised model. num_classes=0 gives a backbone whose forward returns (B, model.num_features)
    features; kwargs: img_size, patch_size, drop_path_rate for ViTs; small_stem, zero_init_residual for ResNets."""
    family = arch_family(arch)
    wrong = sorted(set(kwargs) - set(OPTIONS[family]))
    if wrong:
        raise ValueError(f"{', '.join(wrong)} does not apply to {arch}; a {family} takes: {', '.join(OPTIONS[family])}")
    return ARCHS[arch](num_classes=num_classes, **kwargs)


@dataclass
class LoadReport:
    """What load_pretrained did; str() gives one line for the log."""
    source: str  # the part of the file that was loaded: 'teacher', 'student', 'model', 'state_dict' or 'file'
    loaded: int  # tensors copied from the file
    head_kept_init: list[str] = field(default_factory=list)  # classifier keys absent from the file
    dropped: list[str] = field(default_factory=list)  # file keys not loaded, each with the reason
    resized: list[str] = field(default_factory=list)  # e.g. "pos_embed (1, 197, 384) -> (1, 785, 384)"
    notes: list[str] = field(default_factory=list)  # accepted differences, e.g. of a Hugging Face config.json

    def __str__(self):
        parts = [f"loaded {self.loaded} tensors from {self.source}"]
        if self.resized:
            parts.append("resized " + "; ".join(self.resized))
        if self.head_kept_init:
            parts.append(f"classifier not in file, kept its init: {', '.join(self.head_kept_init)}")
        if self.dropped:
            parts.append(f"dropped {len(self.dropped)}: " + "; ".join(self.dropped[:4])
                         + (" ..." if len(self.dropped) > 4 else ""))
        parts += self.notes
        return " | ".join(parts)


def resize_pos_embed(pos_embed: torch.Tensor, grid: int) -> torch.Tensor:
    """(1, 1 + g*g, D) position table -> (1, 1 + grid*grid, D): bicubic on the g x g patch part, CLS kept.

    Same arithmetic as VisionTransformer.interpolate_pos_encoding (DINO's), so a model loaded at another img_size
    gives what the source model gives when run at that size."""
    _, n, D = pos_embed.shape
    g = math.isqrt(n - 1)
    if g * g != n - 1:
        raise ValueError(f"pos_embed {tuple(pos_embed.shape)} does not hold a square grid of patches plus CLS")
    cls_pos, patch_pos = pos_embed[:, :1], pos_embed[:, 1:].reshape(1, g, g, D).permute(0, 3, 1, 2)  # (1, D, g, g)
    # +0.1: the scale factor alone can round the output size down by one (official DINO trick)
    patch_pos = F.interpolate(patch_pos.float(), scale_factor=(grid + 0.1) / g, mode="bicubic")  # (1, D, grid, grid)
    patch_pos = patch_pos.to(pos_embed.dtype).permute(0, 2, 3, 1).reshape(1, grid * grid, D)
    return torch.cat((cls_pos, patch_pos), dim=1)


def _describe(sd: dict) -> str:
    """A guess at the model a state_dict belongs to, for error messages."""
    if "blocks.0.attn.qkv.weight" in sd and "patch_embed.proj.weight" in sd:
        D, _, p, _ = sd["patch_embed.proj.weight"].shape
        depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
        return f"a ViT (embed_dim {D}, depth {depth}, patch_size {p})"
    if "layer1.0.conv1.weight" in sd:
        blocks = sum(len({k.split(".")[1] for k in sd if k.startswith(f"layer{s}.")}) for s in range(1, 5))
        convs_per_block = 3 if "layer1.0.conv3.weight" in sd else 2  # Bottleneck or BasicBlock
        return f"a ResNet (resnet{convs_per_block * blocks + 2})"
    return "neither a ViT nor a ResNet (first keys: " + ", ".join(list(sd)[:3]) + ")"


def _first(keys: list[str], n: int = 3) -> str:
    """The first n keys, comma-separated, for one-line error messages."""
    return ", ".join(keys[:n]) + (", ..." if len(keys) > n else "")


def _rename(key: str, prefixes: tuple[str, ...], target: dict) -> str:
    """A file key -> the model's name for it: wrapper prefixes stripped, weight-norm names as the model has them."""
    while key.startswith(prefixes):
        key = key[len(next(p for p in prefixes if key.startswith(p))):]
    for g_or_v in WEIGHT_NORM:
        for a, b in (g_or_v, g_or_v[::-1]):
            if key.endswith(a) and key not in target and key[:-len(a)] + b in target:
                return key[:-len(a)] + b
    return key


def load_pretrained(model: torch.nn.Module, path_or_state_dict, trust_pickle: bool = False) -> LoadReport:
    """Load weights into `model` in place from a checkpoint path or an already loaded dict; returns a LoadReport.

    Takes a full DINO checkpoint (its 'teacher', else 'student', else a 'model' or 'state_dict' entry) or a bare
    state_dict. Strips `module.` (DDP), `_orig_mod.` (torch.compile) and `backbone.` prefixes (the last one only
    when the model has no `backbone` of its own) and maps weight-norm names onto the model's. Expected differences
    are reported, not raised: DINO head keys (head.mlp.*, head.last_layer.*) the model lacks are dropped; a
    classifier (`head` of a ViT, `fc` of a ResNet) absent from the file keeps its init, one of another shape
    (1000 classes into 10) or one the model lacks (num_classes=0) is dropped; a pos_embed of another grid is resized
    bicubically. Anything else missing, unexpected or of another shape -> ValueError naming the first keys. The
    load itself is strict. A Hugging Face ViT folder (config.json + model.safetensors) or a .safetensors file is
    read by minivit/hf.py first: names mapped onto these, config.json checked against the model.

    Any other path is read by checkpoint.torch_load: tensors and plain containers only (official DINO files' argparse
    Namespace too); a file with other pickled objects is refused unless trust_pickle=True, since unpickling them
    can run code.
    """
    dropped, notes = [], []
    if hf.is_hf_path(path_or_state_dict):  # a Hugging Face folder or a .safetensors file: names mapped, config checked
        path_or_state_dict, dropped, notes = hf.read_hf(path_or_state_dict, model)
    ckpt = (checkpoint.torch_load(path_or_state_dict, trust_pickle)
            if isinstance(path_or_state_dict, (str, os.PathLike)) else path_or_state_dict)
    if not isinstance(ckpt, dict):
        raise ValueError(f"expected a checkpoint dict or a state_dict, got {type(ckpt).__name__}")
    source = next((k for k in ("teacher", "student", "model", "state_dict") if isinstance(ckpt.get(k), dict)), "file")
    sd = ckpt if source == "file" else ckpt[source]
    if not sd or not all(torch.is_tensor(v) for v in sd.values()):
        raise ValueError(f"no weights found in {source}: expected tensors or a 'teacher', 'student', 'model' or "
                         f"'state_dict' entry; top-level keys: {_first(list(ckpt), 6)}")

    target = model.state_dict()
    prefixes = PREFIXES if not any(k.startswith("backbone.") for k in target) else PREFIXES[:2]
    clf = "fc" if isinstance(model, resnet.ResNet) else "head"
    classifier = (f"{clf}.weight", f"{clf}.bias")
    report = LoadReport(source, loaded=0, dropped=dropped, notes=notes)
    mapped, wrong_shape = {}, []
    for key, value in sd.items():
        name = _rename(key, prefixes, target)
        if name not in target and name.startswith(DINO_HEAD):
            report.dropped.append(f"{name} (DINO projection head)")
        elif name not in target and name in classifier:
            report.dropped.append(f"{name} (the model has no classifier)")
        elif name in target and value.shape != target[name].shape and name in classifier:
            report.dropped.append(f"{name} (shape {tuple(value.shape)}, the model's {tuple(target[name].shape)})")
        elif name == "pos_embed" and value.shape != target[name].shape and value.shape[-1] == target[name].shape[-1]:
            mapped[name] = resize_pos_embed(value, grid=math.isqrt(target[name].shape[1] - 1))
            report.resized.append(f"pos_embed {tuple(value.shape)} -> {tuple(target[name].shape)}")
        else:
            mapped[name] = value
            if name in target and value.shape != target[name].shape:
                wrong_shape.append(name)

    missing = [k for k in target if k not in mapped]
    report.head_kept_init = [k for k in missing if k in classifier]
    # files saved before PyTorch 0.4.1 (torchvision's ResNet-50) lack BN's num_batches_tracked; eval never reads it
    missing = [k for k in missing if k not in classifier and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in mapped if k not in target]
    if missing or unexpected or wrong_shape:
        problems = []
        if missing:
            problems.append(f"{len(missing)} missing ({_first(missing)})")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected ({_first(unexpected)})")
        if wrong_shape:
            shapes = [f"{k} {tuple(mapped[k].shape)} vs {tuple(target[k].shape)}" for k in wrong_shape]
            problems.append(f"{len(wrong_shape)} of another shape ({_first(shapes, 2)})")
        file_kind, model_kind = _describe(mapped), _describe(target)
        hint = (f"checkpoint of another model? it looks like {file_kind}, the model is {model_kind}"
                if file_kind != model_kind else "same architecture: a truncated file, or saved from another wrapper?")
        raise ValueError(f"{source} weights do not fit {type(model).__name__}: "
                         f"{'; '.join(problems)}; {hint}")
    model.load_state_dict({**target, **mapped}, strict=True)  # the keys left out above keep the model's values
    report.loaded = len(mapped)
    return report


def load_backbone(arch, weights="none", patch_size=None, small_stem=False, trust_pickle=False):
    """models.build_model(arch, num_classes=0) built as the checkpoint was trained (patch_size overrides a ViT's
    patch, small_stem a ResNet's stem), then `weights` loaded: our checkpoint or an official file; "none" keeps the
    random init. Shared by the evaluation command lines; a bad name, a refused pickle (see trust_pickle in
    models.load_pretrained) or a mismatching file -> a one-line `error: ...` exit."""
    options = {k: v for k, v in (("patch_size", patch_size), ("small_stem", small_stem)) if v}
    with cli.errors():
        model = build_model(arch, num_classes=0, **options)
        if str(weights).lower() != "none":
            print(load_pretrained(model, weights, trust_pickle=trust_pickle))
    return model


def build_backbones(arch, weights, device, trust_pickle=False, **vit_options):
    """One frozen backbone per (label, path) of parse_weights, built with build_model(arch, num_classes=0,
    **vit_options) and loaded with load_pretrained (random init when path is None; trust_pickle as there).
    vit_options (img_size, patch_size) that are None, or given for a ResNet, are left out.
    -> {label: model in eval mode on device}."""
    models = {}
    for label, path in weights:
        try:
            options = {k: v for k, v in vit_options.items() if v is not None and arch_family(arch) == "vit"}
            torch.manual_seed(0)  # the random-init baseline is the same model every run
            model = build_model(arch, num_classes=0, **options)
            note = "random init" if path is None else str(load_pretrained(model, path, trust_pickle=trust_pickle))
        except ValueError as e:
            cli.fail(f"--weights {label}: {e}")
        print(f"{label}: {arch}, {note}")
        models[label] = model.to(device).requires_grad_(False).eval()
    return models
