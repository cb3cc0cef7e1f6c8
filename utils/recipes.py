"""Each network's training recipe: the defaults of every training flag, in one place.

``reproduce.py --preset full`` trains every network with its recipe and no extra flags, so the
README's table follows from this file. A flag given on the command line overrides its entry.
The values are reasoned from published CIFAR-10 recipes (SGD with Nesterov momentum, batch 512,
4-pixel translation with reflect padding and flips, 12-pixel Cutout, label smoothing 0.1); the
epochs follow from the time budget of one GPU session. They have not yet been tuned on the
hold-out split of this repository's data (docs/results.md, "Recipe ablation", has the commands
that do it).

``python -m utils.recipes`` prints them as a table.
"""

TEACHER = "resnet50"
STUDENTS = {"1": "densenet121", "2": "googlenet"}  # StudentTrain.py --model 1 | 2, in this order everywhere
WARMUP_EPOCHS = 2.0  # linear warm-up of the learning rate, unless --warmup-epochs says otherwise

COMMON = {
    "batch_size": 512,       # images per step, over all GPUs
    "lr": 0.2,               # peak learning rate per batch of 512 (scaled linearly with the batch)
    "schedule": "cosine",    # after the warm-up: cosine or linear decay to 0
    "weight_decay": 5e-4,    # L2, not on biases and BatchNorm
    "label_smoothing": 0.1,
    "ema": 0.0,              # decay of the weight EMA; 0: off
    "translate": 4,          # pixels of random translation (with a random flip)
    "padding": "reflect",    # what the translation shows at the border: reflect or zeros
    "cutout": 12,            # side of the Cutout square in pixels; 0: off
    "mix": "none",           # CutMix / MixUp: none, cutmix, mixup or both
    "mix_alpha": 1.0,        # Beta(alpha, alpha) of the mixing weight
    "mix_prob": 1.0,         # share of batches mixed
    "tta": "none",           # evaluation views: none, flip or flip-shift (2 and 6 forward passes)
}

RECIPES = {
    "resnet50": {**COMMON, "epochs": 60},
    "resnet18": {**COMMON, "epochs": 60},
    "densenet121": {**COMMON, "epochs": 40},
    "googlenet": {**COMMON, "epochs": 40},
    "googlenet32": {**COMMON, "epochs": 40},
    # The selector trains on images the students were judged on: no augmentation, no label smoothing (no flags).
    "selector": {key: COMMON[key] for key in ("batch_size", "schedule", "weight_decay", "ema", "tta")}
    | {"lr": 0.1, "epochs": 30},
}


def apply_recipe(args, arch):
    """Fill every training flag left at ``None`` with ``arch``'s recipe; returns ``args``."""
    flags = vars(args)
    for key, value in RECIPES[arch].items():
        if key in flags and flags[key] is None:
            flags[key] = value
    return args


def recipe_values(key, archs=tuple(RECIPES)):
    """``{arch: the recipe's value of key, as text}``; ``—`` where the network has no such flag."""
    return {arch: _text(RECIPES[arch].get(key, "—")) for arch in archs}


def _text(value):
    return f"{value:g}" if isinstance(value, float) else str(value)


def main(argv=None):
    from utils.cli import make_parser  # only here: the recipes themselves are plain data, importing nothing

    make_parser("Every network's recipe, the defaults of its training flags, as a markdown table.",
                "python -m utils.recipes").parse_args(argv)  # no flags: --help says what it prints
    keys = list(RECIPES["resnet50"])
    print("| Flag | " + " | ".join(RECIPES) + " |")
    print("|---|" + "---|" * len(RECIPES))
    for key in keys:
        print(f"| --{key.replace('_', '-')} | " + " | ".join(recipe_values(key).values()) + " |")


if __name__ == "__main__":
    from utils.cli import run

    run(main)
