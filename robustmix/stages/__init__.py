"""Callback kinds by stage of the step, shared by several methods: anti-adversary generators, margin estimators,
label refiners, loss reweighters and losses. Attack generators have their own package, ``robustmix.attacks``."""
