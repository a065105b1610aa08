"""Retinal anatomy of a volume: layer lines, the fovea, the ETDRS grid and the retinal thickness.

HRF only exist inside the neurosensory retina, and clinicians read them by where they sit (inner or
outer retina, near the fovea or not), so every lesion is placed between the layer lines and on the
ETDRS grid around the foveal centre.
"""
