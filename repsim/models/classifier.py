"""``build_classifier``: a backbone plus a linear head or the stacked DeiT classifier, frozen or fine-tuned.

Unlike the paper's code the choice is made once, here: a frozen backbone is never re-frozen during ``forward`` (so
partial unfreezing really trains the unfrozen blocks) and parameters a scenario never uses (the final norm and
projection in the stacked scenarios, which read patch tokens) are set not to require gradients, so that after one
backward pass the parameters with gradients are exactly the ones that require them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from repsim import surgery
from repsim.backbone import Backbone
from repsim.types import SCENARIOS


class FoundationClassifier(nn.Module):
    """``backbone`` -> (pooled feature | ``classifier`` on patch tokens) -> ``head`` logits ``(B, num_classes)``."""

    def __init__(self, backbone: Backbone, head: nn.Module, scenario: str, classifier: nn.Module | None) -> None:
        super().__init__()
        self.backbone = backbone
        self.classifier = classifier
        self.head = head
        self.scenario = scenario

    def backbone_output(self, x: torch.Tensor) -> torch.Tensor:
        """What the backbone hands on: its pooled feature (linear head) or its patch tokens (stacked classifier)."""
        return self.backbone.forward_features(x) if self.classifier is None else self.backbone.forward_tokens(x)

    def forward_head(self, backbone_output: torch.Tensor) -> torch.Tensor:
        """Logits from ``backbone_output(x)``: what trains on cached outputs when the backbone is frozen."""
        if self.classifier is None:
            return self.head(backbone_output)
        return self.head(self.classifier(backbone_output))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The feature the head reads: the backbone's pooled feature, or the stacked classifier's CLS."""
        out = self.backbone_output(x)
        return out if self.classifier is None else self.classifier(out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.backbone_output(x))


def build_classifier(
    backbone: Backbone,
    scenario: str,
    num_classes: int,
    *,
    freeze_blocks: int | None = None,
    decapitate: int | None = None,
    classifier_kwargs: dict[str, Any] | None = None,
) -> FoundationClassifier:
    """Wrap ``backbone`` (modified in place) for one of ``SCENARIOS``.

    ``frozen-*``: the whole backbone is frozen.  ``unfrozen-*``: it trains, except the first ``freeze_blocks``
    blocks and what precedes them when given.  ``decapitate=k`` first keeps only the first ``k`` blocks.
    ``*-linear`` puts a ``LinearHead`` on the pooled feature; ``*-stacked`` feeds the patch tokens of the last kept
    block to a ``StackedClassifier`` (``classifier_kwargs`` go to it, e.g. ``pretrained=True``) and a linear head
    on its CLS.
    """
    if scenario not in SCENARIOS:
        raise ValueError(f"unknown scenario {scenario!r}; expected one of {', '.join(SCENARIOS)}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    mode, kind = scenario.split("-")
    if mode == "frozen" and freeze_blocks is not None:
        raise ValueError(f"freeze_blocks={freeze_blocks} needs an unfrozen-* scenario; {scenario} freezes everything")
    if decapitate is not None:
        surgery.decapitate(backbone, decapitate)
    surgery.freeze(backbone, "all" if mode == "frozen" else ("none" if freeze_blocks is None else freeze_blocks))
    unused = backbone.unused_parameter_names(tokens_only=kind == "stacked")
    for name, param in backbone.named_parameters():
        if name in unused:
            param.requires_grad_(False)
    backbone.train(backbone.training)
    if kind == "stacked":
        classifier = surgery.StackedClassifier(backbone.embed_dim, **(classifier_kwargs or {}))
        head = surgery.LinearHead(classifier.num_features, num_classes)
    else:
        if classifier_kwargs:
            raise ValueError(f"classifier_kwargs are for the stacked scenarios, not {scenario}")
        classifier = None
        head = surgery.LinearHead(backbone.num_features, num_classes)
    return FoundationClassifier(backbone, head, scenario, classifier)
