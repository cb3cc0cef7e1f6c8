"""``python -m models``: parameters, FLOPs per 32x32 image and final feature-map size of every model."""

from models import MODEL_NAMES, build_model, model_stats


def main():
    print("| Model | Parameters | GFLOPs / 32x32 image | Final feature map |")
    print("|---|---|---|---|")
    for name in MODEL_NAMES:
        stats = model_stats(build_model(name, 2 if name == "selector" else 10))
        print(f"| {name} | {stats['params'] / 1e6:.2f} M | {stats['flops'] / 1e9:.3f} | {stats['feature_map']} |")


if __name__ == "__main__":
    main()
