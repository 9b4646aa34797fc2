"""Physics terms that a local model cannot see: Ewald sums of point and latent charges.

Importing this package registers the long-range terms selectable from the config.
"""

from mlip.physics.latent_ewald import LatentEwald

__all__ = ["LatentEwald"]
