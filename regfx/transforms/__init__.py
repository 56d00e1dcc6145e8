"""One module per regularizer family. Each exposes a pure ``plan_*`` and a mutating ``apply_*``.

The registry is the explicit tuple :data:`FAMILIES`, in the order ``apply`` runs them (norms
before dropout, so a normalized layer's class is settled before forwards are regenerated).
"""

from regfx.transforms import dropout, norms, penalty

FAMILIES = (norms, dropout, penalty)

__all__ = ["FAMILIES", "dropout", "norms", "penalty"]
