"""The paper's model zoo behind one ``Backbone`` API, plus the classifiers built on it.

``create(name)`` builds a zoo model (``available()`` lists them) or any timm model; ``build_classifier`` adds a
linear head or the paper's stacked DeiT classifier in one of the four frozen/unfrozen scenarios.
"""

from repsim.backbone import Backbone
from repsim.models.classifier import SCENARIOS, FoundationClassifier, build_classifier
from repsim.models.zoo import ZOO, ZooInfo, available, check_name, create

__all__ = ["SCENARIOS", "ZOO", "Backbone", "FoundationClassifier", "ZooInfo", "available", "build_classifier",
           "check_name", "create"]
