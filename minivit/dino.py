"""DINO: self-distillation with no labels (Caron et al. 2021, "Emerging Properties in Self-Supervised Vision
Transformers"), the pieces of Section 3 and Algorithm 1 in the order the paper introduces them:

    crops -> MultiCropWrapper(backbone, DINOHead) -> student / teacher outputs   (sec. 3.1, Fig. 2)
          -> DINOLoss: centred + sharpened teacher targets, cross-entropy over view pairs, centre EMA  (sec. 3.1)
             (+ koleo_loss on the student's features: DINOv2's regulariser, off unless asked for)
          -> clip_gradients, cancel_gradients_last_layer, optimizer step           (Appendix / official recipe)
          -> update_teacher: teacher = EMA of the student                          (sec. 3.1, "Teacher network")

Checkpoint names follow the official code (github.com/facebookresearch/dino), so its files load strictly.
The training loop itself lives in train_dino.py.
"""
import math

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from minivit.kernels.dino_loss import dino_loss


# -----------------------------------------------------------------------------------------------------------------
# Projection head (sec. 3.1 "Network architecture", Appendix: 3-layer MLP, hidden 2048, bottleneck 256, K outputs)

class WeightNormLinear(nn.Module):
    """Bias-free Linear whose rows are weight-normalised: w_k = g_k * v_k / ||v_k|| (Salimans & Kingma 2016).

    Keeps the two parameters of the official checkpoints, `weight_g (K, 1)` and `weight_v (K, in_features)`,
    without torch's deprecated `nn.utils.weight_norm` hook. x (..., in_features) -> (..., K)."""

    def __init__(self, in_features, out_features):
        super().__init__()
        self.weight_g = nn.Parameter(torch.ones(out_features, 1))
        self.weight_v = nn.Parameter(torch.empty(out_features, in_features))
        # the official head keeps nn.Linear's default init for v; only its direction matters after normalising
        nn.init.kaiming_uniform_(self.weight_v, a=math.sqrt(5))

    def forward(self, x):
        weight = self.weight_g * self.weight_v / self.weight_v.norm(dim=1, keepdim=True)  # (K, in_features)
        return F.linear(x, weight)


class DINOHead(nn.Module):
    """MLP -> L2 normalise -> weight-normalised Linear to `out_dim` (K) prototypes. x (B, in_dim) -> (B, K) logits.

    `norm_last_layer=True` fixes the row norms g at 1 (frozen), the official default; False lets g learn, which
    the official code finds better but less stable (it uses False for ViT-S, True for ViT-B).
    `use_bn` adds BatchNorm after each hidden Linear (official default: off).

    The head always runs in fp32, also under bf16/fp16 autocast: its logits are divided by the teacher temperature
    (0.04) before a softmax over K = 65536 prototypes. Measured on CPU (tests/test_dino.py): a bf16 head moves the
    targets by ~0.3% in total variation, bf16 logits alone by ~0.2%; in fp32 only the rounding of the bf16 backbone
    features is left, ~0.1%, as the official fp16 code. The head is ~1% of a ViT-S step's FLOPs; on GPUs its GEMMs
    may use TF32 (fp32 accumulation)."""

    def __init__(self, in_dim, out_dim, use_bn=False, norm_last_layer=True, nlayers=3, hidden_dim=2048,
                 bottleneck_dim=256):
        super().__init__()
        if nlayers < 1:
            raise ValueError(f"DINOHead needs nlayers >= 1, got {nlayers}")
        if nlayers == 1:
            self.mlp = nn.Linear(in_dim, bottleneck_dim)
        else:
            dims = [in_dim] + [hidden_dim] * (nlayers - 1)
            layers = []
            for d_in, d_out in zip(dims[:-1], dims[1:]):  # Linear(-BN)-GELU per hidden layer
                layers += [nn.Linear(d_in, d_out)] + ([nn.BatchNorm1d(d_out)] if use_bn else []) + [nn.GELU()]
            layers.append(nn.Linear(hidden_dim, bottleneck_dim))
            self.mlp = nn.Sequential(*layers)  # names mlp.0/2/4 without BN, as the official checkpoints
        for m in self.mlp.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim)
        self.last_layer.weight_g.requires_grad = not norm_last_layer

    def forward(self, x):
        with torch.autocast(x.device.type, enabled=False):      # fp32 targets: see the class docstring
            x = self.mlp(x.to(self.last_layer.weight_v.dtype))  # (B, bottleneck_dim)
            x = F.normalize(x, dim=-1, p=2)                     # on the unit sphere: logits are cosines scaled by g
            return self.last_layer(x)                           # (B, K) in the parameters' dtype (float32)


