"""The whole InternViT encoder, bottom-up: Embeddings -> Attention -> MLP -> EncoderLayer -> Encoder -> Model.

References:
    - OpenGVLab/InternVL `modeling_intern_vit.py` (spec/internvit.md §2, [S2]): module names here are the
      official checkpoint keys, so the official `model.safetensors` loads with `strict=True` and no renaming.
    - timm `vit_intern300m_patch14_448` and transformers `InternVLVisionModel` compute the same function
      (spec/peers.md §1-2); the parity tests compare against both.

Differs from the official code:
    - Attention runs through `F.scaled_dot_product_attention` (no flash-attn requirement, works on CPU and in
      fp32), or the official naive path computed one block of queries at a time (`blocked_attention`), whichever
      `autotune.py` measured faster on this CPU (static default without a measurement: blocked for bf16/fp16 on
      CPU); `attn_implementation="eager"` is the official naive path as written.
    - Drop-path rates are plain Python floats, so the model can be built on the meta device (spec §7.4), and
      there the random init draws nothing (`randn_unless_meta`), which keeps torch._dynamo's import out of loading.
    - The position-embedding interpolation is skipped when the patch grid is the native one: bicubic at scale 1
      is the identity (cubic weights 0, 1, 0, 0), so the result is the same and a copy is saved (spec §2.2).
    - Gradient checkpointing is off unless asked for (the official encoder turns it on in training).
    - Floating-point pixels are cast to the weight dtype instead of failing (InternVL issue #602).

Shape legend: B batch, N tokens (1 + h*w), C hidden, H heads, D head_dim, h/w patch-grid rows/cols.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from internvit.config import InternVisionConfig

ATTN_IMPLEMENTATIONS = ("auto", "sdpa", "blocked", "eager")
CPU_INFERENCE_CHUNK = 2  # images per encoder pass in CPU inference, unless measured (InternVisionModel.set_cpu_plan)


@dataclass
class InternVisionOutput:
    """What `InternVisionModel.forward` returns.

    Attributes:
        last_hidden_state: output of the last layer, not normalized, [B, N, C].
        pooler_output: the raw CLS token of the last layer (no final norm), [B, C].
        hidden_states: the embedding output then each layer's output (L + 1 tensors), or None.
    """

    last_hidden_state: torch.Tensor
    pooler_output: torch.Tensor
    hidden_states: tuple[torch.Tensor, ...] | None = None


class RMSNorm(nn.Module):
    """The official InternRMSNorm: normalize in fp32, cast back, then scale (spec §2.5.4)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def make_norm(config: InternVisionConfig, dim: int) -> nn.Module:
    if config.norm_type == "rms_norm":
        return RMSNorm(dim, config.layer_norm_eps)
    return nn.LayerNorm(dim, eps=config.layer_norm_eps)


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Per-sample stochastic depth, rescaled by 1/keep (timm `DropPath`, inlined: spec §7.10)."""
    if p == 0.0 or not training:
        return x
    keep = 1.0 - p
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    return x * mask / keep


def randn_unless_meta(*shape: int) -> torch.Tensor:
    """`torch.randn(*shape)` (the same draws), except on the meta device, where nothing is drawn: torch's meta
    kernels for randn, normal_ and mul are Python functions whose first call imports torch._dynamo (~1.5 s), the
    bulk of a fresh process's `from_pretrained`."""
    x = torch.empty(*shape)
    return x if x.is_meta else x.normal_()


