"""Parameter count, forward FLOPs and final feature-map size of a model on 32x32 images."""

import torch
from torch.utils.flop_counter import FlopCounterMode


@torch.no_grad()
def model_stats(model, image_size=32):
    """Return ``{"params", "flops", "feature_map"}`` for one ``3 x image_size^2`` image.

    FLOPs are what ``torch.utils.flop_counter`` counts (a multiply-add is 2 FLOPs) over the
    whole forward: a pretrained model's resize to 224x224 happens inside it, so they count the
    224x224 network. ``feature_map`` is the spatial size of the last activation before global pooling.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    x = torch.zeros(1, 3, image_size, image_size, device=device)
    spatial = []

    def record(_module, _inputs, out):
        if out.dim() == 4:
            spatial.append(tuple(out.shape[-2:]))

    hooks = [m.register_forward_hook(record) for m in model.modules() if not list(m.children())]
    try:
        with FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    last = next((s for s in reversed(spatial) if s != (1, 1)), None)
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "flops": counter.get_total_flops(),
        "feature_map": f"{last[0]}x{last[1]}" if last else "1x1",
    }
