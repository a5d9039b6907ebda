"""Encoders, heads and the multi-tower model. `VARIANTS` lists every named encoder; `build_encoder` builds one.

Each variant declares its modality and input contract (models/contracts.py); data code reads the contract
instead of repeating frame counts, sizes, mel settings or vocabularies. `*_tiny` variants are a few channels
wide, for CPU tests and the quickstart. Nothing here imports pipeline/, eval/ or launch/.

The variant table is models/variants.py and is imported on first use (`from models import VARIANTS`), so that
`models.contracts` (the input contracts and the pad id, which the dataset format shares) imports without torch:
data preparation reads them too.
"""

from __future__ import annotations

PUBLIC = ("VARIANTS", "Variant", "build_encoder", "variant_contract")


def __getattr__(name: str):
    if name in PUBLIC:
        from models import variants

        return getattr(variants, name)
    raise AttributeError(f"module 'models' has no attribute {name!r}")


__all__ = list(PUBLIC)