class Embeddings(nn.Module):
    def __init__(self, config: InternVisionConfig) -> None:
        super().__init__()
        self.grid_size = config.grid_size
        self.class_embedding = nn.Parameter(randn_unless_meta(1, 1, config.hidden_size))
        self.patch_embedding = nn.Conv2d(3, config.hidden_size, kernel_size=config.patch_size, stride=config.patch_size)
        self.position_embedding = nn.Parameter(randn_unless_meta(1, config.num_positions, config.hidden_size))

    def _patch_position_embedding(self, h: int, w: int) -> torch.Tensor:
        pos_1MC = self.position_embedding[:, 1:]
        if (h, w) == (self.grid_size, self.grid_size):
            return pos_1MC  # bicubic at scale 1 is the identity (spec §2.2)
        # Interpolated in fp32 even for bf16 weights, then cast back (spec §2.2, §2.5.2).
        g = self.grid_size
        C = pos_1MC.shape[-1]
        grid_1CGG = pos_1MC.float().reshape(1, g, g, C).permute(0, 3, 1, 2)
        grid_1Chw = F.interpolate(grid_1CGG, size=(h, w), mode="bicubic", align_corners=False)
        return grid_1Chw.reshape(1, C, h * w).permute(0, 2, 1).to(pos_1MC.dtype)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        dtype = self.patch_embedding.weight.dtype
        if pixel_values.is_cuda and pixel_values.dtype == dtype == torch.float32:
            patches_BMC, h, w = self.patches_as_matmul(pixel_values)
        else:
            patches_BChw = self.patch_embedding(pixel_values)
            h, w = patches_BChw.shape[2:]
            patches_BMC = patches_BChw.flatten(2).transpose(1, 2)  # row-major over (row, col)
        B = patches_BMC.shape[0]
        x_BNC = torch.cat([self.class_embedding.expand(B, 1, -1).to(dtype), patches_BMC], dim=1)
        pos_1NC = torch.cat([self.position_embedding[:, :1], self._patch_position_embedding(h, w)], dim=1)
        return x_BNC + pos_1NC.to(dtype)

    def patches_as_matmul(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        """The patch embedding (a convolution whose stride is its kernel) as one matmul: [B, h*w, C], h, w.

        Used for fp32 on CUDA, where cuDNN runs convolutions in TF32 by default (`torch.backends.cudnn.allow_tf32`,
        2.7e-3 off the CPU's fp32 on the 300M) while matmuls are exact unless asked (`allow_tf32` /
        `torch.set_float32_matmul_precision`): the whole forward then follows the one matmul setting."""
        p = self.patch_embedding.stride[0]
        B, K, H, W = pixel_values.shape
        h, w = H // p, W // p  # a convolution drops the pixels past the last whole patch
        x_BMK = (pixel_values[:, :, :h * p, :w * p].reshape(B, K, h, p, w, p).permute(0, 2, 4, 1, 3, 5)
                 .reshape(B, h * w, K * p * p))
        weight_CK = self.patch_embedding.weight.reshape(self.patch_embedding.out_channels, -1)
        return F.linear(x_BMK, weight_CK, self.patch_embedding.bias), h, w


def blocked_attention(q_BHND: torch.Tensor, k_BHND: torch.Tensor, v_BHND: torch.Tensor, scale: float,
                      block: int = 128) -> torch.Tensor:
    """softmax(q k^T * scale) v, materialised one block of `block` queries at a time; returns [B, N, H, D].

    The official naive path (spec §2.3) with the scores of one block kept in cache: both products run as batched
    GEMMs in the activation dtype and the softmax is torch's (fp32 inside, rounded to the activation dtype, as
    the official bf16 path rounds). On CPU in bf16 this is about 2.5x faster than torch's flash-attention kernel
    (benchmarks/), whose bf16 path does not reach GEMM speed.
    """
    B, H, N, D = q_BHND.shape
    out_BNHD = q_BHND.new_empty(B, N, H, D)
    # Contiguous operands once per call: a strided operand would be copied by every block's GEMM.
    q_BHND = (q_BHND * scale).contiguous()
    kT_BHDN = k_BHND.contiguous().transpose(-2, -1)
    v_BHND = v_BHND.contiguous()
    for b in range(B):  # one image at a time: a block's scores, [H, block, N], stay in cache
        for i in range(0, N, block):
            scores_HnN = q_BHND[b, :, i:i + block] @ kT_BHDN[b]
            out_BNHD[b, i:i + block] = (scores_HnN.softmax(dim=-1) @ v_BHND[b]).transpose(0, 1)
    return out_BNHD


def _choose_after_load(attention: Attention, incompatible_keys) -> None:
    attention.choose_implementation()


class Attention(nn.Module):
    def __init__(self, config: InternVisionConfig, attn_implementation: str = "auto") -> None:
        super().__init__()
        if attn_implementation not in ATTN_IMPLEMENTATIONS:
            raise ValueError(f"attn_implementation must be one of {ATTN_IMPLEMENTATIONS}, got {attn_implementation!r}")
        C = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.scale = self.head_dim**-0.5
        self.attn_implementation = attn_implementation
        self.attention_dropout = config.attention_dropout
        self.qkv = nn.Linear(C, 3 * C, bias=config.qkv_bias)  # rows [q | k | v], each head-major
        self.qk_normalization = config.qk_normalization
        if self.qk_normalization:  # 6B only: RMSNorm over the full width, before the heads split (spec §1)
            self.q_norm = RMSNorm(C, config.layer_norm_eps)
            self.k_norm = RMSNorm(C, config.layer_norm_eps)
        self.proj = nn.Linear(C, C)
        self.proj_drop = nn.Dropout(config.dropout)
        self.measured: dict[torch.dtype, str] = {}  # CPU inference path per dtype, measured (`set_cpu_plan`)
        self.register_load_state_dict_post_hook(_choose_after_load)
        self.choose_implementation()

    def choose_implementation(self) -> None:
        """The one place the attention path is chosen, into `self.implementation`: at construction, and again
        when the weights change device or dtype (`.to()`, loading with `assign=True`) or the mode changes.
        "auto": on CPU, the path measured fastest for this dtype (`measured`), else the blocked path for
        bf16/fp16 and SDPA for fp32; torch SDPA (flash kernels) on GPU, and whenever attention dropout is active
        in training."""
        w = self.qkv.weight
        impl = self.attn_implementation
        if impl == "auto":
            if (self.training and self.attention_dropout) or w.device.type != "cpu":
                impl = "sdpa"
            else:
                impl = self.measured.get(w.dtype, "blocked" if w.dtype in (torch.bfloat16, torch.float16) else "sdpa")
        self.implementation = impl

    def _apply(self, fn, recurse: bool = True):
        super()._apply(fn, recurse)
        self.choose_implementation()
        return self

    def train(self, mode: bool = True):
        super().train(mode)
        self.choose_implementation()
        return self

    def forward(self, x_BNC: torch.Tensor) -> torch.Tensor:
        B, N, C = x_BNC.shape
        H, D = self.num_heads, self.head_dim
        qkv_BN3C = self.qkv(x_BNC).view(B, N, 3, C)
        if self.qk_normalization:
            q_BNC, k_BNC = self.q_norm(qkv_BN3C[:, :, 0]), self.k_norm(qkv_BN3C[:, :, 1])
            qkv_BN3C = torch.stack([q_BNC, k_BNC, qkv_BN3C[:, :, 2]], dim=2)
        # Views, no copies: [3, B, H, N, D] over the qkv output.
        q_BHND, k_BHND, v_BHND = qkv_BN3C.view(B, N, 3, H, D).permute(2, 0, 3, 1, 4).unbind(0)
        impl = self.implementation
        dropout_p = self.attention_dropout if self.training else 0.0
        if impl == "sdpa":
            o_BNC = F.scaled_dot_product_attention(q_BHND, k_BHND, v_BHND, dropout_p=dropout_p)
            o_BNC = o_BNC.transpose(1, 2).reshape(B, N, C)
        elif impl == "blocked":
            o_BNC = blocked_attention(q_BHND, k_BHND, v_BHND, self.scale).view(B, N, C)
        else:  # "eager", the official naive path: softmax in the activation dtype, no fp32 upcast (spec §2.3)
            attn_BHNN = (q_BHND * self.scale) @ k_BHND.transpose(-2, -1)
            attn_BHNN = F.dropout(attn_BHNN.softmax(dim=-1), p=dropout_p)
            o_BNC = (attn_BHNN @ v_BHND).transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(o_BNC))


