"""ShapesWorld: a CPU-scale synthetic world with ground truth.

Flat-coloured shapes on a white 64 px canvas, placed on the 8 px token grid of a tiny
Janus (8 x 8 visual tokens), with an English grammar that both writes and parses the
world's prompts, and a ground-truth evaluator that grades any image against a prompt.

- :mod:`ospo.shapes.world`     scene specifications, deterministic sampling, rendering, masks
- :mod:`ospo.shapes.grammar`   scene -> English, English -> scene, seed examples, held-out set
- :mod:`ospo.shapes.evaluate`  image + scene -> correct / per-requirement details; eval CLI

Categories covered (OSPO sec. 3.3 names): color, shape, spatial_2d, numeracy, complex.
Not covered: texture, spatial_3d, non_spatial (see :data:`ospo.shapes.grammar.NOT_COVERED`).
"""
