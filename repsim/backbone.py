"""The uniform ``Backbone`` interface and the checkpoint/position-embedding plumbing every zoo adapter shares.

A backbone is seen as ``embed -> blocks[0] -> ... -> blocks[-1] -> pool``: parameters fall in three groups, *before*
the blocks (patch embedding, position embeddings, stem), *in* a block, and *after* the blocks (final norm, projection:
used only by the pooled feature).  Freezing, decapitation and the scenario gradient checks are defined on that split.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed, resample_abs_pos_embed_nhwc
from timm.models import adapt_input_conv
from torch import nn

from repsim.files import load_torch
from repsim.inputs import IMAGENET_MEAN, IMAGENET_STD

# containers that checkpoints commonly wrap a state dict in (timm/DeiT/BLIP: "model", Lightning: "state_dict")
_WRAPPER_KEYS = ("state_dict", "model", "module", "model_state")


class Backbone(nn.Module):
    """A feature extractor with an ordered list of blocks, patch tokens after any block and one pooled feature.

    Subclasses wrap one library model and implement ``_tokens_after`` (raw output of block ``i`` as ``(B, N, C)``
    patch tokens, prefix tokens removed, no final norm), ``_pooled`` (the paper's pooled feature) and ``_keep_blocks``
    (keep the first ``k`` blocks, through the library's own pruning where it has one).
    """

    name: str = ""
    source: str = ""  # library that implements the model
    native_img_size: int = 224  # resolution the official weights were trained at
    num_prefix_tokens: int = 0
    # pooling convention in words, for the zoo table
    pooling: str = ""
    # per-channel input normalisation the model's weights expect (ImageNet's unless the weights say otherwise)
    input_mean: tuple[float, ...] = IMAGENET_MEAN
    input_std: tuple[float, ...] = IMAGENET_STD
    normalisation_source: str = "ImageNet statistics (no config says otherwise)"
    # set by repsim.train.runs.load_run: the run folder and its split.json (the images it trained on and held out)
    run_dir: str | None = None
    heldout: dict[str, Any] | None = None
    # True when the official checkpoint format uses this module's own names plus others (always converted)
    _official_shares_names: bool = False

    def __init__(self, *, img_size: int, in_chans: int) -> None:
        super().__init__()
        self.img_size = img_size
        self.in_chans = in_chans
        self._block_names: list[str] = []  # dotted names in self.named_modules(), one per block, in order
        self.embed_dim = 0  # channels of the tokens after the last kept block
        self.num_features = 0  # dimension of forward_features

    # ----- blocks ---------------------------------------------------------------------------------------------
    @property
    def blocks(self) -> list[nn.Module]:
        """The block modules in forward order (a fresh list: edit the model through ``repsim.surgery``)."""
        return [self.get_submodule(n) for n in self._block_names]

    @property
    def num_blocks(self) -> int:
        return len(self._block_names)

    def layer_names(self) -> list[str]:
        """Names of the blocks in ``self.named_modules()``, one per block: the layer list ``repsim.capture`` takes."""
        return list(self._block_names)

    def _check_block_index(self, upto: int | None) -> int:
        if upto is None:
            return self.num_blocks - 1
        if not isinstance(upto, int) or not -self.num_blocks <= upto < self.num_blocks:
            raise ValueError(f"{self.name}: upto={upto!r} is not a block index of its {self.num_blocks} blocks")
        return upto % self.num_blocks

    # ----- forward --------------------------------------------------------------------------------------------
    def forward_tokens(self, x: torch.Tensor, upto: int | None = None) -> torch.Tensor:
        """Patch tokens ``(B, N, C)`` output by block ``upto`` (default: the last), before any final norm."""
        return self._tokens_after(x, self._check_block_index(upto))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The pooled feature ``(B, num_features)`` by the paper's convention for this model (see ``pooling``)."""
        return self._pooled(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)

    def _tokens_after(self, x: torch.Tensor, index: int) -> torch.Tensor:
        raise NotImplementedError

    def _pooled(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _keep_blocks(self, k: int) -> None:
        raise NotImplementedError

    def keep_blocks(self, k: int) -> None:
        """Keep the first ``k`` blocks (``1 <= k <= num_blocks``; decapitation, ``repsim.surgery.decapitate``); the
        pooled feature then pools block ``k-1``."""
        if not isinstance(k, int) or not 1 <= k <= self.num_blocks:
            raise ValueError(
                f"{self.name}: cannot keep {k!r} blocks, it has {self.num_blocks} (need 1..{self.num_blocks})"
            )
        self._keep_blocks(k)
        self._block_names = self._block_names[:k]

    def truncate(self, k: int) -> None:
        """Deprecated name of ``keep_blocks`` (it keeps the first blocks; it goes in the next release)."""
        warnings.warn("Backbone.truncate is deprecated and will be removed in the next release; use keep_blocks",
                      DeprecationWarning, stacklevel=2)
        self.keep_blocks(k)

    # ----- parameter groups -----------------------------------------------------------------------------------
    def _pooling_prefixes(self) -> tuple[str, ...]:
        """Name prefixes of the parameters used only after the last block (final norm, projection)."""
        return ()

    def parameter_groups(self) -> tuple[list[str], list[list[str]], list[str]]:
        """Parameter names split into (before the blocks, per block, after the blocks)."""
        per_block: list[list[str]] = [[] for _ in self._block_names]
        before: list[str] = []
        after: list[str] = []
        prefixes = [n + "." for n in self._block_names]
        pooling = self._pooling_prefixes()
        for name, _ in self.named_parameters():
            idx = next((i for i, p in enumerate(prefixes) if name.startswith(p)), None)
            if idx is not None:
                per_block[idx].append(name)
            elif name.startswith(pooling):
                after.append(name)
            else:
                before.append(name)
        return before, per_block, after

    def unused_parameter_names(self, *, tokens_only: bool = False) -> set[str]:
        """Parameters the forward never touches (``tokens_only``: the forward_tokens path, so the pooling group too)."""
        return set(self.parameter_groups()[2]) if tokens_only else set()

    def train(self, mode: bool = True) -> Backbone:
        """Set train/eval mode, keeping every fully frozen sub-module in eval mode (no BN statistics, no dropout)."""
        super().train(mode)
        if mode:
            _eval_frozen(self)
        return self

    # ----- checkpoints ----------------------------------------------------------------------------------------
    def _convert_official(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Map an official checkpoint of this model to this module's names (default: no official format)."""
        return state

    def _resize_rules(self) -> dict[str, str]:
        """``{parameter name: kind}`` for parameters that are resampled when a checkpoint's grid differs.

        Kinds: ``"abs"`` (``(1, prefix+H*W, C)``), ``"abs2d"`` (``(prefix+H*W, C)``), ``"nhwc"`` (``(1, H, W, C)``),
        ``"rel"`` (a ``(2S-1, C)`` relative-position table), ``"conv_in"`` (a patch/stem kernel folded to ``in_chans``).
        """
        return {}

    def load_checkpoint(self, path: str | Path) -> None:
        """Load a local file: a plain ``state_dict()`` of this backbone (as saved by repsim) or the official format.

        Position embeddings are resampled to this model's grid and an RGB patch kernel is folded to ``in_chans``;
        any other mismatch raises ``ValueError`` listing the missing and unexpected keys.
        """
        self.load_state(read_state_dict(path), source=str(path))

    def load_state(self, state: Mapping[str, torch.Tensor], *, source: str) -> None:
        """Load a state dict in this backbone's names or the official format (``source`` names it in errors)."""
        own = self.state_dict()
        state = dict(state)
        if self._official_shares_names or not any(k in own for k in state):
            state = self._convert_official(state)
        state = self._adapt_shapes(state, own, source)
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        if missing or unexpected:
            hint = ""
            if missing and all(any(m.startswith(b + ".") for b in self._block_names) for m in missing):
                hint = " (only block keys are missing: was it saved after decapitate()? decapitate this model first)"
            raise ValueError(
                f"checkpoint {source} does not fit {self.name}: missing keys {_short(missing)}, "
                f"unexpected keys {_short(unexpected)}{hint}"
            )
        self.load_state_dict(state, strict=True)

    def _adapt_shapes(self, state: dict[str, torch.Tensor], own: Mapping[str, torch.Tensor], path: str) -> dict:
        rules = self._resize_rules()
        out = {}
        for key, value in state.items():
            target = own.get(key)
            if target is not None and value.shape != target.shape:
                kind = rules.get(key)
                if kind is None:
                    raise ValueError(
                        f"checkpoint {path}: {key} has shape {tuple(value.shape)}, {self.name} expects "
                        f"{tuple(target.shape)} and this parameter is not resizable"
                    )
                value = resize_param(value, tuple(target.shape), kind, self.num_prefix_tokens)
            out[key] = value
        return out


def _eval_frozen(module: nn.Module) -> None:
    params = list(module.parameters())
    if params and not any(p.requires_grad for p in params):
        module.eval()
        return
    for child in module.children():
        _eval_frozen(child)


def _short(names: Sequence[str], n: int = 8) -> str:
    shown = ", ".join(names[:n])
    return f"[{shown}{f', ... {len(names) - n} more' if len(names) > n else ''}]"


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict safely (``weights_only`` / safetensors), unwrapping the usual containers and ``module.``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    state: Any
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = load_torch(path)
    while isinstance(state, Mapping):
        inner = next((state[k] for k in _WRAPPER_KEYS if isinstance(state.get(k), Mapping)), None)
        if inner is None:
            break
        state = inner
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors")
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return dict(state)


def resize_param(value: torch.Tensor, shape: tuple[int, ...], kind: str, num_prefix_tokens: int) -> torch.Tensor:
    """Resample a position embedding / relative table to ``shape`` or fold a patch kernel's input channels."""
    if kind == "conv_in":
        if value.shape[0] != shape[0] or value.shape[2:] != shape[2:]:
            raise ValueError(f"patch kernel {tuple(value.shape)} cannot be folded to {shape}")
        return adapt_input_conv(shape[1], value)
    if kind in ("abs", "abs2d"):
        squeeze = kind == "abs2d"
        pe = value[None] if squeeze else value
        out = resample_abs_pos_embed(
            pe, new_size=_square_grid(shape[-2] - num_prefix_tokens), num_prefix_tokens=num_prefix_tokens
        )
        return out[0] if squeeze else out
    if kind == "nhwc":
        return resample_abs_pos_embed_nhwc(value, new_size=list(shape[1:3]))
    if kind == "rel":
        return F.interpolate(value.T[None], size=shape[0], mode="linear", align_corners=False)[0].T.contiguous()
    raise ValueError(f"unknown resize kind {kind!r}")


def _square_grid(n: int) -> list[int]:
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"{n} position embeddings do not form a square grid")
    return [side, side]


def fold_input_conv(conv: nn.Conv2d, in_chans: int) -> nn.Conv2d:
    """A copy of ``conv`` taking ``in_chans`` channels, its kernel folded by timm's rule (summed RGB for 1 channel)."""
    new = nn.Conv2d(
        # torch declares the stored sizes as tuple[int, ...], its __init__ takes int | tuple[int, int]
        in_chans, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,  # type: ignore[arg-type]
        conv.groups, bias=conv.bias is not None,
    )
    with torch.no_grad():
        new.weight.copy_(adapt_input_conv(in_chans, conv.weight))
        if conv.bias is not None and new.bias is not None:
            new.bias.copy_(conv.bias)
    return new