class MLP(nn.Module):
    def __init__(self, config: InternVisionConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = nn.GELU()  # exact erf GELU (spec §2.6)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class EncoderLayer(nn.Module):
    def __init__(self, config: InternVisionConfig, drop_path: float, attn_implementation: str = "auto") -> None:
        super().__init__()
        C = config.hidden_size
        self.drop_path = drop_path
        self.attn = Attention(config, attn_implementation)
        self.mlp = MLP(config)
        self.norm1 = make_norm(config, C)
        self.norm2 = make_norm(config, C)
        # torch.full, not factor * ones: see `randn_unless_meta`
        self.ls1 = nn.Parameter(torch.full((C,), config.initializer_factor))
        self.ls2 = nn.Parameter(torch.full((C,), config.initializer_factor))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # `.to(x.dtype)` after the norms matters under autocast (HEAD code, spec §2.5.3).
        if self.training and self.drop_path > 0:
            x = x + drop_path(self.attn(self.norm1(x).to(x.dtype)) * self.ls1, self.drop_path, True)
            return x + drop_path(self.mlp(self.norm2(x).to(x.dtype)) * self.ls2, self.drop_path, True)
        # x + f(x) * ls as one fused op: one pass over the activations (and, in bf16, one rounding instead of two).
        x = torch.addcmul(x, self.attn(self.norm1(x).to(x.dtype)), self.ls1)
        return torch.addcmul(x, self.mlp(self.norm2(x).to(x.dtype)), self.ls2)


class Encoder(nn.Module):
    def __init__(self, config: InternVisionConfig, attn_implementation: str = "auto") -> None:
        super().__init__()
        L = config.num_hidden_layers
        # Plain floats, equal to torch.linspace(0, rate, L) (spec §2.4): safe on the meta device (spec §7.4).
        rates = [config.drop_path_rate * i / (L - 1) if L > 1 else 0.0 for i in range(L)]
        self.layers = nn.ModuleList(EncoderLayer(config, rates[i], attn_implementation) for i in range(L))
        self.gradient_checkpointing = False

    def forward(self, x: torch.Tensor, keep: Collection[int] = (), depth: int | None = None,
                ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Run the first `depth` layers (all by default): their output, and the hidden states at `keep` (indices
        into `hidden_states`: 0 = the input, i = layer i's output)."""
        states = {0: x} if 0 in keep else {}
        for i, layer in enumerate(self.layers[:depth], start=1):
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(layer, x, use_reentrant=False)
            else:
                x = layer(x)
            if i in keep:
                states[i] = x
        return x, states


def layer_indices(indices: Sequence[int], num_hidden_layers: int) -> tuple[int, ...]:
    """The one layer-index convention: indices into `hidden_states` (0 = embeddings, L = last layer), negatives
    counted from the end as in Python (-1 = last = L; InternVL's `select_layer` means the same). Returns them
    non-negative, in order, each once."""
    L = num_hidden_layers
    out = []
    for i in indices:
        j = i + L + 1 if i < 0 else i
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= j <= L:
            raise ValueError(f"layer {i} is out of range for a {L}-layer model (0..{L}, or -{L + 1}..-1)")
        out.append(j)
    return tuple(dict.fromkeys(out))


class InternVisionModel(nn.Module):
    """InternViT encoder. `model(pixel_values).last_hidden_state` is [B, 1 + h*w, C]; [B, 1025, 1024] at 448 px.

    Args:
        config: the architecture (see `internvit.PRESETS` for the 300M, the 6B and a tiny test size).
        attn_implementation: "auto" (default: on CPU the path measured fastest, see `set_cpu_plan`, else SDPA, or
            the blocked path for bf16/fp16 on CPU), "sdpa", "blocked"
            or "eager" (the official naive softmax path, the whole score matrix at once).
    """

    def __init__(self, config: InternVisionConfig, *, attn_implementation: str = "auto") -> None:
        super().__init__()
        self.config = config
        self.embeddings = Embeddings(config)
        self.encoder = Encoder(config, attn_implementation)
        self.cpu_chunks: dict[torch.dtype, int] = {}  # images per CPU inference pass per dtype, measured

    def set_cpu_plan(self, dtype: torch.dtype, *, attention: str | None, chunk: int) -> None:
        """Use `attention` ("sdpa" or "blocked") where attention is "auto", and `chunk` images per pass, for CPU
        inference in `dtype` (what `autotune.tune_torch` measured fastest); None leaves the attention as it is."""
        if attention is not None and attention not in ("sdpa", "blocked"):
            raise ValueError(f"attention must be 'sdpa' or 'blocked', got {attention!r}")
        if chunk < 1:
            raise ValueError(f"chunk must be a positive number of images, got {chunk}")
        self.cpu_chunks[dtype] = chunk
        for layer in self.encoder.layers:
            if attention is not None:
                layer.attn.measured[dtype] = attention
            layer.attn.choose_implementation()

    @property
    def dtype(self) -> torch.dtype:
        return self.embeddings.patch_embedding.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embeddings.patch_embedding.weight.device

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each layer in the backward pass (trades compute for activation memory in training)."""
        self.encoder.gradient_checkpointing = enable

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        *,
        output_hidden_states: bool = False,
        pixel_embeds: torch.Tensor | None = None,
    ) -> InternVisionOutput:
        """Encode images.

        Args:
            pixel_values: normalized images [B, 3, H, W]; H and W are cut down to multiples of the patch size.
                Floating inputs are cast to the weight dtype.
            output_hidden_states: also return the embedding output and every layer's output.
            pixel_embeds: precomputed embeddings [B, N, C] that skip the patch embedding (official argument).
        """
        L = self.config.num_hidden_layers
        last, states = self._run(pixel_values, pixel_embeds, keep=range(L + 1) if output_hidden_states else ())
        return InternVisionOutput(last_hidden_state=last, pooler_output=last[:, 0],
                                  hidden_states=tuple(states[i] for i in range(L + 1)) if output_hidden_states else None)

    def forward_intermediates(self, pixel_values: torch.Tensor, indices: Sequence[int] = (-1,)) -> list[torch.Tensor]:
        """The hidden states at `indices` (see `layer_indices`: 0 = embeddings, -1 = last), computing no layer past
        the deepest one asked for and keeping no other (timm's `forward_intermediates`, dinov2's
        `get_intermediate_layers`). One tensor per index, [B, 1 + h*w, C], as `hidden_states[i]`; an index given
        twice (24 and -1) is computed once."""
        L = self.config.num_hidden_layers
        wanted = layer_indices(indices, L)
        _, states = self._run(pixel_values, None, keep=wanted, depth=max(wanted, default=0))
        return [states[i + L + 1 if i < 0 else i] for i in indices]

    def _run(self, pixel_values, pixel_embeds, *, keep: Collection[int], depth: int | None = None,
             ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        if pixel_embeds is None:
            if pixel_values is None:
                raise ValueError("pass pixel_values [B, 3, H, W] (or pixel_embeds)")
            self._check_pixels(pixel_values)
        inputs = pixel_embeds if pixel_embeds is not None else pixel_values
        B = inputs.shape[0]
        cpu_inference = inputs.device.type == "cpu" and not torch.is_grad_enabled()
        step = self.cpu_chunks.get(self.dtype, CPU_INFERENCE_CHUNK) if cpu_inference else B
        if B <= step:
            return self._run_chunk(pixel_values, pixel_embeds, keep, depth)
        # CPU inference: a few images at a time. GEMMs of <= ~2k rows run ~20% faster here than the 13k rows of
        # a 13-tile batch (benchmarks/), and each image's activations stay in cache; the results are the same.
        # How many is measured per CPU where autotune ran (`set_cpu_plan`).
        parts = [self._run_chunk(None if pixel_values is None else pixel_values[i:i + step],
                                 None if pixel_embeds is None else pixel_embeds[i:i + step], keep, depth)
                 for i in range(0, B, step)]
        return torch.cat([x for x, _ in parts]), {k: torch.cat([s[k] for _, s in parts]) for k in parts[0][1]}

    def _run_chunk(self, pixel_values, pixel_embeds, keep, depth) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        x = pixel_embeds if pixel_embeds is not None else self.embeddings(pixel_values.to(self.dtype))
        return self.encoder(x, keep, depth)

    def _check_pixels(self, pixel_values: torch.Tensor) -> None:
        p = self.config.patch_size
        if pixel_values.ndim != 4 or pixel_values.shape[1] != 3:
            raise ValueError(f"pixel_values must be [B, 3, H, W], got shape {tuple(pixel_values.shape)}")
        if pixel_values.shape[2] < p or pixel_values.shape[3] < p:
            raise ValueError(f"pixel_values of {tuple(pixel_values.shape[2:])} px is smaller than one {p}x{p} patch")
        if not pixel_values.is_floating_point():
            raise TypeError(f"pixel_values must be a floating tensor (normalized pixels), got {pixel_values.dtype}")

    @torch.no_grad()
    def resize_pos_embeddings(self, image_size: int) -> None:
        """Permanently resample the position embeddings for a new native image size (fp32 bicubic, spec §2.2)."""
        config = self.config.replace(image_size=image_size)  # validates before anything changes
        g = config.grid_size
        emb = self.embeddings
        patch = emb._patch_position_embedding(g, g)
        emb.position_embedding = nn.Parameter(torch.cat([emb.position_embedding[:, :1], patch], dim=1))
        emb.grid_size = g
        self.config = config

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """Random weights in the spirit of timm's ViT init, every tensor non-trivial.

        The official code has no init (spec §2.4); this one keeps activations at a realistic scale, and gives
        biases and norm weights random values so that a mis-mapped key cannot hide in tests.
        """
        std = 0.02
        for name, p in self.named_parameters():
            if name.endswith(("ls1", "ls2")):
                p.fill_(self.config.initializer_factor)
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + std * torch.randn(p.shape, generator=generator))
            else:
                p.copy_(std * torch.randn(p.shape, generator=generator))