def remap_head_state_dict(state_dict):
    """Return a copy of `state_dict` with the parametrization-API names of a weight-normalised layer
    (`...last_layer.parametrizations.weight.original0/1`, torch.nn.utils.parametrizations.weight_norm) renamed
    to the official `...last_layer.weight_g/weight_v`, so heads saved either way load strictly. Other keys
    (any prefix such as `head.` or `module.head.`) are kept as they are."""
    renames = {"parametrizations.weight.original0": "weight_g", "parametrizations.weight.original1": "weight_v"}
    out = {}
    for key, value in state_dict.items():
        for old, new in renames.items():
            if key.endswith(old):
                key = key[: -len(old)] + new
        out[key] = value
    return out


# -----------------------------------------------------------------------------------------------------------------
# Multi-crop forward (sec. 3.1 "multi-crop": 2 global views + several low-resolution local views)

class MultiCropWrapper(nn.Module):
    """backbone + head over a list of crops. Consecutive crops of the same spatial size go through the backbone
    in one call (one call per resolution: 2 for the usual 2 x 224 + n x 96), the features are concatenated and
    the head runs once.

    crops: list of (B_i, C, H_i, W_i) float tensors, or one tensor. Returns (sum_i B_i, K), crop-major: all of
    crop 0's images first, then crop 1's, ... (with return_features=True also the backbone's (sum_i B_i, D)
    features, in the same order). The backbone must map (B, C, H, W) -> (B, D) features (ViT and ResNet with
    num_classes=0)."""

    def __init__(self, backbone, head):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self._compiled_backbone = None  # set by compile_backbone(): a function, so state_dict keys do not change

    def compile_backbone(self):
        """Run the backbone under torch.compile in this wrapper's forward (the training step), one static graph per
        crop resolution. Inductor fuses what surrounds the GEMMs (LayerNorm, GELU, drop path, residual adds) and
        keeps the Triton kernels as they are: measured on an H200, ViT-S/16 DINO steps 1.26x faster (README). The
        backbone called directly (k-NN, attention maps, any batch size) stays eager, so it never recompiles."""
        # the 12 blocks differ in their drop path rate, a constant to dynamo: room for a graph per block and shape
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        self._compiled_backbone = torch.compile(self.backbone.forward, dynamic=False)
        return self

    def forward(self, crops, return_features=False):
        if torch.is_tensor(crops):
            crops = [crops]
        sizes = torch.tensor([tuple(c.shape[-2:]) for c in crops])  # (n_crops, 2): (H, W) of each crop
        counts = torch.unique_consecutive(sizes, dim=0, return_counts=True)[1]
        ends = torch.cumsum(counts, dim=0).tolist()  # e.g. [2, 10]: crops[0:2] are 224 px, crops[2:10] 96 px
        features, start = [], 0
        for end in ends:
            f = (self._compiled_backbone or self.backbone)(torch.cat(crops[start:end]))  # (sum of B_i here, D)
            if f.ndim != 2:
                raise ValueError(f"backbone returned shape {tuple(f.shape)}, expected (B, D) features: "
                                 "build it with num_classes=0")
            features.append(f)
            start = end
        features = torch.cat(features)
        logits = self.head(features)  # (sum_i B_i, K)
        return (logits, features) if return_features else logits


# -----------------------------------------------------------------------------------------------------------------
# Loss (sec. 3.1, eq. 1-4 and Algorithm 1): H(P_t(x), P_s(x')) over global x and every other view x' (eq. 3)

