"""ADA-Lab with Hugging Face's Trainer on the embedded digits, validated with PGD-20 every epoch.

python docs/examples/hf_trainer.py                    # about 3 minutes on 2 CPU cores
python docs/examples/hf_trainer.py --resume           # continue from the last checkpoint
"""

import argparse

from transformers import TrainingArguments

from robustmix import AdaLabLabels, AdversarialCE, AdversarialStep, MAILWeights, PGDAttack, ProbabilityMargin
from robustmix.data import load_dataset
from robustmix.integrations.hf import AdversarialTrainer
from robustmix.models import create_model
from robustmix.stages.anti import AdversarysAdversary


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="test_resnet", help="any timm model name")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--max-steps", type=int, default=-1, help="stop after this many steps (default: the epochs)")
    parser.add_argument("--output-dir", default="runs/hf-adalab-digits")
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --output-dir")
    args = parser.parse_args(argv)

    eps, burn_in = 0.1, args.epochs // 3
    step = AdversarialStep([
        PGDAttack(eps=eps, step_size=0.04, steps=5),                     # x_adv
        AdversarysAdversary(1, eps / 2, burn_in_epochs=burn_in),         # x_aa: one descent step from x_adv
        ProbabilityMargin("adv"),                                        # margin of x_adv
        AdaLabLabels(0.5, 1.0, burn_in_epochs=burn_in),                  # soft label towards p(x_aa)
        MAILWeights(burn_in_epochs=burn_in),                             # low margin, more weight (about 5:1)
        AdversarialCE(),
    ])  # fmt: skip
    training_args = TrainingArguments(
        output_dir=args.output_dir,
        num_train_epochs=args.epochs,
        max_steps=args.max_steps,
        per_device_train_batch_size=128,
        per_device_eval_batch_size=256,
        optim="sgd",
        optim_args="momentum=0.9",
        learning_rate=0.1,
        weight_decay=5e-4,
        lr_scheduler_type="cosine",
        warmup_steps=0.25,                 # a quarter of the steps
        max_grad_norm=0.0,                 # Transformers clips at 1.0 by default; robustmix's recipes do not clip
        remove_unused_columns=False,       # the trainer reads "image", "labels" and "index" itself
        eval_strategy="epoch",
        save_strategy="epoch",
        save_total_limit=2,
        metric_for_best_model="pgd_acc",   # eval_pgd_acc: robust accuracy under PGD-20
        logging_steps=10,
        report_to=[],
        use_cpu=True,
    )  # fmt: skip
    trainer = AdversarialTrainer(
        model=create_model(args.model, num_classes=10, in_chans=1, mean=(0.5,), std=(0.5,)),
        args=training_args,
        train_dataset=load_dataset("digits", "train"),
        eval_dataset=load_dataset("digits", "validation"),
        adversarial_step=step,
    )
    trainer.train(resume_from_checkpoint=args.resume or None)
    return trainer.evaluate()


if __name__ == "__main__":
    print(main())
