"""robustmix: composable adversarial training for any timm model."""

from robustmix.attacks import FGSMAttack, PGDAttack, fgsm_rs, perturb, pgd
from robustmix.core.callbacks import Callback, CompositionError
from robustmix.core.context import Stage, StepContext
from robustmix.core.step import AdversarialStep
from robustmix.methods.awp import AWP, awp_perturbation
from robustmix.methods.bilaw import BiLAWWeightNet, BiLAWWeights
from robustmix.methods.caat import CAATLoss, CAATMetaNet, ClassWiseBudget, ReMarginBudget
from robustmix.methods.gairat import GAIRATWeights, ScheduledGAIRATWeights, gairat_lambda
from robustmix.methods.meta import MetaBatches, functional_forward, virtual_sgd_step
from robustmix.methods.sglr import SGLRLabels
from robustmix.runs.folder import load_model
from robustmix.stages.anti import AdversarysAdversary, AntiAdversary, adversarys_adversary, anti_adversary
from robustmix.stages.labels import AdaLabLabels, LabelSmoothing, OneHotLabels, adalab_lambda, adalab_targets
from robustmix.stages.losses import (
    AdversarialCE,
    MARTLoss,
    TRADESLoss,
    classification_loss,
    mart_loss,
    soft_cross_entropy,
    trades_loss,
)
from robustmix.stages.margins import (
    KappaMargin,
    LogitMargin,
    MultiClassMargin,
    ProbabilityMargin,
    logit_margin,
    multiclass_margin,
    probability_margin,
)
from robustmix.stages.weights import AdaLabWeights, MAILWeights, MarginWeights, normalize_weights
from robustmix.training.distributed import sync_buffers
from robustmix.training.nonfinite import NonFiniteError, NonFiniteLossError
from robustmix.training.trainer import Trainer
from robustmix.version import __version__

__all__ = [
    "AWP",
    "AdaLabLabels",
    "AdaLabWeights",
    "AdversarialCE",
    "AdversarialStep",
    "AdversarysAdversary",
    "AntiAdversary",
    "BiLAWWeightNet",
    "BiLAWWeights",
    "CAATLoss",
    "CAATMetaNet",
    "Callback",
    "ClassWiseBudget",
    "CompositionError",
    "FGSMAttack",
    "GAIRATWeights",
    "KappaMargin",
    "LabelSmoothing",
    "LogitMargin",
    "MAILWeights",
    "MARTLoss",
    "MarginWeights",
    "MetaBatches",
    "MultiClassMargin",
    "NonFiniteError",
    "NonFiniteLossError",
    "OneHotLabels",
    "PGDAttack",
    "ProbabilityMargin",
    "ReMarginBudget",
    "SGLRLabels",
    "ScheduledGAIRATWeights",
    "Stage",
    "StepContext",
    "TRADESLoss",
    "Trainer",
    "__version__",
    "adalab_lambda",
    "adalab_targets",
    "adversarys_adversary",
    "anti_adversary",
    "awp_perturbation",
    "classification_loss",
    "fgsm_rs",
    "functional_forward",
    "gairat_lambda",
    "load_model",
    "logit_margin",
    "mart_loss",
    "multiclass_margin",
    "normalize_weights",
    "perturb",
    "pgd",
    "probability_margin",
    "soft_cross_entropy",
    "sync_buffers",
    "trades_loss",
    "virtual_sgd_step",
]