class DINOLoss(nn.Module):
    """Cross-entropy between centred, sharpened teacher targets and student predictions (Algorithm 1).

    P_t = softmax((t - center) / teacher_temp), P_s = softmax(s / student_temp); the loss averages
    -sum_k P_t log P_s over the batch, then over every (teacher global view iq, student view v != iq) pair:
    2 * ncrops - 2 terms. Centering (a bias) avoids one dimension dominating, sharpening (teacher_temp <
    student_temp) avoids the uniform solution: together they prevent collapse (sec. 3.1, sec. 5.3). A loss stuck
    at ln(K) means the student predicts the uniform distribution: collapse (see `collapse_stats`).

    The teacher temperature warms up linearly per epoch from `warmup_teacher_temp` to `teacher_temp` over
    `warmup_teacher_temp_epochs`, then stays (official default 0.04 flat; e.g. 0.04 -> 0.07 over 30 epochs;
    the official help warns that above 0.07 is unstable). `center` (1, K) is a buffer, so it is saved in
    checkpoints (official key `dino_loss`)."""

    def __init__(self, out_dim, ncrops, warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs, nepochs,
                 student_temp=0.1, center_momentum=0.9):
        super().__init__()
        if ncrops < 2:
            raise ValueError(f"DINOLoss needs ncrops >= 2 (the 2 global views), got {ncrops}")
        if not 0 <= warmup_teacher_temp_epochs <= nepochs:
            raise ValueError(f"warmup_teacher_temp_epochs={warmup_teacher_temp_epochs} must lie in [0, nepochs="
                             f"{nepochs}]: shorten the warm-up")
        self.ncrops = ncrops
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))
        # one value per epoch, as the official np.linspace: warmup_teacher_temp at epoch 0, teacher_temp at
        # epoch warmup_teacher_temp_epochs - 1 and after
        warmup = torch.linspace(warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs).tolist()
        self.teacher_temp_schedule = warmup + [teacher_temp] * (nepochs - warmup_teacher_temp_epochs)

    def teacher_temp_at(self, epoch):
        """Teacher temperature (float) used during `epoch` (0-based int)."""
        if not 0 <= epoch < len(self.teacher_temp_schedule):
            raise ValueError(f"epoch {epoch} is outside the teacher temperature schedule of "
                             f"{len(self.teacher_temp_schedule)} epochs: build DINOLoss with nepochs > {epoch}")
        return self.teacher_temp_schedule[epoch]

    def teacher_targets(self, teacher_output, epoch):
        """Centre and sharpen: (2B, K) raw teacher logits -> (2B, K) float32 probabilities, no gradient."""
        t = teacher_output.detach().float()
        return F.softmax((t - self.center) / self.teacher_temp_at(epoch), dim=-1)

    def forward(self, student_output, teacher_output, epoch):
        """student_output (ncrops * B, K) crop-major, teacher_output (2 * B, K) of the 2 global crops -> scalar
        loss (float32). Updates the centre with this batch afterwards, as Algorithm 1."""
        n_student, K = student_output.shape
        if n_student % self.ncrops != 0 or teacher_output.shape != (2 * (n_student // self.ncrops), K):
            raise ValueError(f"expected student_output (ncrops*B, K) with ncrops={self.ncrops} and teacher_output "
                             f"(2*B, K); got {tuple(student_output.shape)} and {tuple(teacher_output.shape)}")
        # Sum of H(P_t(x), P_s(x')) over the pairs of *different* views (eq. 3; same view: no signal, skipped): the
        # student's global view 0 meets teacher view 1, view 1 meets view 0, and every local view meets both, whose
        # cross-entropies add up to one with the summed targets: -(q0 + q1) . log p. 2 * ncrops - 2 pairs in all,
        # averaged with the batch. In fp32, where 65536-way softmaxes keep their precision. minivit/kernels/dino_loss.py
        # streams the logits without (ncrops * B, K) temporaries; its reference is this sum written in PyTorch.
        loss = dino_loss(student_output, teacher_output, self.center, self.ncrops, self.student_temp,
                         self.teacher_temp_at(epoch))
        self.update_center(teacher_output)
        return loss

    @torch.no_grad()
    def update_center(self, teacher_output):
        """center = m * center + (1 - m) * mean of the raw teacher logits (2B, K) over the batch of every
        process (all-reduced when torch.distributed is initialised; plain mean otherwise). Eq. 4 of sec. 3.1."""
        batch_sum = teacher_output.detach().float().sum(dim=0, keepdim=True)  # (1, K)
        count = teacher_output.shape[0]
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(batch_sum)
            count *= dist.get_world_size()
        self.center.mul_(self.center_momentum).add_(batch_sum / count, alpha=1 - self.center_momentum)

    @torch.no_grad()
    def collapse_stats(self, teacher_output, epoch):
        """Collapse diagnostics of the teacher targets (sec. 5.3, Fig. 7), computed with the current centre
        (call it before `forward`, which moves the centre). teacher_output (2B, K) -> dict of 0-d float tensors:

        - `entropy`: mean per-sample entropy of P_t. Near ln(K): uniform collapse (centering won).
        - `kl_to_uniform`: KL(mean_b P_t || uniform) = ln(K) - H(mean_b P_t). Near ln(K): every image picks
          the same prototype (one-dimension collapse, sharpening won).
        Healthy training has a low entropy (confident targets) and a low kl_to_uniform (prototypes all used)."""
        p = self.teacher_targets(teacher_output, epoch)                       # (2B, K)
        entropy = -(p * torch.log(p.clamp_min(1e-30))).sum(dim=-1).mean()
        p_mean = p.mean(dim=0)                                                # (K,)
        kl = (p_mean * torch.log(p_mean.clamp_min(1e-30))).sum() + math.log(p.shape[-1])
        return dict(entropy=entropy, kl_to_uniform=kl)


# -----------------------------------------------------------------------------------------------------------------
# An optional regulariser from DINOv2 (Oquab et al. 2023, sec. 4), not in DINO itself: spread the features

def koleo_loss(features, eps=1e-8):
    """The KoLeo regulariser (Sablayrolles et al. 2019, "Spreading vectors for similarity search", from the
    Kozachenko-Leonenko entropy estimator): -mean_i log ||x_i - x_j(i)||, x the L2-normalised features and j(i)
    the nearest other feature in the batch. Lowering it pushes each feature away from its nearest neighbour, so
    the batch spreads over the sphere instead of bunching up. DINOv2 adds it, weight 0.1, for the student's CLS
    features of each global view. features (B, D) float, B >= 2 -> 0-d float32 tensor."""
    if features.shape[0] < 2:
        raise ValueError(f"koleo_loss needs at least 2 features to find neighbours, got {features.shape[0]}")
    x = F.normalize(features.float(), dim=-1, eps=eps)      # (B, D) on the unit sphere
    with torch.no_grad():  # which neighbour is nearest: a choice, not differentiated
        cosines = x @ x.T
        cosines.fill_diagonal_(-2.0)                        # below any cosine: never its own neighbour
        nearest = cosines.argmax(dim=1)                     # (B,)
    return -torch.log((x - x[nearest]).norm(dim=-1) + eps).mean()


# -----------------------------------------------------------------------------------------------------------------
# Optimisation helpers of the official recipe (called in train_dino.py after backward, in this order)

def clip_gradients(model, clip):
    """Clip each parameter tensor's gradient to L2 norm `clip` on its own, as the official DINO code; returns
    the norms before clipping, a (P,) float tensor over the P parameters that have a gradient.

    torch.nn.utils.clip_grad_norm_ instead scales all gradients by one factor so that their *global* norm is at
    most `clip`. The per-tensor rule only shrinks the tensors whose gradient is large (often the head) and leaves
    the others untouched; DINO's results (clip 3.0) were obtained with it, so we keep it. Works without host
    syncs: torch._foreach_norm / _foreach_mul_ (multiplying by exactly 1 leaves unclipped gradients unchanged)."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return torch.zeros(0)
    norms = torch.stack(torch._foreach_norm(grads))            # (P,)
    coefs = (clip / (norms + 1e-6)).clamp(max=1.0)             # official: scale by clip/(norm+1e-6) when < 1
    torch._foreach_mul_(grads, list(coefs.unbind()))
    return norms


def cancel_gradients_last_layer(epoch, model, freeze_last_layer):
    """Drop the gradients (set to None, so the optimizer skips them, weight decay included) of the head's
    `last_layer` while epoch < freeze_last_layer. Freezing the prototypes during the first epoch helps
    optimisation (official recipe: freeze_last_layer=1); raise it if the loss does not go down at the start."""
    if epoch >= freeze_last_layer:
        return
    for name, p in model.named_parameters():
        if "last_layer" in name:
            p.grad = None


def _unwrap(module):
    """The module inside DistributedDataParallel (`.module`) and torch.compile (`._orig_mod`) wrappers."""
    while True:
        if isinstance(module, nn.parallel.DistributedDataParallel):
            module = module.module
        elif hasattr(module, "_orig_mod"):
            module = module._orig_mod
        else:
            return module


@torch.no_grad()
def update_teacher(student, teacher, momentum):
    """Teacher = EMA of the student (sec. 3.1 "Teacher network", momentum encoder): for every parameter name
    the two share, t = m * t + (1 - m) * s. m follows a cosine from 0.996 to 1 over training (official).

    Either model may be wrapped by DDP or torch.compile. Only parameters are averaged, as the official code:
    buffers (BatchNorm running statistics of a ResNet teacher) are not copied; the teacher keeps the ones it
    gathers in its own forward passes (the official teacher is never switched to eval mode during training).
    Uses the fused torch._foreach_mul_ / _foreach_add_ (one kernel per op instead of one per tensor)."""
    s_params = dict(_unwrap(student).named_parameters())
    pairs = [(t, s_params[name]) for name, t in _unwrap(teacher).named_parameters() if name in s_params]
    if not pairs:
        raise ValueError("update_teacher: student and teacher share no parameter names; build them alike")
    for t, s in pairs:
        if t.shape != s.shape:
            raise ValueError(f"update_teacher: shape mismatch {tuple(t.shape)} vs {tuple(s.shape)}")
    t_list, s_list = [t for t, _ in pairs], [s.detach() for _, s in pairs]
    torch._foreach_mul_(t_list, momentum)
    torch._foreach_add_(t_list, s_list, alpha=1.0 - momentum)
