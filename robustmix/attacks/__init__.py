"""Attack generators: pure functions (``perturb``, ``pgd``, ``fgsm_rs``) and callbacks."""

from robustmix.attacks.apgd import apgd, apgd_targeted
from robustmix.attacks.callbacks import FGSMAttack, PGDAttack
from robustmix.attacks.fab import fab_targeted
from robustmix.attacks.objectives import OBJECTIVES, cross_entropy, cw_margin, dlr, kl_divergence, targeted_dlr
from robustmix.attacks.pgd import fgsm_rs, perturb, pgd, project, random_start
from robustmix.attacks.square import square_attack

__all__ = [
    "OBJECTIVES",
    "FGSMAttack",
    "PGDAttack",
    "apgd",
    "apgd_targeted",
    "cross_entropy",
    "cw_margin",
    "dlr",
    "fab_targeted",
    "fgsm_rs",
    "kl_divergence",
    "perturb",
    "pgd",
    "project",
    "random_start",
    "square_attack",
    "targeted_dlr",
]
