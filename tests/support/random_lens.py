"""A tuned lens with random translators, for tests that need a lens unlike the logit lens."""

import torch

from lenslab import ModelView, TunedLens


def random_tuned_lens(view: ModelView, seed: int = 0) -> TunedLens:
    """A tuned lens with random translators, unlike the logit lens at every position but the last."""
    lens = TunedLens.from_model(view)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for translator in lens.translators:
            translator.weight.copy_(0.2 * torch.randn(translator.weight.shape, generator=generator))
            translator.bias.copy_(0.5 * torch.randn(translator.bias.shape, generator=generator))
    return lens
