"""robustmix: composable adversarial training for any timm model."""

__version__ = "0.1.0"

from robustmix.anti import AdversarysAdversary, AntiAdversary, adversarys_adversary, anti_adversary
from robustmix.attacks import FGSMAttack, PGDAttack, fgsm_rs, perturb, pgd
from robustmix.callbacks import Callback, CompositionError
from robustmix.context import Stage, StepContext
from robustmix.distributed import sync_buffers
from robustmix.labels import AdaLabLabels, LabelSmoothing, OneHotLabels, adalab_lambda, adalab_targets
from robustmix.losses import AdversarialCE, classification_loss, soft_cross_entropy
from robustmix.margins import (
    KappaMargin,
    LogitMargin,
    MultiClassMargin,
    ProbabilityMargin,
    logit_margin,
    multiclass_margin,
    probability_margin,
)
from robustmix.step import AdversarialStep
from robustmix.weights import AdaLabWeights, GAIRATWeights, MAILWeights, MarginWeights, normalize_weights

__all__ = [
    "AdaLabLabels",
    "AdaLabWeights",
    "AdversarialCE",
    "AdversarialStep",
    "AdversarysAdversary",
    "AntiAdversary",
    "Callback",
    "CompositionError",
    "FGSMAttack",
    "GAIRATWeights",
    "KappaMargin",
    "LabelSmoothing",
    "LogitMargin",
    "MAILWeights",
    "MarginWeights",
    "MultiClassMargin",
    "OneHotLabels",
    "PGDAttack",
    "ProbabilityMargin",
    "Stage",
    "StepContext",
    "__version__",
    "adalab_lambda",
    "adalab_targets",
    "adversarys_adversary",
    "anti_adversary",
    "classification_loss",
    "fgsm_rs",
    "logit_margin",
    "multiclass_margin",
    "normalize_weights",
    "perturb",
    "pgd",
    "probability_margin",
    "soft_cross_entropy",
    "sync_buffers",
]
