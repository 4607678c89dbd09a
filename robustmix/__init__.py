"""robustmix: composable adversarial training for any timm model."""

__version__ = "0.1.0"

from robustmix.anti import AdversarysAdversary, AntiAdversary, adversarys_adversary, anti_adversary
from robustmix.attacks import FGSMAttack, PGDAttack, fgsm_rs, perturb, pgd
from robustmix.awp import AWP, awp_perturbation
from robustmix.bilaw import BiLAWWeightNet, BiLAWWeights
from robustmix.caat import CAATLoss, CAATMetaNet, ClassWiseBudget, ReMarginBudget
from robustmix.callbacks import Callback, CompositionError
from robustmix.context import Stage, StepContext
from robustmix.distributed import sync_buffers
from robustmix.gairat import ScheduledGAIRATWeights, gairat_lambda
from robustmix.labels import AdaLabLabels, LabelSmoothing, OneHotLabels, adalab_lambda, adalab_targets
from robustmix.losses import (
    AdversarialCE,
    MARTLoss,
    TRADESLoss,
    classification_loss,
    mart_loss,
    soft_cross_entropy,
    trades_loss,
)
from robustmix.margins import (
    KappaMargin,
    LogitMargin,
    MultiClassMargin,
    ProbabilityMargin,
    logit_margin,
    multiclass_margin,
    probability_margin,
)
from robustmix.meta import MetaBatches, functional_forward, virtual_sgd_step
from robustmix.runs import load_model
from robustmix.sglr import SGLRLabels
from robustmix.step import AdversarialStep
from robustmix.trainer import NonFiniteError, NonFiniteLossError, Trainer
from robustmix.weights import AdaLabWeights, GAIRATWeights, MAILWeights, MarginWeights, normalize_weights

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
