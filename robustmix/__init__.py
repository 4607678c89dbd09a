"""robustmix: composable adversarial training for any timm model."""

__version__ = "0.1.0"

from robustmix.attacks import FGSMAttack, PGDAttack, fgsm_rs, perturb, pgd
from robustmix.callbacks import Callback, CompositionError
from robustmix.context import Stage, StepContext
from robustmix.distributed import sync_buffers
from robustmix.losses import AdversarialCE, classification_loss, soft_cross_entropy
from robustmix.step import AdversarialStep

__all__ = [
    "AdversarialCE",
    "AdversarialStep",
    "Callback",
    "CompositionError",
    "FGSMAttack",
    "PGDAttack",
    "Stage",
    "StepContext",
    "__version__",
    "classification_loss",
    "fgsm_rs",
    "perturb",
    "pgd",
    "soft_cross_entropy",
    "sync_buffers",
]
